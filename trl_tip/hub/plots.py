"""`quadrants.png`: where the run's tokens fall on entropy x divergence, and how the quadrant shares moved per step."""

from __future__ import annotations

import numpy as np

from ..core.quadrants import QUADRANT_NAMES, QuadrantTracker


QUADRANT_COLORS = {"Q1": "#d62728", "Q2": "#ff7f0e", "Q3": "#9467bd", "Q4": "#7f7f7f"}


def _weighted_median(edges: np.ndarray, weights: np.ndarray) -> float:
    centers = (edges[:-1] + edges[1:]) / 2
    if weights.sum() == 0:
        return float(centers[len(centers) // 2])
    cumulative = np.cumsum(weights) / weights.sum()
    return float(centers[np.searchsorted(cumulative, 0.5)])


def plot_quadrants(tracker: QuadrantTracker, path: str, title: str | None = None) -> str:
    """Writes a two-panel PNG: the 2-D token histogram with the quadrant split, and per-step quadrant shares."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import patheffects
    from matplotlib.colors import LogNorm

    total = tracker.total()
    hist = total.histogram.numpy()
    e_edges = tracker.histogram.entropy_edges().numpy()
    d_edges = tracker.histogram.log10_divergence_edges().numpy()
    rows = tracker.step_rows()

    fig, (ax_hist, ax_steps) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [1.1, 1]})
    if hist.sum() > 0:
        mesh = ax_hist.pcolormesh(d_edges, e_edges, np.where(hist > 0, hist, np.nan), norm=LogNorm(), cmap="viridis")
        fig.colorbar(mesh, ax=ax_hist, label="tokens")
        # Crop to the occupied bins so the cloud fills the panel.
        occupied_e, occupied_d = np.nonzero(hist)
        ax_hist.set_xlim(d_edges[occupied_d.min()], d_edges[occupied_d.max() + 1])
        ax_hist.set_ylim(e_edges[occupied_e.min()], e_edges[occupied_e.max() + 1])
    if tracker.entropy_threshold == "median":
        entropy_split = _weighted_median(e_edges, hist.sum(axis=1))
        divergence_split = _weighted_median(d_edges, hist.sum(axis=0))
        split_note = "run medians (selection used per-batch medians)"
    else:
        entropy_split, divergence_split = (
            tracker.entropy_threshold,
            np.log10(max(tracker.divergence_threshold, 1e-300)),
        )
        split_note = "fixed thresholds"
    ax_hist.axhline(entropy_split, color="white", lw=1.5, ls="--")
    ax_hist.axvline(divergence_split, color="white", lw=1.5, ls="--")
    shares = total.summary()
    for q, (x, y, ha, va) in {
        "Q1": (0.98, 0.98, "right", "top"),
        "Q2": (0.02, 0.98, "left", "top"),
        "Q3": (0.98, 0.02, "right", "bottom"),
        "Q4": (0.02, 0.02, "left", "bottom"),
    }.items():
        ax_hist.text(
            x,
            y,
            f"{q} {100 * shares[f'quadrant_share/{q}']:.0f}% of tokens\n"
            f"{100 * shares[f'selected_share/{q}']:.0f}% of kept",
            transform=ax_hist.transAxes,
            ha=ha,
            va=va,
            color="white",
            fontsize=9,
            bbox={"facecolor": QUADRANT_COLORS[q], "alpha": 0.8, "edgecolor": "none"},
        )
    ax_hist.set_xlabel("log10 reverse KL(student || teacher) per token")
    ax_hist.set_ylabel("student entropy (nats)")
    ax_hist.set_title(f"{int(total.tokens.sum())} completion tokens, split at {split_note}", fontsize=9)

    if rows:
        steps = [r["step"] for r in rows]
        bottom = np.zeros(len(rows))
        for q in QUADRANT_NAMES:
            values = np.array([r[f"quadrant_share/{q}"] for r in rows])
            ax_steps.bar(
                steps,
                values,
                bottom=bottom,
                color=QUADRANT_COLORS[q],
                alpha=0.55,
                label=f"{q} share of tokens",
                width=0.8,
            )
            bottom += values
        for q in QUADRANT_NAMES:
            ax_steps.plot(
                steps,
                [r[f"selected_share/{q}"] for r in rows],
                color=QUADRANT_COLORS[q],
                marker="o",
                ms=3,
                lw=1.6,
                markeredgecolor="black",
                markeredgewidth=0.5,
                label=f"{q} share of kept",
                # A white halo keeps each line visible over the bar of its own colour.
                path_effects=[patheffects.withStroke(linewidth=3.5, foreground="white")],
            )
    ax_steps.set_ylim(0, 1)
    ax_steps.set_xlabel("optimizer step")
    ax_steps.set_ylabel("share")
    ax_steps.set_title("Quadrant shares per step: bars all tokens, lines kept tokens", fontsize=10)
    ax_steps.legend(fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.13))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
