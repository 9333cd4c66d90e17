"""trl-tip: TIP (token importance in on-policy distillation) for Hugging Face TRL."""

from .loss import masked_gjsd_loss
from .quadrants import QUADRANT_NAMES, HistogramSpec, QuadrantCounts, QuadrantTracker, classify_quadrants
from .selectors import SELECTORS, Selection, TokenSelector, build_selector, resolve_selection
from .stats import TokenStats, compute_token_stats
from .config import TIPConfig
from .trainer import TIPGKDTrainer


__version__ = "0.1.0"

__all__ = [
    "QUADRANT_NAMES",
    "SELECTORS",
    "HistogramSpec",
    "QuadrantCounts",
    "QuadrantTracker",
    "Selection",
    "TokenSelector",
    "TIPConfig",
    "TIPGKDTrainer",
    "TokenStats",
    "build_selector",
    "classify_quadrants",
    "compute_token_stats",
    "masked_gjsd_loss",
    "resolve_selection",
]
