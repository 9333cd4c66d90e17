"""`TIPGKDTrainer`: TRL's on-policy `DistillationTrainer`, training only on the tokens a TIP selector keeps."""

from __future__ import annotations

import functools
import os
import random
from collections.abc import Callable
from typing import Any

import torch
from datasets import Dataset, IterableDataset
from trl import DistillationTrainer

from ..core.loss import masked_gjsd_loss
from ..core.quadrants import QuadrantTracker
from ..core.selectors import QuadrantSelector, RatioSelector, resolve_selection, selector_with_ratio
from ..core.stats import compute_token_stats
from ..utils.vllm_compat import apply_cpu_weight_sync_fix, vllm_engine_options
from .benchmark_callback import BenchmarkArguments, BenchmarkCallback, evaluate_benchmarks
from .dataset_checks import check_datasets
from .head_rows import check_head_rows, trl_sees_equal_vocab_sizes, vocab_sizes
from .loss_routing import RoutedLoss, check_routed, routed_to
from .model_checks import RolloutWatch, check_heads_finite, check_model_sources
from .problem_weighting import (
    ROLLOUT_WEIGHTS_KEY,
    ProblemWeightingMixin,
    check_problem_weighting,
    weighted_by_problem,
)
from .publishing import PublishingMixin
from .resume_checks import RNG_STATE_FILE, check_resumable, resolve_checkpoint
from .rollouts import RolloutMixin, rollout_loss_mask
from .run_folder import claim_output_dir
from .scheduling import SELECTION_RATIO_KEY, ScheduleMixin
from .selector_contract import KeptNothingWatch, selector_and_config
from .self_teacher import (
    EMA_STATE_FILE,
    SelfTeacherMixin,
    check_self_teacher,
    frozen_copy_source,
    teacher_loaded_like_student,
)
from .tip_config import TIPConfig, check_rollouts_divide_generation_batch


TIP_STATS_DIR = "tip_stats"
# Per-step metrics that go to the loggers; `tip_stats/` keeps every statistic.
LOGGED_METRICS = (
    "selected_fraction",
    "entropy",
    "reverse_kl",
    "forward_kl",
    "teacher_entropy",
    "quadrant_share/",
    "selected_share/",
)


