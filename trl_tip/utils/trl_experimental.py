"""Imports from `trl.experimental`, which warns on import that its API may change. trl-tip pins TRL's minor version
(`trl>=1.16,<1.17`) and tests what it takes from there, so the warning would tell a user nothing they can act on."""

from __future__ import annotations

import importlib
import warnings
from types import ModuleType


def import_trl_experimental(module: str) -> ModuleType:
    """`trl.experimental.<module>`, imported without TRL's instability warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return importlib.import_module(f"trl.experimental.{module}")
