"""`masked_gjsd_loss`: exact loss and gradients on the selected tokens, TRL parity at 100%, safe edge cases."""

import pytest
import torch
from reference import ragged_mask, reference_gjsd, reference_logits
from trl.experimental.gkd import GKDTrainer
from trl.trainer.distillation_trainer import _chunked_divergence_loss

from trl_tip import compute_token_stats, masked_gjsd_loss


B, C, H_S, H_T, V = 3, 6, 16, 20, 41
BETAS = [0.0, 0.1, 0.5, 0.9, 1.0]


def make_inputs(seed=0, bias=False):
    g = torch.Generator().manual_seed(seed)
    return {
        "h_s": torch.randn(B, C, H_S, generator=g),
        "h_t": torch.randn(B, C, H_T, generator=g),
        "w_s": torch.randn(V, H_S, generator=g) * 0.4,
        "w_t": torch.randn(V, H_T, generator=g) * 0.4,
        "b_s": torch.randn(V, generator=g) * 0.3 if bias else None,
        "b_t": torch.randn(V, generator=g) * 0.3 if bias else None,
    }


def leaf(t):
    return None if t is None else t.clone().requires_grad_(True)


def assert_rel_close(actual, expected, rtol=1e-5):
    actual, expected = actual.double(), expected.double()
    scale = expected.abs().max().clamp(min=1e-12)
    assert ((actual - expected).abs() / scale).max() <= rtol, ((actual - expected).abs().max(), scale)


