"""Schedules over training and per-problem weights: the kept ratio, the divergence `beta`, and PACED's weighting.

TIP fixes the kept ratio and the divergence for a whole run; the methods it is compared with do not. This module
holds their math as small pure functions, so the trainer only decides *when* they are evaluated (at the start of each
generation batch, which keeps the global selected-token normalizer exact):

- `scheduled_ratio`: `constant`, `linear` or `cosine` from a start ratio down to the final one.
- `AdaptiveRatio`: AdaKD's LATF rule, a ratio that follows an exponential moving average of the distillation loss.
- `BetaSchedule`: a piecewise-constant `beta` over training progress (PACED: forward KL first, reverse KL after).
- `paced_weights`: PACED's problem weight `p^a (1 - p)^b` of the student's pass rate `p`, rescaled over a batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from .checks import check_beta, check_choice, check_ratio


RATIO_SCHEDULES = ("constant", "linear", "cosine", "adaptive")
DECAYING_RATIO_SCHEDULES = ("linear", "cosine", "adaptive")


def training_progress(step: int, max_steps: int) -> float:
    """Where optimizer step `step` (0-based) of `max_steps` sits in training: 0 at the first step, 1 at the last, so
    a schedule's end value is the one the last step trains with (one step: 0)."""
    if max_steps <= 1:
        return 0.0
    return min(max(step / (max_steps - 1), 0.0), 1.0)


def check_ratio_schedule(schedule: str, start: float, final: float, decay_fraction: float) -> None:
    """Raises ValueError naming the field when a ratio schedule cannot run as written."""
    check_choice("selection_ratio_schedule", schedule, RATIO_SCHEDULES)
    check_ratio("selection_ratio_start", start)
    check_ratio("selection_ratio", final)
    check_ratio("selection_ratio_decay_fraction", decay_fraction)
    if schedule in DECAYING_RATIO_SCHEDULES and start < final:
        raise ValueError(
            f"`selection_ratio_start`={start!r} is below `selection_ratio`={final!r}, but the "
            f"`{schedule}` schedule decays from the start ratio down to `selection_ratio`. Set "
            f"`selection_ratio_start` to a value in [{final!r}, 1.0] (1.0: every token at first), or use "
            '`selection_ratio_schedule="constant"`.'
        )


def scheduled_ratio(schedule: str, progress: float, start: float, final: float, decay_fraction: float = 1.0) -> float:
    """The kept ratio of a `constant`, `linear` or `cosine` schedule at `progress` (the share of training done).

    `linear` and `cosine` go from `start` at progress 0 to `final` at progress `decay_fraction`, and stay at `final`
    after; `constant` is `final` throughout. (`adaptive` depends on the losses seen, not on progress: `AdaptiveRatio`.)
    """
    if schedule == "constant":
        return final
    if schedule not in ("linear", "cosine"):
        raise ValueError(f"`scheduled_ratio` takes `constant`, `linear` or `cosine`; got {schedule!r}.")
    t = min(max(progress / decay_fraction, 0.0), 1.0)
    if schedule == "linear":
        return start + (final - start) * t
    return final + (start - final) * 0.5 * (1.0 + math.cos(math.pi * t))


