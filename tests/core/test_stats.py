"""`compute_token_stats` is exact (against full float64 logits), chunked, gradient-free, and rejects bad input."""

import pytest
import torch
from reference import ragged_mask, reference_logits, reference_stats

from trl_tip import TokenStats, compute_token_stats


B, C, H_S, H_T, V = 3, 7, 16, 24, 53


def make_inputs(tied=False, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    h_s = torch.randn(B, C, H_S, generator=g)
    h_t = torch.randn(B, C, H_T, generator=g)
    w_s = torch.randn(V, H_S, generator=g) * 0.4
    w_t = torch.randn(V, H_T, generator=g) * 0.4
    if tied:
        # A tied student head is its input embedding: the hidden states are built from the same matrix.
        h_s = torch.tanh(w_s[torch.randint(0, V, (B, C), generator=g)] * 2.5)
    b_s = torch.randn(V, generator=g) * 0.3 if bias else None
    b_t = torch.randn(V, generator=g) * 0.3 if bias else None
    return h_s, h_t, w_s, w_t, b_s, b_t


def assert_rel_close(actual, expected, rtol=1e-5):
    actual, expected = actual.double(), expected.double()
    scale = expected.abs().max().clamp(min=1e-12)
    assert ((actual - expected).abs() / scale).max() <= rtol, ((actual - expected).abs().max(), scale)


@pytest.mark.parametrize("temperature", [0.7, 1.0, 2.0])
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_stats_match_full_logit_float64_reference(temperature, tied, bias, small_tiles):
    h_s, h_t, w_s, w_t, b_s, b_t = make_inputs(tied=tied, bias=bias)
    mask = ragged_mask([7, 3, 0], C)
    stats = compute_token_stats(
        h_s,
        h_t,
        w_s,
        w_t,
        mask,
        temperature=temperature,
        student_lm_head_bias=b_s,
        teacher_lm_head_bias=b_t,
        **small_tiles,
    )
    ref = reference_stats(
        reference_logits(h_s, w_s, b_s, temperature=temperature),
        reference_logits(h_t, w_t, b_t, temperature=temperature),
    )
    for name, expected in zip(("entropy", "reverse_kl", "forward_kl"), ref):
        actual = getattr(stats, name)
        assert actual.dtype == torch.float32
        assert_rel_close(actual[mask], expected[mask])
        assert torch.all(actual[~mask] == 0), f"{name} must be 0 at invalid positions"
    assert torch.equal(stats.mask, mask)


def test_logit_scale_and_softcapping_follow_trl_transform(small_tiles):
    h_s, h_t, w_s, w_t, _, _ = make_inputs()
    mask = torch.ones(B, C, dtype=torch.bool)
    stats = compute_token_stats(
        h_s,
        h_t,
        w_s,
        w_t,
        mask,
        temperature=1.3,
        student_logit_scale=0.5,
        teacher_logit_scale=2.0,
        student_final_logit_softcapping=3.0,
        teacher_final_logit_softcapping=5.0,
        **small_tiles,
    )
    ref = reference_stats(
        reference_logits(h_s, w_s, logit_scale=0.5, softcap=3.0, temperature=1.3),
        reference_logits(h_t, w_t, logit_scale=2.0, softcap=5.0, temperature=1.3),
    )
    for name, expected in zip(("entropy", "reverse_kl", "forward_kl"), ref):
        assert_rel_close(getattr(stats, name), expected)


def test_tile_size_does_not_change_the_result():
    h_s, h_t, w_s, w_t, _, _ = make_inputs()
    mask = ragged_mask([5, 7, 2], C)
    one_tile = compute_token_stats(h_s, h_t, w_s, w_t, mask)
    many_tiles = compute_token_stats(h_s, h_t, w_s, w_t, mask, token_chunk_size=2, vocab_chunk_size=7)
    for name in ("entropy", "reverse_kl", "forward_kl"):
        torch.testing.assert_close(getattr(one_tile, name), getattr(many_tiles, name), rtol=1e-5, atol=1e-6)


def test_identical_models_have_zero_divergence():
    h_s, _, w_s, _, _, _ = make_inputs()
    stats = compute_token_stats(h_s, h_s.clone(), w_s, w_s.clone(), torch.ones(B, C))
    assert stats.reverse_kl.abs().max() < 1e-5 and stats.forward_kl.abs().max() < 1e-5
    assert (stats.entropy > 0).all()


def test_stats_pass_records_no_gradient():
    h_s, h_t, w_s, w_t, _, _ = make_inputs()
    h_s.requires_grad_(True)
    w_s.requires_grad_(True)
    stats = compute_token_stats(h_s, h_t, w_s, w_t, torch.ones(B, C))
    assert not stats.entropy.requires_grad and stats.entropy.grad_fn is None


def test_all_masked_gives_zeros():
    h_s, h_t, w_s, w_t, _, _ = make_inputs()
    stats = compute_token_stats(h_s, h_t, w_s, w_t, torch.zeros(B, C))
    assert stats.num_valid == 0
    assert torch.all(stats.entropy == 0) and torch.all(stats.reverse_kl == 0)


def test_nan_at_padding_is_ignored_but_nan_at_valid_token_is_rejected():
    h_s, h_t, w_s, w_t, _, _ = make_inputs()
    mask = ragged_mask([7, 3, 0], C)
    h_s[1, 5] = float("nan")  # padding position: never projected
    stats = compute_token_stats(h_s, h_t, w_s, w_t, mask)
    assert torch.isfinite(stats.entropy).all()
    h_t[0, 2] = float("inf")
    with pytest.raises(ValueError, match="teacher_hidden_states.*NaN or inf"):
        compute_token_stats(h_s, h_t, w_s, w_t, mask)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda a: a.update(mask=torch.ones(B, C + 1)), r"`mask` must have shape \(B, C\)"),
        (lambda a: a.update(h_t=torch.randn(B, C - 1, H_T)), "same \\(B, C\\) positions"),
        (lambda a: a.update(h_s=torch.randn(B * C, H_S)), "must have shape \\(B, C, H\\)"),
        (lambda a: a.update(w_s=torch.randn(V, H_S + 2)), "student_lm_head_weight` must have shape \\(V, H\\)"),
        (lambda a: a.update(w_t=torch.randn(V, H_T, device="meta")), "one device.*teacher_lm_head_weight on meta"),
        (lambda a: a.update(temperature=0.0), "`temperature` must be a positive number"),
    ],
)
def test_bad_input_names_the_field(mutate, message):
    h_s, h_t, w_s, w_t, _, _ = make_inputs()
    args = {"h_s": h_s, "h_t": h_t, "w_s": w_s, "w_t": w_t, "mask": torch.ones(B, C), "temperature": 1.0}
    mutate(args)
    with pytest.raises(ValueError, match=message):
        compute_token_stats(
            args["h_s"], args["h_t"], args["w_s"], args["w_t"], args["mask"], temperature=args["temperature"]
        )


def test_token_stats_checks_shapes():
    with pytest.raises(ValueError, match="`forward_kl` must have shape"):
        TokenStats(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3, dtype=torch.bool))
