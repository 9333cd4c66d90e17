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

from ..pair.problems import pair_problems
from ..pair.scoring import Rollouts, answer_accuracy, completion_states, greedy_rollouts, token_kls
from .grid import StudyArguments


def study_problems(args: StudyArguments):
    """(training prompts, held-out problems): one fixed pool and one fixed held-out set for every run and seed, drawn
    with `--problem-seed`; held-out questions are removed from the training pool. The answers stay for
    `problem_weighting="paced"`, which grades the rollouts against them."""
    return pair_problems(args, args.problem_seed, drop_held_out_from_train=True)


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
    on_own = token_kls(student, teacher, tokenizer, own, args.eval_batch_size, desc=f"KL, own ({label})")
    on_teacher = token_kls(
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
