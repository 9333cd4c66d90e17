"""The one adapter between trl-tip and the private pieces of TRL's chunked-divergence kernels.

TRL's `trl.kernels.chunked_divergence` computes one divergence per token on `[tokens, vocabulary]` fp32 tiles. TIP
needs three statistics from the same folds and a loss that reuses them, so it drives TRL's private tile helpers
directly: `_project`, `_stats_tile` (CPU) and the Triton `_stats_kernel` (CUDA), `_compute_dtype`, the tile sizes,
and the saved-tensor context of `ChunkedDivergenceFunction.backward`. Every such name is imported here and nowhere
else, so a TRL upgrade touches this file only; `tests/core/test_trl_parity.py` pins each of them against trl 1.16.

TRL's fold keeps no `E_t[z_t]`, which the teacher's entropy needs: `fold_teacher_x_sum` adds two accumulators over the
same tiles (the teacher's own normalizer and `E_t[z_t]`, both relative to TRL's running max, so the entropy stays exact
at low temperatures), with TRL's logit transform (`_transform` in Triton, `_torch_transform` in torch).
"""

from __future__ import annotations

import torch
from transformers.utils import is_triton_available
from trl.kernels.chunked_divergence import (
    TOKEN_CHUNK_SIZE,
    VOCAB_CHUNK_SIZE,
    ChunkedDivergenceFunction,
    _compute_dtype,
    _project,
    _stats_kernel,
    _stats_tile,
)
from trl.kernels.chunked_logprob import _BLOCK_SIZE, _jit, _torch_transform, _transform, _use_triton
from trl.trainer.utils import maybe_gather_lm_head_ctx

from .checks import full_shape


if is_triton_available():
    import triton.language as tl

__all__ = [
    "TOKEN_CHUNK_SIZE",
    "VOCAB_CHUNK_SIZE",
    "ChunkedDivergenceFunction",
    "DivergenceFromStats",
    "compute_dtype",
    "fold_teacher_x_sum",
    "fold_tile",
    "kernel_arguments",
    "materialize_lm_head",
    "maybe_gather_lm_head_ctx",
    "on_shared_rows",
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
    teacher_x_sum=None,
    teacher_exp_sum=None,
) -> None:
    """Folds one `[n, vocab_cols]` pair of tiles into the online-logsumexp accumulators (updated in place).

    On CUDA this launches TRL's Triton `_stats_kernel` (one program per token row), elsewhere its eager twin
    `_stats_tile`; both take the same positional arguments, in this order. With `teacher_x_sum` and
    `teacher_exp_sum` (the teacher's entropy accumulators), [`fold_teacher_x_sum`] then folds the same teacher tile
    into them, using both tiles, which TRL's fold has consumed, as scratch: they are left overwritten.
    """
    n, cols = student_tile.shape
    teacher_max_before = None if teacher_x_sum is None else teacher_max.clone()
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
    if teacher_x_sum is not None:
        fold_teacher_x_sum(
            teacher_tile,
            teacher_max_before,
            teacher_max,
            teacher_x_sum,
            teacher_exp_sum,
            kernel_args,
            scratch=student_tile,
            overwrite_tile=True,
        )


