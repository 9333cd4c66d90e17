"""Input checks shared by the math modules, so every entry point fails the same way on the same bad input."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch


def check_choice(name: str, value, allowed: Iterable) -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"`{name}` must be one of {', '.join(repr(a) for a in allowed)}; got {value!r}.")


def check_ratio(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) <= 1.0:
        raise ValueError(f"`{name}` must be a number in (0, 1]; got {value!r}.")
    return float(value)


def check_quantile(name: str, value) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) <= 1.0:
        raise ValueError(f"`{name}` must be a quantile in (0, 1] or None (no clipping); got {value!r}.")
    return float(value)


def check_beta(beta) -> float:
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= float(beta) <= 1.0:
        raise ValueError(f"`beta` must be a number in [0, 1] (0 forward KL, 1 reverse KL); got {beta!r}.")
    return float(beta)


def check_temperature(temperature, meaning: str = "", fix: str = "") -> float:
    """A finite, positive softmax temperature (an infinite one makes every distribution uniform). `meaning` and `fix`
    let a caller say what the field is for and how to set it."""
    valid = isinstance(temperature, (int, float)) and not isinstance(temperature, bool)
    if not valid or not 0.0 < float(temperature) < math.inf:
        raise ValueError(f"`temperature` must be a positive number{meaning}; got {temperature!r}.{fix}")
    return float(temperature)


def check_projection_inputs(
    student_hidden_states: torch.Tensor,
    teacher_hidden_states: torch.Tensor,
    student_lm_head_weight: torch.Tensor,
    teacher_lm_head_weight: torch.Tensor,
    mask: torch.Tensor,
    mask_name: str,
    student_lm_head_bias: torch.Tensor | None = None,
    teacher_lm_head_bias: torch.Tensor | None = None,
) -> None:
    """Shapes and devices of the two models' hidden states and heads must line up with the mask.

    The two heads may differ in rows: checkpoints pad the same tokenizer's vocabulary to different multiples (the
    Qwen2.5-14B head has 152064 rows, the 1.5B head 151936). The projections then use the `min(V_s, V_t)` rows both
    heads share; the rows past the tokenizer are padding that no token id reaches.
    """
    if student_hidden_states.dim() != 3 or teacher_hidden_states.dim() != 3:
        raise ValueError(
            "`student_hidden_states` and `teacher_hidden_states` must have shape (B, C, H); got "
            f"{tuple(student_hidden_states.shape)} and {tuple(teacher_hidden_states.shape)}."
        )
    if student_hidden_states.shape[:2] != teacher_hidden_states.shape[:2]:
        raise ValueError(
            "`student_hidden_states` and `teacher_hidden_states` must cover the same (B, C) positions; got "
            f"{tuple(student_hidden_states.shape[:2])} and {tuple(teacher_hidden_states.shape[:2])}."
        )
    if tuple(mask.shape) != tuple(student_hidden_states.shape[:2]):
        raise ValueError(
            f"`{mask_name}` must have shape (B, C) = {tuple(student_hidden_states.shape[:2])}; "
            f"got {tuple(mask.shape)}."
        )
    for name, weight, hidden in (
        ("student_lm_head_weight", student_lm_head_weight, student_hidden_states),
        ("teacher_lm_head_weight", teacher_lm_head_weight, teacher_hidden_states),
    ):
        shape = full_shape(weight)
        if len(shape) != 2 or shape[1] != hidden.shape[-1]:
            raise ValueError(
                f"`{name}` must have shape (V, H) with H = {hidden.shape[-1]} (the hidden size); got {shape}."
            )
    for name, bias, weight in (
        ("student_lm_head_bias", student_lm_head_bias, student_lm_head_weight),
        ("teacher_lm_head_bias", teacher_lm_head_bias, teacher_lm_head_weight),
    ):
        if bias is not None and full_shape(bias) != (full_shape(weight)[0],):
            raise ValueError(f"`{name}` must have shape ({full_shape(weight)[0]},); got {full_shape(bias)}.")
    devices = {
        "student_hidden_states": student_hidden_states.device,
        "teacher_hidden_states": teacher_hidden_states.device,
        "student_lm_head_weight": student_lm_head_weight.device,
        "teacher_lm_head_weight": teacher_lm_head_weight.device,
        mask_name: mask.device,
    }
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{k} on {v}" for k, v in devices.items())
        raise ValueError(f"All inputs must be on one device; got {listing}.")


def full_shape(tensor: torch.Tensor) -> tuple[int, ...]:
    """The logical shape: ZeRO-3 partitions a parameter to numel 0 outside its module's forward and keeps the full
    shape in `ds_shape`; the projections gather it themselves."""
    return tuple(int(d) for d in getattr(tensor, "ds_shape", tensor.shape))


def check_finite(name: str, tensor: torch.Tensor) -> None:
    if tensor.numel() > 0 and not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"`{name}` contains NaN or inf at positions that enter the computation.")
