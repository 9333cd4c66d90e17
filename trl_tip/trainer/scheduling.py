"""The kept-ratio and `beta` schedules of `TIPGKDTrainer`: evaluated at the start of each generation batch, logged,
and saved beside every checkpoint so a resumed run moves on exactly as the uninterrupted one."""

from __future__ import annotations

import json
import os

import torch

from ..core.schedules import AdaptiveRatio, scheduled_ratio, training_progress
from ..utils.files import write_text_atomically


SCHEDULE_STATE_FILE = "tip_schedule_state.json"
# The generation batch's key for the kept ratio in force, read by every micro-batch's selection.
SELECTION_RATIO_KEY = "tip_selection_ratio"


class ScheduleMixin:
    """Schedules of [`TIPGKDTrainer`]; a mixin over TRL's `DistillationTrainer`.

    The ratio and `beta` in force change only when a generation batch starts: every micro-batch of an optimizer step
    (all accumulation steps, all processes) then trains with the same ratio, so the global selected-token normalizer
    computed at generation time stays exact, and one beta covers the whole step. The ratio in force
    (`selection_ratio_in_force`, `None` without a ratio schedule) goes out with the generation batch; the selector
    itself is never changed.
    """

    selection_ratio_in_force: float | None = None

    @property
    def follows_training_loss(self) -> bool:
        """Whether the ratio follows the training loss (the adaptive rule), which `_record_training_loss` feeds."""
        return self._adaptive_ratio is not None

    def _init_schedules(self) -> None:
        args = self.args
        self._beta_schedule = args.beta_schedule_value
        self._adaptive_ratio = None
        self._adaptive_loss_sum = 0.0
        self._adaptive_loss_count = 0.0
        if self._beta_schedule is not None:
            # Before the first training batch (an `evaluate()` first, say) the run is at progress 0.
            self.beta = self._beta_schedule(0.0)
        if args.selection_ratio_schedule == "constant":
            return
        if getattr(self.token_selector, "name", None) == "all":
            raise ValueError(
                f'`selection_ratio_schedule="{args.selection_ratio_schedule}"` has nothing to move with the `all` '
                "selector, which keeps every token (its count would follow the ratio, its selection would not). Pass "
                'a ratio selector or set `selection_ratio_schedule="constant"`.'
            )
        if not isinstance(getattr(self.token_selector, "ratio", None), float):
            raise ValueError(
                f'`selection_ratio_schedule="{args.selection_ratio_schedule}"` sets the `ratio` of the token '
                f"selector at each generation batch, but {self.token_selector!r} has no float `ratio`. Use a "
                'registry selector (`token_selector=` a name) or `selection_ratio_schedule="constant"`.'
            )
        if args.selection_ratio_schedule == "adaptive":
            self._adaptive_ratio = AdaptiveRatio(
                ratio=args.selection_ratio_start,
                floor=args.selection_ratio,
                ema_decay=args.adaptive_ratio_ema_decay,
                step=args.adaptive_ratio_step,
                tolerance=args.adaptive_ratio_tolerance,
            )
        self.selection_ratio_in_force = float(args.selection_ratio_start)

    def _apply_schedules(self) -> None:
        """Sets the ratio and beta of the generation batch about to be generated (training only)."""
        args = self.args
        progress = training_progress(self.state.global_step, self.state.max_steps)
        if args.selection_ratio_schedule != "constant":
            if self._adaptive_ratio is not None:
                self._update_adaptive_ratio()
                ratio = self._adaptive_ratio.ratio
            else:
                ratio = scheduled_ratio(
                    args.selection_ratio_schedule,
                    progress,
                    args.selection_ratio_start,
                    args.selection_ratio,
                    args.selection_ratio_decay_fraction,
                )
            self.selection_ratio_in_force = float(ratio)
        if self._beta_schedule is not None:
            self.beta = self._beta_schedule(progress)
        metrics = self._metrics["train"]
        metrics["tip/selection_ratio"].append(self._ratio_kept())
        metrics["tip/beta"].append(float(self.beta))

    def _ratio_kept(self) -> float:
        """The ratio in force: the schedule's, else the selector's own (1.0 for one without a ratio)."""
        if self.selection_ratio_in_force is not None:
            return self.selection_ratio_in_force
        return float(getattr(self.token_selector, "ratio", 1.0))

    def _record_training_loss(self, divergence_sum: torch.Tensor, weight: torch.Tensor) -> None:
        """Adds a training micro-batch's summed divergence over its kept tokens (weighted, under PACED) and their
        count (or total weight) to the adaptive schedule's next update."""
        self._adaptive_loss_sum += float(divergence_sum)
        self._adaptive_loss_count += float(weight)

    def _update_adaptive_ratio(self) -> None:
        """Feeds the last generation batch's loss to the adaptive controller: the mean divergence over every kept
        token of the batch (all accumulation steps, all processes), LATF's loss over the selected tokens. It is the
        same on every process, so every process keeps the same ratio, and it does not depend on
        `loss_normalization` (an average over all valid tokens would fall with the ratio itself and drive it down).
        A batch that kept nothing (every PACED weight 0) leaves the average as it is."""
        totals = torch.tensor(
            [self._adaptive_loss_sum, self._adaptive_loss_count], dtype=torch.float64, device=self.accelerator.device
        )
        divergence, weight = self.accelerator.reduce(totals, reduction="sum").tolist()
        self._adaptive_loss_sum, self._adaptive_loss_count = 0.0, 0.0
        if weight > 0:
            self._adaptive_ratio.update(divergence / weight)

    def _schedule_state(self) -> dict:
        return {
            "adaptive_ratio": None if self._adaptive_ratio is None else self._adaptive_ratio.state_dict(),
            "adaptive_loss_sum": self._adaptive_loss_sum,
            "adaptive_loss_count": self._adaptive_loss_count,
            "selection_ratio": self._ratio_kept(),
            "beta": self.beta,
        }

    def _save_schedule_state(self, output_dir: str) -> dict:
        """Writes the schedules' state readable beside the checkpoint (main process) and returns it for this
        process's own `tip_rng_state_<rank>.pt`: the adaptive rule's pending loss sums differ between processes."""
        state = self._schedule_state()
        if self.accelerator.is_main_process:
            write_text_atomically(os.path.join(output_dir, SCHEDULE_STATE_FILE), json.dumps(state, indent=2) + "\n")
        return state

    def _load_schedule_state(self, state: dict | None) -> None:
        """Restores what `_save_schedule_state` returned (from this process's RNG-state file). The adaptive rule
        resumes its ratio, average and anchor; its settings (floor, step, tolerance, decay) are the config's. The
        ratio and beta in force are not read back: the first generation batch after the resume sets them again from
        the step and the adaptive state (they are saved for people reading the checkpoint)."""
        if state is None:
            return
        if self._adaptive_ratio is not None and state["adaptive_ratio"] is not None:
            saved = state["adaptive_ratio"]
            self._adaptive_ratio.ratio, self._adaptive_ratio.ema = saved["ratio"], saved["ema"]
            self._adaptive_ratio.anchor = saved["anchor"]
            self._adaptive_loss_sum = state["adaptive_loss_sum"]
            self._adaptive_loss_count = state["adaptive_loss_count"]