SELECTED = torch.tensor(
    [[1, 0, 1, 1, 0, 0], [0, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.bool
)  # ragged, one empty row
VALID = ragged_mask([6, 4, 0], C)


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("temperature", [0.7, 1.0, 2.0])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("reuse_stats", [False, True], ids=["own-forward", "stats-reused"])
def test_loss_and_gradients_match_float64_reference(beta, temperature, bias, reuse_stats, small_tiles):
    """Also when the statistics pass's divergences and normalizers stand in for the loss's own forward (beta 0/1)."""
    x = make_inputs(bias=bias)
    h_s, w_s, b_s = leaf(x["h_s"]), leaf(x["w_s"]), leaf(x["b_s"])
    weights = torch.rand(B, C) + 0.5
    stats = None
    if reuse_stats:
        stats = compute_token_stats(
            h_s,
            x["h_t"],
            w_s,
            x["w_t"],
            VALID,
            temperature=temperature,
            student_lm_head_bias=b_s,
            teacher_lm_head_bias=x["b_t"],
            **small_tiles,
        )
    loss, divergence_sum, num_selected = masked_gjsd_loss(
        h_s,
        x["h_t"],
        w_s,
        x["w_t"],
        SELECTED,
        beta=beta,
        temperature=temperature,
        token_weights=weights,
        student_lm_head_bias=b_s,
        teacher_lm_head_bias=x["b_t"],
        stats=stats,
    )
    loss.backward()

    rh_s, rw_s, rb_s = (
        None if t is None else t.detach().double().requires_grad_(True) for t in (x["h_s"], x["w_s"], x["b_s"])
    )
    per_token = reference_gjsd(
        reference_logits(rh_s, rw_s, rb_s, temperature=temperature),
        reference_logits(x["h_t"], x["w_t"], x["b_t"], temperature=temperature),
        beta,
    )
    ref_loss = (per_token * weights.double())[SELECTED].sum() / SELECTED.sum()
    ref_loss.backward()

    assert int(num_selected) == 4
    assert_rel_close(loss.detach(), ref_loss.detach())
    assert_rel_close(divergence_sum, ref_loss.detach() * 4)
    assert_rel_close(h_s.grad, rh_s.grad)
    assert_rel_close(w_s.grad, rw_s.grad)
    if bias:
        assert_rel_close(b_s.grad, rb_s.grad)
    # Unselected positions get no gradient at all.
    assert torch.all(h_s.grad[~SELECTED] == 0)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_tied_student_head_gradient_flows_through_both_uses(beta, small_tiles):
    """With tied embeddings the same matrix makes the hidden states and the head; both paths reach it."""
    g = torch.Generator().manual_seed(3)
    embedding = (torch.randn(V, H_S, generator=g) * 0.4).requires_grad_(True)
    ids = torch.randint(0, V, (B, C), generator=g)
    h_t, w_t = torch.randn(B, C, H_T, generator=g), torch.randn(V, H_T, generator=g) * 0.4
    h_s = torch.tanh(embedding[ids] * 2.5)
    loss, _, _ = masked_gjsd_loss(h_s, h_t, embedding, w_t, VALID, beta=beta)
    loss.backward()

    ref_embedding = embedding.detach().double().requires_grad_(True)
    ref_h = torch.tanh(ref_embedding[ids] * 2.5)
    per_token = reference_gjsd(reference_logits(ref_h, ref_embedding), reference_logits(h_t, w_t), beta)
    (per_token[VALID].sum() / VALID.sum()).backward()
    assert_rel_close(embedding.grad, ref_embedding.grad)


@pytest.mark.parametrize("beta", BETAS)
def test_full_selection_equals_trl_gkd_and_distillation_losses(beta):
    x = make_inputs(seed=1)
    mask = VALID
    h_s = leaf(x["h_s"])
    ours, _, _ = masked_gjsd_loss(h_s, x["h_t"], x["w_s"], x["w_t"], mask, beta=beta, temperature=0.9)

    logits_s = (x["h_s"] @ x["w_s"].T).double()
    logits_t = (x["h_t"] @ x["w_t"].T).double()
    labels = torch.where(mask, 0, -100)
    gkd = GKDTrainer.generalized_jsd_loss(logits_s, logits_t, labels=labels, beta=beta, temperature=0.9)
    trl_chunked, _, _ = _chunked_divergence_loss(
        x["h_s"], x["h_t"], x["w_s"], x["w_t"], mask.long(), beta, temperature=0.9
    )
    assert_rel_close(ours.detach(), gkd)
    assert_rel_close(ours.detach(), trl_chunked)


def test_num_items_in_batch_gives_gradient_accumulation_correct_sums():
    """Two micro-batches divided by the global count sum to the loss of the pooled batch."""
    x = make_inputs(seed=2)
    sel = SELECTED | ragged_mask([2, 2, 2], C)
    whole, _, _ = masked_gjsd_loss(x["h_s"], x["h_t"], x["w_s"], x["w_t"], sel)
    total = sel.sum()
    parts = [
        masked_gjsd_loss(x["h_s"][rows], x["h_t"][rows], x["w_s"], x["w_t"], sel[rows], num_items_in_batch=total)[0]
        for rows in (slice(0, 1), slice(1, 3))
    ]
    torch.testing.assert_close(parts[0] + parts[1], whole, rtol=1e-6, atol=1e-7)


def test_normalization_all_divides_by_valid_tokens():
    x = make_inputs(seed=4)
    by_selected, total, count = masked_gjsd_loss(x["h_s"], x["h_t"], x["w_s"], x["w_t"], SELECTED, valid_mask=VALID)
    by_all, _, _ = masked_gjsd_loss(
        x["h_s"], x["h_t"], x["w_s"], x["w_t"], SELECTED, normalization="all", valid_mask=VALID
    )
    torch.testing.assert_close(by_selected, total / count)
    torch.testing.assert_close(by_all, total / VALID.sum())


def test_teacher_receives_no_gradient():
    x = make_inputs()
    h_t, w_t = leaf(x["h_t"]), leaf(x["w_t"])
    h_s = leaf(x["h_s"])
    loss, _, _ = masked_gjsd_loss(h_s, h_t, x["w_s"], w_t, VALID, beta=0.5)
    loss.backward()
    assert h_t.grad is None and w_t.grad is None
    assert h_s.grad is not None


def test_all_masked_batch_gives_zero_loss_and_finite_zero_gradient():
    x = make_inputs()
    h_s, w_s = leaf(x["h_s"]), leaf(x["w_s"])
    for beta in BETAS:
        h_s.grad = w_s.grad = None
        loss, divergence_sum, count = masked_gjsd_loss(h_s, x["h_t"], w_s, x["w_t"], torch.zeros(B, C), beta=beta)
        loss.backward()
        assert loss.item() == 0.0 and divergence_sum.item() == 0.0 and count.item() == 0
        assert torch.all(h_s.grad == 0) and torch.isfinite(h_s.grad).all()
        assert w_s.grad is None or torch.all(w_s.grad == 0)


def test_selection_of_unselected_nan_positions_is_harmless_but_selected_nan_is_rejected():
    x = make_inputs()
    x["h_s"][2, 0] = float("nan")  # not selected
    loss, _, _ = masked_gjsd_loss(x["h_s"], x["h_t"], x["w_s"], x["w_t"], SELECTED)
    assert torch.isfinite(loss)
    x["h_s"][0, 0] = float("inf")  # selected
    with pytest.raises(ValueError, match="student_hidden_states.*NaN or inf"):
        masked_gjsd_loss(x["h_s"], x["h_t"], x["w_s"], x["w_t"], SELECTED)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"beta": 1.5}, r"`beta` must be a number in \[0, 1\]"),
        ({"beta": -0.1}, r"`beta` must be a number in \[0, 1\]"),
        ({"temperature": -1.0}, "`temperature` must be a positive number"),
        ({"normalization": "tokens"}, "`normalization` must be one of 'selected', 'all'"),
        ({"normalization": "all"}, "needs `valid_mask`"),
        ({"valid_mask": torch.zeros(B, C)}, "selects tokens that `valid_mask` marks invalid"),
        ({"token_weights": torch.ones(B, C + 1)}, "`token_weights` must have shape"),
        ({"token_weights": -torch.ones(B, C)}, "`token_weights` must be non-negative"),
    ],
)
def test_bad_arguments_name_the_field(kwargs, message):
    x = make_inputs()
    with pytest.raises(ValueError, match=message):
        masked_gjsd_loss(x["h_s"], x["h_t"], x["w_s"], x["w_t"], SELECTED, **kwargs)


