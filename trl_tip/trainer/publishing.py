"""Publishing of `TIPGKDTrainer`: trl-tip's model card, `push_to_hub` with the quadrant-statistics dataset, and the
run's recipe as `trl-tip train --config` YAML."""

from __future__ import annotations

import os

from trl.trainer.utils import get_config_model_id

from ..core.selectors import QuadrantSelector, promises_count, selector_name
from .selector_contract import recipe_for_selector
from .tip_config import field_default, fields_in_groups


class PublishingMixin:
    """Model card and Hub push of [`TIPGKDTrainer`]; a mixin over TRL's `DistillationTrainer`."""

    def create_model_card(
        self, model_name: str | None = None, dataset_name: str | None = None, tags=None, output_dir: str | None = None
    ):
        """
        Writes `README.md` (and `quadrants.png`) to `output_dir` (default `args.output_dir`): trl-tip's card from
        `model_cards/student.md.j2`, with the teacher, selector, loss, quadrant tables and training settings. TRL's own
        template lookup only sees TRL's folder, hence the override. Extra `tags` are ignored: the card carries
        trl-tip's own. A `model_name` or `dataset_name` given once is kept by the cards written after it (each
        `save_model` writes one, so a run saved without a checkpoint still has its card).
        """
        if not self.is_world_process_zero():
            return
        from ..hub.model_card import write_student_card
        from ..hub.plots import plot_quadrants
        from ..models import hub_model_id, model_license

        names = getattr(self, "_card_names", {})
        model_name = names["model_name"] = model_name or names.get("model_name")
        dataset_name = names["dataset_name"] = dataset_name or names.get("dataset_name")
        self._card_names = names
        output_dir = output_dir or self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        plot = None
        if self.quadrant_tracker.steps:
            plot_quadrants(self.quadrant_tracker, os.path.join(output_dir, "quadrants.png"))
            plot = "quadrants.png"
        student_id = get_config_model_id(self.model.config)
        teacher_label = _model_label(self.accelerator.unwrap_model(self.teacher_model).config)
        if self.args.teacher_model_kind is not None:
            teacher_label = (
                f"{_model_label(self.model.config)} itself (self-distillation, `teacher_model_kind="
                f'"{self.args.teacher_model_kind}"`), reading `{self.args.teacher_prompt_template!r}`'
            )
        selector = self.token_selector
        ratio = getattr(selector, "ratio", None)
        write_student_card(
            output_dir,
            self.quadrant_tracker,
            model_name=model_name or os.path.basename(os.path.normpath(output_dir)),
            base_model=hub_model_id(student_id) if student_id else None,
            license=model_license(student_id) if student_id else None,
            datasets=[dataset_name] if dataset_name else [],
            teacher=teacher_label,
            student=_model_label(self.model.config),
            selector=getattr(selector, "name", getattr(selector, "__name__", type(selector).__name__)),
            selector_kwargs=self.args.token_selector_kwargs,
            ratio_text=self._ratio_text(ratio),
            beta=self.args.beta_schedule or self.args.beta,
            temperature=self.args.temperature,
            normalization=(
                "the number of selected tokens" if self.args.loss_normalization == "selected" else "all valid tokens"
            )
            + self._weighting_text(),
            training_data=dataset_name or "the trainer's prompt dataset",
            steps=self.state.global_step,
            learning_rate=self.args.learning_rate,
            plot=plot,
            evaluation=getattr(self, "benchmark_results", None) or [],
            recipe=recipe_for_selector(self._recipe_yaml(), self.token_selector),
            recipe_language="yaml",
            stats_dataset=self.tip_stats_dataset_id if self.args.push_to_hub else None,
        )

    @property
    def tip_stats_dataset_id(self) -> str | None:
        """Where `push_to_hub` puts the quadrant statistics: `hub_stats_dataset_id`, else
        `<hub_model_id>-tip-stats`."""
        from ..hub.push import _same_namespace, default_stats_id

        model_id = self.hub_model_id or self.args.hub_model_id
        if model_id is None:
            return self.args.hub_stats_dataset_id
        return _same_namespace(self.args.hub_stats_dataset_id or default_stats_id(model_id), model_id)

    def push_to_hub(
        self,
        commit_message: str | None = "End of training",
        blocking: bool = True,
        token=None,
        revision: str | None = None,
        **kwargs,
    ):
        """
        Pushes the student with transformers' `Trainer.push_to_hub` (model, tokenizer, trl-tip's model card linking
        the statistics dataset), then the quadrant statistics as the dataset `tip_stats_dataset_id` (configs `steps`
        and `histogram`, the plot, a card linking back). Hub calls are retried on 5xx and timeouts; if the push still
        fails, `trl-tip push <output_dir> --model-id ...` completes it from the saved run.
        """
        from ..hub.push import ensure_branch, push_stats_dataset, require_token, with_retries

        token = require_token(token or self.args.hub_token)
        if revision and self.is_world_process_zero():
            from huggingface_hub import HfApi

            if self.hub_model_id is None:
                self.init_hf_repo(token=token)
            ensure_branch(HfApi(token=token), self.hub_model_id, revision)
        commit = with_retries(
            lambda: super(PublishingMixin, self).push_to_hub(
                commit_message=commit_message, blocking=True, token=token, revision=revision, **kwargs
            ),
            "Pushing the student",
        )
        if self.is_world_process_zero():
            push_stats_dataset(
                self.args.output_dir,
                self.tip_stats_dataset_id,
                self.hub_model_id,
                token=token,
                private=bool(self.args.hub_private_repo),
                revision=revision,
            )
        return commit

    def _weighting_text(self) -> str:
        args = self.args
        if args.problem_weighting != "paced":
            return ""
        return (
            f"; each problem's rollouts weighted by PACED's p^{args.paced_alpha:g} (1 - p)^{args.paced_beta:g} of the "
            f"student's pass rate p over its {args.num_rollouts_per_prompt} rollouts"
        )

    def _ratio_text(self, ratio: float | None) -> str:
        """The kept share for the card: fixed, or the schedule that moved it and where it ended; for a selector whose
        kept count depends on the statistics (`quadrant`, a custom rule), the share it kept, measured."""
        from ..hub.model_card import measured_kept_text, quadrant_rule_text

        selector = self.token_selector
        if isinstance(selector, QuadrantSelector):
            return measured_kept_text(quadrant_rule_text(selector.quadrants, selector.ratio), self.quadrant_tracker)
        if ratio is None or not promises_count(selector):
            return measured_kept_text(f"a custom rule (`{selector_name(selector)}`)", self.quadrant_tracker)
        args = self.args
        schedule = args.selection_ratio_schedule
        if schedule == "constant":
            return f"{100 * ratio:g}% of each rollout's valid tokens"
        if schedule == "adaptive":
            return (
                f"adaptive (LATF) between {100 * args.selection_ratio:g}% and 100% of each rollout's valid tokens, "
                f"from {100 * args.selection_ratio_start:g}%, {100 * ratio:.3g}% at the end"
            )
        return (
            f"{schedule} from {100 * args.selection_ratio_start:g}% to {100 * args.selection_ratio:g}% of each "
            f"rollout's valid tokens over {100 * args.selection_ratio_decay_fraction:g}% of training"
        )

    def _recipe_yaml(self) -> str:
        """The settings that define the run, as a `trl-tip train --config` YAML."""
        import yaml

        args = self.args
        fields = (
            "teacher_model_name_or_path",
            "token_selector",
            "token_selector_kwargs",
            "selection_ratio",
            "selection_scope",
            "loss_normalization",
            "beta",
            "temperature",
            "lmbda",
            "num_rollouts_per_prompt",
            "learning_rate",
            "lr_scheduler_type",
            "per_device_train_batch_size",
            "gradient_accumulation_steps",
            "max_completion_length",
            "max_steps",
            "num_train_epochs",
            "seed",
        )
        recipe = {"model_name_or_path": _recipe_model(get_config_model_id(self.model.config), self.model.config)}
        for name in fields:
            value = getattr(args, name, None)
            if value is not None:
                # Enums (e.g. the scheduler type) are written as their plain values, as a recipe spells them.
                recipe[name] = getattr(value, "value", value)
        # Schedules and problem weighting only when a run uses them: a TIP run's recipe stays as short as TIP's.
        for name in fields_in_groups("schedules", "weighting"):
            if getattr(args, name) != field_default(name):
                recipe[name] = getattr(args, name)
        if args.teacher_model_kind is not None:
            recipe.pop("teacher_model_name_or_path", None)
            for name in fields_in_groups("self_distillation"):
                if name == "teacher_model_kind" or getattr(args, name) != field_default(name):
                    recipe[name] = getattr(args, name)
            return yaml.safe_dump(recipe, sort_keys=False).strip()
        teacher_config = self.accelerator.unwrap_model(self.teacher_model).config
        recipe["teacher_model_name_or_path"] = _recipe_model(
            recipe.get("teacher_model_name_or_path") or get_config_model_id(teacher_config), teacher_config
        )
        return yaml.safe_dump(recipe, sort_keys=False).strip()


def _model_label(config) -> str:
    """How the card names a model: by `model_name` (a Hub id, or a local folder's base name marked as local, never
    its path), or by its architecture when it was built in memory and has neither."""
    from ..models import model_name

    model_id = get_config_model_id(config)
    return model_name(model_id) if model_id else f"{config.model_type} model built in memory"


def _recipe_model(name_or_path: str | None, config) -> str:
    """A model as the card's recipe names it: a Hub id as it is, a local folder by its base name (the card is meant
    to be published; the reader points it at their copy), or its architecture when it was built in memory."""
    if not name_or_path:
        return f"{config.model_type} model built in memory"
    return os.path.basename(os.path.normpath(name_or_path)) if os.path.exists(name_or_path) else name_or_path