def fold_teacher_x_sum(
    teacher_tile,
    teacher_max_before,
    teacher_max,
    teacher_x_sum,
    teacher_exp_sum,
    kernel_args: dict,
    scratch=None,
    overwrite_tile: bool = False,
) -> None:
    """
    Folds a `[n, vocab_cols]` teacher tile into the two accumulators of the teacher's entropy (updated in place):
    `teacher_exp_sum = sum exp(z_t - m)` and `teacher_x_sum = sum exp(z_t - m) (z_t - m)`, `m` TRL's running max.
    Then `H(P_T) = log(teacher_exp_sum) - teacher_x_sum / teacher_exp_sum`, exactly, for any `m`.

    Both sums are taken relative to the max, as a log-sum-exp is: at a low temperature `z_t` is huge (logits / T) and
    `log Z - E[z]` would cancel two numbers of that size in float32 (1e6 nats off at T = 1e-6), while `z_t - m` stays
    small where the probability is. The normalizer is this fold's own, not TRL's `t_sum`: the entropy then holds
    exactly for the `z_t` computed here, whatever TRL's rounding of the same tile.

    Runs after [`fold_tile`] has folded the same tile: `teacher_max` is TRL's running max after it and
    `teacher_max_before` the one before; when the max moves from `m0` to `m`, `x -> exp(m0 - m) (x + (m0 - m) s)`
    and `s -> exp(m0 - m) s`. `z_t` is TRL's transform of the tile (scale, softcap, temperature). On CUDA a Triton
    kernel reads the tile once; elsewhere the same math runs in torch, on `scratch` (an fp32 tensor of the tile's
    shape) when given and on the tile itself with `overwrite_tile`, so that no tile-sized temporary is allocated.
    """
    n, cols = teacher_tile.shape
    t_scale, t_softcap, inv_t = kernel_args["t_scale"], kernel_args["t_softcap"], kernel_args["inv_t"]
    has_softcap = kernel_args["T_HAS_SOFTCAP"]
    if _use_triton(teacher_tile.device):
        _teacher_x_sum_kernel[(n,)](
            teacher_tile,
            teacher_tile.stride(0),
            teacher_max_before,
            teacher_max,
            teacher_x_sum,
            teacher_exp_sum,
            cols,
            t_scale,
            t_softcap,
            inv_t,
            T_HAS_SOFTCAP=has_softcap,
            BLOCK_SIZE=_BLOCK_SIZE,
        )
        return
    with torch.autocast(teacher_tile.device.type, enabled=False):  # `bmm` would run in bf16 under autocast
        _teacher_x_sum_tile(
            teacher_tile,
            teacher_max_before,
            teacher_max,
            teacher_x_sum,
            teacher_exp_sum,
            t_scale,
            t_softcap,
            inv_t,
            has_softcap,
            scratch,
            overwrite_tile,
        )


def _teacher_x_sum_tile(
    t_tile,
    t_max_before,
    t_max,
    t_x_sum,
    t_exp_sum,
    t_scale,
    t_softcap,
    inv_t,
    T_HAS_SOFTCAP,
    scratch=None,
    overwrite_tile=False,
) -> None:
    # `_teacher_x_sum_kernel` in torch, for devices without Triton: the whole tile at once. Without a softcap,
    # `gap = z_t - m` goes to `scratch`; `exp(gap)` goes to the tile when it may be overwritten. The row-wise dot
    # product goes through `bmm` (BLAS on CPU, about 3x faster there than a multiply and a sum); the caller keeps it
    # in fp32.
    neg_max = -t_max.unsqueeze(-1)
    if T_HAS_SOFTCAP:
        gap = _torch_transform(t_tile, t_scale, t_softcap, inv_t, T_HAS_SOFTCAP).add_(neg_max)
    else:
        gap = torch.add(neg_max, t_tile, alpha=t_scale * inv_t, out=scratch)
    weights = torch.exp(gap, out=t_tile if overwrite_tile else None)
    x_sum = torch.bmm(weights.unsqueeze(1), gap.unsqueeze(2)).view(-1)
    exp_sum = weights.sum(-1)
    moved = t_max_before - t_max
    # A row's first tile has no sum to move (`m0 = -inf`, `s = 0`, whose product is NaN).
    shift = torch.where(t_exp_sum > 0, moved * t_exp_sum, torch.zeros_like(t_exp_sum))
    rescale = torch.exp(moved)
    t_x_sum.add_(shift).mul_(rescale).add_(x_sum)
    t_exp_sum.mul_(rescale).add_(exp_sum)


