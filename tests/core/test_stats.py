"""`compute_token_stats` is exact (against full float64 logits), chunked, gradient-free, and rejects bad input."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from reference import ragged_mask, reference_entropy, reference_logits, reference_stats

from trl_tip import TokenStats, compute_token_stats


B, C, H_S, H_T, V = 3, 7, 16, 24, 53
STAT_NAMES = ("entropy", "reverse_kl", "forward_kl", "teacher_entropy")


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
    z_t = reference_logits(h_t, w_t, b_t, temperature=temperature)
    ref = (*reference_stats(reference_logits(h_s, w_s, b_s, temperature=temperature), z_t), reference_entropy(z_t))
    for name, expected in zip(STAT_NAMES, ref):
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
    z_t = reference_logits(h_t, w_t, logit_scale=2.0, softcap=5.0, temperature=1.3)
    ref = (
        *reference_stats(reference_logits(h_s, w_s, logit_scale=0.5, softcap=3.0, temperature=1.3), z_t),
        reference_entropy(z_t),
    )
    for name, expected in zip(STAT_NAMES, ref):
        assert_rel_close(getattr(stats, name), expected)


def test_tile_size_does_not_change_the_result():
    h_s, h_t, w_s, w_t, _, _ = make_inputs()
    mask = ragged_mask([5, 7, 2], C)
    one_tile = compute_token_stats(h_s, h_t, w_s, w_t, mask)
    many_tiles = compute_token_stats(h_s, h_t, w_s, w_t, mask, token_chunk_size=2, vocab_chunk_size=7)
    for name in STAT_NAMES:
        torch.testing.assert_close(getattr(one_tile, name), getattr(many_tiles, name), rtol=1e-5, atol=1e-6)


def test_identical_models_have_zero_divergence():
    h_s, _, w_s, _, _, _ = make_inputs()
    stats = compute_token_stats(h_s, h_s.clone(), w_s, w_s.clone(), torch.ones(B, C))
    assert stats.reverse_kl.abs().max() < 1e-5 and stats.forward_kl.abs().max() < 1e-5
    assert (stats.entropy > 0).all()
    torch.testing.assert_close(stats.teacher_entropy, stats.entropy, rtol=1e-5, atol=1e-6)


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
    assert torch.all(stats.teacher_entropy == 0)


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


@pytest.mark.parametrize("temperature", [0.7, 2.0])
@pytest.mark.parametrize(
    "student_rows, teacher_rows", [(V, V), (48, 64), (64, 48)], ids=["same", "longer-teacher", "longer-student"]
)
def test_teacher_entropy_matches_float64_reference(temperature, student_rows, teacher_rows, small_tiles):
    """H(P_T) from the extra accumulator equals the float64 full-logit entropy of the teacher, over the rows both heads
    share, with padding, temperature, several token and vocabulary tiles, and logit scale / softcapping."""
    h_s, h_t, _, _, _, _ = make_inputs()
    g = torch.Generator().manual_seed(1)
    w_s, w_t = torch.randn(student_rows, H_S, generator=g), torch.randn(teacher_rows, H_T, generator=g) * 0.5
    b_t = torch.randn(teacher_rows, generator=g)
    mask = ragged_mask([7, 4, 0], C)
    rows = min(student_rows, teacher_rows)
    for transform in ({}, {"teacher_logit_scale": 1.5, "teacher_final_logit_softcapping": 4.0}):
        stats = compute_token_stats(
            h_s, h_t, w_s, w_t, mask, temperature=temperature, teacher_lm_head_bias=b_t, **transform, **small_tiles
        )
        expected = reference_entropy(
            reference_logits(
                h_t,
                w_t[:rows],
                b_t[:rows],
                logit_scale=transform.get("teacher_logit_scale", 1.0),
                softcap=transform.get("teacher_final_logit_softcapping"),
                temperature=temperature,
            )
        )
        actual = stats.teacher_entropy
        assert actual.dtype == torch.float32 and actual.shape == mask.shape
        assert_rel_close(actual[mask], expected[mask])
        assert torch.all(actual[~mask] == 0)


def test_stats_under_bf16_autocast_match_the_reference_of_the_rounded_inputs(small_tiles):
    """Under `bf16=True` training the projections take bf16-rounded operands into fp32 tiles; every statistic,
    the teacher's entropy included, is then exact for the rounded inputs (no fold may drop to bf16)."""
    h_s, h_t, w_s, w_t, _, _ = make_inputs()
    mask = ragged_mask([7, 3, 0], C)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        stats = compute_token_stats(h_s, h_t, w_s, w_t, mask, temperature=0.7, **small_tiles)
    h_s, h_t, w_s, w_t = (t.to(torch.bfloat16) for t in (h_s, h_t, w_s, w_t))
    z_t = reference_logits(h_t, w_t, temperature=0.7)
    ref = (*reference_stats(reference_logits(h_s, w_s, temperature=0.7), z_t), reference_entropy(z_t))
    for name, expected in zip(STAT_NAMES, ref):
        assert getattr(stats, name).dtype == torch.float32
        assert_rel_close(getattr(stats, name)[mask], expected[mask])


