"""Running the grid: one training + evaluation per (rule, seed), resumable and safe to interrupt.

Layout of the study folder:

- `study.json`: the shared settings; a folder only ever holds runs of one set of settings.
- `baselines.json`: teacher's greedy completions and accuracy, untrained student's metrics (computed once), and
  `teacher_states.pt`: the teacher's last hidden states on its completions (reused by every forward-KL scoring).
- `runs/<rule>-<ratio>-seed<k>.json`: one file per finished run, written atomically and last. A run counts as done
  exactly when its file exists, so an interrupted run (its `runs/.<id>.incomplete/` staging folder) is discarded and
  redone, and a finished one is never recomputed.
- `results.jsonl`, `summary.md`, `study.png`: rebuilt from `runs/` after every run.
- `models/<run>/`: the trained students, only with `--keep-models`.
"""

from __future__ import annotations

import copy
import gc
import hashlib
import json
import os
import platform
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import ProgressCallback

from ..trainer.run_folder import refuse_run_folder_as_parent
from ..utils.files import STAGING_SUFFIX, write_jsonl_atomically, write_text_atomically
from .grid import Rule, StudyArguments, study_rule_options


RESULT_VERSION = 1


class StudyFolderError(ValueError):
    """The study folder cannot take this grid (other settings, or another process working in it)."""


