"""The study's report: per-rule means and standard errors across seeds, paired differences to `all`, and study.png."""

from __future__ import annotations

import math
import os
from pathlib import Path

from ..core.quadrants import QUADRANT_NAMES
from ..utils.files import STAGING_SUFFIX


BASELINE_RULE = "all:1"
# (row key, column title, format of a value, format of its standard error, compared with `all`)
METRICS = (
    ("reverse_kl", "reverse KL(S‖T), own greedy (nats/token)", "{:.4f}", "{:.4f}", True),
    ("forward_kl", "forward KL(T‖S), teacher's greedy (nats/token)", "{:.4f}", "{:.4f}", True),
    ("accuracy", "accuracy", "{:.1%}", "{:.1%}", True),
    ("kept_fraction", "tokens kept", "{:.1%}", "{:.1%}", False),
    ("tokens_trained", "tokens trained on", "{:.0f}", "{:.0f}", False),
    ("wall_time_s", "wall time (min)", "{:.1f}", "{:.1f}", False),
)
_SCALE = {"wall_time_s": 1 / 60}
HELDOUT_SE = ("reverse_kl", "forward_kl", "accuracy")


def _median(values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def mean_se(values: list[float]) -> tuple[float, float | None]:
    """Mean and standard error of the mean (sample standard deviation with n - 1, over sqrt(n)); no s.e. for n = 1."""
    n = len(values)
    if n == 0:
        return math.nan, None
    mean = sum(values) / n
    if n == 1:
        return mean, None
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance / n)


def rules_in_order(rows: list[dict]) -> list[str]:
    seen = []
    for row in rows:
        if row["rule"] not in seen:
            seen.append(row["rule"])
    return seen


def aggregate(rows: list[dict], keys: tuple[str, ...] | None = None) -> dict[str, dict]:
    """rule -> {"seeds": [...], key: (mean, s.e.) for every metric and quadrant share}, rules in first-seen order."""
    keys = keys or (
        *(m[0] for m in METRICS),
        *(f"kept_share/{q}" for q in QUADRANT_NAMES),
        *(f"valid_share/{q}" for q in QUADRANT_NAMES),
    )
    out = {}
    for rule in rules_in_order(rows):
        mine = [r for r in rows if r["rule"] == rule]
        stats = {"seeds": [r["seed"] for r in mine]}
        for key in keys:
            stats[key] = mean_se([float(r[key]) for r in mine if r.get(key) is not None])
        out[rule] = stats
    return out


def paired_difference(
    rows: list[dict], rule: str, key: str, baseline: str = BASELINE_RULE
) -> tuple[float, float | None, int] | None:
    """Mean and s.e. of the per-seed differences `rule - baseline` over the seeds both ran, and how many; or None."""
    base = {r["seed"]: float(r[key]) for r in rows if r["rule"] == baseline}
    diffs = [float(r[key]) - base[r["seed"]] for r in rows if r["rule"] == rule and r["seed"] in base]
    if not diffs:
        return None
    mean, se = mean_se(diffs)
    return mean, se, len(diffs)


def _cell(value: tuple[float, float | None], fmt: str, se_fmt: str, scale: float = 1.0, signed: bool = False) -> str:
    mean, se = value
    if mean is None or math.isnan(mean):
        return "–"
    text = (("+" if signed and mean >= 0 else "") + fmt).format(mean * scale)
    return text if se is None else f"{text} ± {se_fmt.format(se * scale)}"


