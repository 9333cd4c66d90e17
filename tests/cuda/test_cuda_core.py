"""CUDA checks of the statistics pass and the masked loss against float64 full-logit references and TRL's own loss.

On CUDA `compute_token_stats` drives TRL's Triton `_stats_kernel` through `trl_kernels.fold_tile` (and trl_tip's own
`_teacher_x_sum_kernel` for the teacher's entropy) and `masked_gjsd_loss` hands TRL's
`ChunkedDivergenceFunction.backward` a context built by `DivergenceFromStats`; the CPU tests (tests/core) only reach
the eager twins. These tests run that code on a GPU, in float32, in bfloat16 and under bfloat16 autocast with float32
weights (the usual `bf16=True` training setup), at 100/50/10% selection, with temperature != 1, with logit scale and
softcapping, and on shapes that cross TRL's tiles (4096 tokens, 32768 columns).

    pytest -m cuda tests/cuda                          # on a GPU machine; skipped (with the reason) without one
    TRL_TIP_TEST_DEVICE=cpu pytest -m cuda tests/cuda  # the same checks on CPU, to test the tests

Tolerances (all "relative to max": max |actual - expected| / max |expected|):

- float32 vs the float64 reference: 1e-4. Inputs are exact in both; the only error is fp32 rounding in the
  projection (accumulating H <= 128 products) and in the online log-sum-exp, about 1e-6 of the logits (~10 nats);
  1e-4 leaves two orders of magnitude. TF32 is switched off for these tests (conftest.py).
- bfloat16 inputs: the reference is computed from the same bf16-rounded inputs, and TRL projects bf16 into fp32
  tiles (`mm(..., out_dtype=float32)`), so statistics and losses keep the float32 tolerance. Gradients come back in
  bf16: rounding the result costs at most 2^-9 (0.2%) of an element, so 1e-2 of the largest element leaves 5x
  headroom for cuBLAS's accumulation order.
- ours vs TRL's `_chunked_divergence_loss` on the same kept tokens: the same tiles and kernels, so 1e-5 in float32;
  in bf16 the gradients may differ by one bf16 rounding (our backward reuses the statistics pass's normalizers, TRL's
  its own forward's), hence 1e-2 there too.
"""

import pytest
import torch
from reference import ragged_mask, reference_entropy, reference_gjsd, reference_logits, reference_stats
from trl.trainer.distillation_trainer import _chunked_divergence_loss

from trl_tip import build_selector, compute_token_stats, masked_gjsd_loss, resolve_selection


pytestmark = pytest.mark.cuda

# `teacher_entropy` is the extra accumulator folded by trl_tip's own Triton kernel (`trl_kernels.fold_teacher_x_sum`).
STAT_NAMES = ("entropy", "reverse_kl", "forward_kl", "teacher_entropy")
# Input precision modes: tensors' dtype, and whether the computation runs under bf16 autocast (fp32 weights).
MODES = {
    "float32": (torch.float32, False),
    "bfloat16": (torch.bfloat16, False),
    "autocast-bf16": (torch.float32, True),
}
TOL = {
    "float32": {"stats": 1e-4, "loss": 1e-4, "grad": 1e-4, "trl_loss": 1e-5, "trl_grad": 1e-5},
    "bfloat16": {"stats": 1e-4, "loss": 1e-4, "grad": 1e-2, "trl_loss": 1e-5, "trl_grad": 1e-2},
    # fp32 weights and hidden states cast to bf16 for the projection; gradients come back in fp32 but are built from
    # bf16-rounded operands, which the reference (computed from the rounded inputs) does not see in the backward.
    "autocast-bf16": {"stats": 1e-4, "loss": 1e-4, "grad": 1e-2, "trl_loss": 1e-5, "trl_grad": 1e-2},
}
# A Gemma/Cohere-like head: scaled logits, then `softcap * tanh(z / softcap)` small enough to bend them.
TRANSFORMS = {
    "plain": {},
    "scale+softcap": {
        "student_logit_scale": 0.75,
        "teacher_logit_scale": 1.25,
        "student_final_logit_softcapping": 4.0,
        "teacher_final_logit_softcapping": 6.0,
    },
}


def assert_rel_close(actual, expected, rtol, what=""):
    actual, expected = actual.double(), expected.double().to(actual.device)
    scale = expected.abs().max().clamp(min=1e-12)
    error = ((actual - expected).abs() / scale).max().item()
    assert error <= rtol, f"{what}: max error {error:.3g} of max |expected| {scale.item():.3g} > {rtol:g}"


