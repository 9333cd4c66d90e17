"""Selectors keep exactly the tokens their rule names, the right number of them, reproducibly."""

import itertools
import math

import pytest
import torch
from reference import ragged_mask
from scipy.stats import chisquare

from trl_tip import SELECTORS, Selection, TokenSelector, TokenStats, build_selector, resolve_selection
from trl_tip.core.selectors import clip_and_minmax, kept_per_sequence, selected_token_count


RATIO_SELECTORS = [n for n in SELECTORS if n not in ("all", "quadrant")]


def random_stats(lengths, width, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = ragged_mask(lengths, width)
    shape = (len(lengths), width)
    entropy = torch.rand(shape, generator=g) * 4
    reverse_kl = torch.rand(shape, generator=g).pow(3) * 3
    forward_kl = torch.rand(shape, generator=g).pow(3) * 3
    zero = torch.zeros(shape)
    return TokenStats(
        torch.where(mask, entropy, zero),
        torch.where(mask, reverse_kl, zero),
        torch.where(mask, forward_kl, zero),
        mask,
    )


def stats_from_rows(entropy, reverse_kl, forward_kl=None):
    entropy = torch.tensor([entropy], dtype=torch.float32)
    reverse_kl = torch.tensor([reverse_kl], dtype=torch.float32)
    forward_kl = reverse_kl.clone() if forward_kl is None else torch.tensor([forward_kl], dtype=torch.float32)
    return TokenStats(entropy, reverse_kl, forward_kl, torch.ones_like(entropy, dtype=torch.bool))


@pytest.mark.parametrize("name", RATIO_SELECTORS)
@pytest.mark.parametrize("ratio", [1.0, 0.5, 0.2, 0.1, 0.29])
@pytest.mark.parametrize("scope", ["sequence", "batch"])
def test_ratio_selectors_keep_floor_ratio_m_valid_tokens(name, ratio, scope):
    lengths = [100, 37, 3, 0, 1]
    stats = random_stats(lengths, 100)
    keep = build_selector(name, ratio=ratio, scope=scope).select(stats, torch.Generator().manual_seed(1))
    assert keep.dtype == torch.bool
    assert not (keep & ~stats.mask).any(), "an invalid token was kept"
    expected = [max(1, math.floor(ratio * m + 1e-9)) if m else 0 for m in lengths]
    if scope == "sequence":
        assert keep.sum(-1).tolist() == expected
    assert keep.sum().item() == sum(expected) == selected_token_count(stats.mask, ratio).item()


def test_kept_count_examples():
    mask = ragged_mask([10, 3, 1, 0, 100], 100)
    assert kept_per_sequence(mask, 0.5).tolist() == [5, 1, 1, 0, 50]
    assert kept_per_sequence(mask, 0.29).tolist() == [2, 1, 1, 0, 29]  # 0.29 * 100 is 28.999... in binary
    assert kept_per_sequence(mask, 1.0).tolist() == [10, 3, 1, 0, 100]


def test_all_keeps_every_valid_token():
    stats = random_stats([5, 2, 0], 5)
    assert torch.equal(build_selector("all").select(stats), stats.mask)


def q3_case():
    """Token 0 is a Q3 token: near-zero entropy, large divergence both ways. Tokens 1-4 are high-entropy and agree."""
    return stats_from_rows(
        entropy=[0.001, 2.0, 2.1, 2.2, 2.3, 0.05],
        reverse_kl=[3.0, 0.01, 0.02, 0.015, 0.03, 0.001],
        forward_kl=[5.0, 0.01, 0.02, 0.015, 0.03, 0.001],
    )


@pytest.mark.parametrize(
    "name, kept", [("q3", True), ("soft_or", True), ("divergence_topk", True), ("entropy_topk", False)]
)
def test_overconfident_q3_token_is_seen_by_divergence_rules_only(name, kept):
    keep = build_selector(name, ratio=0.5, clip_quantile=None, divergence_clip_quantile=None).select(q3_case())
    assert keep.sum() == 3
    assert bool(keep[0, 0]) is kept


def test_soft_or_bottom_keeps_the_complement_of_soft_or():
    stats = random_stats([40], 40, seed=5)
    top = build_selector("soft_or", ratio=0.5).select(stats)
    bottom = build_selector("soft_or_bottom", ratio=0.5).select(stats)
    assert torch.equal(top, ~bottom)


def test_soft_or_score_is_the_spec_formula():
    """s = ĥ + δ̂ - ĥ δ̂ with 98th-percentile clipping and min-max normalization over the batch's valid tokens."""
    stats = random_stats([30, 20], 30, seed=7)
    selector = build_selector("soft_or", ratio=0.5)

    def normalize(values):
        valid = values[stats.mask].double()
        clipped = valid.clamp(max=torch.quantile(valid, 0.98))
        return (clipped - clipped.min()) / (clipped.max() - clipped.min())

    h, d = normalize(stats.entropy), normalize(stats.reverse_kl)
    expected = 1 - (1 - h) * (1 - d)
    torch.testing.assert_close(selector.scores(stats, None)[stats.mask].double(), expected, rtol=1e-6, atol=1e-6)
    q3 = build_selector("q3", ratio=0.5).scores(stats, None)[stats.mask].double()
    torch.testing.assert_close(q3, stats.forward_kl[stats.mask].double() * (1 - h), rtol=1e-6, atol=1e-6)


def test_clip_and_minmax_clips_at_the_quantile():
    values = torch.tensor([[0.0, 1.0, 2.0, 3.0, 100.0]])
    mask = torch.ones_like(values, dtype=torch.bool)
    q = torch.quantile(values[0], 0.75).item()  # 3.0
    out = clip_and_minmax(values, mask, 0.75)
    torch.testing.assert_close(out, torch.tensor([[0.0, 1 / q, 2 / q, 1.0, 1.0]]))
    unclipped = clip_and_minmax(values, mask, None)
    torch.testing.assert_close(unclipped, values / 100.0)
    assert torch.all(clip_and_minmax(torch.ones(2, 3), torch.ones(2, 3, dtype=torch.bool), 0.98) == 0)


def test_sequence_normalization_scope_normalizes_each_row():
    values = torch.tensor([[0.0, 1.0, 2.0], [10.0, 20.0, 30.0]])
    out = clip_and_minmax(values, torch.ones_like(values, dtype=torch.bool), None, scope="sequence")
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.5, 1.0], [0.0, 0.5, 1.0]]))