def summary_markdown(rows: list[dict], baselines: dict | None, grid_size: int | None = None) -> str:
    """summary.md: per-rule table (mean ± s.e. across seeds, paired Δ to `all`), baselines, token composition."""
    lines = ["# TIP token-selection study", ""]
    if rows:
        first = rows[0]
        seeds = sorted({r["seed"] for r in rows})
        lines += [
            f"Teacher {first.get('teacher_model', first.get('teacher'))}; student {first.get('student_model')}.",
            f"Each run: {first.get('steps')} optimizer steps of {first.get('batch_size')} on-policy rollouts of up to "
            f"{first.get('max_new_tokens')} tokens, learning rate {first.get('learning_rate')} "
            f"({first.get('lr_scheduler_type')}), beta {first.get('beta')}, temperature {first.get('temperature')}, "
            f"{first.get('train_problems')} training prompts; seeds {', '.join(map(str, seeds))}. Evaluation: "
            f"{first.get('held_out_problems')} held-out problems, the same for every run, greedy decoding.",
            "",
        ]
    done = f"{len(rows)} of {grid_size}" if grid_size is not None else str(len(rows))
    lines += [
        f"{done} runs finished. Values are the **mean ± standard error across seeds** (sample standard deviation, "
        "n − 1, over √n; no ± with one seed). **Δ vs all** pairs runs by seed: the mean of the per-seed differences "
        "(rule − `all`, same seed, so the same prompts order and the same start) ± the standard error of those "
        "differences. Reverse KL is on the student's own greedy completions, forward KL on the teacher's; lower is "
        "closer to the teacher. Accuracy differences are in percentage points.",
        "",
    ]
    if not rows:
        return "\n".join(lines)
    stats = aggregate(rows)
    has_baseline = BASELINE_RULE in stats
    header = ["rule", "seeds"]
    for _key, title, _, _, compare in METRICS:
        header.append(title)
        if compare and has_baseline:
            header.append("Δ vs all")
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for rule, s in stats.items():
        cells = [f"`{rule}`", str(len(s["seeds"]))]
        for key, _, fmt, se_fmt, compare in METRICS:
            cells.append(_cell(s[key], fmt, se_fmt, _SCALE.get(key, 1.0)))
            if compare and has_baseline:
                diff = paired_difference(rows, rule, key) if rule != BASELINE_RULE else None
                if diff is None:
                    cells.append("–")
                elif key == "accuracy":
                    mean, se, _ = diff
                    cells.append(
                        _cell((100 * mean, None if se is None else 100 * se), "{:.1f}", "{:.1f}", signed=True)
                    )
                else:
                    cells.append(_cell(diff[:2], fmt, se_fmt, signed=True))
        lines.append("| " + " | ".join(cells) + " |")
    noise = {key: _median([r[f"{key}_heldout_se"] for r in rows if f"{key}_heldout_se" in r]) for key in HELDOUT_SE}
    if all(v is not None for v in noise.values()):
        lines += [
            "",
            f"Evaluation noise alone (median over runs of one run's standard error over the held-out prompts): "
            f"reverse KL {noise['reverse_kl']:.4f}, forward KL {noise['forward_kl']:.4f}, accuracy "
            f"{100 * noise['accuracy']:.1f} points. A rule's ± above adds the training's seed-to-seed variation.",
        ]
    if baselines:
        teacher, before = baselines.get("teacher", {}), baselines.get("student_before", {})

        def value(source, key, fmt):
            return fmt.format(source[key]) if key in source else "–"

        lines += [
            "",
            "## Shared baselines (computed once; the same held-out set for every run)",
            "",
            "| | accuracy | reverse KL(S‖T), own greedy | forward KL(T‖S), teacher's greedy | completion tokens |",
            "|---|---|---|---|---|",
            f"| teacher | {value(teacher, 'accuracy', '{:.1%}')} | 0 | 0 "
            f"| {value(teacher, 'completion_tokens', '{:.1f}')} |",
            f"| student before training | {value(before, 'accuracy', '{:.1%}')} "
            f"| {value(before, 'reverse_kl', '{:.4f}')} | {value(before, 'forward_kl', '{:.4f}')} "
            f"| {value(before, 'completion_tokens', '{:.1f}')} |",
        ]
    lines += [
        "",
        "## Kept tokens by quadrant (mean share over seeds)",
        "",
        "Quadrants split each micro-batch at its median student entropy and reverse KL: Q1 uncertain and disagreeing, "
        "Q2 uncertain and agreeing, Q3 confident and disagreeing (overconfident), Q4 confident and agreeing.",
        "",
        "| rule | "
        + " | ".join(f"{q} of kept" for q in QUADRANT_NAMES)
        + " | "
        + " | ".join(f"{q} of all" for q in QUADRANT_NAMES)
        + " |",
        "|" + "---|" * (1 + 2 * len(QUADRANT_NAMES)),
    ]
    for rule, s in stats.items():
        kept = [f"{s[f'kept_share/{q}'][0]:.1%}" for q in QUADRANT_NAMES]
        valid = [f"{s[f'valid_share/{q}'][0]:.1%}" for q in QUADRANT_NAMES]
        lines.append(f"| `{rule}` | " + " | ".join(kept + valid) + " |")
    return "\n".join(lines) + "\n"


