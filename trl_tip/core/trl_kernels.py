"""The one adapter between trl-tip and the private pieces of TRL's chunked-divergence kernels.

TRL's `trl.kernels.chunked_divergence` computes one divergence per token on `[tokens, vocabulary]` fp32 tiles. TIP
needs three statistics from the same folds and a loss that reuses them, so it drives TRL's private tile helpers
directly: `_project`, `_stats_tile` (CPU) and the Triton `_stats_kernel` (CUDA), `_compute_dtype`, the tile sizes,
and the saved-tensor context of `ChunkedDivergenceFunction.backward`. Every such name is imported here and nowhere
else, so a TRL upgrade touches this file only; `tests/core/test_trl_parity.py` pins each of them against trl 1.16.
"""

from __future__ import annotations

import torch
from trl.kernels.chunked_divergence import (
    TOKEN_CHUNK_SIZE,
    VOCAB_CHUNK_SIZE,
    ChunkedDivergenceFunction,
    _compute_dtype,
    _project,
    _stats_kernel,
    _stats_tile,
)
from trl.kernels.chunked_logprob import _BLOCK_SIZE, _use_triton
from trl.trainer.utils import maybe_gather_lm_head_ctx


__all__ = [
    "TOKEN_CHUNK_SIZE",
    "VOCAB_CHUNK_SIZE",
    "ChunkedDivergenceFunction",
    "DivergenceFromStats",
    "compute_dtype",
    "fold_tile",
    "kernel_arguments",
    "materialize_lm_head",
    "maybe_gather_lm_head_ctx",
    "project_tile",
]


def compute_dtype(hidden_states: torch.Tensor) -> torch.dtype:
    """The dtype TRL projects a model's hidden states in (its `_compute_dtype`)."""
    return _compute_dtype(hidden_states)


def project_tile(tile, hidden, weight, bias, start: int, end: int, dtype: torch.dtype) -> None:
    """Writes `hidden @ weight[start:end].T (+ bias)` into the fp32 `tile`, as TRL's tiles are filled."""
    _project(tile, hidden, weight, bias, start, end, dtype)


def fold_tile(
    student_tile,
    teacher_tile,
    student_max,
    student_sum,
    student_x_sum,
    teacher_max,
    teacher_sum,
    teacher_weighted_gap,
    student_weighted_gap,
    kernel_args: dict,
) -> None:
    """Folds one `[n, vocab_cols]` pair of tiles into the online-logsumexp accumulators (updated in place).

    On CUDA this launches TRL's Triton `_stats_kernel` (one program per token row), elsewhere its eager twin
    `_stats_tile`; both take the same positional arguments, in this order.
    """
    n, cols = student_tile.shape
    fold = _stats_kernel[(n,)] if _use_triton(student_tile.device) else _stats_tile
    fold(
        student_tile,
        student_tile.stride(0),
        teacher_tile,
        teacher_tile.stride(0),
        student_max,
        student_sum,
        student_x_sum,
        teacher_max,
        teacher_sum,
        teacher_weighted_gap,
        student_weighted_gap,
        cols,
        BLOCK_SIZE=_BLOCK_SIZE,
        **kernel_args,
    )


def materialize_lm_head(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
    """Turns an FSDP2 `DTensor` head into a plain tensor once, as TRL's `_chunked_divergence_loss` does, so the tile
    loop does not re-gather it per chunk. Plain tensors pass through."""
    if isinstance(weight, torch.distributed.tensor.DTensor):
        weight = weight.full_tensor().to(dtype)
        if bias is not None:
            bias = bias.full_tensor()
    return weight, bias


def kernel_arguments(
    temperature: float,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_final_logit_softcapping: float | None = None,
    teacher_final_logit_softcapping: float | None = None,
) -> dict:
    """The logit-transform arguments of TRL's chunked-divergence tiles, as its `ChunkedDivergenceFunction` builds
    them."""
    return {
        "s_scale": student_logit_scale,
        "s_softcap": student_final_logit_softcapping or 1.0,
        "t_scale": teacher_logit_scale,
        "t_softcap": teacher_final_logit_softcapping or 1.0,
        "inv_t": 1 / temperature,
        "S_HAS_SOFTCAP": student_final_logit_softcapping is not None,
        "T_HAS_SOFTCAP": teacher_final_logit_softcapping is not None,
    }


class DivergenceFromStats(torch.autograd.Function):
    """
    Per-token KL whose value and log-normalizers the statistics pass already holds: the forward projects nothing and
    the backward is TRL's `ChunkedDivergenceFunction.backward`, fed the same saved tensors its own forward would save.

    For `beta` in {0, 1} this saves the loss's whole forward projection, so the statistics pass plus the loss costs
    one full projection plus the backward over the kept tokens only.
    """

    @staticmethod
    def forward(
        ctx,
        student_hidden,
        student_weight,
        student_bias,
        teacher_hidden,
        teacher_weight,
        teacher_bias,
        divergence,
        student_log_z,
        teacher_log_z,
        beta,
        kernel_args,
        dtypes,
    ):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(
            student_hidden,
            student_weight,
            student_bias,
            teacher_hidden,
            teacher_weight,
            teacher_bias,
            student_log_z,
            teacher_log_z,
            divergence,
        )
        ctx.dtypes = dtypes
        ctx.beta = beta
        ctx.mode = 0 if beta == 0.0 else 1
        ctx.kernel_args = kernel_args
        return divergence.clone()

    @staticmethod
    def backward(ctx, grad_divergence):
        grads = ChunkedDivergenceFunction.backward(ctx, grad_divergence, None)
        return (*grads[:3], *(None,) * 9)
