"""trl-tip: TIP (token importance in on-policy distillation) for Hugging Face TRL.

Layers, bottom up (declared in pyproject.toml and enforced by `lint-imports`; a module imports only from its own layer
or those below it):

1. `trl_tip.utils` (files, vLLM and TRL-experimental shims) and `trl_tip.testing` (tiny models for tests);
2. `trl_tip.core`: the math (statistics, selectors, quadrants, loss, schedules), no trainer;
3. `trl_tip.models` (loading models, the embedded SmolLM2) and `trl_tip.data` (prompt datasets);
4. `trl_tip.eval`: grading and the `trl-tip eval` harness;
5. `trl_tip.hub`: model cards, plots and pushing to the Hub;
6. `trl_tip.trainer`: `TIPConfig`, `TIPGKDTrainer` and its parts;
7. `trl_tip.train` (the `trl-tip train` command) and `trl_tip.pair` (the embedded teacher/student pair);
8. `trl_tip.demo` and `trl_tip.study`: the `trl-tip demo` and `trl-tip study` commands;
9. `trl_tip.cli`: the `trl-tip` entry point.
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
