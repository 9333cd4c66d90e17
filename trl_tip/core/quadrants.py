"""The TIP quadrants: classify tokens by student entropy x divergence and accumulate statistics across steps/ranks.

| quadrant | entropy | divergence | meaning |
|---|---|---|---|
| Q1 | high | high | uncertain and disagrees: densest signal |
| Q2 | high | low | uncertain, agrees |
| Q3 | low | high | overconfident and wrong |
| Q4 | low | low | solved |

Counts are kept as raw sums (not shares) so that ranks, gradient-accumulation micro-batches and whole runs merge by
addition, and shares are derived when read. Besides the two axes, each quadrant keeps the sums of the forward KL and
of the teacher's entropy (`TokenStats.teacher_entropy`), so that their means can be read per quadrant too.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, fields

import torch

from ..utils.files import write_jsonl_atomically, write_text_atomically
from .checks import check_choice
from .stats import TokenStats


QUADRANT_NAMES = ("Q1", "Q2", "Q3", "Q4")


def check_threshold(name: str, value) -> float | str:
    if isinstance(value, str):
        check_choice(name, value, ("median",))
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"`{name}` must be 'median' or a non-negative number of nats; got {value!r}.")
    return float(value)


def quadrant_thresholds(
    stats: TokenStats, entropy_threshold: float | str = "median", divergence_threshold: float | str = "median"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Entropy and reverse-KL split points in nats: the median of the micro-batch's valid tokens, or a fixed number."""

    def resolve(name, value, values):
        value = check_threshold(name, value)
        if value == "median":
            valid = values[stats.mask]
            if valid.numel() == 0:
                return torch.zeros((), device=values.device)
            return torch.quantile(valid.to(torch.float32), 0.5)
        return torch.tensor(value, device=values.device)

    return (
        resolve("entropy_threshold", entropy_threshold, stats.entropy),
        resolve("divergence_threshold", divergence_threshold, stats.reverse_kl),
    )


def classify_quadrants(
    stats: TokenStats, entropy_threshold: float | str = "median", divergence_threshold: float | str = "median"
) -> torch.Tensor:
    """
    Quadrant index of every token, `(B, C)` long: 0..3 for Q1..Q4, -1 where invalid.

    "High" means strictly above the threshold: Q1 high entropy and high divergence, Q2 high and low, Q3 low and high,
    Q4 low and low.
    """
    h_thr, d_thr = quadrant_thresholds(stats, entropy_threshold, divergence_threshold)
    high_h = stats.entropy > h_thr
    high_d = stats.reverse_kl > d_thr
    quadrant = torch.where(high_h, torch.where(high_d, 0, 1), torch.where(high_d, 2, 3))
    return torch.where(stats.mask, quadrant, torch.full_like(quadrant, -1))


@dataclass
class HistogramSpec:
    """
    Fixed bins of the 2-D histogram over (student entropy in nats, log10 reverse KL), shared by every rank and step so
    histograms add. Values outside the range fall into the edge bins; a zero divergence into the lowest bin.
    """

    entropy_bins: int = 48
    entropy_max: float = 12.0
    log10_divergence_bins: int = 48
    log10_divergence_min: float = -6.0
    log10_divergence_max: float = 2.0

    def __post_init__(self):
        if self.entropy_bins < 1 or self.log10_divergence_bins < 1:
            raise ValueError("`entropy_bins` and `log10_divergence_bins` must be positive.")
        if not self.entropy_max > 0 or not self.log10_divergence_max > self.log10_divergence_min:
            raise ValueError("The histogram ranges must be non-empty: entropy_max > 0 and divergence max > min.")

    def entropy_edges(self) -> torch.Tensor:
        return torch.linspace(0.0, self.entropy_max, self.entropy_bins + 1, dtype=torch.float64)

    def log10_divergence_edges(self) -> torch.Tensor:
        return torch.linspace(
            self.log10_divergence_min, self.log10_divergence_max, self.log10_divergence_bins + 1, dtype=torch.float64
        )

    def bin_index(self, entropy: torch.Tensor, divergence: torch.Tensor) -> torch.Tensor:
        e = entropy.to(torch.float64) / self.entropy_max * self.entropy_bins
        log_d = torch.log10(divergence.to(torch.float64).clamp(min=1e-300))
        span = self.log10_divergence_max - self.log10_divergence_min
        d = (log_d - self.log10_divergence_min) / span * self.log10_divergence_bins
        e = e.floor().clamp(0, self.entropy_bins - 1).long()
        d = d.floor().clamp(0, self.log10_divergence_bins - 1).long()
        return e * self.log10_divergence_bins + d


