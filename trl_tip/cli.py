"""The `trl-tip` command line: `trl-tip demo`, `trl-tip train`, `trl-tip eval`, `trl-tip push`, `trl-tip study`,
`trl-tip tiny-models`."""

from __future__ import annotations

import argparse
import sys


COMMANDS = {
    "demo": "Distill SmolLM2-135M-Instruct into a compressed copy on this CPU, offline, and plot the quadrants.",
    "train": "TIP on-policy distillation from a YAML recipe (TrlParser: --config FILE plus --flag overrides).",
    "eval": "mean@k accuracy on MATH-500, AIME 2024/2025, AMC 2023, GSM8K or a .jsonl, checked with math-verify.",
    "push": "Push a finished run to the Hub: the student with its card, and the quadrant statistics as a dataset.",
    "study": "Compare token-selection rules over seeds from one start: results.jsonl, summary.md, study.png.",
    "tiny-models": "Write a tiny random student, teacher, tokenizer and prompt file for offline smoke runs.",
}


def tiny_models(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="trl-tip tiny-models", description=COMMANDS["tiny-models"])
    parser.add_argument(
        "--output-dir", default="outputs/tiny-models", help="Folder for student/, teacher/, prompts.jsonl"
    )
    parser.add_argument("--num-prompts", type=int, default=64)
    args = parser.parse_args(argv)

    import os

    from .testing import tiny_causal_lm, tiny_math_dataset, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    for name, model in (
        ("student", tiny_causal_lm(tokenizer, hidden_size=64, seed=0)),
        ("teacher", tiny_causal_lm(tokenizer, hidden_size=128, seed=1)),
    ):
        path = os.path.join(args.output_dir, name)
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
    tiny_math_dataset(args.num_prompts).to_json(os.path.join(args.output_dir, "prompts.jsonl"))
    print(f"Wrote {args.output_dir}/student, {args.output_dir}/teacher and {args.output_dir}/prompts.jsonl")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        lines = [
            "usage: trl-tip <command> [options]",
            "",
            "TIP: token importance in on-policy distillation.",
            "",
            "commands:",
        ]
        lines += [f"  {name:<12} {text}" for name, text in COMMANDS.items()]
        lines += ["", "Run `trl-tip <command> --help` for a command's options."]
        print("\n".join(lines))
        if not argv:
            sys.exit(2)
        return
    command, rest = argv[0], argv[1:]
    if command == "demo":
        from .demo.command import main as demo_main

        demo_main(rest)
    elif command == "train":
        from .train import run

        run(rest, prog="trl-tip train")
    elif command == "eval":
        from .eval.benchmarks import main as eval_main

        eval_main(rest)
    elif command == "push":
        from .hub.push import main as push_main

        push_main(rest)
    elif command == "study":
        from .study import main as study_main

        study_main(rest)
    elif command == "tiny-models":
        tiny_models(rest)
    else:
        sys.exit(f"trl-tip: unknown command {command!r}; choose from {', '.join(COMMANDS)}.")


if __name__ == "__main__":
    main()
