"""Token selectors: which completion tokens enter the distillation loss (`TIP_SPEC.md`, "Selection rules").

A selector maps a [`~trl_tip.core.stats.TokenStats`] to a boolean keep-mask, optionally with per-token weights. The
built-ins implement every rule of the TIP paper plus controls; `build_selector("soft_or", ratio=0.5)` builds one by
name, and any callable `fn(stats, generator) -> mask | (mask, weights)` can stand in for a selector.
"""

from __future__ import annotations

import copy
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from .checks import check_choice, check_quantile, check_ratio
from .quadrants import QUADRANT_NAMES, check_threshold, classify_quadrants
from .stats import TokenStats


SELECTION_SCOPES = ("sequence", "batch")
# Largest weight a selector may put on a token. A weight multiplies the token's divergence and its gradient; float32
# squares of gradients near 1e19 overflow, so the gradient norm turns infinite and clipping zeroes the update. 1e6
# leaves thirteen orders of magnitude below that, far above any sensible importance weight (the loss is normalized by
# the kept count, not by the weights' sum, so weights need no rescaling to large values).
MAX_SELECTOR_WEIGHT = 1e6
# Guards floor(ratio * m) against binary rounding (0.29 * 100 = 28.999999999999996).
_RATIO_EPS = 1e-9


@runtime_checkable
class TokenSelector(Protocol):
    """
    Decides which valid completion tokens enter the loss.

    `select` returns a `(B, C)` boolean keep-mask, or a `(mask, weights)` pair whose `(B, C)` weights multiply each
    kept token's divergence. `fixed_count` says whether the kept count follows from the valid mask alone (ratio
    rules), which lets a trainer know the global normalizer before any statistics are computed.

    The contract, checked by [`resolve_selection`] at every call (an error naming the broken rule): the mask is a
    boolean tensor of the valid mask's shape (a float or integer mask is refused, never thresholded); weights are
    finite, non-negative and at most `MAX_SELECTOR_WEIGHT` on the kept tokens; a selector with `fixed_count = True`
    and a `count(valid_mask)` method keeps exactly what `count` promised (the trainer divides the loss by it). A
    selector that keeps nothing of a micro-batch with valid tokens is warned about by the trainer, not refused: a
    micro-batch may rightly hold no token of the kind a rule keeps. A selector class passed instead of an instance is
    refused when the trainer is built.
    """

    fixed_count: bool

    def select(self, stats: TokenStats, generator: torch.Generator | None = None): ...


@dataclass
class Selection:
    """A resolved selection: `mask` is `(B, C)` bool and never keeps an invalid token; `weights` is `(B, C)` or
    None. [`resolve_selection`] also records `kept` and `valid`, the micro-batch's kept and valid token counts."""

    mask: torch.Tensor
    weights: torch.Tensor | None = None
    kept: int | None = None
    valid: int | None = None

    @property
    def kept_nothing(self) -> bool:
        """Whether the selector kept no token of a micro-batch that has valid ones (its loss adds nothing)."""
        return self.kept == 0 and bool(self.valid)


def kept_per_sequence(valid_mask: torch.Tensor, ratio: float) -> torch.Tensor:
    """`floor(ratio * m)` kept tokens for a sequence with `m` valid ones, at least 1 when `m > 0`; shape `(B,)`."""
    m = (valid_mask != 0).sum(dim=-1)
    k = torch.floor(m.to(torch.float64) * ratio + _RATIO_EPS).to(torch.long)
    return torch.where(m > 0, k.clamp(min=1), torch.zeros_like(k)).minimum(m)


def selected_token_count(valid_mask: torch.Tensor, ratio: float) -> torch.Tensor:
    """Number of tokens a ratio selector keeps in a micro-batch (either scope), from its valid mask alone."""
    return kept_per_sequence(valid_mask, ratio).sum()