def _read_json(path: Path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def _write_json(path: Path, data) -> None:
    write_text_atomically(path, json.dumps(data, indent=1) + "\n")


@contextmanager
def study_lock(folder: Path):
    """An exclusive lock on the folder for the whole grid: two processes never train the same runs."""
    import fcntl

    handle = open(folder / ".lock", "w")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StudyFolderError(
                f"Another `trl-tip study` is running in {folder}; wait for it or stop it."
            ) from None
        yield
    finally:
        handle.close()


def check_settings(folder: Path, args: StudyArguments) -> None:
    """Records the shared settings in a new folder; refuses a folder whose runs used other settings."""
    path = folder / "study.json"
    settings = args.settings()
    recorded = _read_json(path)
    # Nothing computed yet (say the first attempt stopped at a wrong model path): the new settings simply apply.
    if recorded is None or not (finished_runs(folder) or (folder / "baselines.json").exists()):
        _write_json(path, {"settings": settings})
        return
    old = recorded.get("settings", {})
    differences = [
        f"{name}: {old.get(name)!r} there, {value!r} now" for name, value in settings.items() if old.get(name) != value
    ]
    if differences:
        raise StudyFolderError(
            f"{folder} holds a study with other settings ({'; '.join(differences)}). Its runs would not be "
            "comparable: choose another --output-dir, or delete the folder to start over."
        )


def finished_runs(folder: Path) -> dict[str, dict]:
    """run id -> result of every complete run file in `runs/` (staging files and unreadable files are ignored)."""
    runs = {}
    for path in sorted((folder / "runs").glob("*.json")):
        result = _read_json(path)
        if isinstance(result, dict) and result.get("result_version") == RESULT_VERSION and "run_id" in result:
            runs[result["run_id"]] = result
    return runs


def ordered_rows(folder: Path, args: StudyArguments) -> list[dict]:
    """The finished runs in grid order (rules as listed, then seeds), then any others in the folder."""
    runs = finished_runs(folder)
    order = {text: i for i, text in enumerate(args.rules)}
    return sorted(runs.values(), key=lambda r: (order.get(r["rule"], len(order)), r["rule"], r["seed"]))


def write_outputs(folder: Path, args: StudyArguments) -> list[dict]:
    """Rebuilds results.jsonl, summary.md and study.png from `runs/` and the baselines."""
    from .report import plot_study, summary_markdown

    rows = ordered_rows(folder, args)
    baselines = _read_json(folder / "baselines.json")
    if baselines is not None:
        baselines.pop("teacher_rollouts", None)
    write_jsonl_atomically(folder / "results.jsonl", rows)
    write_text_atomically(folder / "summary.md", summary_markdown(rows, baselines, len(args.grid)))
    if rows:
        plot_study(rows, baselines, folder / "study.png")
    return rows


class StudyContext:
    """What every run shares: the teacher, the untrained student, the tokenizer, the data and the baselines.

    The baselines (`baselines.json`, with the teacher's greedy completions, and `teacher_states.pt`, the teacher's
    last hidden states on them) are computed by the first process that needs them and reused by every later one."""

    def __init__(self, args: StudyArguments, folder: Path, problems: tuple | None = None):
        from ..pair.loading import load_models, public_model_names
        from ..pair.scoring import completion_states
        from .evaluation import compute_baselines, rollouts_from_json, study_problems

        self.args = args
        # The data first (`run_study` reads it before writing anything): a bad --dataset fails before a model loads.
        self.train_set, self.held_out = problems if problems is not None else study_problems(args)
        self.teacher, self.student, self.tokenizer, _, _ = load_models(args)
        # Results and summaries are shared: models by name (Hub id, or a local folder's base name), never by path.
        self.teacher_name, self.student_name = public_model_names(args, self.teacher.config.num_hidden_layers)
        path, states_path = folder / "baselines.json", folder / "teacher_states.pt"
        # The cache is keyed by the models' content: a path that now holds other weights gets no stale baselines.
        models = {
            "teacher": model_fingerprint(self.teacher, self.tokenizer),
            "student": model_fingerprint(self.student, self.tokenizer),
        }
        baselines = cached_baselines(folder, _read_json(path), models)
        if baselines is None:
            print(
                "[study] Evaluating the teacher and the untrained student once (shared by every run) ...", flush=True
            )
            baselines, states = compute_baselines(self.student, self.teacher, self.tokenizer, self.held_out, args)
            baselines.update(teacher_model=self.teacher_name, student_model=self.student_name, models=models)
            _save_tensors(states_path, states)
            _write_json(path, baselines)
        self.baselines = baselines
        self.teacher_rollouts = rollouts_from_json(baselines["teacher_rollouts"])
        try:
            self.teacher_states = torch.load(states_path, weights_only=True)
        except (OSError, RuntimeError):
            self.teacher_states = completion_states(
                self.teacher, self.tokenizer, self.teacher_rollouts, args.eval_batch_size, desc="Teacher states"
            )
            _save_tensors(states_path, self.teacher_states)


def model_fingerprint(model, tokenizer) -> str:
    """SHA-256 of a model's content: every weight (name, dtype, shape, bytes) and the tokenizer's vocabulary and chat
    template. Equal for the same weights wherever they were loaded from; about a second per GB of weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
    vocabulary = json.dumps(sorted(tokenizer.get_vocab().items()))
    digest.update(f"{vocabulary}|{getattr(tokenizer, 'chat_template', None)}".encode())
    return digest.hexdigest()


def cached_baselines(folder: Path, baselines: dict | None, models: dict) -> dict | None:
    """The baselines in `baselines.json` when they were computed with these `models` (content fingerprints); `None`
    (recompute) when they were computed with other models and no run used them; StudyFolderError when finished runs
    were trained against those other models."""
    if baselines is None:
        return None
    recorded = baselines.get("models")
    if recorded is None:  # written before the fingerprints existed: recorded now, trusted as the folder's models
        print(f"[study] {folder}/baselines.json names no model fingerprints; recording the current models'.")
        baselines["models"] = models
        _write_json(folder / "baselines.json", baselines)
        return baselines
    changed = [role for role in ("teacher", "student") if recorded.get(role) != models[role]]
    if not changed:
        return baselines
    runs = finished_runs(folder)
    if runs:
        raise StudyFolderError(
            f"The {' and '.join(changed)} weights differ from those the {len(runs)} finished runs in {folder} were "
            f"trained and scored against (baselines.json records their content). Their results would not be "
            "comparable: choose another --output-dir, or delete the folder to start over."
        )
    print(f"[study] The {' and '.join(changed)} changed since the baselines were cached; computing them again.")
    return None


def _save_tensors(path: Path, tensors: list) -> None:
    staging = path.with_name(path.name + STAGING_SUFFIX)
    torch.save(tensors, staging)
    os.replace(staging, path)


class _QuietProgress(ProgressCallback):
    def on_log(self, args, state, control, logs=None, **kwargs):
        pass


def train_and_evaluate(ctx: StudyContext, rule: Rule, seed: int, staging: Path, model_dir: Path | None) -> dict:
    """Trains a fresh copy of the untrained student under `rule` with `seed`, evaluates it, returns its metrics."""
    from transformers import set_seed

    from ..core.quadrants import QUADRANT_NAMES
    from ..pair.training import pair_config
    from ..trainer.tip_trainer import TIPGKDTrainer
    from .evaluation import evaluate_student

    args = ctx.args
    started = time.time()
    set_seed(seed)
    # Fresh copies: each run starts from the same weights, whatever ran before it in this process.
    student, teacher, tokenizer = (copy.deepcopy(m) for m in (ctx.student, ctx.teacher, ctx.tokenizer))
    config = pair_config(
        args,
        str(staging),
        seed,
        token_selector=rule.name,
        selection_ratio=rule.ratio,
        selection_scope=args.selection_scope,
        num_rollouts_per_prompt=args.num_rollouts_per_prompt,
        lr_scheduler_type=args.lr_scheduler_type,
        beta=args.beta,
        temperature=args.temperature,
        **study_rule_options(rule),
    )
    trainer = TIPGKDTrainer(
        model=student,
        # A self-teacher rule trains against the student told the answer; the evaluation below still uses `teacher`.
        teacher_model=None if config.teacher_model_kind else teacher,
        args=config,
        train_dataset=ctx.train_set,
        processing_class=tokenizer,
    )
    # A step bar, without the full metrics dict the default bar prints at every step (the run file keeps the losses).
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(_QuietProgress())
    trainer.train()
    train_time = time.time() - started
    student = trainer.accelerator.unwrap_model(trainer.model)
    t = time.time()
    metrics = evaluate_student(
        student, teacher, tokenizer, ctx.held_out, ctx.teacher_rollouts, ctx.teacher_states, args, rule.label
    )
    eval_time = time.time() - t
    if model_dir is not None:
        trainer.save_model(str(model_dir))
    total = trainer.quadrant_tracker.total().summary()
    result = {
        "accuracy": metrics["accuracy"],
        "reverse_kl": metrics["reverse_kl"],
        "forward_kl": metrics["forward_kl"],
        "completion_tokens": metrics["completion_tokens"],
        "accuracy_heldout_se": metrics["accuracy_heldout_se"],
        "reverse_kl_heldout_se": metrics["reverse_kl_heldout_se"],
        "forward_kl_heldout_se": metrics["forward_kl_heldout_se"],
        "tokens_trained": total["num_selected"],
        "tokens_valid": total["num_tokens"],
        "kept_fraction": total["selected_fraction"],
        **{f"kept_share/{q}": total[f"selected_share/{q}"] for q in QUADRANT_NAMES},
        **{f"valid_share/{q}": total[f"quadrant_share/{q}"] for q in QUADRANT_NAMES},
        # The teacher's entropy on the student's rollouts, all valid tokens and per quadrant (absent if unmeasured).
        **{key: value for key, value in total.items() if key.startswith("teacher_entropy")},
        "final_loss": next((h["loss"] for h in reversed(trainer.state.log_history) if "loss" in h), None),
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "train_time_s": train_time,
        "eval_time_s": eval_time,
        "examples": metrics["examples"],
    }
    del trainer, student, teacher
    gc.collect()
    return result


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def run_study(args: StudyArguments) -> str:
    """Runs every (rule, seed) of the grid not yet finished in `args.output_dir`; returns the folder."""
    folder = Path(args.output_dir)
    grid = args.grid
    refuse_run_folder_as_parent("--output-dir", str(folder), "the study's files")
    from .evaluation import study_problems

    problems = study_problems(args)  # a --dataset with bad or too few rows fails before the folder is written
    folder.mkdir(parents=True, exist_ok=True)
    with study_lock(folder):
        check_settings(folder, args)
        runs_dir = folder / "runs"
        runs_dir.mkdir(exist_ok=True)
        for stale in runs_dir.glob(f".*{STAGING_SUFFIX}"):
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
        done = finished_runs(folder)
        pending = [(i, rule, seed) for i, (rule, seed) in enumerate(grid, 1) if rule.run_id(seed) not in done]
        print(
            f"[study] {folder}: {len(grid)} runs in the grid ({len(grid) - len(pending)} already finished, "
            f"{len(pending)} to run).",
            flush=True,
        )
        if pending:
            if args.threads:
                torch.set_num_threads(args.threads)
            ctx = StudyContext(args, folder, problems)
            previous = [r["wall_time_s"] for r in done.values() if "wall_time_s" in r]
            session = []
            for position, (i, rule, seed) in enumerate(pending):
                times = session or previous
                eta = f", ETA {_minutes(sum(times) / len(times) * (len(pending) - position))}" if times else ""
                print(f"[study] run {i} of {len(grid)}: {rule.label} seed {seed}{eta}", flush=True)
                row = _run_one(ctx, folder, rule, seed)
                session.append(row["wall_time_s"])
                try:
                    write_outputs(folder, args)
                except Exception as error:  # the run is saved; a report problem must not stop the grid
                    print(
                        f"[study] could not rebuild the report yet ({error!r}); it is rebuilt at the end.", flush=True
                    )
                print(
                    f"[study] run {i} of {len(grid)} done in {_minutes(row['wall_time_s'])}: reverse KL "
                    f"{row['reverse_kl']:.4f}, forward KL {row['forward_kl']:.4f}, accuracy "
                    f"{100 * row['accuracy']:.1f}%, {row['tokens_trained']:.0f} tokens trained on",
                    flush=True,
                )
        rows = write_outputs(folder, args)
    print(f"[study] {len(rows)} runs in {folder}/results.jsonl, summary.md and study.png.", flush=True)
    return str(folder)


def _run_one(ctx: StudyContext, folder: Path, rule: Rule, seed: int) -> dict:
    run_id = rule.run_id(seed)
    staging = folder / "runs" / f".{run_id}{STAGING_SUFFIX}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    model_dir = staging / "model" if ctx.args.keep_models else None
    started, cpu_started = time.time(), time.process_time()
    metrics = train_and_evaluate(ctx, rule, seed, staging, model_dir)
    row = {
        "result_version": RESULT_VERSION,
        "run_id": run_id,
        "rule": rule.label,
        "selector": rule.name,
        "ratio": rule.ratio,
        "options": dict(rule.options),
        "seed": seed,
        **metrics,
        "wall_time_s": time.time() - started,
        # CPU seconds of this process (all threads): near threads x wall time when the machine was not shared.
        "cpu_time_s": time.process_time() - cpu_started,
        **ctx.args.settings(),
        "teacher_model": ctx.teacher_name,
        "student_model": ctx.student_name,
        "held_out_problems": len(ctx.held_out),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
    }
    if model_dir is not None:
        target = folder / "models" / run_id
        target.parent.mkdir(exist_ok=True)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(model_dir, target)
    # The result file is written last: it alone marks the run as finished.
    _write_json(folder / "runs" / f"{run_id}.json", row)
    shutil.rmtree(staging, ignore_errors=True)
    return row