def make_inputs(device, mode, lengths, width, h_s=64, h_t=96, vocab=5000, seed=0):
    """Random hidden states and heads whose logits have a realistic spread (std ~2 nats), in the mode's dtype."""
    dtype, _ = MODES[mode]
    g = torch.Generator().manual_seed(seed)
    batch = len(lengths)

    def randn(*size, scale=1.0):
        return (torch.randn(*size, generator=g) * scale).to(device=device, dtype=dtype)

    return {
        "h_s": randn(batch, width, h_s),
        "h_t": randn(batch, width, h_t),
        "w_s": randn(vocab, h_s, scale=2.0 * h_s**-0.5),
        "w_t": randn(vocab, h_t, scale=2.5 * h_t**-0.5),
        "mask": ragged_mask(lengths, width).to(device),
    }


def autocast(device, mode):
    if MODES[mode][1]:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


def rounded(t, mode):
    """What the kernels actually multiply: under autocast the fp32 operands are rounded to bf16 first."""
    return t.to(torch.bfloat16) if MODES[mode][1] else t


def reference(x, keep, beta, temperature, transforms, mode, chunk=512):
    """Float64 full-logit statistics (valid tokens), loss over `keep` / |keep| and its gradients, row chunk by row
    chunk so that large shapes stay within a few hundred MiB."""
    tf = transforms
    h_s = rounded(x["h_s"], mode).double().reshape(-1, x["h_s"].size(-1))
    h_t = rounded(x["h_t"], mode).double().reshape(-1, x["h_t"].size(-1))
    w_s = rounded(x["w_s"], mode).double().requires_grad_(True)
    w_t = rounded(x["w_t"], mode).double()

    def logits(h, w, who):
        return reference_logits(
            h,
            w,
            logit_scale=tf.get(f"{who}_logit_scale", 1.0),
            softcap=tf.get(f"{who}_final_logit_softcapping"),
            temperature=temperature,
        )

    stats = torch.zeros(len(STAT_NAMES), h_s.shape[0], dtype=torch.float64, device=h_s.device)
    valid_rows = x["mask"].reshape(-1).nonzero().squeeze(1)
    with torch.no_grad():
        for start in range(0, len(valid_rows), chunk):
            rows = valid_rows[start : start + chunk]
            z_t = logits(h_t[rows], w_t, "teacher")
            stats[:, rows] = torch.stack(
                (*reference_stats(logits(h_s[rows], w_s, "student"), z_t), reference_entropy(z_t))
            )

    keep_rows = keep.reshape(-1).nonzero().squeeze(1)
    grad_h = torch.zeros_like(h_s)
    loss = torch.zeros((), dtype=torch.float64, device=h_s.device)
    for start in range(0, len(keep_rows), chunk):
        rows = keep_rows[start : start + chunk]
        hs = h_s[rows].clone().requires_grad_(True)
        part = reference_gjsd(logits(hs, w_s, "student"), logits(h_t[rows], w_t, "teacher"), beta).sum()
        part = part / len(keep_rows)
        part.backward()
        grad_h[rows] = hs.grad
        loss += part.detach()
    shape = x["mask"].shape
    return {
        "stats": {name: stats[i].reshape(shape) for i, name in enumerate(STAT_NAMES)},
        "loss": loss,
        "grad_h": grad_h.reshape(*shape, -1),
        "grad_w": w_s.grad,
    }


def select(stats, ratio):
    if ratio == 1.0:
        return stats.mask.clone()
    selector = build_selector("soft_or", ratio=ratio)
    # A CPU generator with CUDA statistics, as the trainer passes it.
    return resolve_selection(selector, stats, torch.Generator().manual_seed(0)).mask


def leaf(t):
    return t.detach().clone().requires_grad_(True)


def run_ours(x, mode, device, ratio, beta, temperature, transforms):
    h_s, w_s = leaf(x["h_s"]), leaf(x["w_s"])
    with autocast(device, mode):
        stats = compute_token_stats(h_s, x["h_t"], w_s, x["w_t"], x["mask"], temperature=temperature, **transforms)
        keep = select(stats, ratio)
        loss, divergence_sum, num_selected = masked_gjsd_loss(
            h_s, x["h_t"], w_s, x["w_t"], keep, beta=beta, temperature=temperature, stats=stats, **transforms
        )
    loss.backward()
    return {
        "stats": stats,
        "keep": keep,
        "loss": loss.detach(),
        "grad_h": h_s.grad,
        "grad_w": w_s.grad,
        "n": num_selected,
    }


def run_trl(x, mode, device, keep, beta, temperature, transforms):
    h_s, w_s = leaf(x["h_s"]), leaf(x["w_s"])
    with autocast(device, mode):
        loss, _, _ = _chunked_divergence_loss(
            h_s, x["h_t"], w_s, x["w_t"], keep.long(), beta, temperature=temperature, **transforms
        )
    loss.backward()
    return {"loss": loss.detach(), "grad_h": h_s.grad, "grad_w": w_s.grad}


