"""A checkpoint is resumed from what it holds, or refused before training starts, naming the missing file.

transformers restores the model, optimizer, scheduler and its own RNG states; a TIP run also needs, per process, the
selection generator and the schedules' state (`tip_rng_state_<rank>.pt`), the quadrant statistics so far
(`tip_stats/tracker.json`) and, for an `ema` self teacher, its weights. Without them a resumed run reseeds selection,
restarts an adaptive ratio at its start or drops the statistics' history while looking like a continuation, so a
checkpoint missing one is refused instead of guessed around.
"""

from __future__ import annotations

import json
import os

from transformers.trainer_utils import get_last_checkpoint


RNG_STATE_FILE = "tip_rng_state_{rank}.pt"
TRACKER_FILE = os.path.join("tip_stats", "tracker.json")


def resolve_checkpoint(output_dir: str, resume_from_checkpoint) -> str | None:
    """The checkpoint folder `train(resume_from_checkpoint=...)` resumes: `True` is the last one in `output_dir`."""
    if resume_from_checkpoint is None or resume_from_checkpoint is False:
        return None
    if resume_from_checkpoint is True:
        checkpoint = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
        if checkpoint is None:
            raise ValueError(
                f"`resume_from_checkpoint=True` found no `checkpoint-*` folder in `output_dir` {output_dir!r}. Pass "
                "the checkpoint's path, or start without `resume_from_checkpoint`."
            )
        return checkpoint
    return str(resume_from_checkpoint)


def check_resumable(checkpoint: str, process_index: int, ema_teacher: bool, ema_state_files: tuple[str, ...]) -> None:
    """Raises ValueError naming what `checkpoint` lacks for an exact TIP resume on process `process_index`."""
    if not os.path.isdir(checkpoint):
        raise ValueError(f"`resume_from_checkpoint` {checkpoint!r} is not a folder: pass a `checkpoint-*` folder.")
    missing = []
    rng_state = RNG_STATE_FILE.format(rank=process_index)
    if not os.path.isfile(os.path.join(checkpoint, rng_state)):
        missing.append(f"`{rng_state}` (the selection generator and the schedules' state of process {process_index})")
    tracker = os.path.join(checkpoint, TRACKER_FILE)
    if not os.path.isfile(tracker):
        missing.append(f"`{TRACKER_FILE}` (the quadrant statistics so far)")
    else:
        try:
            with open(tracker) as f:
                json.load(f)
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(
                f"{tracker} is not readable JSON ({error}): the checkpoint's quadrant statistics are damaged. Resume "
                "from an earlier checkpoint of this run."
            ) from None
    if ema_teacher and not any(os.path.isfile(os.path.join(checkpoint, name)) for name in ema_state_files):
        missing.append(f"the EMA teacher's weights (`{ema_state_files[0]}` or per-process files)")
    if missing:
        raise ValueError(
            f"Checkpoint {checkpoint} lacks {'; '.join(missing)}, which an exact TIP resume restores: resuming would "
            "reseed token selection, restart the schedules or drop history while looking like a continuation. Resume "
            "from a complete checkpoint of this run (written by `TIPGKDTrainer`), or start a new run."
        )