def test_batch_scope_pools_the_micro_batch():
    """Row 0 holds every high-entropy token: per-sequence top-k keeps half of each row, pooled top-k takes row 0."""
    entropy = [[5.0, 6.0, 7.0, 8.0], [0.1, 0.2, 0.3, 0.4]]
    stats = TokenStats(torch.tensor(entropy), torch.zeros(2, 4), torch.zeros(2, 4), torch.ones(2, 4, dtype=torch.bool))
    per_sequence = build_selector("entropy_topk", ratio=0.5, scope="sequence").select(stats)
    pooled = build_selector("entropy_topk", ratio=0.5, scope="batch").select(stats)
    assert per_sequence.tolist() == [[False, False, True, True], [False, False, True, True]]
    assert pooled.tolist() == [[True, True, True, True], [False, False, False, False]]


@pytest.mark.parametrize("name", RATIO_SELECTORS + ["quadrant"])
def test_same_seed_same_selection(name):
    kwargs = {"ratio": 0.5} if name != "quadrant" else {"ratio": 0.5, "quadrants": ["Q1", "Q2", "Q3"]}
    stats = random_stats([50, 30, 7], 50)
    selector = build_selector(name, **kwargs)
    first = selector.select(stats, torch.Generator().manual_seed(123))
    second = selector.select(stats, torch.Generator().manual_seed(123))
    assert torch.equal(first, second)


