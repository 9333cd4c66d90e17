"""Model cards rendered from the Jinja templates in `model_cards/` (installed as `trl_tip.model_cards`).

The YAML front matter is `huggingface_hub.ModelCardData`'s, so the Hub reads the metadata and the `model-index`
(evaluation results) exactly as it reads cards written by transformers and TRL.
"""

from __future__ import annotations

import importlib.resources
import json
import os
from typing import Any

import jinja2

from ..core.quadrants import QUADRANT_NAMES, QuadrantTracker
from ..utils.files import write_text_atomically


CARD_TAGS = ["trl", "trl-tip", "distillation", "tip"]
# The rendering context of a run's card, kept beside it so `trl-tip push` can render it again with the dataset link.
CARD_CONTEXT_FILE = "tip_card.json"


def _template(name: str) -> jinja2.Template:
    source = importlib.resources.files("trl_tip.model_cards").joinpath(name).read_text(encoding="utf-8")
    return jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True).from_string(source)


def render_template(name: str, **context: Any) -> str:
    """Renders one of the templates in `model_cards/`; a missing field is an error, not an empty string."""
    return _template(name).render(**context)


def quadrant_rows(tracker: QuadrantTracker) -> tuple[list[dict], dict[str, float]]:
    """Per-quadrant shares and means over the whole run, and the run summary, for the card's tables."""
    summary = tracker.total().summary()
    rows = [
        {
            "name": q,
            "share": summary[f"quadrant_share/{q}"],
            "selected_share": summary[f"selected_share/{q}"],
            "kept": summary[f"kept_in_quadrant/{q}"],
            "entropy": summary[f"entropy/{q}"],
            "reverse_kl": summary[f"reverse_kl/{q}"],
        }
        for q in QUADRANT_NAMES
    ]
    return rows, summary


def measured_kept_text(rule: str, tracker: QuadrantTracker) -> str:
    """The kept share of a selector whose count depends on the statistics (`quadrant`, a custom rule), as the card
    states it: the rule, then the share of valid tokens it kept, measured over the steps the tracker recorded."""
    summary = tracker.total().summary()
    if not summary["num_tokens"]:
        return f"{rule}; no token statistics were recorded"
    return (
        f"{rule}: {100 * summary['selected_fraction']:.1f}% of the valid tokens kept, measured over the "
        f"{int(summary['num_tokens']):,} tokens recorded"
    )


def quadrant_rule_text(quadrants, ratio: float) -> str:
    """The `quadrant` selector's rule in words: which quadrants, and which share of their tokens."""
    share = "every token" if ratio == 1.0 else f"a random {100 * ratio:g}% of the tokens"
    return f"{share} of quadrants {', '.join(quadrants)}"


def loss_name(beta: float | str) -> str:
    if isinstance(beta, str):
        # A `beta_schedule` ("0:0,0.5:1"): piecewise over training progress.
        return "divergence scheduled over training progress (progress:beta)"
    if beta == 1.0:
        return "reverse KL(student ‖ teacher)"
    if beta == 0.0:
        return "forward KL(teacher ‖ student)"
    return "generalized Jensen-Shannon divergence"


def _benchmark_dataset(summary: dict) -> tuple[str, str | None]:
    """(dataset id, split) of an evaluation summary: the Hub id of a named benchmark, else the file's name."""
    source = summary["source"]
    if os.path.isabs(source):
        return summary["benchmark"], None
    dataset_id, _, split = source.partition(":")
    return dataset_id, split or None


def eval_results(evaluation: list[dict]) -> list:
    """`huggingface_hub.EvalResult`s (the card's model-index) for `trl-tip eval` summaries: mean@k in percent."""
    from huggingface_hub import EvalResult

    results = []
    for summary in evaluation:
        k = summary["k"]
        dataset_id, split = _benchmark_dataset(summary)
        results.append(
            EvalResult(
                task_type="text-generation",
                task_name="Math reasoning",
                dataset_type=dataset_id,
                dataset_name=summary["benchmark"],
                dataset_split=split,
                metric_type=f"mean@{k}",
                metric_name=f"mean@{k} (math-verify)",
                metric_value=round(100 * summary[f"mean@{k}"], 2),
            )
        )
    return results


