"""Model cards rendered from the Jinja templates in `model_cards/` (installed as `trl_tip.model_cards`)."""

from __future__ import annotations

import importlib.resources
from typing import Any

import jinja2

from .quadrants import QUADRANT_NAMES, QuadrantTracker


def _template(name: str) -> jinja2.Template:
    source = importlib.resources.files("trl_tip.model_cards").joinpath(name).read_text(encoding="utf-8")
    return jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True).from_string(source)


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


def loss_name(beta: float) -> str:
    if beta == 1.0:
        return "reverse KL(student ‖ teacher)"
    if beta == 0.0:
        return "forward KL(teacher ‖ student)"
    return "generalized Jensen-Shannon divergence"


def render_student_card(tracker: QuadrantTracker, **context: Any) -> str:
    """
    The student's model card: Hub front matter, training setup, quadrant tables, plot, evaluation, recipe, citations.

    Args:
        tracker (`QuadrantTracker`): the run's quadrant statistics.
        **context: template fields: `model_name`, `base_model`, `license`, `datasets`, `teacher`, `student`,
            `selector`, `selector_kwargs`, `ratio_text`, `beta`, `temperature`, `normalization`, `training_data`,
            `steps`, `learning_rate`, `plot`, `evaluation` (None or {description, columns, rows}), `recipe`,
            `recipe_language`.
    """
    quadrants, summary = quadrant_rows(tracker)
    return _template("student.md.j2").render(
        quadrants=quadrants,
        selected_fraction=summary["selected_fraction"],
        num_tokens=int(summary["num_tokens"]),
        loss_text=loss_name(context["beta"]),
        **context,
    )
