"""Heads of different sizes over one tokenizer (Qwen2.5-14B: 152064 rows, Qwen2.5-1.5B: 151936): the statistics and
the loss are exact over the rows both heads share, whichever head is the longer one."""

import pytest
import torch
from reference import ragged_mask, reference_gjsd, reference_logits, reference_stats

from trl_tip import compute_token_stats, masked_gjsd_loss


B, C, H_S, H_T = 3, 7, 16, 24
# Like the real pair: the longer head has 32 more rows; TIP's tiles are 16 columns wide here (`small_tiles`).
HEAD_ROWS = [(128, 160), (160, 128)]
IDS = ["longer-teacher", "longer-student"]
MASK = ragged_mask([7, 3, 0], C)
SELECTED = MASK & (torch.arange(C) % 2 == 0)


def make_inputs(student_rows, teacher_rows, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "h_s": torch.randn(B, C, H_S, generator=g),
        "h_t": torch.randn(B, C, H_T, generator=g),
        "w_s": torch.randn(student_rows, H_S, generator=g) * 0.4,
        "w_t": torch.randn(teacher_rows, H_T, generator=g) * 0.4,
        "b_s": torch.randn(student_rows, generator=g) * 0.3,
        "b_t": torch.randn(teacher_rows, generator=g) * 0.3,
    }


def shared_logits(x, rows, h_s=None, w_s=None, b_s=None):
    """Both models' float64 logits over the first `rows` rows of each head."""
    h_s, w_s, b_s = (x[k] if v is None else v for k, v in (("h_s", h_s), ("w_s", w_s), ("b_s", b_s)))
    return (
        reference_logits(h_s, w_s[:rows], b_s[:rows]),
        reference_logits(x["h_t"], x["w_t"][:rows], x["b_t"][:rows]),
    )


def assert_rel_close(actual, expected, rtol=1e-5):
    actual, expected = actual.double(), expected.double()
    scale = expected.abs().max().clamp(min=1e-12)
    assert ((actual - expected).abs() / scale).max() <= rtol, ((actual - expected).abs().max(), scale)


@pytest.mark.parametrize("student_rows, teacher_rows", HEAD_ROWS, ids=IDS)
def test_stats_cover_the_shared_rows(student_rows, teacher_rows, small_tiles):
    x = make_inputs(student_rows, teacher_rows)
    stats = compute_token_stats(
        x["h_s"],
        x["h_t"],
        x["w_s"],
        x["w_t"],
        MASK,
        student_lm_head_bias=x["b_s"],
        teacher_lm_head_bias=x["b_t"],
        **small_tiles,
    )
    expected = reference_stats(*shared_logits(x, min(student_rows, teacher_rows)))
    for name, values in zip(("entropy", "reverse_kl", "forward_kl"), expected):
        assert_rel_close(getattr(stats, name)[MASK], values[MASK])
        assert torch.all(getattr(stats, name)[~MASK] == 0)
    # Zero logits for the shorter head's missing rows would not be exact: they would enter both normalizers.
    longer = max(student_rows, teacher_rows)
    z_s, z_t = (
        torch.nn.functional.pad(z, (0, longer - z.shape[-1]))
        for z in (
            reference_logits(x["h_s"], x["w_s"], x["b_s"]),
            reference_logits(x["h_t"], x["w_t"], x["b_t"]),
        )
    )
    zero_padded = reference_stats(z_s, z_t)
    assert (stats.reverse_kl[MASK].double() - zero_padded[1][MASK]).abs().max() > 1e-2


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("reuse_stats", [False, True], ids=["own-forward", "stats-reused"])
@pytest.mark.parametrize("student_rows, teacher_rows", HEAD_ROWS, ids=IDS)
def test_loss_and_gradients_cover_the_shared_rows(student_rows, teacher_rows, beta, reuse_stats, small_tiles):
    """Loss and gradients equal those of the heads cut to their shared rows; the student's rows past the teacher's
    get a zero gradient. Also when the statistics stand in for the loss's forward (beta 0 and 1)."""
    x = make_inputs(student_rows, teacher_rows)
    rows = min(student_rows, teacher_rows)
    h_s, w_s, b_s = (x[k].clone().requires_grad_(True) for k in ("h_s", "w_s", "b_s"))
    heads = {"student_lm_head_bias": b_s, "teacher_lm_head_bias": x["b_t"]}
    stats = None
    if reuse_stats:
        stats = compute_token_stats(h_s, x["h_t"], w_s, x["w_t"], MASK, **heads, **small_tiles)
    loss, divergence_sum, num_selected = masked_gjsd_loss(
        h_s, x["h_t"], w_s, x["w_t"], SELECTED, beta=beta, stats=stats, **heads
    )
    loss.backward()

    rh_s, rw_s, rb_s = (x[k].double().requires_grad_(True) for k in ("h_s", "w_s", "b_s"))
    per_token = reference_gjsd(*shared_logits(x, rows, rh_s, rw_s, rb_s), beta)
    ref_loss = per_token[SELECTED].sum() / SELECTED.sum()
    ref_loss.backward()

    assert int(num_selected) == int(SELECTED.sum())
    assert_rel_close(loss.detach(), ref_loss.detach())
    assert_rel_close(divergence_sum, ref_loss.detach() * int(SELECTED.sum()))
    assert w_s.grad.shape == (student_rows, H_S) and b_s.grad.shape == (student_rows,)
    assert_rel_close(h_s.grad, rh_s.grad)
    assert_rel_close(w_s.grad, rw_s.grad)
    assert_rel_close(b_s.grad, rb_s.grad)
    assert torch.all(w_s.grad[rows:] == 0) and torch.all(b_s.grad[rows:] == 0)


def test_a_longer_student_head_is_cut_by_views(monkeypatch):
    """The tiles read the student head's shared rows in place: no copy of the head is made to cut it."""
    import trl.kernels.chunked_divergence as kernel

    x = make_inputs(160, 128)
    w_s = x["w_s"].clone().requires_grad_(True)
    seen = []
    original = kernel._project
    monkeypatch.setattr(
        kernel, "_project", lambda tile, h, weight, *a: seen.append(weight) or original(tile, h, weight, *a)
    )
    loss, _, _ = masked_gjsd_loss(x["h_s"], x["h_t"], w_s, x["w_t"], SELECTED, beta=1.0)
    loss.backward()
    student = [w for w in seen if w.shape[1] == H_S]
    assert len(student) == 2  # the forward's tile and the backward's
    for weight in student:
        assert weight.shape == (128, H_S) and weight.data_ptr() == w_s.data_ptr()


def test_each_bias_matches_its_own_head():
    x = make_inputs(128, 160)
    with pytest.raises(ValueError, match=r"`teacher_lm_head_bias` must have shape \(160,\); got \(128,\)"):
        compute_token_stats(x["h_s"], x["h_t"], x["w_s"], x["w_t"], MASK, teacher_lm_head_bias=x["b_t"][:128])
