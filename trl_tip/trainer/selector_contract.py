"""The trainer's side of the selector contract: which selector and settings a run uses, and what it watches per step.

`TIPGKDTrainer(token_selector=...)` overrides `args.token_selector`. [`selector_and_config`] applies that override
to a copy of the config, so that every other selection setting the user gave (`selection_ratio`, scope, clipping,
thresholds) is used or refused, never silently replaced by a class default, and the model card and recipe, which read
the config, describe the selection that ran. The per-micro-batch checks of a selector's output (boolean mask, weights,
honest count) live in `trl_tip.core.selectors.resolve_selection`; [`KeptNothingWatch`] adds the one rule that is a
warning, not an error.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

from ..core.selectors import (
    SELECTORS,
    QuadrantSelector,
    RatioSelector,
    Selection,
    build_selector,
    check_selector_object,
    selector_name,
)
from .tip_config import (
    _check_no_field_in_selector_kwargs,
    _parse_thresholds,
    _resolve_selection_ratio,
    default_selection_ratio,
)


logger = logging.getLogger(__name__)

# Streak lengths (micro-batches in a row that kept nothing) at which the warning is repeated.
_KEPT_NOTHING_REPEATS = (1, 10, 100, 1000)


def given_selection_ratio(args) -> float | None:
    """`selection_ratio` as the user gave it, `None` when unset. `TIPConfig` resolves an unset ratio to its
    selector's default when built; a value other than that default was set by the user (and so is a default value
    that `TIPConfig` recorded as given)."""
    if args.selection_ratio != default_selection_ratio(args.token_selector):
        return float(args.selection_ratio)
    return None if getattr(args, "_given_selection_ratio", None) is None else float(args.selection_ratio)


def selector_and_config(args, token_selector: Any):
    """
    The selector a trainer runs and the config that describes it.

    - `token_selector=None`: `args` and the selector it names.
    - A registry name or a `{"name": ..., **kwargs}` dict: a copy of `args` with that `token_selector` (the dict's
      kwargs merged over `token_selector_kwargs`), every other selection field kept: `selection_ratio` as the user
      gave it (or the new selector's default when unset; refused for `all`), the scope, clipping and thresholds. A
      dict's `ratio` or thresholds move to `selection_ratio` / `quadrant_thresholds` (refused when the config set
      a different value). The copy is checked as `TIPConfig` checks itself.
    - A selector object or callable: checked (an instance, not a class), and the config copy records a built-in
      selector's name and ratio. With a constant ratio schedule, a `selection_ratio` the user set in the config that
      differs from the object's own `ratio` is refused: the object's ratio would silently win.

    Returns:
        `(args, selector)`; `args` is a copy whenever the override changed it, so a config shared by several
        trainers is never modified.
    """
    if token_selector is None:
        return args, args.build_selector()
    if isinstance(token_selector, (str, dict)):
        return _named_selector(args, token_selector)
    check_selector_object(token_selector)
    if isinstance(token_selector, (RatioSelector, QuadrantSelector)):
        given = given_selection_ratio(args)
        ratio = token_selector.ratio
        if args.selection_ratio_schedule == "constant" and given is not None and given != ratio:
            raise ValueError(
                f"`selection_ratio`={given!r} is set in the TIPConfig, but the selector object passed as "
                f"`token_selector` ({token_selector!r}) keeps its own ratio {ratio!r}, so the config's value would be "
                "ignored. Build the selector with the ratio you want, or pass `token_selector` by name "
                f'(`token_selector="{token_selector.name}"`) so that `selection_ratio` applies.'
            )
        args = copy.copy(args)
        args.token_selector = token_selector.name
        args.selection_scope = token_selector.scope
        if args.selection_ratio_schedule == "constant":
            args.selection_ratio = ratio
    return args, token_selector


def _named_selector(args, token_selector: str | dict):
    spec = dict(token_selector) if isinstance(token_selector, dict) else {"name": token_selector}
    if "name" not in spec:
        raise ValueError(
            f"A `token_selector` dict needs a `name` key, one of {', '.join(SELECTORS)}; got {token_selector!r}."
        )
    name = spec.pop("name")
    if name not in SELECTORS:
        # The registry's own message, naming `token_selector` and the choices.
        build_selector(name)
    schedule = args.selection_ratio_schedule
    if name == "all" and schedule != "constant":
        # Before the ratio: the schedule is what the `all` selector cannot honour, whatever the ratio.
        raise ValueError(
            f'`selection_ratio_schedule="{schedule}"` has nothing to move with the `all` selector, which keeps every '
            'token. Pass a ratio selector or set `selection_ratio_schedule="constant"`.'
        )
    given = given_selection_ratio(args)
    if "ratio" in spec:
        ratio = spec.pop("ratio")
        if given is not None and given != ratio:
            raise ValueError(
                f"`token_selector`={token_selector!r} sets `ratio`={ratio!r}, but the TIPConfig sets "
                f"`selection_ratio`={given!r}. Give the ratio once: in the dict or as `selection_ratio`."
            )
        given = ratio
    thresholds = [spec.pop(key, None) for key in ("entropy_threshold", "divergence_threshold")]
    kwargs = {**(args.token_selector_kwargs or {}), **spec}
    _check_no_field_in_selector_kwargs(kwargs)
    new = copy.copy(args)
    new.token_selector = name
    new.token_selector_kwargs = kwargs or None
    new.selection_ratio = _resolve_selection_ratio(name, given)
    if any(value is not None for value in thresholds):
        if args.quadrant_thresholds != "median":
            raise ValueError(
                f"`token_selector`={token_selector!r} sets quadrant thresholds, but the TIPConfig sets "
                f"`quadrant_thresholds`={args.quadrant_thresholds!r}. Give them once, as `quadrant_thresholds`."
            )
        if None in thresholds:
            raise ValueError(
                f"`token_selector`={token_selector!r} sets one quadrant threshold; set both as "
                '`quadrant_thresholds="H,D"` (or "median").'
            )
        new.quadrant_thresholds = _parse_thresholds(thresholds)
    new._check_schedules()
    new._given_selection_ratio = given
    return new, new.build_selector()


def recipe_for_selector(recipe: str, selector) -> str:
    """A run's recipe YAML as the card shows it. A selector that is not a registry class cannot be named in a recipe,
    so the selection fields (which would describe the config's unused selector) are replaced by a comment naming
    it."""
    if isinstance(selector, tuple(SELECTORS.values())):
        return recipe
    import yaml

    settings = yaml.safe_load(recipe)
    for name in ("token_selector", "token_selector_kwargs", "selection_ratio", "selection_scope"):
        settings.pop(name, None)
    note = (
        f"# token_selector: the custom Python selector `{selector_name(selector)}`, passed as "
        "TIPGKDTrainer(token_selector=...); a recipe cannot name it."
    )
    return f"{note}\n{yaml.safe_dump(settings, sort_keys=False).strip()}"


class KeptNothingWatch:
    """
    Warns when the selector keeps no token of a micro-batch that has valid ones: that micro-batch adds nothing to the
    loss, and a selector that does so on every step trains nothing (loss 0). A warning, not an error: a micro-batch
    may rightly hold no token of the kind a rule keeps (a `quadrant` rule with fixed thresholds; a per-rollout rule
    whose rollouts went to another process), and the global normalizer accounts for it. Repeated after 10, 100 and
    1000 such micro-batches in a row, then every 10000.
    """

    def __init__(self):
        self.streak = 0

    def see(self, selection: Selection, selector, step: int) -> None:
        if not selection.kept_nothing:
            self.streak = 0
            return
        self.streak += 1
        if self.streak in _KEPT_NOTHING_REPEATS or self.streak % 10000 == 0:
            # `step` counts finished optimizer steps; the micro-batch belongs to the next one.
            step += 1
            row = "" if self.streak == 1 else f", the {self.streak}th micro-batch in a row to keep nothing"
            logger.warning(
                f"The token selector `{selector_name(selector)}` kept none of the {selection.valid} valid completion "
                f"tokens of a micro-batch (step {step}{row}): the micro-batch adds nothing to the loss, and a "
                "selector that keeps nothing on every step trains nothing (loss 0). Check the selector's rule; a "
                "rule that keeps nothing on some micro-batches (fixed quadrant thresholds, a per-rollout rule) is "
                "fine."
            )
