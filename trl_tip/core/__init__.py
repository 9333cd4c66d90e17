"""TIP's math, importable without any trainer: per-token statistics, token selectors, quadrant statistics, the
masked chunked generalized-JSD loss, and the schedules and problem weights beyond TIP. Pure torch plus TRL's kernel
module, reached through `trl_kernels` only."""

from .loss import LOSS_NORMALIZATIONS, masked_gjsd_loss
from .quadrants import QUADRANT_NAMES, HistogramSpec, QuadrantCounts, QuadrantTracker, classify_quadrants
from .schedules import RATIO_SCHEDULES, AdaptiveRatio, BetaSchedule, paced_weight, paced_weights, scheduled_ratio
from .selectors import (
    SELECTION_SCOPES,
    SELECTORS,
    AllTokens,
    DivergenceTopK,
    EntropySampling,
    EntropyTopK,
    Q3Overconfidence,
    QuadrantSelector,
    RandomTokens,
    RatioSelector,
    Selection,
    SoftOr,
    SoftOrBottom,
    TokenSelector,
    build_selector,
    clip_and_minmax,
    kept_per_sequence,
    resolve_selection,
    selected_token_count,
    top_k_mask,
)
from .stats import TokenStats, compute_token_stats


__all__ = [
    "LOSS_NORMALIZATIONS",
    "QUADRANT_NAMES",
    "RATIO_SCHEDULES",
    "SELECTION_SCOPES",
    "SELECTORS",
    "AdaptiveRatio",
    "AllTokens",
    "BetaSchedule",
    "DivergenceTopK",
    "EntropySampling",
    "EntropyTopK",
    "HistogramSpec",
    "Q3Overconfidence",
    "QuadrantCounts",
    "QuadrantSelector",
    "QuadrantTracker",
    "RandomTokens",
    "RatioSelector",
    "Selection",
    "SoftOr",
    "SoftOrBottom",
    "TokenSelector",
    "TokenStats",
    "build_selector",
    "classify_quadrants",
    "clip_and_minmax",
    "compute_token_stats",
    "kept_per_sequence",
    "masked_gjsd_loss",
    "paced_weight",
    "paced_weights",
    "resolve_selection",
    "scheduled_ratio",
    "selected_token_count",
    "top_k_mask",
]
