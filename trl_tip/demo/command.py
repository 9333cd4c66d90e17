"""`trl-tip demo`: distill a real model on a laptop CPU, offline, and show the quadrants.

Teacher: SmolLM2-135M-Instruct (fetched once from PyPI). Student: the same model with decoder layers removed.
Prompts: arithmetic word problems generated here. The student is evaluated on held-out problems before and after a
few minutes of TIP on-policy distillation, and everything lands in `outputs/<run>/`.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

from ..core.checks import check_ratio
from ..core.selectors import SELECTORS
from ..models import hub_model_id, model_license
from ..pair.arguments import PairArguments, refuse_layer_flags
from ..pair.loading import load_models, public_model_names
from ..pair.problems import ANSWER_TEACHER_PROMPT_TEMPLATE, pair_problems
from ..pair.scoring import answer_accuracy, greedy_rollouts, token_kls
from ..pair.training import pair_config
from ..trainer.privileged_context import teacher_prompt
from ..trainer.run_folder import refuse_run_folder_as_parent
from ..trainer.tip_config import TEACHER_MODEL_KINDS, default_selection_ratio
from ..utils.command_errors import usage_errors
from ..utils.files import write_text_atomically


@dataclass
class DemoArguments(PairArguments):
    """Arguments of `trl-tip demo`: the embedded pair's (`PairArguments`), the rule and the run folder."""

    teacher_model_kind: str | None = field(
        default=None,
        metadata={
            "help": "Self-distillation instead: the full --teacher model (or --student) is the student, and its own "
            "teacher is itself told each problem's answer (TIPConfig's `teacher_model_kind`: base, live or ema).",
            "choices": (None, *TEACHER_MODEL_KINDS),
        },
    )
    selector: str = field(
        default="soft_or", metadata={"help": f"Token selector: {', '.join(SELECTORS)}.", "choices": tuple(SELECTORS)}
    )
    ratio: float | None = field(
        default=None,
        metadata={
            "help": "Retention ratio in (0, 1]: the share of each rollout's tokens the ratio selectors keep (default "
            "0.5), of the in-quadrant tokens `quadrant` keeps (default 1.0); `all` keeps every token (1.0)."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed for problems, rollouts and selection."})
    output_dir: str = field(default="outputs", metadata={"help": "Parent folder of the run folder."})
    run_name: str | None = field(
        default=None,
        metadata={"help": "Run folder name; default demo-<selector>-<ratio> (demo-self-<kind>-<selector>-<ratio>)."},
    )
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing run folder."})

    def __post_init__(self):
        super().__post_init__()
        if self.selector not in SELECTORS:
            raise ValueError(f"--selector must be one of {', '.join(SELECTORS)}; got {self.selector!r}.")
        if self.teacher_model_kind is not None and self.teacher_model_kind not in TEACHER_MODEL_KINDS:
            raise ValueError(
                f"--teacher-model-kind must be one of {', '.join(TEACHER_MODEL_KINDS)}; "
                f"got {self.teacher_model_kind!r}."
            )
        if self.ratio is None:
            self.ratio = default_selection_ratio(self.selector)
        try:
            self.ratio = check_ratio("ratio", self.ratio)
        except ValueError:
            raise ValueError(f"--ratio must be a number in (0, 1]; got {self.ratio!r}.") from None
        if self.selector == "all" and self.ratio != 1.0:
            raise ValueError(
                f"--ratio {self.ratio:g} has no effect with --selector all, which keeps every valid token. Leave "
                "--ratio out for `all`, or pick a ratio selector such as --selector random."
            )
        if self.teacher_model_kind is not None:
            refuse_layer_flags(
                self, f"--teacher-model-kind {self.teacher_model_kind} trains the full model against itself"
            )

    @property
    def self_distillation(self) -> bool:
        return self.teacher_model_kind is not None


def make_parser():
    """`trl-tip demo`'s parser: transformers' `HfArgumentParser`, so each option is spelled `--a_b` or `--a-b`."""
    from transformers import HfArgumentParser

    return HfArgumentParser(DemoArguments, prog="trl-tip demo", description=__doc__.split("\n\n")[0])


def parse_args(argv: list[str] | None = None) -> DemoArguments:
    (args,) = make_parser().parse_args_into_dataclasses(argv)
    return args


def without_local_path(value):
    """A local path (absolute, or one that exists here) as its base name, for files meant to be shared; other values
    as they are."""
    if isinstance(value, str) and value and (os.path.isabs(value) or os.path.exists(value)):
        return os.path.basename(os.path.normpath(value))
    return value


def reproduce_command(args: DemoArguments) -> str:
    """The `trl-tip demo` line with every flag that differs from its default (local paths by their base names, where
    the run goes left out)."""
    defaults = DemoArguments()
    flags = []
    for name in DemoArguments.__dataclass_fields__:
        value = getattr(args, name)
        if name in ("output_dir", "run_name", "overwrite") or value == getattr(defaults, name):
            continue
        if name == "ratio" and value == default_selection_ratio(args.selector):
            continue
        flags.append(f"--{name.replace('_', '-')} {without_local_path(value)}")
    return " ".join(["trl-tip demo", *flags])


def _problems(args: DemoArguments):
    """Training prompts (with their answers for self-distillation) and held-out problems."""
    train, held_out = pair_problems(args, args.seed, drop_held_out_from_train=False)
    # A self teacher reads each problem's answer (`ANSWER_TEACHER_PROMPT_TEMPLATE`).
    columns = ["prompt"] if args.teacher_model_kind is None else ["prompt", "answer"]
    return train.select_columns(columns), held_out


def evaluate(
    model, teacher, tokenizer, held_out, args: DemoArguments, label: str, with_kl: bool = True, privileged=False
) -> dict:
    """Greedy held-out accuracy of `model` (reading the teacher's prompts when `privileged`) and its mean reverse KL
    to `teacher` on those completions; for self-distillation the teacher reads the problem with its answer."""
    teacher_prompts = None
    if args.teacher_model_kind is not None:
        teacher_prompts = [teacher_prompt(row, ANSWER_TEACHER_PROMPT_TEMPLATE) for row in held_out]
    prompts = teacher_prompts if privileged else held_out["prompt"]
    rollouts = greedy_rollouts(model, tokenizer, prompts, args.max_new_tokens, desc=f"Evaluating {label}")
    result = {"accuracy": answer_accuracy(rollouts.texts, held_out["answer"]), "examples": rollouts.texts[:3]}
    if with_kl:
        result["reverse_kl"] = token_kls(model, teacher, tokenizer, rollouts, teacher_prompts=teacher_prompts)[
            "reverse_kl"
        ]
    return result


def run_demo(args: DemoArguments) -> str:
    """Runs the whole demo and returns the finished run folder: load, evaluate, train, evaluate again, write."""
    started = time.time()
    run_name, final_dir = _run_folder(args)
    train_set, held_out = _problems(args)  # before the models load: a --dataset too small for a batch fails first
    torch.manual_seed(args.seed)
    teacher, student, tokenizer, _, _ = load_models(args, args.self_distillation)
    teacher_name, student_name = public_model_names(
        args, (teacher or student).config.num_hidden_layers, args.teacher_model_kind
    )
    self_distillation = teacher is None
    # The privileged self before training: the initial weights, reading the answer (a copy, as the student trains).
    initial = copy.deepcopy(student).eval() if self_distillation else teacher

    timings = {}
    t = time.time()
    before = {
        "teacher": evaluate(initial, initial, tokenizer, held_out, args, "teacher", False, self_distillation),
        "student": evaluate(student, initial, tokenizer, held_out, args, "student (before)"),
    }
    timings["evaluation_before_s"] = time.time() - t
    if self_distillation:
        del initial  # the trainer keeps its own copy where the kind needs one

    staging = _fresh_staging_dir(args.output_dir, run_name)
    t = time.time()
    trainer = train_student(student, teacher, tokenizer, train_set, args, staging)
    timings["training_s"] = time.time() - t
    peak_rss_mib = _peak_rss_mib()

    t = time.time()
    after_teacher = teacher if teacher is not None else _self_teacher_weights(trainer)
    after = evaluate(trainer.model, after_teacher, tokenizer, held_out, args, "student (after)")
    timings["evaluation_after_s"] = time.time() - t

    save_student(trainer, staging, args)
    timings["total_s"] = time.time() - started
    report = demo_report(args, trainer, teacher_name, student_name, held_out, before, after, timings)
    report["machine"]["peak_rss_after_training_mib"] = peak_rss_mib
    write_report_and_card(staging, trainer, report, args, run_name)
    _move_into_place(staging, final_dir)
    print(_summary(report, final_dir))
    return final_dir


def _self_teacher_weights(trainer):
    """The self teacher's weights after training, as a model: the student itself for `live`, else its copy."""
    from ..trainer.self_teacher import SelfTeacher

    teacher = trainer.accelerator.unwrap_model(trainer.teacher_model)
    if isinstance(teacher, SelfTeacher):
        if teacher.kind == "base":  # a PEFT student's base: not reached by the demo, which trains every weight
            raise ValueError("the demo trains every weight; a PEFT student has no separate teacher model to score")
        return teacher.student
    return teacher


def _peak_rss_mib() -> float:
    """The process's peak resident memory so far, in MiB (Linux reports KiB, macOS bytes)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024 if sys.platform == "darwin" else 1024)


def _run_folder(args: DemoArguments) -> tuple[str, str]:
    """The run's name and final folder, checked before any slow work: no run to overwrite."""
    prefix = "demo" if args.teacher_model_kind is None else f"demo-self-{args.teacher_model_kind}"
    run_name = args.run_name or f"{prefix}-{args.selector}-{args.ratio:g}"
    final_dir = os.path.join(args.output_dir, run_name)
    refuse_run_folder_as_parent("--output-dir", args.output_dir, "the demo's run folder")
    if os.path.exists(final_dir) and not args.overwrite:
        raise ValueError(f"{final_dir} already exists; pass --overwrite or choose --run-name.")
    return run_name, final_dir


def _fresh_staging_dir(output_dir: str, run_name: str) -> str:
    """`<output_dir>/.<run_name>.incomplete`, emptied: the run is written there and moved into place when done."""
    os.makedirs(output_dir, exist_ok=True)
    staging = os.path.join(output_dir, f".{run_name}.incomplete")
    shutil.rmtree(staging, ignore_errors=True)
    return staging


def demo_config(args: DemoArguments, output_dir: str):
    """The demo's `TIPConfig`: `args.steps` optimizer steps of TIP reverse-KL distillation with the chosen selector,
    logged every step, nothing saved during training, on the CPU unless CUDA is there."""
    selector_kwargs = {} if args.selector == "all" else {"selection_ratio": args.ratio}
    self_teacher = (
        {} if args.teacher_model_kind is None else {"teacher_prompt_template": ANSWER_TEACHER_PROMPT_TEMPLATE}
    )
    return pair_config(
        args,
        output_dir,
        args.seed,
        token_selector=args.selector,
        teacher_model_kind=args.teacher_model_kind,
        **selector_kwargs,
        **self_teacher,
    )


def train_student(student, teacher, tokenizer, train_dataset, args: DemoArguments, output_dir: str):
    """Distills `teacher` into `student` on `train_dataset` with [`demo_config`]'s settings; returns the trained
    `TIPGKDTrainer` (the student is `trainer.model`, the quadrant statistics `trainer.quadrant_tracker`)."""
    from ..trainer.tip_trainer import TIPGKDTrainer

    trainer = TIPGKDTrainer(
        model=student,
        teacher_model=teacher,
        args=demo_config(args, output_dir),
        train_dataset=train_dataset,
        processing_class=tokenizer,
    )
    trainer.train()
    return trainer


def save_student(trainer, output_dir: str, args: DemoArguments) -> None:
    """The student, its tokenizer (the trainer's processing class), `tip_stats/` and the quadrant plot."""
    from ..hub.plots import plot_quadrants

    trainer.save_model(output_dir)
    plot_quadrants(
        trainer.quadrant_tracker,
        os.path.join(output_dir, "quadrants.png"),
        title=f"TIP {args.selector} {args.ratio:g}: SmolLM2 student tokens during on-policy "
        + ("distillation" if args.teacher_model_kind is None else "self-distillation"),
    )


def demo_report(
    args: DemoArguments, trainer, teacher_name: str, student_name: str, held_out, before: dict, after: dict, timings
) -> dict:
    """The contents of `report.json`: models (named by `public_model_names`), settings (local paths by their base
    names), the before/after evaluation, losses, quadrants, timings."""
    return {
        "teacher": teacher_name,
        "student": student_name,
        "selector": args.selector,
        "ratio": args.ratio,
        "arguments": {name: without_local_path(value) for name, value in asdict(args).items()},
        "evaluation": {
            "held_out_problems": len(held_out),
            "teacher_accuracy": before["teacher"]["accuracy"],
            "student_accuracy_before": before["student"]["accuracy"],
            "student_accuracy_after": after["accuracy"],
            "student_reverse_kl_before": before["student"]["reverse_kl"],
            "student_reverse_kl_after": after["reverse_kl"],
            "examples_after": after["examples"],
        },
        "training": {
            "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
            "quadrants": trainer.quadrant_tracker.total().summary(),
        },
        "timings": timings,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
    }


def write_report_and_card(output_dir: str, trainer, report: dict, args: DemoArguments, run_name: str) -> None:
    """`report.json` and the student's model card (`README.md`) with the before/after comparison. The card's
    `base_model` and licence are those of the model the student starts from: the teacher, or `--student`."""
    from ..hub.model_card import write_student_card

    write_text_atomically(os.path.join(output_dir, "report.json"), json.dumps(report, indent=2))
    base = args.student or args.teacher
    write_student_card(
        output_dir,
        trainer.quadrant_tracker,
        model_name=run_name,
        base_model=hub_model_id(base),
        license=model_license(base),
        datasets=[args.dataset] if args.dataset and not os.path.exists(args.dataset) else [],
        teacher=report["teacher"],
        student=report["student"],
        selector=args.selector,
        selector_kwargs=None,
        ratio_text=demo_ratio_text(trainer, args),
        beta=1.0,
        temperature=1.0,
        normalization="the number of selected tokens",
        training_data=without_local_path(args.dataset)
        or f"{args.train_problems} generated arithmetic word problems (seed {args.seed})",
        steps=args.steps,
        learning_rate=args.learning_rate,
        plot="quadrants.png",
        comparison=_comparison(report["evaluation"]),
        recipe=reproduce_command(args),
        recipe_language="bash",
    )


def demo_ratio_text(trainer, args: DemoArguments) -> str:
    """The card's kept share: the ratio rule, or for `quadrant` (whose count depends on the statistics) the share
    kept, measured."""
    from ..hub.model_card import measured_kept_text, quadrant_rule_text

    if args.selector == "all":
        return "100% of tokens"
    if args.selector == "quadrant":
        rule = quadrant_rule_text(trainer.token_selector.quadrants, trainer.token_selector.ratio)
        return measured_kept_text(rule, trainer.quadrant_tracker)
    return f"{100 * args.ratio:g}% of each rollout's tokens"


def _comparison(ev: dict) -> dict:
    """The model card's before/after table: accuracy and reverse KL to the teacher."""
    return {
        "description": (
            f"{ev['held_out_problems']} held-out arithmetic problems, greedy decoding, exact integer match; mean "
            "per-token reverse KL(student ‖ teacher) on the student's own greedy completions."
        ),
        "columns": ["accuracy", "reverse KL to teacher (nats/token)"],
        "rows": [
            {"name": "teacher", "values": [f"{100 * ev['teacher_accuracy']:.1f}%", "0"]},
            {
                "name": "student before",
                "values": [f"{100 * ev['student_accuracy_before']:.1f}%", f"{ev['student_reverse_kl_before']:.4f}"],
            },
            {
                "name": "student after",
                "values": [f"{100 * ev['student_accuracy_after']:.1f}%", f"{ev['student_reverse_kl_after']:.4f}"],
            },
        ],
    }


def _move_into_place(staging: str, final_dir: str) -> None:
    if os.path.exists(final_dir):
        shutil.rmtree(final_dir)
    os.replace(staging, final_dir)


def _summary(report: dict, final_dir: str) -> str:
    ev = report["evaluation"]
    kl_before, kl_after = ev["student_reverse_kl_before"], ev["student_reverse_kl_after"]
    return (
        f"\nDone in {report['timings']['total_s'] / 60:.1f} min -> {final_dir}\n"
        f"  reverse KL(student||teacher) per token: {kl_before:.4f} -> {kl_after:.4f}\n"
        f"  accuracy: teacher {100 * ev['teacher_accuracy']:.1f}%, "
        f"student {100 * ev['student_accuracy_before']:.1f}% -> {100 * ev['student_accuracy_after']:.1f}%"
    )


def main(argv: list[str] | None = None) -> None:
    # ModelSourceError included: a bad model, option, dataset or run folder, named in the message.
    with usage_errors("demo", ValueError):
        run_demo(parse_args(argv))