def test_teacher_entropy_can_be_left_out():
    """`teacher_entropy=False` skips the extra accumulator: the field is None, the other statistics are unchanged."""
    h_s, h_t, w_s, w_t, _, _ = make_inputs()
    mask = ragged_mask([5, 7, 2], C)
    kwargs = {"temperature": 0.8, "token_chunk_size": 4, "vocab_chunk_size": 16}
    with_it = compute_token_stats(h_s, h_t, w_s, w_t, mask, **kwargs)
    without = compute_token_stats(h_s, h_t, w_s, w_t, mask, teacher_entropy=False, **kwargs)
    assert without.teacher_entropy is None and with_it.teacher_entropy is not None
    for name in ("entropy", "reverse_kl", "forward_kl", "student_log_z", "teacher_log_z"):
        assert torch.equal(getattr(with_it, name), getattr(without, name)), name


@pytest.mark.parametrize("softcap", [None, 4.0])
def test_fold_teacher_x_sum_over_two_tiles_with_and_without_scratch(softcap):
    """The adapter's extra fold alone, on two column tiles of teacher logits whose second raises the running max:
    `sum exp(z_t - m) (z_t - m)` and `sum exp(z_t - m)` with the final max `m`, whether or not a scratch tile is lent
    (and the tile itself overwritten)."""
    from trl_tip.core.trl_kernels import fold_teacher_x_sum, kernel_arguments

    logits = torch.randn(5, 40, generator=torch.Generator().manual_seed(2)) * 3
    logits[:, 30] += 10.0
    args = kernel_arguments(0.7, teacher_logit_scale=1.5, teacher_final_logit_softcapping=softcap)

    def transform(x):
        x = x.double() * 1.5
        return (x if softcap is None else softcap * torch.tanh(x / softcap)) / 0.7

    z = transform(logits)
    gap = z - z.max(-1, keepdim=True).values
    expected_x, expected_exp = (torch.exp(gap) * gap).sum(-1), torch.exp(gap).sum(-1)
    for scratch in (None, torch.empty(5, 20)):
        t_max, x_sum, exp_sum = torch.full((5,), -torch.inf), torch.zeros(5), torch.zeros(5)
        for tile in logits.split(20, dim=1):
            # TRL's fold moves the running max first; the extra fold reads it before and after.
            before, t_max = t_max, torch.maximum(t_max, transform(tile).max(-1).values.float())
            overwrite = scratch is not None
            fold_teacher_x_sum(
                tile.contiguous(), before, t_max, x_sum, exp_sum, args, scratch=scratch, overwrite_tile=overwrite
            )
        torch.testing.assert_close(x_sum.double(), expected_x, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(exp_sum.double(), expected_exp, rtol=1e-5, atol=1e-5)


def test_hand_built_token_stats_have_no_teacher_entropy():
    mask = torch.ones(2, 3, dtype=torch.bool)
    stats = TokenStats(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3), mask)
    assert stats.teacher_entropy is None and stats.to("cpu").teacher_entropy is None
    stats = TokenStats(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3), mask, teacher_entropy=torch.ones(2, 3))
    assert torch.equal(stats.to("cpu").teacher_entropy, torch.ones(2, 3))
    with pytest.raises(ValueError, match="`teacher_entropy` must have shape"):
        TokenStats(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3), mask, teacher_entropy=torch.zeros(3))


TRITON_TWIN_CHECK = """
import sys
import torch
sys.path.insert(0, {tests!r})
from reference import ragged_mask, reference_entropy, reference_logits
import trl_tip.core.trl_kernels as kernels
from trl_tip import compute_token_stats

g = torch.Generator().manual_seed(0)
h_s, h_t = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 12, generator=g)
w_s, w_t = torch.randn(1500, 8, generator=g) * 0.5, torch.randn(1500, 12, generator=g) * 0.5
mask = ragged_mask([5, 3], 5)
for transform in ({{}}, {{"teacher_logit_scale": 1.5, "teacher_final_logit_softcapping": 4.0}}):
    expected = reference_entropy(
        reference_logits(
            h_t,
            w_t,
            logit_scale=transform.get("teacher_logit_scale", 1.0),
            softcap=transform.get("teacher_final_logit_softcapping"),
            temperature=0.7,
        )
    )
    kernels._use_triton = lambda device: True  # TRL's `_stats_kernel` and ours, run by Triton's interpreter
    stats = compute_token_stats(
        h_s, h_t, w_s, w_t, mask, temperature=0.7, token_chunk_size=4, vocab_chunk_size=1100, **transform
    )
    error = (stats.teacher_entropy.double() - expected)[mask].abs().max() / expected[mask].abs().max()
    assert error < 1e-5, error
    assert torch.all(stats.teacher_entropy[~mask] == 0)
print("ok")
"""


@pytest.mark.slow
def test_triton_teacher_kernel_matches_reference_in_the_interpreter():
    """The Triton kernel that folds the teacher's `E_t[z_t]` on CUDA, run on CPU by Triton's interpreter (with TRL's
    own `_stats_kernel`): a vocabulary tile wider than one Triton block (1100 > 1024 columns), a ragged last tile and
    two token tiles. The CUDA tests (tests/cuda) run the compiled kernel."""
    pytest.importorskip("triton")
    tests = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    code = textwrap.dedent(TRITON_TWIN_CHECK.format(tests=tests))
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
