"""The study's data and held-out evaluation: the training pool and held-out set every run shares, and the metrics.

Per run, on the same held-out prompts: greedy answer accuracy, the mean per-token reverse KL(student || teacher) on the
student's own greedy completions (what on-policy distillation minimizes), and the mean per-token forward
KL(teacher || student) on the teacher's greedy completions (how well the student predicts what the teacher writes).
The teacher's completions and the student-before-training numbers do not depend on the run, so they are computed once
per study folder and cached (`baselines.json`).
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from ..demo.heldout import (
    Rollouts,
    answer_accuracy,
    completion_batches,
    completion_stats,
    greedy_rollouts,
    last_hidden,
)
from .grid import StudyArguments


def study_problems(args: StudyArguments):
    """(training prompts, held-out problems): one fixed pool and one fixed held-out set for every run and seed.

    Generated problems follow `trl-tip demo` (training: 1-2 steps; held-out: one step, which the 135M teacher gets
    right a third of the time); held-out questions are removed from the training pool."""
    from ..demo.problems import make_problems, to_dataset

    if args.dataset:
        return _dataset_problems(args.dataset, args.train_problems, args.eval_problems, args.problem_seed)
    held_out = make_problems(args.eval_problems, seed=args.problem_seed + 10_000, steps=1, digits=1)
    seen = {p.question for p in held_out}
    train = make_problems(args.train_problems, seed=args.problem_seed, steps=(1, 2), digits=1)
    train = [p for p in train if p.question not in seen] or train
    # The answers stay for `problem_weighting="paced"`, which grades the rollouts against them.
    return to_dataset(train).select_columns(["prompt", "answer"]), to_dataset(held_out)


def _dataset_problems(name: str, n_train: int, n_eval: int, seed: int):
    """As `trl-tip demo --dataset`: rows with an integer answer (GSM8K's `#### n` included), shuffled with `seed`;
    the first `n_eval` are held out, the next `n_train` train."""
    from ..demo.problems import extract_integer
    from ..train import load_prompt_dataset

    data = load_prompt_dataset(name)["train"].shuffle(seed=seed)
    if "answer" not in data.column_names:
        raise ValueError(
            f"--dataset {name!r} needs an `answer` column for the evaluation; it has {data.column_names}."
        )
    data = data.map(lambda row: {"answer": extract_integer(str(row["answer"]).split("####")[-1])})
    data = data.filter(lambda row: row["answer"] is not None)
    if data.num_rows < n_eval + 1:
        raise ValueError(
            f"--dataset {name!r} has {data.num_rows} usable rows; need more than --eval-problems={n_eval}."
        )
    held_out = data.select(range(n_eval))
    train = data.select(range(n_eval, min(data.num_rows, n_eval + n_train)))
    return train.select_columns(["prompt", "answer"]), held_out


@torch.no_grad()
def completion_states(model, tokenizer, rollouts: Rollouts, batch_size: int = 16, desc: str = "States") -> list:
    """Per rollout, the model's last hidden states `(len(completion), H)` that predict its completion tokens.

    The teacher's states on its own completions are the same for every run: the study computes them once and
    `mean_token_kls(..., teacher_states=...)` reuses them, batched exactly as they were computed."""
    model.eval()
    states = []
    batches = completion_batches(rollouts, batch_size, tokenizer.pad_token_id)
    for _, ids, attention, completion_mask, span in tqdm(
        batches, desc=desc, unit="batch", total=_count(rollouts, batch_size)
    ):
        hidden = last_hidden(model, ids, attention)[:, span]
        states += [h[: int(n)].clone() for h, n in zip(hidden, completion_mask.sum(-1))]
    return states


def _count(rollouts: Rollouts, batch_size: int) -> int:
    return -(-len(rollouts.prompt_ids) // batch_size)


@torch.no_grad()
def mean_token_kls(
    student,
    teacher,
    tokenizer,
    rollouts: Rollouts,
    batch_size: int = 16,
    temperature: float = 1.0,
    teacher_states: list | None = None,
    desc: str = "KL",
) -> dict:
    """Mean over the rollouts' completion tokens of KL(student || teacher) and KL(teacher || student), in nats.

    `trl_tip.demo.heldout.mean_reverse_kl` gives the first only; this scores both in the same pass. `teacher_states`
    (from `completion_states` with the same batch size) replaces the teacher's forward pass."""
    student.eval()
    teacher.eval()
    reverse, forward, count = [], [], []
    batches = completion_batches(rollouts, batch_size, tokenizer.pad_token_id)
    for start, ids, attention, completion_mask, span in tqdm(
        batches, desc=desc, unit="batch", total=_count(rollouts, batch_size)
    ):
        h_s = last_hidden(student, ids, attention)[:, span]
        if teacher_states is None:
            h_t = last_hidden(teacher, ids, attention)[:, span]
        else:
            h_t = torch.zeros(h_s.shape[:2] + (teacher_states[start].shape[-1],), dtype=teacher_states[start].dtype)
            for i, state in enumerate(teacher_states[start : start + len(ids)]):
                h_t[i, : len(state)] = state
        stats = completion_stats(student, teacher, h_s, h_t, completion_mask, temperature)
        reverse += stats.reverse_kl.sum(-1).tolist()
        forward += stats.forward_kl.sum(-1).tolist()
        count += completion_mask.sum(-1).tolist()
    total = sum(count)
    return {
        "reverse_kl": sum(reverse) / total if total else 0.0,
        "forward_kl": sum(forward) / total if total else 0.0,
        "reverse_kl_heldout_se": ratio_se(reverse, count),
        "forward_kl_heldout_se": ratio_se(forward, count),
    }


def ratio_se(sums: list[float], counts: list[int]) -> float:
    """Standard error, over the held-out prompts, of a per-token mean `sum(sums) / sum(counts)` (ratio estimator):
    how much the metric would move with another held-out draw of the same size, whatever the training did."""
    n, total = len(sums), sum(counts)
    if n < 2 or not total:
        return 0.0
    mean = sum(sums) / total
    residual = sum((s - mean * c) ** 2 for s, c in zip(sums, counts)) / (n - 1)
    return math.sqrt(residual / n) / (total / n)


def rollouts_to_json(rollouts: Rollouts) -> dict:
    return {
        "prompt_ids": [p.tolist() for p in rollouts.prompt_ids],
        "completion_ids": [c.tolist() for c in rollouts.completion_ids],
        "texts": rollouts.texts,
    }


def rollouts_from_json(data: dict) -> Rollouts:
    return Rollouts(
        prompt_ids=[torch.tensor(p, dtype=torch.long) for p in data["prompt_ids"]],
        completion_ids=[torch.tensor(c, dtype=torch.long) for c in data["completion_ids"]],
        texts=list(data["texts"]),
    )


def evaluate_student(
    student, teacher, tokenizer, held_out, teacher_rollouts: Rollouts, teacher_states: list, args, label: str
) -> dict:
    """Accuracy and reverse KL on the student's own greedy completions, forward KL on the teacher's."""
    own = greedy_rollouts(
        student, tokenizer, held_out["prompt"], args.max_new_tokens, args.eval_batch_size, desc=f"Generating ({label})"
    )
    on_own = mean_token_kls(student, teacher, tokenizer, own, args.eval_batch_size, desc=f"KL, own ({label})")
    on_teacher = mean_token_kls(
        student,
        teacher,
        tokenizer,
        teacher_rollouts,
        args.eval_batch_size,
        teacher_states=teacher_states,
        desc=f"KL, teacher's ({label})",
    )
    accuracy = answer_accuracy(own.texts, list(held_out["answer"]))
    n = len(own.texts)
    return {
        "accuracy": accuracy,
        "reverse_kl": on_own["reverse_kl"],
        "forward_kl": on_teacher["forward_kl"],
        # Evaluation noise alone: the standard error of each metric over the held-out prompts.
        "accuracy_heldout_se": math.sqrt(accuracy * (1 - accuracy) / (n - 1)) if n > 1 else 0.0,
        "reverse_kl_heldout_se": on_own["reverse_kl_heldout_se"],
        "forward_kl_heldout_se": on_teacher["forward_kl_heldout_se"],
        "completion_tokens": sum(len(c) for c in own.completion_ids) / len(own.completion_ids),
        "examples": own.texts[:3],
    }


def compute_baselines(student, teacher, tokenizer, held_out, args) -> tuple[dict, list]:
    """The teacher's greedy completions, accuracy and states on them, and the untrained student's metrics: shared by
    every run. Returns (the JSON-able baselines, the teacher's completion states)."""
    teacher_rollouts = greedy_rollouts(
        teacher, tokenizer, held_out["prompt"], args.max_new_tokens, args.eval_batch_size, desc="Generating (teacher)"
    )
    states = completion_states(teacher, tokenizer, teacher_rollouts, args.eval_batch_size, desc="Teacher states")
    before = evaluate_student(student, teacher, tokenizer, held_out, teacher_rollouts, states, args, "student before")
    baselines = {
        "held_out_problems": len(held_out),
        "teacher": {
            "accuracy": answer_accuracy(teacher_rollouts.texts, list(held_out["answer"])),
            "completion_tokens": sum(len(c) for c in teacher_rollouts.completion_ids) / len(teacher_rollouts.texts),
            "examples": teacher_rollouts.texts[:3],
        },
        "student_before": before,
        "teacher_rollouts": rollouts_to_json(teacher_rollouts),
    }
    return baselines, states
