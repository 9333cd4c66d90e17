"""The output folder of a training run: a folder that holds another run is refused, or cleared when asked to.

transformers 5 dropped `TrainingArguments.overwrite_output_dir` (transformers 4 refused an `output_dir` with
checkpoints unless it was set); `TIPConfig.overwrite_output_dir` brings the rule back for everything a run leaves:
training into a folder that holds a saved model, `tip_stats/`, a card (`README.md`, `tip_card.json`), a plot or
`checkpoint-*` is refused unless the run resumes (`resume_from_checkpoint`) or `overwrite_output_dir=True`, which
first deletes those files, so nothing of the old run is left beside the new one (and `trl-tip push` never publishes
the old card). Other files in the folder are left alone. A `trl-tip study` folder is never a training run's folder.
"""

from __future__ import annotations

import fnmatch
import os
import shutil


# What a run (trl-tip's trainer, transformers' `save_model`, the demo, the benchmarks at the end) writes at the top of
# its output folder. Tokenizer files are cleared with the model but do not mark a run alone.
RUN_MARKERS = (
    "config.json",
    "adapter_config.json",
    "model.safetensors",
    "model-*-of-*.safetensors",
    "model.safetensors.index.json",
    "pytorch_model*.bin",
    "adapter_model.safetensors",
    "adapter_model.bin",
    "trainer_state.json",
    "training_args.bin",
    "tip_card.json",
    "tip_stats",
    "quadrants.png",
    "report.json",
    "checkpoint-*",
    "README.md",
)
RUN_FILES = (
    *RUN_MARKERS,
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "self_teacher_*.pt",
    "tip_rng_state_*.pt",
    "tip_schedule_state.json",
    "eval",
)
# A `trl-tip study` folder (its settings, baselines, lock and per-run results).
STUDY_MARKERS = ("study.json", "baselines.json", "teacher_states.pt")


def _matching(folder: str, patterns) -> list[str]:
    if not os.path.isdir(folder):
        return []
    names = sorted(os.listdir(folder))
    return [name for name in names if any(fnmatch.fnmatch(name, pattern) for pattern in patterns)]


def run_files(folder: str) -> list[str]:
    """The names in `folder` that mark a saved run (model, card, statistics, checkpoints), sorted."""
    return _matching(folder, RUN_MARKERS)


def study_files(folder: str) -> list[str]:
    return _matching(folder, STUDY_MARKERS)


def _listing(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_output_dir(output_dir: str, overwrite: bool = False, resume: bool = False) -> None:
    """Raises ValueError when `output_dir` holds a study, or another run and neither `resume` nor `overwrite`."""
    study = study_files(output_dir)
    if study:
        raise ValueError(
            f"`output_dir` {output_dir!r} is a `trl-tip study` folder ({_listing(study)}); a training run there would "
            "mix its files with the study's. Choose another `output_dir`."
        )
    if resume or overwrite:
        return
    found = run_files(output_dir)
    if found:
        raise ValueError(
            f"`output_dir` {output_dir!r} already holds a run ({_listing(found)}). Choose another `output_dir`, "
            "resume it with `resume_from_checkpoint` (a checkpoint path, or true for the last one there), or set "
            "`overwrite_output_dir=True` (--overwrite_output_dir) to delete that run's files first."
        )


def refuse_run_folder_as_parent(option: str, folder: str, what: str) -> None:
    """Raises ValueError when `folder`, where a command (the demo, the study) writes `what`, holds a training run:
    its files would sit beside the run's model, and `trl-tip push` of the run would upload them."""
    found = [name for name in run_files(folder) if name not in ("README.md", "quadrants.png", "report.json")]
    if found:
        raise ValueError(
            f"{option} {folder!r} holds a training run ({_listing(found)}); {what} would be written beside its model "
            f"(and `trl-tip push {folder}` would upload it). Choose another {option}."
        )


def clear_old_run(output_dir: str) -> list[str]:
    """Deletes what a previous run left in `output_dir` (`RUN_FILES`); returns the names deleted."""
    removed = _matching(output_dir, RUN_FILES)
    for name in removed:
        path = os.path.join(output_dir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    return removed


def claim_output_dir(trainer, resume_from_checkpoint) -> None:
    """Called once when `trainer` starts training: refuses a used `output_dir` (`check_output_dir`), or clears it
    (main process) under `overwrite_output_dir=True` when the run does not resume. `resume_from_checkpoint` is what
    `train()` received; a `TIPConfig.resume_from_checkpoint` that `train()` did not receive is refused, since
    transformers' `Trainer.train` never reads it."""
    if getattr(trainer, "_output_dir_claimed", False):
        return
    args = trainer.args
    resume = resume_from_checkpoint not in (None, False)
    if not resume and args.resume_from_checkpoint is not None:
        raise ValueError(
            f"`resume_from_checkpoint`={args.resume_from_checkpoint!r} is set in the TIPConfig, but `train()` was "
            "called without it and would start from scratch (transformers' Trainer reads it only from "
            "`train(resume_from_checkpoint=...)`). Pass it to `train()`, or unset it."
        )
    overwrite = bool(getattr(args, "overwrite_output_dir", False))
    check_output_dir(args.output_dir, overwrite=overwrite, resume=resume)
    if overwrite and not resume:
        if trainer.is_world_process_zero():
            removed = clear_old_run(args.output_dir)
            if removed:
                print(f"overwrite_output_dir: deleted the previous run's {_listing(removed)} from {args.output_dir}.")
        trainer.accelerator.wait_for_everyone()
    trainer._output_dir_claimed = True
