"""The selector contract, checked on every call of `resolve_selection` (issue 24, pattern 4): a boolean mask of the
mask's shape, finite non-negative bounded weights, an honest count; a class is refused where a selector is given."""

import pytest
import torch
from reference import ragged_mask

from trl_tip import SELECTORS, TokenStats, build_selector, resolve_selection
from trl_tip.core.selectors import MAX_SELECTOR_WEIGHT, SoftOr


LENGTHS = [8, 5]


def stats():
    mask = ragged_mask(LENGTHS, 8)
    g = torch.Generator().manual_seed(0)
    values = [torch.rand(mask.shape, generator=g) * mask for _ in range(3)]
    return TokenStats(*values, mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.int64, torch.uint8])
def test_a_mask_that_is_not_boolean_is_refused_not_thresholded(dtype):
    """A float mask of values < 0.5 used to keep every token (read as `mask != 0`)."""
    with pytest.raises(ValueError, match=rf"broke the mask rule: .* must be a boolean tensor .*got dtype {dtype}"):
        resolve_selection(lambda s, g: torch.full(s.mask.shape, 0.3).to(dtype), stats())


@pytest.mark.parametrize(
    "weight, bad", [(float("nan"), 13), (float("inf"), 13), (-1.0, 13), (1e30, 13), (2 * MAX_SELECTOR_WEIGHT, 13)]
)
def test_weights_must_be_finite_non_negative_and_bounded_on_the_kept_tokens(weight, bad):
    with pytest.raises(ValueError, match=rf"broke the weights rule: .*at most 1e\+06.*; {bad} of the 13 kept tokens"):
        resolve_selection(lambda s, g: (s.mask, torch.full(s.mask.shape, weight)), stats())
    # Outside the kept tokens a weight is never read.
    keep_first = torch.zeros(2, 8, dtype=torch.bool)
    keep_first[:, 0] = True
    weights = torch.where(keep_first, 2.0, weight)
    selection = resolve_selection(lambda s, g: (keep_first, weights), stats())
    assert (selection.kept, selection.valid) == (2, 13) and torch.equal(
        selection.weights[keep_first], torch.full((2,), 2.0)
    )


class Liar:
    """Declares a fixed count of every valid token but keeps only the first of each rollout."""

    fixed_count = True

    def select(self, stats, generator=None):
        keep = torch.zeros_like(stats.mask)
        keep[:, 0] = True
        return keep & stats.mask

    def count(self, valid_mask):
        return (valid_mask != 0).sum()


def test_a_fixed_count_selector_must_keep_what_its_count_promised():
    with pytest.raises(
        ValueError, match=r"`Liar` broke the count rule: .*promised 13 tokens while `select` kept 2 of 13"
    ):
        resolve_selection(Liar(), stats())
    Liar.fixed_count = False  # the trainer then counts what was kept: nothing promised, nothing to break
    try:
        assert resolve_selection(Liar(), stats()).kept == 2
    finally:
        Liar.fixed_count = True


@pytest.mark.parametrize("name", list(SELECTORS))
def test_builtin_selectors_keep_the_contract(name):
    selection = resolve_selection(build_selector(name), stats(), torch.Generator().manual_seed(0))
    assert selection.mask.dtype == torch.bool and selection.valid == 13
    assert selection.kept == int(selection.mask.sum()) and not selection.kept_nothing


def test_a_selector_class_is_refused_naming_token_selector():
    with pytest.raises(ValueError, match=r"`token_selector` got the class `SoftOr`, not a selector: pass an instance"):
        build_selector(SoftOr)


def test_keeping_nothing_is_recorded_for_the_trainer_to_warn():
    selection = resolve_selection(lambda s, g: torch.zeros_like(s.mask), stats())
    assert (selection.kept, selection.valid, selection.kept_nothing) == (0, 13, True)
    empty = TokenStats(*(torch.zeros(1, 4) for _ in range(3)), torch.zeros(1, 4, dtype=torch.bool))
    assert not resolve_selection(lambda s, g: torch.zeros_like(s.mask), empty).kept_nothing
