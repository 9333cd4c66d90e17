"""What the teacher's entropy looks like on the student's own rollouts (TIP's appendix B.1 and EOPD argue about it).

Samples rollouts from the student on training prompts, as on-policy distillation does, and prints the distribution of
the teacher's entropy `H(P_T)` over their tokens next to the student's, overall and per entropy-divergence quadrant
(median splits, as the trainer logs them). Defaults: the embedded pair of `trl-tip demo` and `trl-tip study`.

    python benchmarks/teacher_entropy.py                       # SmolLM2-135M-Instruct teacher, its 26-layer student
    python benchmarks/teacher_entropy.py --prompts 64 --max-new-tokens 64 --temperature 1.0
    python benchmarks/teacher_entropy.py --teacher TEACHER_DIR --student STUDENT_DIR   # any pair with one tokenizer
"""

from __future__ import annotations

import argparse
import time

import torch


def quantiles(values: torch.Tensor, qs=(0.1, 0.25, 0.5, 0.75, 0.9)) -> str:
    return ", ".join(f"p{int(100 * q)} {float(torch.quantile(values, q)):.3f}" for q in qs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default="smollm2", help="Teacher: 'smollm2' (embedded), a folder or a Hub id.")
    parser.add_argument("--student", default=None, help="Student folder or Hub id; default: the compressed teacher.")
    parser.add_argument("--student-layers", type=int, default=26, help="Layers the compressed student keeps.")
    parser.add_argument("--prompts", type=int, default=32, help="Training prompts to sample from.")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="Longest rollout (the study's default).")
    parser.add_argument("--temperature", type=float, default=1.0, help="Rollout sampling and softmax temperature.")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from trl_tip.core.quadrants import QUADRANT_NAMES, classify_quadrants
    from trl_tip.core.stats import TokenStats
    from trl_tip.eval.harness import end_after_eos
    from trl_tip.pair.arguments import PairArguments
    from trl_tip.pair.loading import load_models
    from trl_tip.pair.problems import make_problems, to_dataset
    from trl_tip.pair.scoring import Rollouts, completion_batches, completion_stats, last_hidden

    torch.manual_seed(args.seed)
    teacher, student, tokenizer, _, _ = load_models(
        PairArguments(
            teacher=args.teacher,
            student=args.student,
            student_layers=args.student_layers,
            max_new_tokens=args.max_new_tokens,
        )
    )
    prompts = list(to_dataset(make_problems(args.prompts, seed=args.seed, steps=(1, 2), digits=1))["prompt"])
    started = time.time()
    encoded = tokenizer.apply_chat_template(
        prompts, add_generation_prompt=True, tokenize=True, return_dict=True, padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        out = student.generate(
            **encoded,
            max_new_tokens=args.max_new_tokens,
            do_sample=True,
            temperature=args.temperature,
            top_k=0,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=[tokenizer.eos_token_id],
        )
    width = encoded["input_ids"].shape[1]
    rollouts = Rollouts(
        prompt_ids=[row[:width][mask.bool()] for row, mask in zip(out, encoded["attention_mask"])],
        completion_ids=[end_after_eos(row[width:], [tokenizer.eos_token_id]) for row in out],
        texts=[],
    )
    stats = []
    with torch.no_grad():
        for _, ids, attention, completion_mask, span in completion_batches(rollouts, 16, tokenizer.pad_token_id):
            h_s = last_hidden(student, ids, attention)[:, span]
            h_t = last_hidden(teacher, ids, attention)[:, span]
            stats.append(completion_stats(student, teacher, h_s, h_t, completion_mask, args.temperature))

    valid = [s.mask for s in stats]
    teacher_entropy = torch.cat([s.teacher_entropy[m] for s, m in zip(stats, valid)])
    student_entropy = torch.cat([s.entropy[m] for s, m in zip(stats, valid)])
    reverse_kl = torch.cat([s.reverse_kl[m] for s, m in zip(stats, valid)])
    print(
        f"{len(prompts)} prompts, {teacher_entropy.numel()} rollout tokens sampled from the student at temperature "
        f"{args.temperature:g} ({time.time() - started:.0f} s)"
    )
    for name, values in (("teacher entropy", teacher_entropy), ("student entropy", student_entropy)):
        print(f"{name} (nats): mean {float(values.mean()):.3f}; {quantiles(values)}")
    for threshold in (0.1, 0.5, 1.0):
        share = float((teacher_entropy < threshold).float().mean())
        print(f"share of tokens with teacher entropy < {threshold:g} nats: {100 * share:.1f}%")
    print(f"reverse KL (nats): mean {float(reverse_kl.mean()):.3f}")
    correlation = torch.corrcoef(torch.stack([teacher_entropy, student_entropy]))[0, 1]
    print(f"Pearson correlation of teacher and student entropy: {float(correlation):.3f}")
    flat = TokenStats(student_entropy[None], reverse_kl[None], reverse_kl[None], torch.ones_like(reverse_kl[None]))
    quadrant = classify_quadrants(flat)[0]
    for index, q in enumerate(QUADRANT_NAMES):
        members = quadrant == index
        if members.any():
            print(
                f"{q}: {100 * float(members.float().mean()):.1f}% of tokens, teacher entropy mean "
                f"{float(teacher_entropy[members].mean()):.3f}, student entropy mean "
                f"{float(student_entropy[members].mean()):.3f}"
            )


if __name__ == "__main__":
    main()
