"""How TIP's loss enters TRL's `DistillationTrainer`: through its module-level `_chunked_divergence_loss`.

`DistillationTrainer._compute_loss` resolves `_chunked_divergence_loss` from its module at call time, with the hidden
states, heads, masks and logit transforms it prepared for this model family (VLMs, Gemma softcapping, Granite scaling,
device maps, ZeRO-3, PEFT). Taking that one call reuses all of it.

The module attribute is replaced once, by a dispatcher, rather than swapped for the length of each step: the loss it
runs is looked up in a `contextvars.ContextVar`, which is per thread and restored on exit, so two trainers stepping in
two threads, or a trainer stepped inside another's step, each get their own loss, and any other caller (a plain
`DistillationTrainer` included) gets TRL's own. Each step also counts the calls it received, so a TRL release that
stops calling through the module fails loudly instead of silently training on every token.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import trl
from trl.trainer import distillation_trainer as trl_distillation


SUPPORTED_TRL = "trl>=1.16,<1.17"
_HOOK_NAME = "_chunked_divergence_loss"


@dataclass
class RoutedLoss:
    """What a routed loss may return instead of TRL's value: the `value` TRL receives, and an `output` for the caller
    of `routed_to` (per-call results come back as values, not through attributes of the trainer)."""

    value: Any
    output: Any


@dataclass
class LossRoute:
    """The loss one `compute_loss` call routes TRL's `_chunked_divergence_loss` to, how often TRL called it, and the
    `outputs` of the calls whose loss returned a [`RoutedLoss`]."""

    loss: Callable
    calls: int = 0
    outputs: list = field(default_factory=list)


_ACTIVE_ROUTE: contextvars.ContextVar[LossRoute | None] = contextvars.ContextVar("trl_tip_loss_route", default=None)
_INSTALL_LOCK = threading.Lock()


def _dispatcher(original: Callable) -> Callable:
    """A stand-in for TRL's `original` that runs the active route's loss, or `original` when no route is active."""

    @functools.wraps(original)
    def dispatch(*args, **kwargs):
        route = _ACTIVE_ROUTE.get()
        if route is None:
            return original(*args, **kwargs)
        route.calls += 1
        # Whatever the TIP loss runs (a selector stepping another trainer, say) starts with no active route.
        token = _ACTIVE_ROUTE.set(None)
        try:
            result = route.loss(*args, **kwargs)
        finally:
            _ACTIVE_ROUTE.reset(token)
        if isinstance(result, RoutedLoss):
            route.outputs.append(result.output)
            return result.value
        return result

    dispatch.trl_tip_dispatcher = True
    return dispatch


def install_dispatcher() -> None:
    """Replaces TRL's module-level `_chunked_divergence_loss` by the dispatcher, once per process (thread-safe)."""
    with _INSTALL_LOCK:
        current = getattr(trl_distillation, _HOOK_NAME, None)
        if current is None:
            raise RuntimeError(unsupported_trl_message(f"`trl.trainer.distillation_trainer` has no `{_HOOK_NAME}`."))
        if not getattr(current, "trl_tip_dispatcher", False):
            setattr(trl_distillation, _HOOK_NAME, _dispatcher(current))


@contextlib.contextmanager
def routed_to(loss: Callable) -> Iterator[LossRoute]:
    """Within the block, TRL's `_chunked_divergence_loss` calls made in this context run `loss` instead.

    Yields the [`LossRoute`], whose `calls` the caller checks with [`check_routed`] after the block.
    """
    install_dispatcher()
    route = LossRoute(loss)
    token = _ACTIVE_ROUTE.set(route)
    try:
        yield route
    finally:
        _ACTIVE_ROUTE.reset(token)


def check_routed(route: LossRoute, mode: str) -> None:
    """Raises RuntimeError when TRL computed the loss of a `mode` step without calling the route."""
    if route.calls == 0:
        raise RuntimeError(
            unsupported_trl_message(
                f"This {mode} step's loss did not go through TIP's token selection: `DistillationTrainer` no longer "
                f"calls `trl.trainer.distillation_trainer.{_HOOK_NAME}` through its module, so TRL's own loss ran: "
                "every token, in training divided by the selected count."
            )
        )


def unsupported_trl_message(problem: str) -> str:
    return (
        f"{problem} Installed: trl {trl.__version__}; trl-tip supports {SUPPORTED_TRL}. Install a supported version, "
        f"e.g. `pip install '{SUPPORTED_TRL}'`."
    )