def plot_study(rows: list[dict], baselines: dict | None, path: str | os.PathLike) -> str:
    """study.png: reverse KL and accuracy against the share of tokens trained on (one marker per rule, s.e. bars),
    and the kept-token quadrant composition per rule. Written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from ..hub.plots import QUADRANT_COLORS

    stats = aggregate(rows)
    rules = list(stats)
    colors = plt.get_cmap("tab10")
    markers = "os^Dv<>pPX*h"
    fig, (ax_kl, ax_acc, ax_quad) = plt.subplots(1, 3, figsize=(17, 5.2))
    # Rules at the same ratio (four at 50% by default) are spread a little sideways so their bars stay apart.
    groups: dict[float, list[str]] = {}
    for rule in rules:
        groups.setdefault(round(100 * stats[rule]["kept_fraction"][0]), []).append(rule)
    dodge = {rule: (j - (len(g) - 1) / 2) * 2.5 for g in groups.values() for j, rule in enumerate(g)}
    for i, rule in enumerate(rules):
        s = stats[rule]
        x, x_se = s["kept_fraction"]
        for ax, key, scale in ((ax_kl, "reverse_kl", 1.0), (ax_acc, "accuracy", 100.0)):
            y, y_se = s[key]
            ax.errorbar(
                100 * x + dodge[rule],
                scale * y,
                xerr=None if x_se is None else 100 * x_se,
                yerr=None if y_se is None else scale * y_se,
                fmt=markers[i % len(markers)],
                color=colors(i % 10),
                ms=8,
                capsize=4,
                label=f"{rule} (n={len(s['seeds'])})",
            )
    if baselines:
        teacher, before = baselines.get("teacher", {}), baselines.get("student_before", {})
        if "accuracy" in teacher:
            ax_acc.axhline(100 * teacher["accuracy"], color="black", ls="--", lw=1, label="teacher")
        if "accuracy" in before:
            ax_acc.axhline(100 * before["accuracy"], color="gray", ls=":", lw=1.5, label="student before")
        if "reverse_kl" in before:
            ax_kl.set_title(f"Held-out reverse KL (student before training: {before['reverse_kl']:.3f})", fontsize=10)
    if not ax_kl.get_title():
        ax_kl.set_title("Held-out reverse KL", fontsize=10)
    ax_kl.set_ylabel("mean reverse KL(student ‖ teacher), nats/token\n(student's own greedy completions)")
    ax_acc.set_ylabel("held-out accuracy (%)")
    ax_acc.set_title("Held-out accuracy (greedy, final number)", fontsize=10)
    for ax in (ax_kl, ax_acc):
        ax.set_xlabel("tokens trained on (% of the rollouts' tokens; rules at one ratio spread apart)")
        ax.set_xlim(0, 105)
        ax.grid(alpha=0.3)
    ax_kl.legend(fontsize=8, loc="best")
    ax_acc.legend(fontsize=8, loc="best")

    positions = np.arange(len(rules))
    bottom = np.zeros(len(rules))
    for q in QUADRANT_NAMES:
        values = np.array([stats[r][f"kept_share/{q}"][0] for r in rules])
        ax_quad.bar(positions, 100 * values, bottom=100 * bottom, color=QUADRANT_COLORS[q], label=q, width=0.7)
        for x, v, b in zip(positions, values, bottom):
            if v >= 0.06:
                ax_quad.text(x, 100 * (b + v / 2), f"{100 * v:.0f}", ha="center", va="center", fontsize=8, color="w")
        bottom += values
    # A rule's options go on lines of their own, so a long label does not run into the legend below.
    ax_quad.set_xticks(positions, [rule.replace("+", "\n+") for rule in rules], rotation=30, ha="right", fontsize=8)
    ax_quad.set_ylim(0, 100)
    ax_quad.set_ylabel("share of the kept tokens (%)")
    ax_quad.set_title("Kept tokens by quadrant (mean over seeds)", fontsize=10)
    ax_quad.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    n_seeds = len({r["seed"] for r in rows})
    fig.suptitle(f"TIP study: {len(rows)} runs, {len(rules)} rules, {n_seeds} seeds; bars are ± 1 standard error")
    fig.tight_layout()
    path = Path(path)
    staging = path.with_name(path.name + STAGING_SUFFIX)
    fig.savefig(staging, dpi=110, format="png")
    plt.close(fig)
    os.replace(staging, path)
    return str(path)