def evaluation_rows(evaluation: list[dict]) -> list[dict]:
    rows = []
    for summary in evaluation:
        k = summary["k"]
        rows.append(
            {
                "benchmark": summary["benchmark"],
                "num_problems": summary["num_problems"],
                "k": k,
                "temperature": summary["settings"]["temperature"],
                "mean": f"{100 * summary[f'mean@{k}']:.1f}%",
                "stderr": f"{100 * summary[f'mean@{k}_stderr']:.1f}",
                "pass": f"{100 * summary[f'pass@{k}']:.1f}%",
                "tokens": f"{summary['mean_response_tokens']:.0f}",
            }
        )
    return rows


def student_card_data(
    model_name: str, base_model: str | None, license: str | None, datasets: list[str], evaluation=()
):
    """The card's front matter as `huggingface_hub.ModelCardData`; a `None` licence or base model is left out."""
    from huggingface_hub import ModelCardData

    return ModelCardData(
        model_name=model_name,
        base_model=base_model,
        library_name="transformers",
        license=license,
        pipeline_tag="text-generation",
        tags=list(CARD_TAGS),
        datasets=list(datasets) or None,
        eval_results=eval_results(evaluation) or None,
    )


def render_student_card(tracker: QuadrantTracker, **context: Any) -> str:
    """
    The student's model card: Hub front matter, training setup, quadrant tables, plot, evaluation, recipe, citations.

    Args:
        tracker (`QuadrantTracker`): the run's quadrant statistics.
        **context: template fields: `model_name`, `base_model` (a Hub id or `None`), `license` (the base model's,
            or `None`), `datasets`, `teacher`, `student` (names, not local paths: see `model_source.model_name`),
            `selector`, `selector_kwargs`, `ratio_text`, `beta`, `temperature`, `normalization`, `training_data`,
            `steps`, `learning_rate`, `plot`, `recipe`, `recipe_language`; optional `evaluation` (`trl-tip eval`
            summaries, also written to the model-index), `comparison` ({description, columns, rows}: a free-form
            before/after table) and `stats_dataset` (Hub id of the quadrant-statistics dataset).
    """
    quadrants, summary = quadrant_rows(tracker)
    evaluation = list(context.pop("evaluation", None) or [])
    card_data = student_card_data(
        context["model_name"], context.pop("base_model"), context.pop("license"), context.pop("datasets"), evaluation
    )
    context.setdefault("comparison", None)
    context.setdefault("stats_dataset", None)
    return render_template(
        "student.md.j2",
        card_data=card_data.to_yaml(),
        quadrants=quadrants,
        selected_fraction=summary["selected_fraction"],
        num_tokens=int(summary["num_tokens"]),
        loss_text=loss_name(context["beta"]),
        evaluation=evaluation_rows(evaluation),
        **context,
    )


def write_student_card(output_dir: str, tracker: QuadrantTracker, **context: Any) -> str:
    """
    Renders the student card into `<output_dir>/README.md` and keeps its context in `tip_card.json`; returns it.
    Both are written atomically, so a failure midway leaves the previous files whole, never a partial card.
    """
    card = render_student_card(tracker, **dict(context))
    os.makedirs(output_dir, exist_ok=True)
    write_text_atomically(os.path.join(output_dir, CARD_CONTEXT_FILE), json.dumps(context, indent=2))
    write_text_atomically(os.path.join(output_dir, "README.md"), card)
    return card


def load_card_context(run_dir: str) -> dict | None:
    path = os.path.join(run_dir, CARD_CONTEXT_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def rerender_student_card(run_dir: str, **changes: Any) -> bool:
    """Renders a run's card again with `changes` (e.g. `stats_dataset`); False when the run kept no card context."""
    context = load_card_context(run_dir)
    if context is None:
        return False
    write_student_card(run_dir, QuadrantTracker.load(os.path.join(run_dir, "tip_stats")), **{**context, **changes})
    return True