def clip_and_minmax(
    values: torch.Tensor, mask: torch.Tensor, clip_quantile: float | None, scope: str = "batch"
) -> torch.Tensor:
    """
    Clips `values` at the `clip_quantile` quantile of the valid values, then min-max normalizes them to [0, 1].

    The quantile (linear interpolation) and the min/max are taken over the valid tokens of the whole micro-batch
    (`scope="batch"`) or of each sequence (`scope="sequence"`). A constant scope maps to 0. Invalid positions are 0.
    """
    check_choice("normalization_scope", scope, SELECTION_SCOPES)
    values = values.to(torch.float32)
    out = torch.zeros_like(values)
    groups = [(mask, slice(None))] if scope == "batch" else [(mask[i], i) for i in range(mask.shape[0])]
    for group_mask, index in groups:
        group = values[index][group_mask]
        if group.numel() == 0:
            continue
        if clip_quantile is not None and clip_quantile < 1.0:
            group = group.clamp(max=torch.quantile(group, clip_quantile))
        low, high = group.min(), group.max()
        span = high - low
        normalized = (group - low) / span if span > 0 else torch.zeros_like(group)
        row = out[index]
        row[group_mask] = normalized
        out[index] = row
    return out


def top_k_mask(
    scores: torch.Tensor,
    valid_mask: torch.Tensor,
    k_per_sequence: torch.Tensor,
    scope: str,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """
    Keeps the highest-scoring valid tokens: `k_per_sequence[i]` in each row (`scope="sequence"`), or their sum over
    the pooled micro-batch (`scope="batch"`). Ties are broken by a random order drawn from `generator` (by position
    when `generator` is None), so the result is reproducible from a seed.
    """
    check_choice("scope", scope, SELECTION_SCOPES)
    valid = valid_mask != 0
    if scope == "batch":
        pooled = top_k_mask(
            scores.reshape(1, -1), valid.reshape(1, -1), k_per_sequence.sum().reshape(1), "sequence", generator
        )
        return pooled.reshape(valid.shape)
    scores = scores.to(torch.float64)
    # Valid tokens with a -inf score (zero sampling weight) still rank above every invalid token.
    floor = torch.finfo(torch.float64).min
    keyed = torch.where(valid, scores.nan_to_num(nan=floor, neginf=floor), torch.full_like(scores, -math.inf))
    if generator is not None:
        tie_order = torch.rand(keyed.shape, generator=generator, device=generator.device).to(keyed.device)
    else:
        tie_order = torch.arange(keyed.shape[-1], device=keyed.device, dtype=torch.float64).expand_as(keyed)
    # Two stable sorts: by the tie order, then by score descending; equal scores keep the tie order.
    by_tie = torch.argsort(tie_order, dim=-1, stable=True)
    by_score = torch.argsort(torch.gather(keyed, -1, by_tie), dim=-1, descending=True, stable=True)
    order = torch.gather(by_tie, -1, by_score)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    return (rank < k_per_sequence.to(rank.device).unsqueeze(-1)) & valid


class RatioSelector(ABC):
    """
    Base of the rules that keep `floor(ratio * m)` tokens of a sequence with `m` valid ones, ranked by `scores`.

    Args:
        ratio (`float`, *optional*, defaults to `0.5`):
            Retention ratio rho in (0, 1].
        scope (`str`, *optional*, defaults to `"sequence"`):
            `"sequence"` keeps the top `k` of each rollout (the paper's text); `"batch"` keeps the same total count
            from the pooled micro-batch (the paper's code).
        clip_quantile (`float` or `None`, *optional*, defaults to `0.98`):
            Entropy is clipped at this quantile before min-max normalization (`ĥ`); `None` disables clipping.
        divergence_clip_quantile (`float` or `None`, *optional*, defaults to `0.98`):
            The same for the divergence (`δ̂`); the paper is silent, TIP_SPEC's default clips like the entropy.
        normalization_scope (`str`, *optional*, defaults to `"batch"`):
            Over which valid tokens the clip quantile and min/max are taken: the micro-batch or each sequence.
    """

    name = "ratio"
    fixed_count = True

    def __init__(
        self,
        ratio: float = 0.5,
        scope: str = "sequence",
        clip_quantile: float | None = 0.98,
        divergence_clip_quantile: float | None = 0.98,
        normalization_scope: str = "batch",
    ):
        self.ratio = check_ratio("ratio", ratio)
        check_choice("scope", scope, SELECTION_SCOPES)
        check_choice("normalization_scope", normalization_scope, SELECTION_SCOPES)
        self.scope = scope
        self.clip_quantile = check_quantile("clip_quantile", clip_quantile)
        self.divergence_clip_quantile = check_quantile("divergence_clip_quantile", divergence_clip_quantile)
        self.normalization_scope = normalization_scope

    @abstractmethod
    def scores(self, stats: TokenStats, generator: torch.Generator | None) -> torch.Tensor:
        """Per-token ranking score `(B, C)`; higher is kept first."""

    def select(self, stats: TokenStats, generator: torch.Generator | None = None) -> torch.Tensor:
        k = kept_per_sequence(stats.mask, self.ratio)
        return top_k_mask(self.scores(stats, generator), stats.mask, k, self.scope, generator)

    def count(self, valid_mask: torch.Tensor) -> torch.Tensor:
        """Kept count for a micro-batch, from its valid mask alone (the global normalizer's share)."""
        return selected_token_count(valid_mask, self.ratio)

    def normalized_entropy(self, stats: TokenStats) -> torch.Tensor:
        return clip_and_minmax(stats.entropy, stats.mask, self.clip_quantile, self.normalization_scope)

    def normalized_divergence(self, stats: TokenStats) -> torch.Tensor:
        return clip_and_minmax(stats.reverse_kl, stats.mask, self.divergence_clip_quantile, self.normalization_scope)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(ratio={self.ratio}, scope={self.scope!r})"


class AllTokens(RatioSelector):
    """`all`: every valid completion token (plain on-policy distillation)."""

    name = "all"

    def __init__(self, ratio: float = 1.0, scope: str = "sequence", **kwargs):
        super().__init__(ratio=ratio, scope=scope, **kwargs)
        if self.ratio != 1.0:
            raise ValueError(f"`ratio` must be 1.0 for the `all` selector; got {ratio!r}. Use `random` to subsample.")

    def scores(self, stats, generator):
        return stats.mask.to(torch.float32)

    def select(self, stats: TokenStats, generator: torch.Generator | None = None) -> torch.Tensor:
        return stats.mask.clone()


class RandomTokens(RatioSelector):
    """`random`: a uniform sample of `k` tokens without replacement (a control; not in the paper)."""

    name = "random"

    def scores(self, stats, generator):
        return torch.rand(stats.mask.shape, generator=generator, device=_generator_device(generator)).to(
            stats.mask.device
        )


class EntropyTopK(RatioSelector):
    """`entropy_topk`: the `k` tokens of highest student entropy."""

    name = "entropy_topk"

    def scores(self, stats, generator):
        return stats.entropy


class EntropySampling(RatioSelector):
    """`entropy_sampling`: `k` tokens sampled without replacement with probability proportional to the entropy.

    Gumbel-top-k: the `k` largest `log h_t + Gumbel` keys are distributed as sequential sampling without replacement
    with probabilities proportional to `h_t`, and stay vectorized over the batch."""

    name = "entropy_sampling"

    def scores(self, stats, generator):
        uniform = torch.rand(
            stats.mask.shape, generator=generator, device=_generator_device(generator), dtype=torch.float64
        )
        gumbel = -torch.log(-torch.log(uniform.clamp(min=1e-300)))
        return torch.log(stats.entropy.to(torch.float64)) + gumbel.to(stats.mask.device)


class DivergenceTopK(RatioSelector):
    """`divergence_topk`: the `k` tokens of highest reverse KL `delta_t`."""

    name = "divergence_topk"

    def scores(self, stats, generator):
        return stats.reverse_kl


class SoftOr(RatioSelector):
    """`soft_or` (TIP's rule): top-k by `s_t = ĥ + δ̂ - ĥ·δ̂ = 1 - (1 - ĥ)(1 - δ̂)`."""

    name = "soft_or"

    def scores(self, stats, generator):
        h, d = self.normalized_entropy(stats), self.normalized_divergence(stats)
        return h + d - h * d


class SoftOrBottom(SoftOr):
    """`soft_or_bottom`: the `k` tokens of lowest soft-or score (the paper's sanity check)."""

    name = "soft_or_bottom"

    def scores(self, stats, generator):
        return -super().scores(stats, generator)


class Q3Overconfidence(RatioSelector):
    """`q3`: top-k by the overconfidence score `KL(T || S) * (1 - ĥ)`: confident tokens the teacher disagrees with."""

    name = "q3"

    def scores(self, stats, generator):
        return stats.forward_kl * (1.0 - self.normalized_entropy(stats))


class QuadrantSelector:
    """
    `quadrant`: keeps the valid tokens whose quadrant is in `quadrants`, e.g. `("Q1", "Q3")`.

    The kept count depends on the statistics, not only on the mask (`fixed_count = False`). With `ratio < 1`, a
    uniform random `floor(ratio * n)` of the `n` in-quadrant tokens of each scope is kept (at least one when n > 0).

    Args:
        quadrants (`Iterable[str]`, *optional*, defaults to `("Q1", "Q3")`):
            Names among `Q1`..`Q4`.
        entropy_threshold, divergence_threshold (`float` or `"median"`, *optional*, defaults to `"median"`):
            Split points in nats; `"median"` takes the median over the micro-batch's valid tokens.
        ratio (`float`, *optional*, defaults to `1.0`):
            Fraction of the in-quadrant tokens to keep.
        scope (`str`, *optional*, defaults to `"sequence"`):
            Scope of the `ratio` subsample.
    """

    name = "quadrant"
    fixed_count = False

    def __init__(
        self,
        quadrants: Iterable[str] = ("Q1", "Q3"),
        entropy_threshold: float | str = "median",
        divergence_threshold: float | str = "median",
        ratio: float = 1.0,
        scope: str = "sequence",
    ):
        if isinstance(quadrants, str):
            quadrants = [q.strip() for q in quadrants.split(",")]
        quadrants = tuple(quadrants)
        if not quadrants:
            raise ValueError(f"`quadrants` must name at least one of {', '.join(QUADRANT_NAMES)}.")
        for q in quadrants:
            check_choice("quadrants", q, QUADRANT_NAMES)
        self.quadrants = quadrants
        self.entropy_threshold = check_threshold("entropy_threshold", entropy_threshold)
        self.divergence_threshold = check_threshold("divergence_threshold", divergence_threshold)
        self.ratio = check_ratio("ratio", ratio)
        check_choice("scope", scope, SELECTION_SCOPES)
        self.scope = scope

    def select(self, stats: TokenStats, generator: torch.Generator | None = None) -> torch.Tensor:
        quadrant = classify_quadrants(stats, self.entropy_threshold, self.divergence_threshold)
        wanted = torch.tensor([QUADRANT_NAMES.index(q) for q in self.quadrants], device=quadrant.device)
        in_set = torch.isin(quadrant, wanted) & stats.mask
        if self.ratio == 1.0:
            return in_set
        scores = torch.rand(in_set.shape, generator=generator, device=_generator_device(generator)).to(in_set.device)
        return top_k_mask(scores, in_set, kept_per_sequence(in_set, self.ratio), self.scope, generator)

    def __repr__(self) -> str:
        return f"QuadrantSelector(quadrants={self.quadrants}, ratio={self.ratio})"


def _generator_device(generator: torch.Generator | None):
    return generator.device if generator is not None else "cpu"


SELECTORS: dict[str, type] = {
    cls.name: cls
    for cls in (
        AllTokens,
        RandomTokens,
        EntropyTopK,
        EntropySampling,
        DivergenceTopK,
        SoftOr,
        SoftOrBottom,
        Q3Overconfidence,
        QuadrantSelector,
    )
}


def build_selector(name: str | dict | Any, **kwargs) -> Any:
    """
    Builds a selector from a registry name and keyword arguments, e.g. `build_selector("soft_or", ratio=0.2)`.

    Args:
        name (`str`, `dict` or selector):
            A name in `SELECTORS`; a dict `{"name": ..., **kwargs}` as a YAML recipe writes it; or a ready selector
            (an object with `select`, or any callable `fn(stats, generator)`), returned unchanged.
        **kwargs:
            Constructor arguments of the named selector (`ratio`, `scope`, ...).

    Returns:
        A [`TokenSelector`] (or the callable passed in).
    """
    if isinstance(name, dict):
        spec = dict(name)
        if "name" not in spec:
            raise ValueError(f"A selector dict needs a `name` key, one of {', '.join(SELECTORS)}; got {name!r}.")
        return build_selector(spec.pop("name"), **{**spec, **kwargs})
    if not isinstance(name, str):
        if kwargs:
            raise ValueError("Keyword arguments apply to a selector given by name, not to a selector object.")
        check_selector_object(name)
        return name
    check_choice("token_selector", name, SELECTORS)
    try:
        return SELECTORS[name](**kwargs)
    except TypeError as error:
        raise ValueError(f"Bad arguments for the `{name}` selector: {error}") from error


def check_selector_object(selector: Any) -> None:
    """
    Checks, before any step runs, what can be checked of a selector object without running it: it is an instance
    with a callable `select`, or a callable, not a class. Raises ValueError naming `token_selector`.
    """
    if isinstance(selector, type):
        raise ValueError(
            f"`token_selector` got the class `{selector.__name__}`, not a selector: pass an instance, e.g. "
            f"`token_selector={selector.__name__}(...)` (a selector is an object with `select(stats, generator)`, or "
            "a function `fn(stats, generator)`)."
        )
    if hasattr(selector, "select"):
        if not callable(selector.select):
            raise ValueError(
                f"`token_selector` {type(selector).__name__} has a `select` attribute that is not callable; a "
                "selector's `select(stats, generator)` returns its keep-mask."
            )
    elif not callable(selector):
        raise ValueError(f"`token_selector` must be a name, a dict or a callable; got {type(selector).__name__}.")
    if getattr(selector, "fixed_count", False) and hasattr(selector, "count") and not callable(selector.count):
        raise ValueError(
            f"`token_selector` {type(selector).__name__} declares `fixed_count=True` but its `count` is not callable; "
            "`count(valid_mask)` must return the number of tokens `select` keeps."
        )


def selector_name(selector: Any) -> str:
    """How messages and cards name a selector: its `name`, a function's name, else its class name."""
    return getattr(selector, "name", None) or getattr(selector, "__name__", None) or type(selector).__name__


def promises_count(selector: Any) -> bool:
    """Whether a selector declares that its kept count follows from the valid mask alone and says it (`fixed_count`
    and a `count(valid_mask)` method): a trainer then uses that count as the loss's normalizer."""
    return bool(getattr(selector, "fixed_count", False)) and callable(getattr(selector, "count", None))


def resolve_selection(
    selector: TokenSelector | Callable, stats: TokenStats, generator: torch.Generator | None = None
) -> Selection:
    """
    Runs a selector (an object with `select`, or a callable) and checks what it returns against the selector
    contract, raising ValueError that names the broken rule:

    - a `(B, C)` **boolean** mask, or a `(mask, weights)` pair (a float or integer mask is refused, not thresholded:
      return `scores > threshold` or `mask.bool()`);
    - `(B, C)` weights that are finite, non-negative and at most `MAX_SELECTOR_WEIGHT` on the kept tokens;
    - for a selector declaring `fixed_count=True` with a `count(valid_mask)` method, `count` equals what `select`
      kept (a trainer divides the loss by that promised count).

    Invalid tokens are dropped from the mask whatever the selector returned. The checks cost one host sync per call
    (the counts are read together); the returned [`Selection`] records the kept and valid counts.
    """
    run = selector.select if hasattr(selector, "select") else selector
    out = run(stats, generator)
    weights = None
    if isinstance(out, Selection):
        out, weights = out.mask, out.weights
    elif isinstance(out, tuple):
        if len(out) != 2:
            raise ValueError(f"A selector must return a mask or a (mask, weights) pair; got a tuple of {len(out)}.")
        out, weights = out
    name = selector_name(selector)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(stats.mask.shape):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"The selector `{name}` broke the mask rule: a selector's mask must be a tensor of shape "
            f"{tuple(stats.mask.shape)}; got {shape}."
        )
    if out.dtype != torch.bool:
        raise ValueError(
            f"The selector `{name}` broke the mask rule: a selector's mask must be a boolean tensor (True keeps a "
            f"token); got dtype {out.dtype}. A float or integer mask is refused rather than read as `mask != 0` or "
            "thresholded: return e.g. `scores > threshold`, or `(mask, weights)` to weight the kept tokens."
        )
    mask = out.to(stats.mask.device) & stats.mask
    counts = [mask.sum(), stats.mask.sum()]
    if weights is not None:
        if not isinstance(weights, torch.Tensor) or tuple(weights.shape) != tuple(stats.mask.shape):
            raise ValueError(
                f"The selector `{name}` broke the weights rule: a selector's weights must be a tensor of shape "
                f"{tuple(stats.mask.shape)}."
            )
        weights = weights.to(device=stats.mask.device, dtype=torch.float32)
        bad = ~torch.isfinite(weights) | (weights < 0) | (weights > MAX_SELECTOR_WEIGHT)
        counts.append((bad & mask).sum())
    promised = promises_count(selector)
    if promised:
        counts.append(torch.as_tensor(selector.count(stats.mask), device=mask.device).reshape(()))
    # One host sync for every check.
    values = torch.stack([c.to(device=mask.device, dtype=torch.float64) for c in counts]).tolist()
    kept, valid = int(values[0]), int(values[1])
    if weights is not None and values[2] > 0:
        raise ValueError(
            f"The selector `{name}` broke the weights rule: a selector's weights must be finite and non-negative on "
            f"the kept tokens, and at most {MAX_SELECTOR_WEIGHT:g} (a weight multiplies the token's divergence and "
            f"its gradient; larger ones overflow the gradient norm); {int(values[2])} of the {kept} kept tokens' "
            "weights are not."
        )
    if promised and values[-1] != kept:
        raise ValueError(
            f"The selector `{name}` broke the count rule: it declares `fixed_count=True`, so its `count(valid_mask)` "
            f"is the loss's normalizer, but `count` promised {values[-1]:g} tokens while `select` kept {kept} of "
            f"{valid} valid ones (the loss would be scaled by {kept}/{values[-1]:g}). Make `count` return exactly "
            "the number `select` keeps, or set `fixed_count = False` so that the kept tokens are counted."
        )
    return Selection(mask=mask, weights=weights, kept=kept, valid=valid)


def selector_with_ratio(selector: Any, ratio: float) -> Any:
    """`selector` keeping `ratio` instead of its own: a copy (the selector given is never changed), or `selector`
    itself when the ratio is already its own. A schedule's ratio reaches selection this way, batch by batch."""
    ratio = check_ratio("ratio", ratio)
    if getattr(selector, "ratio", None) == ratio:
        return selector
    if not isinstance(getattr(selector, "ratio", None), float):
        raise ValueError(f"{selector!r} has no float `ratio` to set; a ratio schedule needs a ratio selector.")
    moved = copy.copy(selector)
    moved.ratio = ratio
    return moved