@dataclass
class AdaptiveRatio:
    """
    AdaKD's LATF kept-ratio controller (arXiv 2510.11615; `SassyRong/AdaKD`, `distillation.py`): start at every token,
    shrink while the distillation loss falls, grow when it rises.

    Each update adds a loss to an exponential moving average. The first update only sets the anchor. Afterwards, when
    the average has fallen below the anchor by more than `tolerance` x anchor, the ratio is multiplied by
    `1 - step`; when it has risen above it by as much, by `1 + step`; either way the anchor moves to the current
    average. Within the tolerance nothing changes (the anchor stays, so slow drifts add up). The ratio stays within
    `[floor, ceiling]`.

    Kept from LATF: the anchor-and-tolerance rule, the multiplicative step, the bounds, the start at 1.0 and the loss
    it follows (the training loss over the selected tokens, averaged over processes). Different: LATF updates after
    every micro-batch with `ema_decay=0.99`; here the update comes once per generation batch, when the ratio may change
    without breaking the exact global normalizer, so the default decay is 0.9 (0.99 would take about a hundred
    generation batches to react). LATF's warm-up before the first anchor is the first generation batch here.

    Args:
        ratio (`float`):
            The ratio in force (the start ratio before any update).
        floor (`float`):
            Lowest ratio (the run's `selection_ratio`; LATF's floor is 0.1).
        ceiling (`float`, *optional*, defaults to `1.0`):
            Highest ratio.
        ema_decay (`float`, *optional*, defaults to `0.9`):
            Weight of the previous average: `ema = decay * ema + (1 - decay) * loss`.
        step (`float`, *optional*, defaults to `0.05`):
            Relative change of the ratio per move (LATF's `sample_ratio_eps`, 0.05 in its scripts).
        tolerance (`float`, *optional*, defaults to `0.05`):
            Relative change of the average that triggers a move (LATF's `loss_ratio_eps`, 0.05 in its scripts).
        ema (`float`, *optional*):
            The moving average (`None` before the first update).
        anchor (`float`, *optional*):
            The average at the last move (`None` before the first update).
    """

    ratio: float
    floor: float
    ceiling: float = 1.0
    ema_decay: float = 0.9
    step: float = 0.05
    tolerance: float = 0.05
    ema: float | None = None
    anchor: float | None = None

    def __post_init__(self):
        check_ratio("floor", self.floor)
        check_ratio("ceiling", self.ceiling)
        if self.floor > self.ceiling:
            raise ValueError(f"`floor`={self.floor!r} must not exceed `ceiling`={self.ceiling!r}.")
        self.ratio = min(max(check_ratio("ratio", self.ratio), self.floor), self.ceiling)
        check_open_unit("ema_decay", self.ema_decay, low_closed=True)
        check_open_unit("step", self.step)
        check_open_unit("tolerance", self.tolerance, low_closed=True)

    def update(self, loss: float) -> float:
        """Feeds one loss value; returns the ratio in force from now on."""
        loss = float(loss)
        if not math.isfinite(loss):
            raise ValueError(f"AdaptiveRatio needs a finite loss; got {loss!r}.")
        self.ema = loss if self.ema is None else self.ema_decay * self.ema + (1.0 - self.ema_decay) * loss
        if self.anchor is None:
            self.anchor = self.ema
            return self.ratio
        # |anchor|: a loss a hair below zero (a KL of two nearly equal models, by rounding) must not shrink forever.
        margin = abs(self.anchor) * self.tolerance
        if self.anchor - self.ema > margin:
            self.ratio, self.anchor = max(self.ratio * (1.0 - self.step), self.floor), self.ema
        elif self.ema - self.anchor > margin:
            self.ratio, self.anchor = min(self.ratio * (1.0 + self.step), self.ceiling), self.ema
        return self.ratio

    def state_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state_dict(cls, state: dict) -> AdaptiveRatio:
        return cls(**state)


def short_number(value: float) -> str:
    """`value` written short (`1` for 1.0, `0.5`), but never rounded: `0.9999995` stays whole."""
    text = f"{value:g}"
    return text if float(text) == value else repr(float(value))


def check_open_unit(name: str, value, low_closed: bool = False) -> float:
    """A number in (0, 1), or [0, 1) with `low_closed`; raises ValueError naming `name`."""
    valid = not isinstance(value, bool) and isinstance(value, (int, float))
    if not valid or not ((0.0 <= value < 1.0) if low_closed else (0.0 < value < 1.0)):
        raise ValueError(f"`{name}` must be a number in {'[0, 1)' if low_closed else '(0, 1)'}; got {value!r}.")
    return float(value)


