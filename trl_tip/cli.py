"""The `trl-tip` command line: `trl-tip demo`, `trl-tip train`, `trl-tip eval`, `trl-tip push`, `trl-tip study`,
`trl-tip tiny-models`."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

from .utils.command_errors import DEBUG_ENV, UsageExit, exit_with_usage_status, usage_errors


COMMANDS = {
    "demo": "Distill SmolLM2-135M-Instruct into a compressed copy on this CPU, offline, and plot the quadrants.",
    "train": "TIP on-policy distillation from a YAML recipe (TrlParser: --config FILE plus --flag overrides).",
    "eval": "mean@k accuracy on MATH-500, AIME 2024/2025, AMC 2023, GSM8K or a .jsonl, checked with math-verify.",
    "push": "Push a finished run to the Hub: the student with its card, and the quadrant statistics as a dataset.",
    "study": "Compare token-selection rules over seeds from one start: results.jsonl, summary.md, study.png.",
    "tiny-models": "Write a tiny random student, teacher, tokenizer and prompt file for offline smoke runs.",
}


# The versions `trl-tip --version` reports: trl-tip's, then those of the libraries it builds on.
VERSIONED = ("trl-tip", "trl", "transformers", "torch")


@dataclass
class TinyModelsArguments:
    output_dir: str = field(
        default="outputs/tiny-models", metadata={"help": "Folder for student/, teacher/, prompts.jsonl"}
    )
    num_prompts: int = field(default=64, metadata={"help": "Prompts written to prompts.jsonl."})

    def __post_init__(self):
        if isinstance(self.num_prompts, bool) or not isinstance(self.num_prompts, int) or self.num_prompts < 1:
            raise ValueError(f"--num-prompts must be a positive integer; got {self.num_prompts!r}.")


def parse_tiny_models_args(argv: list[str] | None = None) -> TinyModelsArguments:
    from transformers import HfArgumentParser

    parser = HfArgumentParser(TinyModelsArguments, prog="trl-tip tiny-models", description=COMMANDS["tiny-models"])
    (args,) = parser.parse_args_into_dataclasses(argv)
    return args


def version_text() -> str:
    """`trl-tip <version>`, then the installed trl, transformers and torch, one per line (from package metadata)."""
    from importlib.metadata import PackageNotFoundError, version

    lines = []
    for name in VERSIONED:
        try:
            lines.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            lines.append(f"{name} (not installed)")
    return "\n".join(lines)


def tiny_models(argv: list[str]) -> None:
    with usage_errors("tiny-models", ValueError):
        args = parse_tiny_models_args(argv)

    from .testing import save_tiny_pair

    save_tiny_pair(args.output_dir, num_prompts=args.num_prompts)
    print(f"Wrote {args.output_dir}/student, {args.output_dir}/teacher and {args.output_dir}/prompts.jsonl")


def main(argv: list[str] | None = None) -> None:
    """`trl-tip ...`. Run as the program (no `argv`), a refused input prints `trl-tip <command>: <message>` and exits
    with status 2; called with `argv`, it raises `UsageExit`, whose `code` is that message."""
    if argv is None:
        exit_with_usage_status(_main, sys.argv[1:])
    else:
        _main(argv)


def _main(argv: list[str]) -> None:
    if argv and argv[0] == "--debug":
        # Tracebacks instead of one-line errors, for this command (and the processes it starts).
        previous = os.environ.get(DEBUG_ENV)
        os.environ[DEBUG_ENV] = "1"
        try:
            return _main(argv[1:])
        finally:
            if previous is None:
                os.environ.pop(DEBUG_ENV, None)
            else:
                os.environ[DEBUG_ENV] = previous
    if not argv or argv[0] in ("-h", "--help"):
        lines = [
            "usage: trl-tip <command> [options]",
            "",
            "TIP: token importance in on-policy distillation.",
            "",
            "commands:",
        ]
        lines += [f"  {name:<12} {text}" for name, text in COMMANDS.items()]
        lines += [
            "",
            "options:",
            "  -h, --help   show this message",
            "  --version    print the versions of trl-tip, trl, transformers and torch",
            "  --debug      before the command: show a traceback instead of the one-line error",
            "",
            "Run `trl-tip <command> --help` for a command's options; each option is spelled `--a_b` or `--a-b`.",
        ]
        print("\n".join(lines))
        if not argv:
            sys.exit(2)
        return
    if argv[0] == "--version":
        print(version_text())
        return
    command, rest = argv[0], argv[1:]
    if command in COMMANDS and "--version" in rest:
        print(version_text())
        return
    if command == "demo":
        from .demo.command import main as demo_main

        demo_main(rest)
    elif command == "train":
        from .train import run

        run(rest, prog="trl-tip train")
    elif command == "eval":
        from .eval.harness import main as eval_main

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
        raise UsageExit(f"trl-tip: unknown command {command!r}; choose from {', '.join(COMMANDS)}.")


if __name__ == "__main__":
    main()
