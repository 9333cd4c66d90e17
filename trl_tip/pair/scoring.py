"""Held-out scoring of the embedded pair: greedy completions, answer accuracy, and the per-token reverse and forward KL
between student and teacher on given completions (one scorer for the demo and the study)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..core.stats import compute_token_stats
from ..eval.grading import grade
from ..eval.harness import end_after_eos


@dataclass
class Rollouts:
    """Greedy completions of a batch of prompts: padded ids and masks, plus the decoded text."""

    prompt_ids: list[torch.Tensor]
    completion_ids: list[torch.Tensor]
    texts: list[str]


@torch.no_grad()
def greedy_rollouts(
    model, tokenizer, prompts: list, max_new_tokens: int, batch_size: int = 16, desc: str = "Generating"
):
    """Greedy, batched, left-padded generation with the tokenizer's chat template."""
    model.eval()
    eos_ids = [tokenizer.eos_token_id]
    prompt_ids, completion_ids, texts = [], [], []
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, unit="batch"):
        batch = prompts[start : start + batch_size]
        encoded = tokenizer.apply_chat_template(
            batch, add_generation_prompt=True, tokenize=True, return_dict=True, padding=True, return_tensors="pt"
        )
        out = model.generate(
            **encoded,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=eos_ids,
        )
        width = encoded["input_ids"].shape[1]
        for row, mask in zip(out, encoded["attention_mask"]):
            prompt_ids.append(row[:width][mask.bool()])
            completion = end_after_eos(row[width:], eos_ids)
            completion_ids.append(completion)
            texts.append(tokenizer.decode(completion, skip_special_tokens=True))
    return Rollouts(prompt_ids, completion_ids, texts)


def answer_accuracy(texts: list[str], answers: list[int]) -> float:
    """Share of completions whose final number equals the answer, checked as `trl-tip eval` checks GSM8K."""
    if not texts:
        return 0.0
    return sum(grade(t, str(a), "number").correct for t, a in zip(texts, answers, strict=True)) / len(texts)


def last_hidden(model, input_ids, attention_mask):
    """The backbone's last hidden states, with position ids that skip the left padding."""
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return model.base_model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
    ).last_hidden_state


def completion_stats(student, teacher, h_s, h_t, completion_mask, temperature: float):
    """Per-token statistics of completions from the two models' last hidden states, through their own heads."""
    return compute_token_stats(
        h_s,
        h_t,
        student.get_output_embeddings().weight,
        teacher.get_output_embeddings().weight,
        completion_mask,
        temperature=temperature,
    )


def completion_batches(rollouts: Rollouts, batch_size: int, pad: int):
    """Left-padded prompt + right-padded completion batches, with the slice of states that predict the completion:
    yields `(start, ids, attention, completion_mask, span)`."""
    for start in range(0, len(rollouts.prompt_ids), batch_size):
        prompts = rollouts.prompt_ids[start : start + batch_size]
        completions = rollouts.completion_ids[start : start + batch_size]
        p_width = max(len(p) for p in prompts)
        c_width = max(1, max(len(c) for c in completions))
        ids = torch.full((len(prompts), p_width + c_width), pad, dtype=torch.long)
        attention = torch.zeros_like(ids)
        completion_mask = torch.zeros(len(prompts), c_width, dtype=torch.long)
        for i, (p, c) in enumerate(zip(prompts, completions)):
            ids[i, p_width - len(p) : p_width] = p
            ids[i, p_width : p_width + len(c)] = c
            attention[i, p_width - len(p) : p_width + len(c)] = 1
            completion_mask[i, : len(c)] = 1
        # The state at position t predicts token t + 1: the completion tokens are predicted from p_width - 1 on.
        yield start, ids, attention, completion_mask, slice(p_width - 1, p_width - 1 + c_width)


@torch.no_grad()
def completion_states(model, tokenizer, rollouts: Rollouts, batch_size: int = 16, desc: str = "States") -> list:
    """Per rollout, the model's last hidden states `(len(completion), H)` that predict its completion tokens.

    The teacher's states on its own completions are the same for every run of a study: it computes them once and
    `token_kls(..., teacher_states=...)` reuses them, batched exactly as they were computed."""
    model.eval()
    states = []
    batches = completion_batches(rollouts, batch_size, tokenizer.pad_token_id)
    for _, ids, attention, completion_mask, span in tqdm(
        batches, desc=desc, unit="batch", total=_num_batches(rollouts, batch_size)
    ):
        hidden = last_hidden(model, ids, attention)[:, span]
        states += [h[: int(n)].clone() for h, n in zip(hidden, completion_mask.sum(-1))]
    return states


def _num_batches(rollouts: Rollouts, batch_size: int) -> int:
    return math.ceil(len(rollouts.prompt_ids) / batch_size)


def _with_prompts(tokenizer, rollouts: Rollouts, prompts: list) -> Rollouts:
    """The same completions after other prompts (one per rollout, chat template applied here)."""
    prompt_ids = [
        torch.tensor(tokenizer.apply_chat_template(p, add_generation_prompt=True, return_dict=True)["input_ids"])
        for p in prompts
    ]
    return Rollouts(prompt_ids, rollouts.completion_ids, rollouts.texts)


@torch.no_grad()
def token_kls(
    student,
    teacher,
    tokenizer,
    rollouts: Rollouts,
    batch_size: int = 16,
    temperature: float = 1.0,
    teacher_prompts: list | None = None,
    teacher_states: list | None = None,
    desc: str = "Scoring KL",
) -> dict:
    """Mean over the rollouts' completion tokens of KL(student || teacher) (`reverse_kl`) and KL(teacher || student)
    (`forward_kl`), in nats, scored in one pass, with each one's standard error over the rollouts
    (`reverse_kl_heldout_se`, `forward_kl_heldout_se`: how much it would move with another held-out draw).

    `teacher_prompts` (one per rollout) makes the teacher read those before the same completions (self-distillation's
    privileged context); `teacher_states` (from `completion_states` with the same batch size) replaces the teacher's
    forward pass."""
    student.eval()
    teacher.eval()
    teacher_rollouts = rollouts if teacher_prompts is None else _with_prompts(tokenizer, rollouts, teacher_prompts)
    pad = tokenizer.pad_token_id
    batches = zip(completion_batches(rollouts, batch_size, pad), completion_batches(teacher_rollouts, batch_size, pad))
    reverse, forward, count = [], [], []
    for (start, ids, attention, completion_mask, span), (_, t_ids, t_attention, _, t_span) in tqdm(
        batches, desc=desc, unit="batch", total=_num_batches(rollouts, batch_size)
    ):
        h_s = last_hidden(student, ids, attention)[:, span]
        if teacher_states is None:
            h_t = last_hidden(teacher, t_ids, t_attention)[:, t_span]
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