def test_reused_stats_must_match_the_loss_projection():
    x = make_inputs()
    stats = compute_token_stats(x["h_s"], x["h_t"], x["w_s"], x["w_t"], VALID, temperature=2.0)
    with pytest.raises(ValueError, match="recompute them with the same temperature"):
        masked_gjsd_loss(x["h_s"], x["h_t"], x["w_s"], x["w_t"], SELECTED, temperature=1.0, stats=stats)
    narrow = compute_token_stats(x["h_s"], x["h_t"], x["w_s"], x["w_t"], ragged_mask([1, 1, 0], C))
    with pytest.raises(ValueError, match="`stats.mask` marks invalid"):
        masked_gjsd_loss(x["h_s"], x["h_t"], x["w_s"], x["w_t"], SELECTED, stats=narrow)


def test_reusing_stats_skips_the_forward_projection(monkeypatch):
    """With stats given, the loss projects tiles only in the backward, and only the kept tokens."""
    import trl.kernels.chunked_divergence as kernel

    rows = []
    original = kernel._project
    monkeypatch.setattr(kernel, "_project", lambda tile, h, *a: rows.append(h.shape[0]) or original(tile, h, *a))
    x = make_inputs()
    h_s = leaf(x["h_s"])
    stats = compute_token_stats(h_s, x["h_t"], x["w_s"], x["w_t"], VALID)
    rows.clear()
    loss, _, _ = masked_gjsd_loss(h_s, x["h_t"], x["w_s"], x["w_t"], SELECTED, stats=stats)
    assert rows == []
    loss.backward()
    assert rows == [int(SELECTED.sum())] * 2  # student and teacher tile, one vocabulary chunk
