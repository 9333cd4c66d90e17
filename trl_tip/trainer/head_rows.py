"""A student and a teacher whose heads pad one tokenizer's vocabulary to different sizes.

Checkpoints of one family often share a tokenizer but pad their heads differently: Qwen2.5-14B's head has 152064 rows,
Qwen2.5-1.5B's 151936, for a tokenizer of 151665 tokens. TIP's statistics and loss use the rows both heads share
(`trl_tip.core.trl_kernels.on_shared_rows`), so such a pair trains exactly; the rows past the tokenizer are padding no
token id reaches. This module checks that the pair shares a tokenizer that fits both heads, and lets trl 1.16's
`DistillationTrainer.__init__`, which refuses any `vocab_size` difference, build the trainer.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from transformers import AutoConfig, AutoTokenizer
from transformers.utils.hub import has_file
from trl.trainer import distillation_trainer as trl_distillation


logger = logging.getLogger(__name__)


def vocab_sizes(model, teacher_model, args) -> tuple[int, int]:
    """The student's and the teacher's `vocab_size` (head rows), from the models or, for paths and Hub ids, from their
    configs alone, at the revisions TRL will load."""
    student_revision = (args.model_init_kwargs or {}).get("revision")
    return (
        _vocab_size(model, student_revision, args.trust_remote_code),
        _vocab_size(teacher_model, _teacher_revision(args), args.trust_remote_code),
    )


def _teacher_revision(args) -> str | None:
    return args.teacher_model_revision or (args.teacher_model_init_kwargs or {}).get("revision")


def _vocab_size(model, revision: str | None, trust_remote_code: bool) -> int:
    if isinstance(model, str):
        config = AutoConfig.from_pretrained(model, revision=revision, trust_remote_code=trust_remote_code)
    else:
        config = model.config
    return config.get_text_config().vocab_size


@contextlib.contextmanager
def trl_sees_equal_vocab_sizes(teacher_model, student_rows: int, teacher_rows: int) -> Iterator[None]:
    """
    While the block runs, the teacher's config reports the student's `vocab_size`, `student_rows`, in place of its own,
    `teacher_rows`; restored on exit. Nothing changes when the two are equal.

    trl 1.16's `DistillationTrainer.__init__` compares the two configs' `vocab_size` and refuses any difference. That
    comparison is the only read of the teacher's `vocab_size` in TRL's `__init__` (its teacher preparation reads the
    hidden size only), so reporting the student's value for the length of `__init__` lets TRL build the trainer
    without re-implementing its teacher loading and preparation. A teacher given as a path is loaded inside
    `__init__`, by TRL's module-level `create_model_from_path`, which is wrapped for the block to the same end.
    """
    masked = []

    def mask(model):
        config = model.config.get_text_config()
        masked.append((config, config.vocab_size))
        config.vocab_size = student_rows
        return model

    if student_rows == teacher_rows:
        yield
        return
    original = trl_distillation.create_model_from_path
    if isinstance(teacher_model, str):

        def load(model_id, *args, **kwargs):
            model = original(model_id, *args, **kwargs)
            # Sizes differ, so the student is not loaded from the teacher's path.
            return mask(model) if model_id == teacher_model else model

        trl_distillation.create_model_from_path = load
    else:
        mask(teacher_model)
    try:
        yield
    finally:
        trl_distillation.create_model_from_path = original
        for config, size in masked:
            config.vocab_size = size


def check_head_rows(trainer, teacher_model, student_rows: int, teacher_rows: int) -> None:
    """
    For heads of different sizes, checks the pair with [`check_shared_rows`] against the trainer's tokenizer and the
    one saved with the teacher (when it has one), and logs once, on the main process, which rows are ignored.
    """
    if student_rows == teacher_rows:
        return
    tokenizer = getattr(trainer.processing_class, "tokenizer", trainer.processing_class)
    saved = _saved_tokenizer(teacher_model, _teacher_revision(trainer.args), trainer.args.trust_remote_code)
    note = check_shared_rows(tokenizer, student_rows, teacher_rows, saved)
    if trainer.accelerator.is_main_process:
        logger.warning(note)


def _saved_tokenizer(model, revision: str | None, trust_remote_code: bool):
    """The tokenizer saved with a model (at its path or Hub id), or `None` when it has none to load."""
    source = model if isinstance(model, str) else getattr(model, "name_or_path", "")
    try:
        # Asked first: given a folder without one, `AutoTokenizer` builds an empty tokenizer instead of failing.
        if not source or not has_file(source, "tokenizer_config.json", revision=revision):
            return None
        return AutoTokenizer.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):  # not a folder or Hub repo (`HFValidationError` is a `ValueError`)
        return None


def check_shared_rows(tokenizer, student_rows: int, teacher_rows: int, teacher_tokenizer=None) -> str:
    """
    Checks that heads of `student_rows` and `teacher_rows` rows can be compared over the rows they share, and returns
    the note saying which rows are ignored.

    Args:
        tokenizer (`PreTrainedTokenizerBase`):
            The tokenizer the trainer uses (the student's).
        student_rows, teacher_rows (`int`):
            The two heads' row counts (`vocab_size`), different.
        teacher_tokenizer (`PreTrainedTokenizerBase`, *optional*):
            The tokenizer saved with the teacher; compared with `tokenizer` when given.

    Raises:
        ValueError: the teacher's tokenizer differs from `tokenizer`, or `tokenizer` has more tokens than a head has
        rows.
    """
    length = len(tokenizer)
    sizes = f"the student head has {student_rows} rows and the teacher head {teacher_rows}"
    if teacher_tokenizer is not None and teacher_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ValueError(
            f"The student and teacher use different tokenizers ({length} and {len(teacher_tokenizer)} tokens; "
            f"{sizes}). Distillation compares the two models' next-token distributions token id by token id, "
            "which needs one tokenizer: use a teacher with the student's tokenizer, or GOLD for cross-tokenizer "
            "distillation."
        )
    shared = min(student_rows, teacher_rows)
    if length > shared:
        raise ValueError(
            f"The tokenizer has {length} tokens but {sizes}: every token id needs a row in both heads. Use a student "
            "and teacher whose heads cover the tokenizer (a shared tokenizer padded to different sizes is fine)."
        )
    longer = "student" if student_rows > teacher_rows else "teacher"
    return (
        f"The student head has {student_rows} rows and the teacher head {teacher_rows}, for a tokenizer of {length} "
        f"tokens: TIP's statistics and loss use the {shared} rows both heads share and ignore the {longer} head's "
        f"rows {shared}-{max(student_rows, teacher_rows) - 1} (padding past the tokenizer, which no token id reaches)."
    )