@dataclass
class QuadrantCounts:
    """
    Additive quadrant statistics of some tokens (a micro-batch, a step, a run), float64 on CPU.

    Args:
        tokens, selected (`torch.Tensor`): `(4,)` token counts per quadrant, of all valid and of selected tokens.
        entropy_sum, reverse_kl_sum, forward_kl_sum (`torch.Tensor`): `(4,)` sums over the valid tokens.
        histogram, selected_histogram (`torch.Tensor`): `(entropy_bins, log10_divergence_bins)` token counts.
        teacher_entropy_sum, teacher_entropy_tokens (`torch.Tensor`): `(4,)` sum of the teacher's entropy and count of
            the valid tokens it was measured on (statistics without `teacher_entropy` add neither), so that its means
            stay exact when such statistics are merged with others. Zero by default: counts saved before the field
            existed load with it absent.
    """

    tokens: torch.Tensor
    selected: torch.Tensor
    entropy_sum: torch.Tensor
    reverse_kl_sum: torch.Tensor
    forward_kl_sum: torch.Tensor
    histogram: torch.Tensor
    selected_histogram: torch.Tensor
    teacher_entropy_sum: torch.Tensor = field(default_factory=lambda: torch.zeros(4, dtype=torch.float64))
    teacher_entropy_tokens: torch.Tensor = field(default_factory=lambda: torch.zeros(4, dtype=torch.float64))

    @classmethod
    def zeros(cls, spec: HistogramSpec) -> QuadrantCounts:
        shape = (spec.entropy_bins, spec.log10_divergence_bins)
        quad = {name: torch.zeros(4, dtype=torch.float64) for name in ("tokens", "selected", "entropy_sum")}
        quad.update({name: torch.zeros(4, dtype=torch.float64) for name in ("reverse_kl_sum", "forward_kl_sum")})
        return cls(
            **quad,
            histogram=torch.zeros(shape, dtype=torch.float64),
            selected_histogram=torch.zeros(shape, dtype=torch.float64),
        )

    def __add__(self, other: QuadrantCounts) -> QuadrantCounts:
        return QuadrantCounts(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    def flatten(self) -> torch.Tensor:
        return torch.cat([getattr(self, f.name).reshape(-1) for f in fields(self)])

    def unflatten(self, flat: torch.Tensor) -> QuadrantCounts:
        parts, offset = {}, 0
        for f in fields(self):
            ref = getattr(self, f.name)
            parts[f.name] = flat[offset : offset + ref.numel()].reshape(ref.shape).to(torch.float64).cpu()
            offset += ref.numel()
        return QuadrantCounts(**parts)

    def all_reduce(self, device: torch.device | str | None = None) -> QuadrantCounts:
        """Sums the counts over all processes of the default `torch.distributed` group (a no-op without one).

        All statistics travel in one packed tensor, so a step costs one collective whatever the histogram size."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return self
        if torch.distributed.get_world_size() == 1:
            return self
        backend = torch.distributed.get_backend()
        if device is None:
            device = "cuda" if backend == "nccl" else "cpu"
        # NCCL cannot reduce float64 on every platform; counts stay exact in float64 where possible.
        dtype = torch.float32 if backend == "nccl" else torch.float64
        flat = self.flatten().to(device=device, dtype=dtype)
        torch.distributed.all_reduce(flat)
        return self.unflatten(flat)

    def summary(self) -> dict[str, float]:
        """Shares and means as flat, log-ready metrics: `quadrant_share/Q1`, `selected_share/Q1`, ...

        The teacher-entropy means (`teacher_entropy/Q1`, ..., `teacher_entropy`) are left out when no token had one."""
        total, kept = float(self.tokens.sum()), float(self.selected.sum())
        metrics = {"selected_fraction": kept / total if total else 0.0, "num_tokens": total, "num_selected": kept}
        for i, q in enumerate(QUADRANT_NAMES):
            n = float(self.tokens[i])
            metrics[f"quadrant_share/{q}"] = n / total if total else 0.0
            metrics[f"selected_share/{q}"] = float(self.selected[i]) / kept if kept else 0.0
            metrics[f"kept_in_quadrant/{q}"] = float(self.selected[i]) / n if n else 0.0
            metrics[f"entropy/{q}"] = float(self.entropy_sum[i]) / n if n else 0.0
            metrics[f"reverse_kl/{q}"] = float(self.reverse_kl_sum[i]) / n if n else 0.0
            metrics[f"forward_kl/{q}"] = float(self.forward_kl_sum[i]) / n if n else 0.0
        metrics["entropy"] = float(self.entropy_sum.sum()) / total if total else 0.0
        metrics["reverse_kl"] = float(self.reverse_kl_sum.sum()) / total if total else 0.0
        metrics["forward_kl"] = float(self.forward_kl_sum.sum()) / total if total else 0.0
        measured = float(self.teacher_entropy_tokens.sum())
        if measured:
            for i, q in enumerate(QUADRANT_NAMES):
                n = float(self.teacher_entropy_tokens[i])
                metrics[f"teacher_entropy/{q}"] = float(self.teacher_entropy_sum[i]) / n if n else 0.0
            metrics["teacher_entropy"] = float(self.teacher_entropy_sum.sum()) / measured
        return metrics


def measure_quadrants(
    stats: TokenStats,
    keep_mask: torch.Tensor,
    spec: HistogramSpec,
    entropy_threshold: float | str = "median",
    divergence_threshold: float | str = "median",
) -> QuadrantCounts:
    """Quadrant counts, sums and histograms of one micro-batch's valid tokens and of the kept subset."""
    if tuple(keep_mask.shape) != tuple(stats.mask.shape):
        raise ValueError(f"`keep_mask` must have shape {tuple(stats.mask.shape)}; got {tuple(keep_mask.shape)}.")
    quadrant = classify_quadrants(stats, entropy_threshold, divergence_threshold)
    valid = stats.mask
    kept = (keep_mask != 0) & valid
    q = quadrant[valid]
    kept_q = quadrant[kept]

    def per_quadrant(index, values=None):
        out = torch.zeros(4, dtype=torch.float64, device=index.device)
        src = torch.ones_like(index, dtype=torch.float64) if values is None else values.to(torch.float64)
        return out.index_add_(0, index, src).cpu()

    teacher_entropy = {}
    if stats.teacher_entropy is not None:
        teacher_entropy = {
            "teacher_entropy_sum": per_quadrant(q, stats.teacher_entropy[valid]),
            "teacher_entropy_tokens": per_quadrant(q),
        }

    n_bins = spec.entropy_bins * spec.log10_divergence_bins
    bins = spec.bin_index(stats.entropy, stats.reverse_kl)

    def histogram(where):
        counts = torch.bincount(bins[where], minlength=n_bins).to(torch.float64).cpu()
        return counts.reshape(spec.entropy_bins, spec.log10_divergence_bins)

    return QuadrantCounts(
        tokens=per_quadrant(q),
        selected=per_quadrant(kept_q),
        entropy_sum=per_quadrant(q, stats.entropy[valid]),
        reverse_kl_sum=per_quadrant(q, stats.reverse_kl[valid]),
        forward_kl_sum=per_quadrant(q, stats.forward_kl[valid]),
        histogram=histogram(valid),
        selected_histogram=histogram(kept),
        **teacher_entropy,
    )


@dataclass
class QuadrantTracker:
    """
    Accumulates quadrant statistics over a run: a per-step history and the run's 2-D histograms.

    Feed it with `update(step, counts)`, where `counts` are already reduced across ranks (see
    [`QuadrantCounts.all_reduce`]); trackers of disjoint token sets merge with `merge`.

    Args:
        entropy_threshold, divergence_threshold (`float` or `"median"`):
            Quadrant split points used by [`QuadrantTracker.measure`].
        histogram (`HistogramSpec`):
            Bins of the 2-D histogram.
    """

    entropy_threshold: float | str = "median"
    divergence_threshold: float | str = "median"
    histogram: HistogramSpec = field(default_factory=HistogramSpec)
    steps: dict[int, QuadrantCounts] = field(default_factory=dict)

    def __post_init__(self):
        self.entropy_threshold = check_threshold("entropy_threshold", self.entropy_threshold)
        self.divergence_threshold = check_threshold("divergence_threshold", self.divergence_threshold)

    def measure(self, stats: TokenStats, keep_mask: torch.Tensor) -> QuadrantCounts:
        return measure_quadrants(stats, keep_mask, self.histogram, self.entropy_threshold, self.divergence_threshold)

    def update(self, step: int, counts: QuadrantCounts) -> dict[str, float]:
        """Adds `counts` to `step` (micro-batches of one step add up) and returns that step's summary so far."""
        self.steps[step] = self.steps[step] + counts if step in self.steps else counts
        return self.steps[step].summary()

    def total(self) -> QuadrantCounts:
        total = QuadrantCounts.zeros(self.histogram)
        for counts in self.steps.values():
            total = total + counts
        return total

    def merge(self, other: QuadrantTracker) -> QuadrantTracker:
        if other.histogram != self.histogram:
            raise ValueError("Cannot merge quadrant trackers with different histogram bins.")
        merged = QuadrantTracker(self.entropy_threshold, self.divergence_threshold, self.histogram, dict(self.steps))
        for step, counts in other.steps.items():
            merged.update(step, counts)
        return merged

    def step_rows(self) -> list[dict]:
        """One row per step: the step's shares and means plus its raw per-quadrant counts."""
        rows = []
        for step in sorted(self.steps):
            counts = self.steps[step]
            row = {"step": step, **counts.summary()}
            for i, q in enumerate(QUADRANT_NAMES):
                row[f"tokens/{q}"] = float(counts.tokens[i])
                row[f"selected/{q}"] = float(counts.selected[i])
            rows.append(row)
        return rows

    def histogram_rows(self) -> list[dict]:
        """The run's 2-D histograms, one row per non-empty bin, with the bin edges."""
        total = self.total()
        e_edges, d_edges = self.histogram.entropy_edges(), self.histogram.log10_divergence_edges()
        rows = []
        for i, j in torch.nonzero(total.histogram > 0).tolist():
            rows.append(
                {
                    "entropy_low": float(e_edges[i]),
                    "entropy_high": float(e_edges[i + 1]),
                    "log10_reverse_kl_low": float(d_edges[j]),
                    "log10_reverse_kl_high": float(d_edges[j + 1]),
                    "tokens": float(total.histogram[i, j]),
                    "selected": float(total.selected_histogram[i, j]),
                }
            )
        return rows

    def state_dict(self) -> dict:
        return {
            "entropy_threshold": self.entropy_threshold,
            "divergence_threshold": self.divergence_threshold,
            "histogram": {f.name: getattr(self.histogram, f.name) for f in fields(self.histogram)},
            "steps": {
                str(step): {f.name: getattr(c, f.name).tolist() for f in fields(c)} for step, c in self.steps.items()
            },
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> QuadrantTracker:
        tracker = cls(state["entropy_threshold"], state["divergence_threshold"], HistogramSpec(**state["histogram"]))
        for step, counts in state["steps"].items():
            tracker.steps[int(step)] = QuadrantCounts(
                **{name: torch.tensor(value, dtype=torch.float64) for name, value in counts.items()}
            )
        return tracker

    def to_dataset_dict(self):
        """`datasets.DatasetDict` with splits `steps` (per-step shares and counts) and `histogram` (2-D bins)."""
        from datasets import Dataset, DatasetDict

        return DatasetDict(
            {
                "steps": Dataset.from_list(self.step_rows()),
                "histogram": Dataset.from_list(self.histogram_rows()),
            }
        )

    def save(self, directory: str | os.PathLike) -> None:
        """Writes `steps.jsonl`, `histogram.jsonl` (both `datasets.load_dataset("json", ...)`-loadable) and the full
        `tracker.json` state to `directory`, each through a temporary file so a crash never leaves a half file."""
        os.makedirs(directory, exist_ok=True)
        write_text_atomically(os.path.join(directory, "tracker.json"), json.dumps(self.state_dict()))
        for name, rows in (("steps", self.step_rows()), ("histogram", self.histogram_rows())):
            write_jsonl_atomically(os.path.join(directory, f"{name}.jsonl"), rows)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> QuadrantTracker:
        with open(os.path.join(directory, "tracker.json")) as f:
            return cls.from_state_dict(json.load(f))
