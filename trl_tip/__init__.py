"""trl-tip: TIP (token importance in on-policy distillation) for Hugging Face TRL."""

from .loss import masked_gjsd_loss
from .quadrants import QUADRANT_NAMES, HistogramSpec, QuadrantCounts, QuadrantTracker, classify_quadrants
from .selectors import SELECTORS, Selection, TokenSelector, build_selector, resolve_selection
from .stats import TokenStats, compute_token_stats


# The training glue (TRL's trainer, transformers, accelerate) loads on first use, so the math modules above can be
# imported, read and tested without it, as TRL does with its own lazy module.
_LAZY = {"TIPConfig": ".config", "TIPGKDTrainer": ".trainer"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'trl_tip' has no attribute {name!r}")


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