def check_against_reference_and_trl(x, mode, device, ratio, beta, temperature, transforms):
    tol = TOL[mode]
    ours = run_ours(x, mode, device, ratio, beta, temperature, transforms)
    stats, keep, mask = ours["stats"], ours["keep"], x["mask"]
    assert stats.entropy.device.type == device.type
    assert int(ours["n"]) == int(keep.sum()) > 0
    if ratio < 1.0:
        per_row = mask.sum(1)
        kept = keep.sum(1)
        expected = torch.where(per_row > 0, (per_row * ratio).floor().clamp(min=1), 0)
        assert torch.equal(kept.cpu(), expected.cpu().to(kept.dtype)), (kept, expected)
    ref = reference(x, keep, beta, temperature, transforms, mode)

    for name in STAT_NAMES:
        actual = getattr(stats, name)
        assert actual.dtype == torch.float32
        assert torch.isfinite(actual).all(), name
        assert_rel_close(actual[mask], ref["stats"][name][mask], tol["stats"], name)
        assert torch.all(actual[~mask] == 0), f"{name} must be 0 at invalid positions"
    assert_rel_close(ours["loss"], ref["loss"], tol["loss"], "loss vs float64")
    assert_rel_close(ours["grad_h"], ref["grad_h"], tol["grad"], "d loss / d student hidden vs float64")
    assert_rel_close(ours["grad_w"], ref["grad_w"], tol["grad"], "d loss / d student head vs float64")
    assert torch.all(ours["grad_h"][~keep] == 0), "tokens that were not kept must get no gradient"

    trl = run_trl(x, mode, device, keep, beta, temperature, transforms)
    assert_rel_close(ours["loss"], trl["loss"], tol["trl_loss"], "loss vs TRL _chunked_divergence_loss")
    assert_rel_close(ours["grad_h"], trl["grad_h"], tol["trl_grad"], "d/d hidden vs TRL")
    assert_rel_close(ours["grad_w"], trl["grad_w"], tol["trl_grad"], "d/d head vs TRL")


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("transform", list(TRANSFORMS))
def test_stats_match_float64_reference(device, mode, temperature, transform):
    x = make_inputs(device, mode, lengths=[700, 523, 61, 0], width=700)
    with autocast(device, mode):
        stats = compute_token_stats(
            x["h_s"], x["h_t"], x["w_s"], x["w_t"], x["mask"], temperature=temperature, **TRANSFORMS[transform]
        )
    keep = x["mask"]
    ref = reference(x, keep, 1.0, temperature, TRANSFORMS[transform], mode)
    for name in STAT_NAMES:
        actual = getattr(stats, name)
        assert actual.device.type == device.type and actual.dtype == torch.float32
        assert_rel_close(actual[keep], ref["stats"][name][keep], TOL[mode]["stats"], name)
        assert torch.all(actual[~keep] == 0)
    assert torch.equal(stats.mask, keep)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("ratio", [1.0, 0.5, 0.1])
@pytest.mark.parametrize("beta", [1.0, 0.0, 0.5])
def test_loss_and_gradients_match_reference_and_trl(device, mode, ratio, beta):
    """beta 1 and 0 reuse the statistics pass (`DivergenceFromStats` + TRL's backward); 0.5 runs TRL's forward."""
    x = make_inputs(device, mode, lengths=[700, 523, 61, 0], width=700, seed=1)
    check_against_reference_and_trl(x, mode, device, ratio, beta, 1.0, {})


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("temperature", [0.7, 2.0])
@pytest.mark.parametrize("transform", list(TRANSFORMS))
@pytest.mark.parametrize("beta", [1.0, 0.5])
def test_temperature_and_logit_transforms(device, mode, temperature, transform, beta):
    x = make_inputs(device, mode, lengths=[300, 211], width=300, seed=2)
    check_against_reference_and_trl(x, mode, device, 0.5, beta, temperature, TRANSFORMS[transform])


@pytest.mark.parametrize("mode", ["float32", "bfloat16"])
@pytest.mark.parametrize("ratio", [1.0, 0.1])
def test_shapes_crossing_trl_tiles(device, mode, ratio):
    """4304 valid tokens (> TOKEN_CHUNK_SIZE 4096: a second token tile whose accumulators start at an offset) and a
    vocabulary of 33000 (> VOCAB_CHUNK_SIZE 32768: a ragged second column tile). About 1 GiB on the device."""
    from trl.kernels.chunked_divergence import TOKEN_CHUNK_SIZE, VOCAB_CHUNK_SIZE

    lengths, vocab = [2304, 2000], 33000
    assert sum(lengths) > TOKEN_CHUNK_SIZE and vocab > VOCAB_CHUNK_SIZE
    x = make_inputs(device, mode, lengths=lengths, width=2304, h_s=64, h_t=128, vocab=vocab, seed=3)
    check_against_reference_and_trl(x, mode, device, ratio, 1.0, 1.0, TRANSFORMS["scale+softcap"] if ratio < 1 else {})
