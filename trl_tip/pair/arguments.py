"""`PairArguments`: the options `trl-tip demo` and `trl-tip study` share (which pair, which problems, how long and
how hard to train), written once and checked when parsed, before any model loads."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields


@dataclass
class PairArguments:
    """The embedded pair's options (each field is a `--flag`, with `_` or `-`); `DemoArguments` and `StudyArguments`
    add their own. Numbers given as strings (YAML, Python callers) are converted, then every option is checked."""

    teacher: str = field(
        default="smollm2", metadata={"help": "Teacher: 'smollm2' (the embedded default), a folder or a Hub id."}
    )
    student: str | None = field(
        default=None, metadata={"help": "Student folder or Hub id; default: the teacher with layers removed."}
    )
    student_layers: int = field(
        default=26, metadata={"help": "Decoder layers the compressed student keeps (a middle block is dropped)."}
    )
    drop_layers: str | None = field(
        default=None, metadata={"help": "Comma-separated teacher layer indices to drop instead, e.g. '13,14,15,16'."}
    )
    dataset: str | None = field(
        default=None,
        metadata={"help": "Use a dataset (Hub id or .jsonl with question/answer) instead of generated problems."},
    )
    train_problems: int = field(default=512, metadata={"help": "Training prompts."})
    eval_problems: int = field(default=48, metadata={"help": "Held-out problems for the evaluation."})
    steps: int = field(default=30, metadata={"help": "Optimizer steps."})
    batch_size: int = field(default=8, metadata={"help": "Rollouts per optimizer step."})
    max_new_tokens: int = field(
        default=32, metadata={"help": "Longest rollout during training and longest greedy completion at evaluation."}
    )
    learning_rate: float = field(default=5e-5, metadata={"help": "AdamW learning rate."})

    def __post_init__(self):
        # YAML and Python callers bypass argparse's type conversion: coerce numbers written as strings.
        for f in fields(self):
            value = getattr(self, f.name)
            kind = str(f.type)
            if isinstance(value, str) and kind in ("int", "float", "int | None", "float | None"):
                try:
                    setattr(self, f.name, int(value) if kind.startswith("int") else float(value))
                except ValueError:
                    raise ValueError(f"--{flag(f.name)} must be a number; got {value!r}.") from None
            elif isinstance(value, str) and kind == "bool":
                setattr(self, f.name, value.strip().lower() in ("1", "true", "yes"))
        for name in ("train_problems", "eval_problems", "steps", "batch_size", "max_new_tokens", "student_layers"):
            check_positive_int(name, getattr(self, name))
        if self.eval_problems < 2:
            raise ValueError(f"--eval-problems must be at least 2; got {self.eval_problems}.")
        if isinstance(self.learning_rate, bool) or not self.learning_rate > 0 or not math.isfinite(self.learning_rate):
            raise ValueError(f"--learning-rate must be a positive number; got {self.learning_rate!r}.")
        if self.student is not None:
            refuse_layer_flags(self, "--student gives the student, so no layers are removed from the teacher")

    def layer_flags(self) -> list[str]:
        """The layer flags set away from their defaults (`--student-layers`, `--drop-layers`)."""
        return [
            f"--{flag(f.name)}"
            for f in fields(PairArguments)
            if f.name in LAYER_FIELDS and getattr(self, f.name) != f.default
        ]


# The options that choose which teacher layers the compressed student keeps.
LAYER_FIELDS = ("student_layers", "drop_layers")


def refuse_layer_flags(args: PairArguments, reason: str) -> None:
    """Raises ValueError when a layer flag is set although `reason` says no student is compressed."""
    given = args.layer_flags()
    if given:
        raise ValueError(
            f"{' and '.join(given)} {'has' if len(given) == 1 else 'have'} no effect here: {reason}. Leave "
            f"{'it' if len(given) == 1 else 'them'} out."
        )


def flag(name: str) -> str:
    """A field's command-line spelling: `eval_problems` -> `eval-problems`."""
    return name.replace("_", "-")


def check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"--{flag(name)} must be a positive integer; got {value!r}.")