class TIPGKDTrainer(
    SelfTeacherMixin, RolloutMixin, ScheduleMixin, ProblemWeightingMixin, PublishingMixin, DistillationTrainer
):
    """
    On-policy distillation with token importance (TIP): TRL's [`~trl.DistillationTrainer`] whose loss covers only the
    completion tokens a [`~trl_tip.TokenSelector`] keeps.

    Each micro-batch runs, inside TRL's own loss step (same hidden states, heads, logit scaling and masks): one
    chunked no-grad pass for per-token student entropy and teacher-student KLs, the selector, the quadrant tracker,
    and the chunked generalized-JSD loss on the kept tokens only. Everything else (vLLM rollouts, tool masks, PEFT,
    gradient checkpointing, DeepSpeed ZeRO-3 teacher, gradient-accumulation-correct normalization) is TRL's.

    Example:

    ```python
    >>> import os
    >>> from trl_tip import TIPConfig, TIPGKDTrainer
    >>> from trl_tip.testing import tiny_causal_lm, tiny_math_dataset, tiny_tokenizer

    >>> # Tiny random models, so this runs on a CPU in seconds; pass Hub ids or models for a real run.
    >>> tokenizer = tiny_tokenizer()
    >>> student = tiny_causal_lm(tokenizer, hidden_size=64, seed=0)
    >>> teacher = tiny_causal_lm(tokenizer, hidden_size=128, seed=1)
    >>> config = TIPConfig(
    ...     output_dir="tiny-TIP",
    ...     token_selector="soft_or",  # TIP's rule, on half of each rollout's tokens
    ...     selection_ratio=0.5,
    ...     max_steps=2,
    ...     per_device_train_batch_size=4,
    ...     max_completion_length=16,
    ...     use_cpu=True,
    ...     bf16=False,
    ...     report_to="none",
    ... )
    >>> trainer = TIPGKDTrainer(
    ...     model=student,
    ...     teacher_model=teacher,
    ...     args=config,
    ...     train_dataset=tiny_math_dataset(8),
    ...     processing_class=tokenizer,
    ... )
    >>> trainer.train()
    >>> sorted(os.listdir("tiny-TIP/tip_stats"))  # quadrant statistics per step, histograms, the tracker's state
    ['histogram.jsonl', 'steps.jsonl', 'tracker.json']
    ```

    Args:
        model (`str` or `PreTrainedModel` or `PeftModel`):
            The student, as for `DistillationTrainer`.
        teacher_model (`str` or `PreTrainedModel`, *optional*):
            The teacher; defaults to `args.teacher_model_name_or_path`. Required one way or the other, unless
            `args.teacher_model_kind` makes the student its own teacher (self-distillation on the dataset's privileged
            context, `args.teacher_prompt_template`), which refuses both.
        args ([`TIPConfig`], *optional*):
            Configuration; TIP's defaults when omitted.
        train_dataset, eval_dataset, processing_class, callbacks, optimizers, quantization_config, peft_config, tools:
            As for [`~trl.DistillationTrainer`].
        token_selector (`str`, `dict`, [`~trl_tip.TokenSelector`] or callable, *optional*):
            Overrides `args.token_selector`: a registry name, a `{"name": ..., **kwargs}` dict, a selector object or
            any callable `fn(stats, generator) -> mask | (mask, weights)`.
        reward_func (callable, *optional*):
            Grades rollouts for `problem_weighting="paced"` instead of math-verify against the `answer` column: a TRL
            reward function `fn(prompts, completions, completion_ids, **columns) -> list[float]` (the dataset's other
            columns as keyword lists, as in `GRPOTrainer`), returning 1.0 for a correct rollout and 0.0 otherwise
            (values in between count as partial credit in the pass rate).
        benchmark_args ([`~trl_tip.trainer.benchmark_callback.BenchmarkArguments`], *optional*):
            Math benchmarks to evaluate the student on when training ends (results logged, written to
            `<output_dir>/eval/<benchmark>/` and put in the model card's model-index).
    """

    _tag_names = ["trl", "distillation", "trl-tip", "tip"]
    _name = "TIP"

    def __init__(
        self,
        model,
        teacher_model=None,
        args: TIPConfig | None = None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset=None,
        processing_class=None,
        callbacks=None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config=None,
        tools: list[Callable] | None = None,
        token_selector: Any = None,
        reward_func: Callable | None = None,
        benchmark_args: BenchmarkArguments | None = None,
    ):
        args = _resolve_args(args, model)
        check_self_teacher(args, model, teacher_model, peft_config, train_dataset, eval_dataset)
        check_model_sources(model, teacher_model, args)
        teacher_model = _setup_teacher_model(args, model, teacher_model, peft_config)
        _check_training_inputs(args, train_dataset, eval_dataset, tools, reward_func)
        self.reward_func = reward_func
        # `token_selector` applies to a copy of `args`; every other selection setting there is used or refused.
        args, self.token_selector = selector_and_config(args, token_selector)

        engine_options = {}
        if args.use_vllm and args.vllm_mode == "colocate":
            apply_cpu_weight_sync_fix()
            if args.vllm_enforce_eager:
                engine_options["enforce_eager"] = True
        # A pair whose heads pad one tokenizer to different sizes (Qwen2.5-14B -> 1.5B) trains on the rows the heads
        # share, but trl 1.16's __init__ refuses any `vocab_size` difference: it sees equal sizes while it runs, and
        # `check_head_rows` checks the pair against the tokenizer afterwards (head_rows.py says why this way).
        # A student that is its own teacher (no copy) has one head.
        head_rows = (0, 0) if teacher_model is None else vocab_sizes(model, teacher_model, args)
        with (
            vllm_engine_options(**engine_options),
            trl_sees_equal_vocab_sizes(teacher_model, *head_rows),
            teacher_loaded_like_student(args, teacher_model),
        ):
            super().__init__(
                model=model,
                teacher_model=teacher_model,
                args=args,
                train_dataset=train_dataset,
                eval_dataset=eval_dataset,
                processing_class=processing_class,
                callbacks=callbacks,
                optimizers=optimizers,
                quantization_config=quantization_config,
                peft_config=peft_config,
                tools=tools,
            )
        check_head_rows(self, teacher_model, *head_rows)
        check_heads_finite(self)
        self._rollout_watch = RolloutWatch(self, *head_rows)
        self._init_self_teacher()
        self.benchmark_args = benchmark_args
        if benchmark_args is not None and benchmark_args.benchmarks:
            self.add_callback(BenchmarkCallback(self, benchmark_args))
        self._init_selection_state()
        self._init_schedules()
        self._check_rollout_groups(train_dataset)

    def _init_selection_state(self) -> None:
        """The selection's generators, the kept-nothing watch and the quadrant tracker."""
        args = self.args
        self.selection_seed = args.seed if args.selection_seed is None else args.selection_seed
        # Per rank: ranks hold different rollouts; reseeded identically so runs and resumes repeat exactly.
        self._selection_generator = torch.Generator().manual_seed(self.selection_seed + self.accelerator.process_index)
        # One on/off-policy draw per generation batch, identical on every rank: generation is a collective under vLLM
        # and ZeRO-3, so all ranks must take the same branch.
        self._policy_rng = random.Random(self.selection_seed)
        self._kept_nothing = KeptNothingWatch()
        entropy_threshold, divergence_threshold = args.quadrant_threshold_values
        self.quadrant_tracker = QuadrantTracker(entropy_threshold, divergence_threshold)

    def _check_rollout_groups(self, train_dataset) -> None:
        """Each generation batch holds whole groups of a prompt's `num_rollouts_per_prompt` rollouts."""
        args = self.args
        if args.num_rollouts_per_prompt == 1:
            return
        if isinstance(train_dataset, IterableDataset):
            raise ValueError("`num_rollouts_per_prompt` > 1 needs a map-style (non-streaming) train dataset.")
        # TIPConfig checks this when built; checked again for batch fields changed on the config afterwards.
        check_rollouts_divide_generation_batch(
            args.num_rollouts_per_prompt,
            args.per_device_train_batch_size,
            self.accelerator.num_processes,
            args.gradient_accumulation_steps,
        )

    # ----------------------------------------------------------------------------------------------------------------
    # Rollouts: GKD's lmbda mixes on-policy student rollouts with the dataset's own completions.

    def _generate_and_score_completions(self, inputs):
        if self.model.training:
            self._apply_schedules()
        off_policy = self._draw_off_policy(inputs)
        try:
            output = super()._generate_and_score_completions(inputs)
        finally:
            self._dataset_examples = None
        self._add_teacher_prompts(inputs, output)
        self._rollout_watch.see(output)
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["tip/on_policy"].append(0.0 if off_policy else 1.0)
        if self.args.problem_weighting == "paced" and self.model.training and not off_policy:
            self._add_rollout_weights(inputs, output)
        if self._count_follows_from_masks:
            # Ratio selectors keep a count that follows from the masks alone, so the global normalizer of the whole
            # generation batch (all accumulation steps, all ranks) is known before any statistics are computed.
            loss_mask = rollout_loss_mask(output)
            selector = self._selector_at(self.selection_ratio_in_force)
            output["num_selected_in_batch"] = self.accelerator.gather(selector.count(loss_mask)).sum()
        if self.selection_ratio_in_force is not None:
            # The ratio this generation batch trains with travels with its rollouts to every micro-batch's selection.
            output[SELECTION_RATIO_KEY] = torch.tensor(self.selection_ratio_in_force, dtype=torch.float64)
        return output

    # ----------------------------------------------------------------------------------------------------------------
    # Loss: TRL prepares everything and calls its module-level `_chunked_divergence_loss`; loss_routing.py hands that
    # call to `_tip_divergence_loss` while this trainer's `compute_loss` runs (tests/core/test_trl_parity.py pins the
    # signature and the call).

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.args.loss_normalization == "selected" and inputs.get("num_selected_in_batch") is not None:
            # TRL's compute_loss turns inputs["num_items_in_batch"] into the per-process denominator.
            inputs = {**inputs, "num_items_in_batch": inputs["num_selected_in_batch"]}
        ratio = inputs.get(SELECTION_RATIO_KEY)
        loss = functools.partial(
            self._tip_divergence_loss,
            selector=self._selector_at(None if ratio is None else float(ratio)),
            rollout_weights=inputs.get(ROLLOUT_WEIGHTS_KEY),
        )
        with routed_to(loss) as route, self._teacher_reads_privileged_context(inputs):
            output = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        check_routed(route, "training" if self.model.training else "evaluation")
        if route.outputs:
            self._record_selection(*route.outputs[-1])
        return output

    def _selector_at(self, ratio: float | None):
        """The selector a batch trains with: `token_selector` (never changed) at the ratio in force, when that
        differs from its own (a schedule's ratio)."""
        return self.token_selector if ratio is None else selector_with_ratio(self.token_selector, ratio)

    def _tip_divergence_loss(
        self,
        student_hidden_states,
        teacher_hidden_states,
        student_lm_head_weight,
        teacher_lm_head_weight,
        completion_mask,
        beta,
        num_items_in_batch=None,
        temperature=1.0,
        *,
        selector,
        rollout_weights: torch.Tensor | None = None,
        **head_kwargs,
    ):
        """Drop-in for TRL's `_chunked_divergence_loss` (with this batch's `selector` and PACED `rollout_weights`
        bound by `compute_loss`): statistics, selection, then the masked loss. Returns TRL's value and, for
        `compute_loss`, what the quadrant statistics record: (statistics, kept tokens, the training objective in
        evaluation)."""
        training = self.model.training
        stats = compute_token_stats(
            student_hidden_states,
            teacher_hidden_states,
            student_lm_head_weight,
            teacher_lm_head_weight,
            completion_mask,
            temperature=temperature,
            teacher_entropy=self._needs_teacher_entropy(training),
            **head_kwargs,
        )
        generator = self._selection_generator if training else torch.Generator().manual_seed(self.selection_seed)
        selection = resolve_selection(selector, stats, generator)
        self._kept_nothing.see(selection, selector, self.state.global_step)
        if training and self.args.loss_normalization == "selected" and num_items_in_batch is not None:
            if not self._count_follows_from_masks:
                num_items_in_batch = self._estimated_selected_count(selection.mask)
        projection = (student_hidden_states, teacher_hidden_states, student_lm_head_weight, teacher_lm_head_weight)
        options = {"beta": beta, "temperature": temperature, "valid_mask": stats.mask, "stats": stats, **head_kwargs}
        loss_mask, token_weights = weighted_by_problem(selection.mask, selection.weights, rollout_weights)
        # In evaluation a given `num_items_in_batch` (TRL's contract: the valid tokens' count) divides `eval_loss`.
        all_tokens_eval = not training and self.args.eval_loss_tokens == "all"
        loss, divergence_sum, _ = masked_gjsd_loss(
            *projection,
            loss_mask,
            token_weights=token_weights,
            normalization=self.args.loss_normalization,
            num_items_in_batch=None if all_tokens_eval else num_items_in_batch,
            **options,
        )
        if training and self.follows_training_loss:
            weight = loss_mask.sum() if token_weights is None else token_weights[loss_mask.bool()].sum()
            self._record_training_loss(divergence_sum, weight)
        selected_loss = None
        if not training:
            # The training objective on this batch, logged as `eval_tip/selected_loss`.
            selected_loss = loss.detach()
            if self.args.eval_loss_tokens == "all":
                # `eval_loss` is plain on-policy distillation's loss (every valid token, over their count): the same
                # quantity whatever the selector and ratio, and TRL's `DistillationTrainer` reports it too.
                loss, _, _ = masked_gjsd_loss(
                    *projection, stats.mask, normalization="all", num_items_in_batch=num_items_in_batch, **options
                )
        return RoutedLoss((loss, stats.entropy.sum(), stats.mask.sum()), (stats, loss_mask, selected_loss))

    def _needs_teacher_entropy(self, training: bool) -> bool:
        """The teacher's entropy costs one more pass over the teacher's tiles: computed when this step's quadrant
        statistics are recorded, in evaluation, and always for a selector that is not built in (it may read it)."""
        if not isinstance(self.token_selector, (RatioSelector, QuadrantSelector)):
            return True
        return not training or self.state.global_step % self.args.log_quadrant_stats_every == 0

    @property
    def _count_follows_from_masks(self) -> bool:
        """Whether the selector's kept count is known from the masks alone (it declares `fixed_count` and can
        `count`); both the rollout-time normalizer and the per-micro-batch estimate are chosen by this one test."""
        return bool(getattr(self.token_selector, "fixed_count", False)) and hasattr(self.token_selector, "count")

    def _estimated_selected_count(self, keep_mask: torch.Tensor) -> torch.Tensor:
        """Per-process denominator for selectors whose kept count depends on the statistics (e.g. `quadrant`).

        The count of later accumulation steps is not known yet, so this micro-batch's global count stands for each of
        them: `sum over ranks of kept * accumulation steps / processes` (exact when micro-batches keep equal counts).
        """
        kept = keep_mask.sum().to(self.accelerator.device, torch.float32)
        kept = self.accelerator.reduce(kept, reduction="sum")
        steps = self.current_gradient_accumulation_steps
        return (kept * steps).clamp(min=1.0) / self.accelerator.num_processes

    def _record_selection(self, stats, keep: torch.Tensor, selected_loss: torch.Tensor | None) -> None:
        training = self.model.training
        if selected_loss is not None:
            # Mean over processes, as the Trainer averages `eval_loss`; a collective, so outside the wrapped forward.
            selected_loss = self.accelerator.gather(selected_loss.reshape(1).to(self.accelerator.device)).mean()
            self._metrics["eval"]["tip/selected_loss"].append(selected_loss.item())
        if training and self.state.global_step % self.args.log_quadrant_stats_every != 0:
            return
        counts = self.quadrant_tracker.measure(stats, keep).all_reduce(device=self.accelerator.device)
        if training:
            self.quadrant_tracker.update(self.state.global_step + 1, counts)
        mode = "train" if training else "eval"
        for key, value in counts.summary().items():
            if key.startswith(LOGGED_METRICS):
                self._metrics[mode][f"tip/{key}"].append(value)

    # ----------------------------------------------------------------------------------------------------------------
    # Persistence: `tip_stats/` beside every saved model, selection state beside every RNG state.

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        super().save_model(output_dir, _internal_call)
        self.save_tip_stats(output_dir or self.args.output_dir)
        if not _internal_call:  # the card beside every saved model, so a run saved without a checkpoint has one
            self.create_model_card(output_dir=output_dir or self.args.output_dir)

    def save_tip_stats(self, output_dir: str):
        """Writes the quadrant statistics to `<output_dir>/tip_stats/` (main process only)."""
        if self.accelerator.is_main_process:
            self.quadrant_tracker.save(os.path.join(output_dir, TIP_STATS_DIR))

    def train(self, *args, **kwargs):
        resume_from_checkpoint = args[0] if args else kwargs.get("resume_from_checkpoint")
        claim_output_dir(self, resume_from_checkpoint)  # refuse or clear a used one
        checkpoint = resolve_checkpoint(self.args.output_dir, resume_from_checkpoint)
        if checkpoint is not None:
            rank = self.accelerator.process_index
            ema_files = (EMA_STATE_FILE.format(rank="all"), EMA_STATE_FILE.format(rank=rank))
            check_resumable(checkpoint, rank, self.args.teacher_model_kind == "ema", ema_files)
        output = super().train(*args, **kwargs)
        self.save_tip_stats(self.args.output_dir)
        return output

    def evaluate_benchmarks(self, benchmark_args: BenchmarkArguments | None = None) -> list[dict]:
        """Evaluates the student on `benchmark_args.benchmarks` (default: the trainer's) now; [`BenchmarkCallback`]
        calls this at the end of training."""
        benchmark_args = benchmark_args or self.benchmark_args
        if benchmark_args is None or not benchmark_args.benchmarks:
            raise ValueError("No benchmarks to evaluate: pass `benchmark_args=BenchmarkArguments(benchmarks=[...])`.")
        return evaluate_benchmarks(self, benchmark_args)

    def _save_rng_state(self, output_dir: str) -> None:
        super()._save_rng_state(output_dir)
        state = {"selection": self._selection_generator.get_state(), "policy": self._policy_rng.getstate()}
        state["schedules"] = self._save_schedule_state(output_dir)
        torch.save(state, os.path.join(output_dir, RNG_STATE_FILE.format(rank=self.accelerator.process_index)))
        self._save_self_teacher(output_dir)

    def _load_rng_state(self, checkpoint: str | None) -> None:
        super()._load_rng_state(checkpoint)
        if checkpoint is None:
            return
        # `train` checked that the checkpoint holds all of this (`check_resumable`).
        path = os.path.join(checkpoint, RNG_STATE_FILE.format(rank=self.accelerator.process_index))
        state = torch.load(path, weights_only=False)  # our own file: generator states and Python's RNG tuple
        self._selection_generator.set_state(state["selection"])
        self._policy_rng.setstate(state["policy"])
        self._load_schedule_state(state.get("schedules"))
        self._load_self_teacher(checkpoint)
        self.quadrant_tracker = QuadrantTracker.load(os.path.join(checkpoint, TIP_STATS_DIR))