@_jit
def _teacher_x_sum_kernel(
    t_ptr,
    t_stride,
    t_max_before_ptr,
    t_max_ptr,
    t_x_sum_ptr,
    t_exp_sum_ptr,
    n_cols,
    t_scale,
    t_softcap,
    inv_t,
    T_HAS_SOFTCAP: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    # One program per token, over one vocabulary chunk, with TRL's running max `m` after `_stats_kernel` folded the
    # same chunk and TRL's `_transform`: `s = s * exp(m0 - m) + sum exp(z_t - m)` and
    # `x = (x + (m0 - m) s) * exp(m0 - m) + sum exp(z_t - m) (z_t - m)`, relative to the max (no cancellation).
    row = tl.program_id(0).to(tl.int64)
    t_row = t_ptr + row * t_stride
    t_m = tl.load(t_max_ptr + row)
    acc_x = tl.zeros((BLOCK_SIZE,), dtype=tl.float32)
    acc_s = tl.zeros((BLOCK_SIZE,), dtype=tl.float32)
    for start in range(0, n_cols, BLOCK_SIZE):
        offsets = start + tl.arange(0, BLOCK_SIZE)
        mask = offsets < n_cols
        zt = _transform(
            tl.load(t_row + offsets, mask=mask, other=0.0).to(tl.float32), t_scale, t_softcap, inv_t, T_HAS_SOFTCAP
        )
        gap = tl.where(mask, zt - t_m, 0.0)
        et = tl.where(mask, tl.exp(gap), 0.0)
        acc_x += et * gap
        acc_s += et
    moved = tl.load(t_max_before_ptr + row) - t_m
    rescale = tl.exp(moved)
    s0 = tl.load(t_exp_sum_ptr + row)
    shift = tl.where(s0 > 0, moved * s0, 0.0)
    tl.store(t_x_sum_ptr + row, (tl.load(t_x_sum_ptr + row) + shift) * rescale + tl.sum(acc_x, axis=0))
    tl.store(t_exp_sum_ptr + row, s0 * rescale + tl.sum(acc_s, axis=0))


def materialize_lm_head(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
    """Turns an FSDP2 `DTensor` head into a plain tensor once, as TRL's `_chunked_divergence_loss` does, so the tile
    loop does not re-gather it per chunk. Plain tensors pass through, and so do ZeRO-3 parameters: the tile loops
    gather those themselves, so heads of different sizes are cut to their shared rows there, after the gather (see
    [`on_shared_rows`])."""
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


def on_shared_rows(function, student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, *rest):
    """
    `function.apply(...)` (TRL's `ChunkedDivergenceFunction` or [`DivergenceFromStats`], same arguments) over the
    `min(V_s, V_t)` rows both heads share, for heads padded to different sizes.

    TRL's tiles walk the student's rows and slice the teacher's by them after any ZeRO-3 gather, so a teacher head
    with more rows needs no cut and no copy. A student head with more rows goes through [`StudentHeadCut`], which cuts
    it after the gather (a partitioned parameter sliced before it is empty). Padding the shorter head's logits instead
    would change the normalizers, so the extra rows are left out, never filled.
    """
    student_rows, teacher_rows = full_shape(student_weight)[0], full_shape(teacher_weight)[0]
    if student_rows <= teacher_rows:
        return function.apply(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, *rest)
    return StudentHeadCut.apply(
        function, teacher_rows, student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, *rest
    )


class _InnerContext:
    """Stands in for `ctx` when [`StudentHeadCut`] runs another autograd Function's forward and backward: records
    what the forward saves and marks, and carries what the backward reads (`saved_tensors`, `needs_input_grad` and
    the attributes the forward set)."""

    def __init__(self, needs_input_grad: tuple[bool, ...]):
        self.needs_input_grad = needs_input_grad
        self.saved_tensors = ()
        self.non_differentiable = ()

    def set_materialize_grads(self, value: bool) -> None:
        pass  # the outer Function never materializes them; TRL's backward takes `None`

    def save_for_backward(self, *tensors) -> None:
        self.saved_tensors = tensors

    def mark_non_differentiable(self, *outputs) -> None:
        self.non_differentiable = outputs


def _first_rows(weight: torch.Tensor, bias: torch.Tensor | None, rows: int):
    """Row views of a (gathered) head. A view of a gathered ZeRO-3 parameter keeps its `AVAILABLE` status, so the
    `maybe_gather_lm_head_ctx` that TRL's functions enter themselves leaves it alone."""
    views = []
    for tensor in (weight, bias):
        view = None if tensor is None else tensor[:rows]
        if view is not None and hasattr(tensor, "ds_status"):
            view.ds_status = tensor.ds_status
        views.append(view)
    return views


class StudentHeadCut(torch.autograd.Function):
    """
    Runs `function` (TRL's `ChunkedDivergenceFunction` or [`DivergenceFromStats`]) on the first `rows` rows of a
    student head that has more rows than the teacher's.

    The forward and the backward each gather the head (ZeRO-3; a no-op otherwise) and hand `function` row views of
    it, so the cut comes after the gather and copies no weight. Between the two, only the parameters themselves are
    saved, as TRL saves them, so no gathered copy outlives the forward. The head's gradients are padded back to its
    full shape with zeros (as a slice's backward would): the rows past the teacher's take no part in the loss.
    """

    @staticmethod
    def forward(ctx, function, rows, student_hidden, student_weight, student_bias, *rest):
        inner = _InnerContext(ctx.needs_input_grad[2:])
        with maybe_gather_lm_head_ctx(student_weight, student_bias):
            weight, bias = _first_rows(student_weight, student_bias, rows)
            outputs = function.forward(inner, student_hidden, weight, bias, *rest)
        saved = list(inner.saved_tensors)
        inner.saved_tensors = ()
        # The views are saved as the parameters they cut: the backward gathers and cuts again.
        ctx.head_slots = [_slot(saved, weight), _slot(saved, bias)]
        for slot, parameter in zip(ctx.head_slots, (student_weight, student_bias)):
            if slot is not None:
                saved[slot] = parameter
        ctx.save_for_backward(*saved)
        ctx.set_materialize_grads(False)
        if inner.non_differentiable:
            ctx.mark_non_differentiable(*inner.non_differentiable)
        ctx.function, ctx.rows, ctx.inner, ctx.num_rest = function, rows, inner, len(rest)
        return outputs

    @staticmethod
    def backward(ctx, *grad_outputs):
        saved = list(ctx.saved_tensors)
        weight_slot, bias_slot = ctx.head_slots
        student_weight = saved[weight_slot]
        student_bias = None if bias_slot is None else saved[bias_slot]
        with maybe_gather_lm_head_ctx(student_weight, student_bias):
            full_rows = student_weight.shape[0]
            for slot, view in zip(ctx.head_slots, _first_rows(student_weight, student_bias, ctx.rows)):
                if slot is not None:
                    saved[slot] = view
            ctx.inner.saved_tensors = tuple(saved)
            grad_hidden, grad_weight, grad_bias = ctx.function.backward(ctx.inner, *grad_outputs)[:3]
            ctx.inner.saved_tensors = ()
        return (
            None,
            None,
            grad_hidden,
            _pad_rows(grad_weight, full_rows),
            _pad_rows(grad_bias, full_rows),
            *(None,) * ctx.num_rest,
        )


def _slot(saved: list, view: torch.Tensor | None) -> int | None:
    """Where `function`'s forward saved `view` (by identity), or `None`."""
    return next((i for i, t in enumerate(saved) if view is not None and t is view), None)


def _pad_rows(grad: torch.Tensor | None, rows: int) -> torch.Tensor | None:
    """`grad` of a head's first rows, as the gradient of the whole head (zero past them)."""
    if grad is None or grad.shape[0] == rows:
        return grad
    return torch.cat((grad, grad.new_zeros((rows - grad.shape[0], *grad.shape[1:]))))
