"""Per-token TIP statistics: student and teacher entropy, reverse KL and forward KL, from one chunked no-grad pass.

The two TIP axes (entropy and divergence, `TIP_SPEC.md`) and the forward KL used by the Q3 score all follow from the
same online-logsumexp folds that TRL's `ChunkedDivergenceFunction` runs in its forward: the student and teacher
normalizers, the student's `E_s[z_s]`, and the two cross terms `E_s[z_t - z_s]` and `E_t[z_t - z_s]`. TRL's function
returns only one divergence, so this module drives TRL's own tile projection and fold (through `trl_kernels`, the one
adapter to TRL's private tile helpers) and reads all three statistics from the same accumulators. The teacher's
entropy needs two more accumulators, the teacher's `sum exp(z_t - m)` and `sum exp(z_t - m) (z_t - m)` relative to its
running max `m`, folded over the same tiles (`trl_kernels.fold_teacher_x_sum`): `H(P_T) = log Z_t - E_t[z_t]` taken
relative to `m` on both sides, so that it stays exact at low temperatures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch

from .checks import check_finite, check_projection_inputs, check_temperature
from .trl_kernels import (
    TOKEN_CHUNK_SIZE,
    VOCAB_CHUNK_SIZE,
    compute_dtype,
    fold_tile,
    kernel_arguments,
    materialize_lm_head,
    maybe_gather_lm_head_ctx,
    project_tile,
)


@dataclass
class TokenStats:
    """
    Per-token statistics of a micro-batch of completions, all of shape `(B, C)` and zero where `mask` is `False`.

    Args:
        entropy (`torch.Tensor`):
            Student entropy `H(P_S)` in nats (float32).
        reverse_kl (`torch.Tensor`):
            `KL(P_S || P_T)` in nats, the TIP divergence axis (float32).
        forward_kl (`torch.Tensor`):
            `KL(P_T || P_S)` in nats, used by the Q3 overconfidence score (float32).
        mask (`torch.Tensor`):
            Boolean mask of the valid completion tokens (not padding, not tool output).
        teacher_entropy (`torch.Tensor`, *optional*):
            Teacher entropy `H(P_T)` in nats (float32), set by [`compute_token_stats`] unless it is called with
            `teacher_entropy=False`; `None` when absent (statistics built by hand, for instance).
        student_log_z, teacher_log_z (`torch.Tensor`, *optional*):
            Log-partition functions of the two models' tempered logits, set by [`compute_token_stats`] so that
            [`~trl_tip.core.loss.masked_gjsd_loss`] can skip its own forward projection for the KL endpoints.
        projection (`dict`, *optional*):
            Temperature and logit transforms the statistics were computed with, checked when they are reused.
    """

    entropy: torch.Tensor
    reverse_kl: torch.Tensor
    forward_kl: torch.Tensor
    mask: torch.Tensor
    teacher_entropy: torch.Tensor | None = None
    student_log_z: torch.Tensor | None = field(default=None, repr=False)
    teacher_log_z: torch.Tensor | None = field(default=None, repr=False)
    projection: dict[str, Any] | None = field(default=None, repr=False)

    def __post_init__(self):
        shape = tuple(self.mask.shape)
        if len(shape) != 2:
            raise ValueError(f"`mask` must have shape (B, C); got {shape}.")
        for name in self._tensor_fields():
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != shape:
                raise ValueError(f"`{name}` must have shape {shape} like `mask`; got {tuple(value.shape)}.")
        if self.mask.dtype != torch.bool:
            self.mask = self.mask != 0

    @classmethod
    def _tensor_fields(cls) -> list[str]:
        return [f.name for f in fields(cls) if f.name != "projection"]

    @property
    def num_valid(self) -> int:
        return int(self.mask.sum())

    def to(self, device) -> TokenStats:
        moved = {name: getattr(self, name) for name in self._tensor_fields()}
        moved = {name: None if value is None else value.to(device) for name, value in moved.items()}
        return TokenStats(**moved, projection=self.projection)


@torch.no_grad()
def compute_token_stats(
    student_hidden_states: torch.Tensor,
    teacher_hidden_states: torch.Tensor,
    student_lm_head_weight: torch.Tensor,
    teacher_lm_head_weight: torch.Tensor,
    mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    student_lm_head_bias: torch.Tensor | None = None,
    teacher_lm_head_bias: torch.Tensor | None = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_final_logit_softcapping: float | None = None,
    teacher_final_logit_softcapping: float | None = None,
    token_chunk_size: int = TOKEN_CHUNK_SIZE,
    vocab_chunk_size: int = VOCAB_CHUNK_SIZE,
    teacher_entropy: bool = True,
) -> TokenStats:
    """
    Computes student entropy, `KL(S || T)`, `KL(T || S)` and the teacher's entropy for every valid completion token
    without building logits.

    Only the valid positions are projected, on `[token_chunk_size, vocab_chunk_size]` fp32 tiles, so peak memory is
    two such tiles plus `O(N)` accumulators whatever the sequence length and vocabulary. No gradient is recorded.

    Args:
        student_hidden_states (`torch.Tensor`):
            Student backbone output `(B, C, H_s)`, aligned to the completion tokens (before the `lm_head`).
        teacher_hidden_states (`torch.Tensor`):
            Teacher backbone output `(B, C, H_t)`, aligned to the same tokens.
        student_lm_head_weight (`torch.Tensor`):
            Student `lm_head` weight `(V_s, H_s)`.
        teacher_lm_head_weight (`torch.Tensor`):
            Teacher `lm_head` weight `(V_t, H_t)`. The heads may differ in rows (one tokenizer's vocabulary padded to
            different sizes); the statistics then cover the `min(V_s, V_t)` rows they share.
        mask (`torch.Tensor`):
            `(B, C)` mask; non-zero marks a valid completion token.
        temperature (`float`, *optional*, defaults to `1.0`):
            Softmax temperature applied to both models' logits after scale and softcapping, as in TRL.
        student_lm_head_bias, teacher_lm_head_bias (`torch.Tensor`, *optional*):
            `(V_s,)` and `(V_t,)` head biases.
        student_logit_scale, teacher_logit_scale (`float`, *optional*, defaults to `1.0`):
            Multipliers on the logits before softcapping (as TRL reads them from the model config).
        student_final_logit_softcapping, teacher_final_logit_softcapping (`float`, *optional*):
            Gemma-style `softcap * tanh(logits / softcap)`.
        token_chunk_size, vocab_chunk_size (`int`, *optional*):
            Tile shape; defaults are TRL's, so the pass peaks no higher than TRL's chunked loss.
        teacher_entropy (`bool`, *optional*, defaults to `True`):
            Whether to fold the two extra accumulators (the teacher's normalizer and `E_t[z_t]`) that
            `TokenStats.teacher_entropy` needs; with `False` that field is `None` and the pass is TRL's fold alone.

    Returns:
        [`TokenStats`]: `(B, C)` float32 statistics, zero at invalid positions.
    """
    heads = LMHeads(
        student_lm_head_weight,
        teacher_lm_head_weight,
        temperature,
        student_lm_head_bias,
        teacher_lm_head_bias,
        student_logit_scale,
        teacher_logit_scale,
        student_final_logit_softcapping,
        teacher_final_logit_softcapping,
    )
    heads.check_inputs(student_hidden_states, teacher_hidden_states, mask, "mask")
    heads = heads.with_checked_temperature()
    _check_chunk_sizes(token_chunk_size, vocab_chunk_size)
    valid = mask != 0
    h_s = compact_positions(student_hidden_states.detach(), valid, "student_hidden_states")
    h_t = compact_positions(teacher_hidden_states.detach(), valid, "teacher_hidden_states")
    heads = heads.materialized(student_hidden_states, teacher_hidden_states)
    sums = _fold_tiles(h_s, h_t, heads, token_chunk_size, vocab_chunk_size, teacher_entropy)
    return _stats_from_sums(sums, valid, heads)


@dataclass(frozen=True, eq=False)
class LMHeads:
    """
    Both models' output heads and logit transforms, as TRL's `_chunked_divergence_loss` receives them: `lm_head`
    weights and biases, logit scales, final-logit softcaps and the softmax temperature. The statistics pass and the
    loss hand it to their helpers instead of nine arguments; `materialized` adds the projection dtypes. The two heads
    may have different row counts; the projections use the rows they share, cut after any ZeRO-3 gather.
    """

    student_lm_head_weight: torch.Tensor
    teacher_lm_head_weight: torch.Tensor
    temperature: float = 1.0
    student_lm_head_bias: torch.Tensor | None = None
    teacher_lm_head_bias: torch.Tensor | None = None
    student_logit_scale: float = 1.0
    teacher_logit_scale: float = 1.0
    student_final_logit_softcapping: float | None = None
    teacher_final_logit_softcapping: float | None = None
    student_dtype: torch.dtype | None = None
    teacher_dtype: torch.dtype | None = None

    def check_inputs(self, student_hidden_states, teacher_hidden_states, mask, mask_name: str) -> None:
        """Shapes and devices of the hidden states and heads line up with the mask (the heads' rows may differ)."""
        check_projection_inputs(
            student_hidden_states,
            teacher_hidden_states,
            self.student_lm_head_weight,
            self.teacher_lm_head_weight,
            mask,
            mask_name,
            self.student_lm_head_bias,
            self.teacher_lm_head_bias,
        )

    def with_checked_temperature(self) -> LMHeads:
        return replace(self, temperature=check_temperature(self.temperature))

    def materialized(self, student_hidden_states, teacher_hidden_states) -> LMHeads:
        """The heads as the tiles project them: FSDP2 `DTensor`s made plain tensors once, and each model's compute
        dtype (`compute_dtype` of its hidden states) recorded."""
        s_dtype, t_dtype = compute_dtype(student_hidden_states), compute_dtype(teacher_hidden_states)
        s_weight, s_bias = materialize_lm_head(self.student_lm_head_weight, self.student_lm_head_bias, s_dtype)
        t_weight, t_bias = materialize_lm_head(self.teacher_lm_head_weight, self.teacher_lm_head_bias, t_dtype)
        return replace(
            self,
            student_lm_head_weight=s_weight,
            student_lm_head_bias=s_bias,
            teacher_lm_head_weight=t_weight,
            teacher_lm_head_bias=t_bias,
            student_dtype=s_dtype,
            teacher_dtype=t_dtype,
        )

    @property
    def kernel_args(self) -> dict:
        """The logit transforms as the arguments of TRL's tiles."""
        return kernel_arguments(
            self.temperature,
            self.student_logit_scale,
            self.teacher_logit_scale,
            self.student_final_logit_softcapping,
            self.teacher_final_logit_softcapping,
        )

    @property
    def signature(self) -> dict:
        """What statistics computed with these heads depend on besides the inputs (see `projection_signature`)."""
        return projection_signature(self.temperature, self.kernel_args)


def _check_chunk_sizes(token_chunk_size: int, vocab_chunk_size: int) -> None:
    if token_chunk_size < 1 or vocab_chunk_size < 1:
        raise ValueError(
            f"`token_chunk_size` and `vocab_chunk_size` must be positive; got {token_chunk_size}, {vocab_chunk_size}."
        )


def compact_positions(hidden_states: torch.Tensor, keep: torch.Tensor, name: str) -> torch.Tensor:
    """The `(N, H)` rows of `(B, C, H)` hidden states where the `(B, C)` (or flat) boolean `keep` is set, checked
    finite: only these positions are projected."""
    rows = hidden_states.reshape(-1, hidden_states.size(-1))[keep.reshape(-1)]
    check_finite(name, rows.detach())
    return rows


def _fold_tiles(
    h_s: torch.Tensor,
    h_t: torch.Tensor,
    heads: LMHeads,
    token_chunk_size: int,
    vocab_chunk_size: int,
    teacher_entropy: bool = True,
) -> dict[str, torch.Tensor]:
    """
    Projects the `(N, H)` hidden states through both heads on `[token_chunk_size, vocab_chunk_size]` fp32 tiles and
    folds each pair into TRL's online-logsumexp accumulators. Returns them by `fold_tile`'s argument names: the
    running maxima and sums of both models, the student's `sum exp(z_s) z_s` and the two weighted gaps, plus, with
    `teacher_entropy`, the teacher's `sum exp(z_t - m) (z_t - m)` and `sum exp(z_t - m)` (`teacher_x_sum`,
    `teacher_exp_sum`). Only the rows both heads share are projected.
    """
    device, n_tokens = h_s.device, h_s.shape[0]
    kernel_args = heads.kernel_args
    names = ["student_sum", "student_x_sum", "teacher_sum", "teacher_weighted_gap", "student_weighted_gap"]
    if teacher_entropy:
        names += ["teacher_x_sum", "teacher_exp_sum"]
    sums = {name: torch.zeros((n_tokens,), device=device, dtype=torch.float32) for name in names}
    for name in ("student_max", "teacher_max"):
        sums[name] = torch.zeros((n_tokens,), device=device, dtype=torch.float32) - math.inf
    rows = min(n_tokens, token_chunk_size)
    s_weight, s_bias, s_dtype = heads.student_lm_head_weight, heads.student_lm_head_bias, heads.student_dtype
    t_weight, t_bias, t_dtype = heads.teacher_lm_head_weight, heads.teacher_lm_head_bias, heads.teacher_dtype
    # ZeRO-3 gathers the heads even on a rank with no valid token, so every rank joins the collective.
    with maybe_gather_lm_head_ctx(s_weight, s_bias), maybe_gather_lm_head_ctx(t_weight, t_bias):
        # Read after the gather (a partitioned parameter has no rows before it); the tiles slice both heads by it.
        vocab = min(s_weight.shape[0], t_weight.shape[0])
        vocab_cols = min(vocab, vocab_chunk_size)
        s_buf = torch.empty((rows, vocab_cols), device=device, dtype=torch.float32)
        t_buf = torch.empty((rows, vocab_cols), device=device, dtype=torch.float32)
        for token_start in range(0, n_tokens, token_chunk_size):
            token_end = min(token_start + token_chunk_size, n_tokens)
            n = token_end - token_start
            sl = slice(token_start, token_end)
            chunk_s, chunk_t = h_s[sl].to(s_dtype), h_t[sl].to(t_dtype)
            chunk_sums = {name: value[sl] for name, value in sums.items()}
            for start in range(0, vocab, vocab_chunk_size):
                end = min(start + vocab_chunk_size, vocab)
                s_tile, t_tile = s_buf[:n, : end - start], t_buf[:n, : end - start]
                project_tile(s_tile, chunk_s, s_weight, s_bias, start, end, s_dtype)
                project_tile(t_tile, chunk_t, t_weight, t_bias, start, end, t_dtype)
                fold_tile(s_tile, t_tile, **chunk_sums, kernel_args=kernel_args)
    return sums


def _stats_from_sums(sums: dict[str, torch.Tensor], valid: torch.Tensor, heads: LMHeads) -> TokenStats:
    """Entropies, both KLs and the log-normalizers from the folded accumulators, scattered back to `(B, C)`."""
    s_log_z = sums["student_max"] + torch.log(sums["student_sum"])
    t_log_z = sums["teacher_max"] + torch.log(sums["teacher_sum"])
    # Rounding can leave a divergence a hair below zero; the log-divergence axis needs them non-negative.
    entropy = (s_log_z - sums["student_x_sum"] / sums["student_sum"]).clamp_(min=0.0)
    reverse_kl = (sums["student_weighted_gap"] / sums["student_sum"] - s_log_z + t_log_z).clamp_(min=0.0)
    forward_kl = (sums["teacher_weighted_gap"] / sums["teacher_sum"] - t_log_z + s_log_z).clamp_(min=0.0)
    teacher_entropy = None
    if "teacher_x_sum" in sums:
        # Relative to the running max on both sides (`fold_teacher_x_sum`): no cancellation at low temperatures.
        exp_sum = sums["teacher_exp_sum"]
        teacher_entropy = (torch.log(exp_sum) - sums["teacher_x_sum"] / exp_sum).clamp_(min=0.0)

    def scatter(values: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(valid.shape, device=valid.device, dtype=torch.float32)
        out[valid] = values
        return out

    return TokenStats(
        entropy=scatter(entropy),
        reverse_kl=scatter(reverse_kl),
        forward_kl=scatter(forward_kl),
        mask=valid,
        teacher_entropy=None if teacher_entropy is None else scatter(teacher_entropy),
        student_log_z=scatter(s_log_z),
        teacher_log_z=scatter(t_log_z),
        projection=heads.signature,
    )


def projection_signature(temperature: float, kernel_args: dict) -> dict:
    """What statistics depend on besides the inputs: the temperature and both models' logit transforms. Stored in
    `TokenStats.projection` and compared by the loss before it reuses them."""
    transforms = ("s_scale", "s_softcap", "t_scale", "t_softcap", "S_HAS_SOFTCAP", "T_HAS_SOFTCAP")
    return {"temperature": temperature, **{k: kernel_args[k] for k in transforms}}
