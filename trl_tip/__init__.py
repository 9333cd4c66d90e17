"""trl-tip: TIP (token importance in on-policy distillation) for Hugging Face TRL.

Layers, bottom up: `trl_tip.core` (the math, no trainer), `trl_tip.trainer` (`TIPConfig`, `TIPGKDTrainer`),
`trl_tip.eval` (benchmarks and grading), `trl_tip.hub` (publishing), `trl_tip.demo` (the embedded CPU demo).
"""

from importlib.metadata import PackageNotFoundError, version

from . import core
from .core import *  # noqa: F403  (the math is the package's public API, listed once in core.__all__)


# The training glue (TRL's trainer, transformers, accelerate) loads on first use, so the math above can be imported,
# read and tested without it, as TRL does with its own lazy module.
_LAZY = {"TIPConfig": ".trainer", "TIPGKDTrainer": ".trainer"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'trl_tip' has no attribute {name!r}")


try:
    __version__ = version("trl-tip")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = sorted([*core.__all__, "TIPConfig", "TIPGKDTrainer"])
