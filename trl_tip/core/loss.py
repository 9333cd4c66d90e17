"""The masked generalized-JSD loss: TRL's chunked divergence, evaluated only on the tokens a selector kept."""

from __future__ import annotations

import torch

from .checks import check_beta, check_choice, check_finite
from .stats import LMHeads, TokenStats, compact_positions
from .trl_kernels import ChunkedDivergenceFunction, DivergenceFromStats, on_shared_rows


LOSS_NORMALIZATIONS = ("selected", "all")


def masked_gjsd_loss(
    student_hidden_states: torch.Tensor,
    teacher_hidden_states: torch.Tensor,
    student_lm_head_weight: torch.Tensor,
    teacher_lm_head_weight: torch.Tensor,
    selected_mask: torch.Tensor,
    *,
    beta: float = 1.0,
    temperature: float = 1.0,
    token_weights: torch.Tensor | None = None,
    normalization: str = "selected",
    valid_mask: torch.Tensor | None = None,
    num_items_in_batch: torch.Tensor | int | None = None,
    student_lm_head_bias: torch.Tensor | None = None,
    teacher_lm_head_bias: torch.Tensor | None = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_final_logit_softcapping: float | None = None,
    teacher_final_logit_softcapping: float | None = None,
    stats: TokenStats | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """
    Generalized JSD between student and teacher over the selected completion tokens only.

    The selected positions are compacted before the vocabulary projection, so compute scales with the kept count,
    and TRL's [`~trl.kernels.chunked_divergence.ChunkedDivergenceFunction`] projects them on fp32 tiles, so memory
    never scales with tokens x vocabulary. The gradient reaches the student hidden states, head weight and bias; the
    teacher receives none.

    Args:
        student_hidden_states (`torch.Tensor`):
            Student backbone output `(B, C, H_s)` aligned to the completion tokens.
        teacher_hidden_states (`torch.Tensor`):
            Teacher backbone output `(B, C, H_t)` aligned to the same tokens.
        student_lm_head_weight (`torch.Tensor`):
            Student `lm_head` weight `(V_s, H_s)`.
        teacher_lm_head_weight (`torch.Tensor`):
            Teacher `lm_head` weight `(V_t, H_t)`. The heads may differ in rows (one tokenizer's vocabulary padded to
            different sizes); the divergence then covers the `min(V_s, V_t)` rows they share, and the student's rows
            past them get a zero gradient.
        selected_mask (`torch.Tensor`):
            `(B, C)` mask of the tokens that enter the loss (TRL's `completion_mask` at 100% selection).
        beta (`float`, *optional*, defaults to `1.0`):
            `0.0` forward KL(T || S), `1.0` reverse KL(S || T) (TIP's loss), in between the generalized JSD with
            mixture `(1 - beta) P_S + beta P_T`; TRL's convention.
        temperature (`float`, *optional*, defaults to `1.0`):
            Softmax temperature for both models.
        token_weights (`torch.Tensor`, *optional*):
            `(B, C)` non-negative weights that multiply each selected token's divergence.
        normalization (`str`, *optional*, defaults to `"selected"`):
            Local denominator when `num_items_in_batch` is not given: `"selected"` divides by the number of selected
            tokens (the paper's rule), `"all"` by the number of valid tokens in `valid_mask` (plain OPD's scale).
        valid_mask (`torch.Tensor`, *optional*):
            `(B, C)` mask of all valid completion tokens; required for `normalization="all"`.
        num_items_in_batch (`torch.Tensor` or `int`, *optional*):
            Global denominator (across gradient accumulation and ranks), as TRL's `num_items_in_batch`: the loss is
            `sum / num_items_in_batch`. The caller counts selected or valid tokens according to `normalization`.
        student_lm_head_bias, teacher_lm_head_bias (`torch.Tensor`, *optional*):
            `(V_s,)` and `(V_t,)` head biases.
        student_logit_scale, teacher_logit_scale (`float`, *optional*, defaults to `1.0`):
            Logit multipliers, as TRL reads them from the model config.
        student_final_logit_softcapping, teacher_final_logit_softcapping (`float`, *optional*):
            Gemma-style logit softcapping.
        stats ([`~trl_tip.TokenStats`], *optional*):
            The output of [`~trl_tip.compute_token_stats`] on these same inputs, temperature and transforms. For
            `beta` 0 or 1 its divergences and log-normalizers are reused, so only the backward projects the kept
            tokens; otherwise it is ignored.

    Returns:
        `tuple[torch.Tensor, torch.Tensor, torch.Tensor]`: the scalar loss, the detached sum of the selected tokens'
        (weighted) divergence, and the local number of selected tokens. Sums are returned so callers can reduce
        across ranks.
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
    heads.check_inputs(student_hidden_states, teacher_hidden_states, selected_mask, "selected_mask")
    beta = check_beta(beta)
    heads = heads.with_checked_temperature()
    check_choice("normalization", normalization, LOSS_NORMALIZATIONS)
    selected = (selected_mask != 0).reshape(-1)
    _check_valid_mask(valid_mask, selected_mask, selected, normalization, num_items_in_batch)
    h_s = compact_positions(student_hidden_states, selected, "student_hidden_states")
    h_t = compact_positions(teacher_hidden_states, selected, "teacher_hidden_states").detach()
    weights = _selected_weights(token_weights, selected_mask, selected)
    heads = heads.materialized(student_hidden_states, teacher_hidden_states)
    # Called even with nothing selected: under ZeRO-3 the functions gather the heads, a collective every rank joins,
    # and an empty input still yields a zero loss connected to the student's graph. The teacher's head is passed as
    # the parameter itself (both functions return no gradient for it): ZeRO-3's gather needs the parameter object.
    if stats is not None and beta in (0.0, 1.0):
        _check_reusable(stats, selected_mask, selected, heads.signature)
        per_token_divergence = _divergence_from_stats(h_s, h_t, heads, stats, selected, beta)
    else:
        per_token_divergence = _chunked_divergence(h_s, h_t, heads, beta)
    if weights is not None:
        per_token_divergence = per_token_divergence * weights
    loss_sum = per_token_divergence.sum()
    num_selected = selected.sum()
    loss = _normalized_loss(loss_sum, num_selected, normalization, valid_mask, num_items_in_batch)
    return loss, loss_sum.detach(), num_selected


def _check_valid_mask(valid_mask, selected_mask, selected, normalization: str, num_items_in_batch) -> None:
    """`valid_mask` covers `selected_mask` (same shape, no selected token outside it), or is not needed."""
    if valid_mask is not None:
        if tuple(valid_mask.shape) != tuple(selected_mask.shape):
            raise ValueError(
                f"`valid_mask` must have shape {tuple(selected_mask.shape)} like `selected_mask`; got "
                f"{tuple(valid_mask.shape)}."
            )
        if bool((selected & (valid_mask == 0).reshape(-1).to(selected.device)).any()):
            raise ValueError(
                "`selected_mask` selects tokens that `valid_mask` marks invalid (padding or tool output)."
            )
    elif normalization == "all" and num_items_in_batch is None:
        raise ValueError('`normalization="all"` needs `valid_mask` (or a global `num_items_in_batch`).')


def _selected_weights(
    token_weights: torch.Tensor | None, selected_mask: torch.Tensor, selected: torch.Tensor
) -> torch.Tensor | None:
    """The float32 weights of the selected tokens, in compacted order, checked finite and non-negative."""
    if token_weights is None:
        return None
    if tuple(token_weights.shape) != tuple(selected_mask.shape):
        raise ValueError(
            f"`token_weights` must have shape {tuple(selected_mask.shape)} like `selected_mask`; got "
            f"{tuple(token_weights.shape)}."
        )
    weights = token_weights.reshape(-1)[selected].to(torch.float32)
    check_finite("token_weights", weights)
    if bool((weights < 0).any()):
        raise ValueError("`token_weights` must be non-negative.")
    return weights


def _divergence_from_stats(
    h_s: torch.Tensor, h_t: torch.Tensor, heads: LMHeads, stats: TokenStats, selected: torch.Tensor, beta: float
) -> torch.Tensor:
    """KL(T || S) (`beta` 0) or KL(S || T) (`beta` 1) per selected token, read from `stats`; only the backward
    projects (TRL's `ChunkedDivergenceFunction.backward`)."""
    divergence = stats.reverse_kl if beta == 1.0 else stats.forward_kl
    return on_shared_rows(
        DivergenceFromStats,
        h_s,
        heads.student_lm_head_weight,
        heads.student_lm_head_bias,
        h_t,
        heads.teacher_lm_head_weight,
        heads.teacher_lm_head_bias,
        divergence.reshape(-1)[selected].detach(),
        stats.student_log_z.reshape(-1)[selected].detach(),
        stats.teacher_log_z.reshape(-1)[selected].detach(),
        beta,
        heads.kernel_args,
        (heads.student_dtype, heads.teacher_dtype),
    )


def _chunked_divergence(h_s: torch.Tensor, h_t: torch.Tensor, heads: LMHeads, beta: float) -> torch.Tensor:
    """The generalized JSD per selected token, forward and backward on TRL's `ChunkedDivergenceFunction` tiles."""
    per_token_divergence, _ = on_shared_rows(
        ChunkedDivergenceFunction,
        h_s,
        heads.student_lm_head_weight,
        heads.student_lm_head_bias,
        h_t,
        heads.teacher_lm_head_weight,
        heads.teacher_lm_head_bias,
        beta,
        heads.temperature,
        heads.student_logit_scale,
        heads.student_final_logit_softcapping,
        heads.teacher_logit_scale,
        heads.teacher_final_logit_softcapping,
    )
    return per_token_divergence


def _normalized_loss(
    loss_sum: torch.Tensor,
    num_selected: torch.Tensor,
    normalization: str,
    valid_mask: torch.Tensor | None,
    num_items_in_batch: torch.Tensor | int | None,
) -> torch.Tensor:
    """`loss_sum` over the global `num_items_in_batch` when given, else over the local selected or valid count."""
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(loss_sum.device)
        return loss_sum / num_items_in_batch
    denominator = num_selected if normalization == "selected" else (valid_mask != 0).sum().to(loss_sum.device)
    # Clamped so an all-masked micro-batch reduces to a finite zero rather than 0 / 0.
    return loss_sum / denominator.clamp(min=1)


def _check_reusable(stats, selected_mask, selected, expected: dict) -> None:
    """`stats` may stand in for the loss's forward: same positions, log-normalizers present, same projection."""
    if tuple(stats.mask.shape) != tuple(selected_mask.shape):
        raise ValueError(
            f"`stats` covers shape {tuple(stats.mask.shape)} but `selected_mask` has {tuple(selected_mask.shape)}."
        )
    if stats.student_log_z is None or stats.teacher_log_z is None or stats.projection is None:
        raise ValueError(
            "`stats` lacks log-normalizers; pass the output of `compute_token_stats` or leave `stats` unset."
        )
    if stats.projection != expected:
        raise ValueError(
            f"`stats` were computed with {stats.projection} but the loss uses {expected}; recompute them with the "
            "same temperature and logit transforms."
        )
    if bool((selected & ~stats.mask.reshape(-1).to(selected.device)).any()):
        raise ValueError("`selected_mask` selects tokens that `stats.mask` marks invalid (padding or tool output).")