@pytest.mark.parametrize("name", ["random", "entropy_sampling"])
def test_stochastic_selectors_change_with_the_seed(name):
    stats = random_stats([64, 64], 64)
    selector = build_selector(name, ratio=0.5)
    draws = {tuple(selector.select(stats, torch.Generator().manual_seed(s)).flatten().tolist()) for s in range(5)}
    assert len(draws) == 5


def test_ties_are_broken_by_the_generator_reproducibly():
    flat = TokenStats(torch.ones(1, 20), torch.ones(1, 20), torch.ones(1, 20), torch.ones(1, 20, dtype=torch.bool))
    selector = build_selector("entropy_topk", ratio=0.5)
    a = selector.select(flat, torch.Generator().manual_seed(0))
    b = selector.select(flat, torch.Generator().manual_seed(0))
    c = selector.select(flat, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c) and a.sum() == 10
    assert build_selector("entropy_topk", ratio=0.5).select(flat).tolist()[0] == [True] * 10 + [False] * 10


def test_entropy_sampling_draws_proportionally_to_entropy():
    """k=1: P(token i) = h_i / sum h. 20000 independent rows in one call; chi-square goodness of fit."""
    h = torch.tensor([0.5, 1.0, 2.0, 3.0, 3.5, 0.0])
    rows = 20000
    stats = TokenStats(
        h.repeat(rows, 1), torch.zeros(rows, 6), torch.zeros(rows, 6), torch.ones(rows, 6, dtype=torch.bool)
    )
    keep = build_selector("entropy_sampling", ratio=1 / 6).select(stats, torch.Generator().manual_seed(0))
    assert torch.all(keep.sum(-1) == 1)
    observed = keep.sum(0).double()
    assert observed[-1] == 0, "a zero-entropy token has zero probability"
    expected = h[:-1].double() / h.sum() * rows
    assert chisquare(observed[:-1].numpy(), expected.numpy()).pvalue > 1e-3


def test_entropy_sampling_is_without_replacement_with_plackett_luce_inclusion():
    """k=2 of 4: the inclusion probability of each token equals the exact sequential-sampling one."""
    h = torch.tensor([1.0, 2.0, 3.0, 4.0])
    exact = torch.zeros(4, dtype=torch.float64)
    for i, j in itertools.permutations(range(4), 2):
        p = h[i] / h.sum() * h[j] / (h.sum() - h[i])
        exact[i] += p
        exact[j] += p
    rows = 20000
    stats = TokenStats(
        h.repeat(rows, 1), torch.zeros(rows, 4), torch.zeros(rows, 4), torch.ones(rows, 4, dtype=torch.bool)
    )
    keep = build_selector("entropy_sampling", ratio=0.5).select(stats, torch.Generator().manual_seed(1))
    assert torch.all(keep.sum(-1) == 2)
    counts = keep.sum(0).double()
    # Each token's inclusion count is binomial(rows, exact_i): allow 4 standard deviations.
    std = (rows * exact * (1 - exact)).sqrt()
    assert torch.all((counts - rows * exact).abs() < 4 * std), (counts / rows, exact)


def test_entropy_sampling_fills_up_with_zero_entropy_tokens_when_needed():
    stats = stats_from_rows(entropy=[0.0, 0.0, 1.0, 0.0], reverse_kl=[0.0] * 4)
    keep = build_selector("entropy_sampling", ratio=0.5).select(stats, torch.Generator().manual_seed(0))
    assert keep.sum() == 2 and keep[0, 2]