def _resolve_args(args: TIPConfig | None, model) -> TIPConfig:
    """`args`, or TIP's defaults writing to `<model name>-TIP` when omitted; anything but a `TIPConfig` is refused."""
    if args is None:
        name = model if isinstance(model, str) else model.config._name_or_path
        return TIPConfig(f"{str(name).split('/')[-1]}-TIP")
    if not isinstance(args, TIPConfig):
        raise TypeError(f"`args` must be a `TIPConfig`; got {type(args).__name__}. Build one with TIPConfig(...).")
    return args


def _setup_teacher_model(args: TIPConfig, model, teacher_model, peft_config):
    """
    The teacher TRL's `DistillationTrainer` receives, one decision in one place (as SDFT's `_setup_teacher_model`):

    | `teacher_model_kind` | `teacher_model` given | teacher                                                    |
    |----------------------|-----------------------|------------------------------------------------------------|
    | `base` / `ema`       | refused               | a frozen copy's source (`frozen_copy_source`)              |
    | `live`, PEFT `base`  | refused               | `None`: the student's own backbone (`SelfTeacher`)          |
    | unset                | yes                   | `teacher_model`                                            |
    | unset                | no                    | `args.teacher_model_name_or_path`, else refused             |
    """
    if args.teacher_model_kind is not None:
        return frozen_copy_source(args, model, peft_config)
    teacher_model = args.teacher_model_name_or_path if teacher_model is None else teacher_model
    if teacher_model is None:
        raise ValueError(
            "TIPGKDTrainer needs a teacher: pass `teacher_model=` (a model or a path/Hub id) or set "
            "`teacher_model_name_or_path` in the TIPConfig, or set `teacher_model_kind` to make the student its "
            "own teacher."
        )
    return teacher_model


def _check_training_inputs(args: TIPConfig, train_dataset, eval_dataset, tools, reward_func) -> None:
    """What can be refused before any model loads: a Hub push without a token, `lmbda` < 1 without completions or
    with tools, PACED without a way to grade, and the datasets' rows and columns."""
    if args.push_to_hub:
        from ..hub.push import require_token

        # transformers creates the Hub repo in __init__; without a token, say so before anything runs.
        require_token(args.hub_token)
    if args.lmbda < 1.0:
        if tools:
            raise ValueError("`lmbda` < 1 (training on dataset completions) is not supported together with `tools`.")
        columns = getattr(train_dataset, "column_names", None) or []
        if train_dataset is not None and "completion" not in columns:
            raise ValueError(
                f"`lmbda`={args.lmbda} trains on the dataset's own completions part of the time, so the train "
                f"dataset needs a `completion` column (prompt/completion format); it has {columns}."
            )
    check_problem_weighting(args, train_dataset, reward_func)
    check_datasets(args, train_dataset, eval_dataset, reward_func)
