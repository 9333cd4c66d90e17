"""Checks of the inherited training fields `TIPConfig` relies on that transformers and TRL let through: a NaN `beta`
or learning rate, a seed that is not an integer, a batch of zero. Each would otherwise fail after the models load (or
train on NaN without a word); here it fails when the config is built, naming the field, the value and what is
allowed."""

from __future__ import annotations

import math
from numbers import Integral, Real

from ..core.checks import check_beta


def _is_int(value) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _check_number(config, name: str, low: float, low_closed: bool = True, high: float = math.inf) -> None:
    value = getattr(config, name)
    ok = _is_number(value) and math.isfinite(value) and (value >= low if low_closed else value > low) and value < high
    if not ok:
        bound = f">= {low:g}" if low_closed else f"> {low:g}"
        upper = f" and < {high:g}" if math.isfinite(high) else ""
        raise ValueError(f"`{name}` must be a finite number {bound}{upper}; got {value!r}.")


def check_positive_int(config, name: str, allow_none: bool = False) -> None:
    """Raises ValueError unless the field `name` of `config` is a positive integer (or None with `allow_none`)."""
    value = getattr(config, name)
    if value is None and allow_none:
        return
    if not _is_int(value) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer; got {value!r}.")


def check_training_fields(config) -> None:
    """Raises ValueError naming the first inherited field of `config` (a `TIPConfig`) with an unusable value."""
    try:
        check_beta(config.beta)
    except ValueError:
        raise ValueError(
            f"`beta` must be a number in [0, 1] (0 forward KL, 1 reverse KL, between: generalized JSD); got "
            f"{config.beta!r}."
        ) from None
    if not _is_int(config.seed):
        raise ValueError(f"`seed` must be an integer; got {config.seed!r}.")
    if config.selection_seed is not None and (not _is_int(config.selection_seed) or config.selection_seed < 0):
        raise ValueError(
            f"`selection_seed` must be a non-negative integer, or None to use `seed`; got {config.selection_seed!r}."
        )
    _check_number(config, "learning_rate", 0.0)
    _check_number(config, "weight_decay", 0.0)
    _check_number(config, "adam_epsilon", 0.0, low_closed=False)
    _check_number(config, "adam_beta1", 0.0, high=1.0)
    _check_number(config, "adam_beta2", 0.0, high=1.0)
    _check_number(config, "warmup_steps", 0.0)
    if config.max_grad_norm is not None:
        _check_number(config, "max_grad_norm", 0.0)
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        check_positive_int(config, name)
    check_positive_int(config, "max_completion_length", allow_none=True)
    max_steps = config.max_steps
    if not _is_int(max_steps) or (max_steps < 1 and max_steps != -1):
        raise ValueError(
            f"`max_steps` must be a positive number of optimizer steps, or -1 to train `num_train_epochs` epochs; got "
            f"{max_steps!r}."
        )
    if max_steps == -1:
        _check_number(config, "num_train_epochs", 0.0, low_closed=False)