def test_quadrant_selector_keeps_the_named_quadrants():
    stats = stats_from_rows(entropy=[3.0, 3.0, 0.1, 0.1], reverse_kl=[2.0, 0.01, 2.0, 0.01])
    fixed = {"entropy_threshold": 1.0, "divergence_threshold": 0.5}
    assert build_selector("quadrant", quadrants=["Q1", "Q3"], **fixed).select(stats).tolist() == [
        [True, False, True, False]
    ]
    assert build_selector("quadrant", quadrants="Q2,Q4", **fixed).select(stats).tolist() == [
        [False, True, False, True]
    ]
    assert build_selector("quadrant", quadrants=["Q3"]).select(stats).tolist() == [
        [False, False, True, False]
    ]  # medians
    assert build_selector("quadrant").fixed_count is False and build_selector("soft_or").fixed_count is True


def test_quadrant_selector_ratio_subsamples_the_quadrant():
    stats = random_stats([100], 100, seed=2)
    full = build_selector("quadrant", quadrants=["Q1", "Q2"]).select(stats)
    half = build_selector("quadrant", quadrants=["Q1", "Q2"], ratio=0.5).select(
        stats, torch.Generator().manual_seed(0)
    )
    assert not (half & ~full).any()
    assert half.sum() == math.floor(0.5 * full.sum().item())


def test_custom_callables_and_weights():
    stats = random_stats([6, 3], 6)

    def first_two(stats, generator):
        keep = torch.zeros_like(stats.mask)
        keep[:, :2] = True
        return keep, torch.full(stats.mask.shape, 2.0)

    selection = resolve_selection(build_selector(first_two), stats)
    assert isinstance(selection, Selection)
    assert selection.mask.sum() == 4 and torch.all(selection.weights == 2.0)

    def everything(stats, generator):
        return torch.ones_like(stats.mask)

    assert torch.equal(resolve_selection(everything, stats).mask, stats.mask), "invalid tokens must be dropped"
    assert isinstance(build_selector("soft_or"), TokenSelector)


def test_build_selector_from_a_recipe_dict():
    selector = build_selector({"name": "q3", "ratio": 0.1, "scope": "batch"})
    assert selector.ratio == 0.1 and selector.scope == "batch" and selector.name == "q3"


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: build_selector("soft_or", ratio=0), r"`ratio` must be a number in \(0, 1\]; got 0"),
        (lambda: build_selector("soft_or", ratio=1.5), r"`ratio` must be a number in \(0, 1\]; got 1.5"),
        (lambda: build_selector("random", ratio="half"), r"`ratio` must be a number in \(0, 1\]"),
        (
            lambda: build_selector("softor"),
            "`token_selector` must be one of 'all', 'random', .*'quadrant'; got 'softor'",
        ),
        (lambda: build_selector("q3", scope="rollout"), "`scope` must be one of 'sequence', 'batch'"),
        (lambda: build_selector("q3", clip_quantile=1.2), r"`clip_quantile` must be a quantile in \(0, 1\]"),
        (lambda: build_selector("q3", temperature=2), "Bad arguments for the `q3` selector"),
        (lambda: build_selector("all", ratio=0.5), "`ratio` must be 1.0 for the `all` selector"),
        (lambda: build_selector("quadrant", quadrants=["Q5"]), "`quadrants` must be one of 'Q1', 'Q2', 'Q3', 'Q4'"),
        (lambda: build_selector("quadrant", entropy_threshold="mean"), "`entropy_threshold` must be one of 'median'"),
        (lambda: build_selector("quadrant", divergence_threshold=-1), "`divergence_threshold` must be 'median' or"),
        (lambda: build_selector({"ratio": 0.5}), "needs a `name` key"),
        (lambda: build_selector(42), "must be a name, a dict or a callable"),
    ],
)
def test_bad_selector_arguments_name_the_field(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_selector_returning_a_wrong_shape_is_rejected():
    stats = random_stats([4], 4)
    with pytest.raises(ValueError, match=r"mask must be a tensor of shape \(1, 4\)"):
        resolve_selection(lambda s, g: torch.ones(4, dtype=torch.bool), stats)
    with pytest.raises(ValueError, match="weights must be finite and non-negative"):
        resolve_selection(lambda s, g: (s.mask, torch.full((1, 4), float("nan"))), stats)
