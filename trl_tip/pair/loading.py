"""Loading the embedded pair: the teacher (SmolLM2 from the pinned PyPI wheel, a folder or a Hub id) and the student
(`--student`, or the teacher with a block of decoder layers removed), and the names under which results show them."""

from __future__ import annotations

from ..models import ModelSourceError, load_causal_lm, model_name, resolve_model
from .arguments import PairArguments
from .student_layers import compress_layers, default_layers_to_keep


def layers_to_keep(args: PairArguments, depth: int) -> list[int]:
    """The teacher layers the compressed student keeps: all but `--drop-layers`, else `default_layers_to_keep`."""
    if not args.drop_layers:
        return default_layers_to_keep(depth, args.student_layers)
    try:
        dropped = {int(i) for i in args.drop_layers.split(",")}
    except ValueError as error:
        raise ValueError(f"--drop-layers must be comma-separated integers; got {args.drop_layers!r}.") from error
    if not dropped <= set(range(depth)) or len(dropped) >= depth:
        raise ValueError(f"--drop-layers must name some, not all, of the teacher's layers 0..{depth - 1}.")
    return [i for i in range(depth) if i not in dropped]


def compressed_student_name(teacher: str, keep: list[int], depth: int) -> str:
    return f"{teacher} with decoder layers {keep} ({len(keep)} of {depth})"


def public_model_names(
    args: PairArguments, teacher_depth: int, teacher_model_kind: str | None = None
) -> tuple[str, str]:
    """The teacher and the student as reports and model cards name them: by `model_name`, no local path. With a
    `teacher_model_kind` the teacher is the student itself, told the answer."""
    teacher = model_name(args.teacher)
    if teacher_model_kind is not None:
        student = teacher if args.student is None else model_name(args.student)
        return f"{student}, told the answer ({teacher_model_kind} weights)", student
    if args.student is not None:
        return teacher, model_name(args.student)
    return teacher, compressed_student_name(teacher, layers_to_keep(args, teacher_depth), teacher_depth)


def load_models(args: PairArguments, self_distillation: bool = False):
    """(teacher, student, tokenizer, teacher path, student name), checked before anything is written. With
    `self_distillation` the teacher is `None`: the student (the full `--teacher` model, or `--student`) is its own."""
    teacher_path = resolve_model(args.teacher)
    if self_distillation:
        student_path = teacher_path if args.student is None else resolve_model(args.student)
        student, tokenizer = load_causal_lm(student_path)
        return None, student, tokenizer, student_path, student_path
    teacher, tokenizer = load_causal_lm(teacher_path)
    if args.student is None:
        depth = teacher.config.num_hidden_layers
        keep = layers_to_keep(args, depth)
        student, _ = load_causal_lm(teacher_path)
        student = compress_layers(student, keep)
        student_name = compressed_student_name(teacher_path, keep, depth)
    else:
        student_path = resolve_model(args.student)
        student, _ = load_causal_lm(student_path)
        student_name = student_path
    teacher_vocab = teacher.get_output_embeddings().weight.shape[0]
    student_vocab = student.get_output_embeddings().weight.shape[0]
    if teacher_vocab != student_vocab:
        raise ModelSourceError(
            f"The student's vocabulary ({student_vocab} tokens) differs from the teacher's ({teacher_vocab}); "
            "on-policy distillation compares full next-token distributions, so both must use one tokenizer."
        )
    return teacher, student, tokenizer, teacher_path, student_name