@dataclass(frozen=True)
class BetaSchedule:
    """
    A piecewise-constant `beta` over training progress: `beta = betas[i]` from `starts[i]` until the next start.

    Written `"0:0.0,0.5:1.0"` (progress:beta pairs; progress goes from 0 at the first optimizer step to 1 at the
    last, as `training_progress`): forward KL for the first half, reverse KL after, PACED's two-stage schedule. The
    first piece must start at 0 so that the whole run is covered.
    """

    starts: tuple[float, ...]
    betas: tuple[float, ...]

    @classmethod
    def parse(cls, value: str | Sequence) -> BetaSchedule:
        """From `"0:0.0,0.5:1.0"` or `[[0, 0.0], [0.5, 1.0]]`; raises ValueError naming `beta_schedule`."""
        example = '`beta_schedule="0:0.0,0.5:1.0"` (forward KL for the first half of training, reverse KL after)'
        try:
            if isinstance(value, str):
                pairs = [item.split(":") for item in value.replace(" ", "").split(",") if item]
            else:
                pairs = [list(item) for item in value]
            if not pairs or any(len(pair) != 2 for pair in pairs):
                raise ValueError
            starts, betas = zip(*((float(start), float(beta)) for start, beta in pairs))
        except (TypeError, ValueError):
            raise ValueError(
                f"`beta_schedule` must be `progress:beta` pairs separated by commas, e.g. {example}; got {value!r}."
            ) from None
        if starts[0] != 0.0:
            raise ValueError(
                f"`beta_schedule` must cover the whole run: its first piece starts at progress {starts[0]:g}, not 0, "
                f"so training before it has no beta. Start it at 0, e.g. {example}."
            )
        if any(not 0.0 <= s < 1.0 for s in starts) or any(b <= a for a, b in zip(starts, starts[1:])):
            raise ValueError(
                f"`beta_schedule` progress points must increase strictly within [0, 1); got {list(starts)}. "
                f"E.g. {example}."
            )
        for beta in betas:
            try:
                check_beta(beta)
            except ValueError:
                raise ValueError(
                    f"`beta_schedule` betas must be in [0, 1] (0 forward KL, 1 reverse KL); got {beta!r} in {value!r}."
                ) from None
        return cls(tuple(starts), tuple(betas))

    def __call__(self, progress: float) -> float:
        """The beta in force at `progress` (the share of training done)."""
        index = sum(1 for start in self.starts if start <= progress) - 1
        return self.betas[max(index, 0)]

    def __str__(self) -> str:
        return ",".join(f"{short_number(start)}:{short_number(beta)}" for start, beta in zip(self.starts, self.betas))


def check_paced_exponents(alpha, beta) -> tuple[float, float]:
    """PACED's exponents: finite, non-negative numbers. Raises ValueError naming `paced_alpha`/`paced_beta`."""
    values = []
    for name, value in (("paced_alpha", alpha), ("paced_beta", beta)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) < math.inf:
            raise ValueError(f"`{name}` must be a finite number >= 0 (PACED's default: 1.0); got {value!r}.")
        values.append(float(value))
    return values[0], values[1]


def paced_weight(pass_rate: torch.Tensor, alpha: float = 1.0, beta: float = 1.0) -> torch.Tensor:
    """PACED's problem weight `p^alpha (1 - p)^beta` of pass rates `p` in [0, 1] (`0^0` is 1)."""
    p = pass_rate.to(torch.float64)
    if bool(((p < 0) | (p > 1) | p.isnan()).any()):
        raise ValueError(f"Pass rates must be in [0, 1]; got {pass_rate.tolist()}.")
    return p.pow(alpha) * (1.0 - p).pow(beta)


def paced_weights(
    pass_rate: torch.Tensor, num_tokens: torch.Tensor, alpha: float = 1.0, beta: float = 1.0
) -> torch.Tensor:
    """Per-rollout loss weights of a generation batch: PACED's `w(p)`, rescaled so the tokens keep their total weight.

    Args:
        pass_rate (`torch.Tensor`):
            `(N,)` pass rate of each rollout's problem (the share of that problem's rollouts that are correct); NaN for
            a problem none of whose rollouts could be graded, which gets weight 0.
        num_tokens (`torch.Tensor`):
            `(N,)` tokens of each rollout that the loss's normalizer counts (its valid tokens, or its kept ones).
        alpha, beta (`float`):
            PACED's exponents.

    Returns:
        `(N,)` float32 weights `w_i = w(p_i) * sum_j n_j / sum_j w(p_j) n_j`, so `sum_i w_i n_i = sum_i n_i`: the loss
        stays a per-token average over the counted tokens and its normalizer (their count) is unchanged. All zeros
        when every problem has weight 0 (every rollout right, or every one wrong): nothing to learn from.
    """
    graded = ~pass_rate.isnan()
    raw = torch.where(graded, paced_weight(pass_rate.nan_to_num(0.0), alpha, beta), 0.0)
    tokens = num_tokens.to(torch.float64)
    weighted = (raw * tokens).sum()
    if weighted <= 0:
        return torch.zeros_like(raw, dtype=torch.float32)
    return (raw * tokens.sum() / weighted).to(torch.float32)


def group_pass_rates(keys: Sequence, correct: Sequence[float]) -> list[float]:
    """Each rollout's pass rate: the mean correctness of the rollouts that share its problem key. A NaN correctness
    (not gradable) is left out of its problem's mean; a problem with none graded gets NaN."""
    totals: dict = {}
    for key, value in zip(keys, correct, strict=True):
        total, count = totals.get(key, (0.0, 0))
        if not math.isnan(float(value)):
            total, count = total + float(value), count + 1
        totals[key] = (total, count)
    return [totals[key][0] / totals[key][1] if totals[key][1] else math.nan for key in keys]
