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
    Checks the pair against the trainer's tokenizer and the one saved with the teacher (when it has one): for heads
    of equal sizes the two tokenizers are compared by content ([`check_same_tokenizer`]); for heads of different
    sizes the pair is checked with [`check_shared_rows`], and the main process logs once which rows are ignored. A
    self teacher (`teacher_model_kind`) is the student, with its tokenizer.
    """
    if teacher_model is None or trainer.args.teacher_model_kind is not None:
        return
    tokenizer = getattr(trainer.processing_class, "tokenizer", trainer.processing_class)
    saved = _saved_tokenizer(teacher_model, _teacher_revision(trainer.args), trainer.args.trust_remote_code)
    if student_rows == teacher_rows:
        if saved is not None and tokenizer is not None:
            check_same_tokenizer(tokenizer, saved, student_rows, teacher_rows)
        return
    note = check_shared_rows(tokenizer, student_rows, teacher_rows, saved)
    if trainer.accelerator.is_main_process:
        logger.warning(note)
    never_sample_rows_past(trainer, teacher_rows, student_rows)


def never_sample_rows_past(trainer, teacher_rows: int, student_rows: int) -> None:
    """
    A student head longer than the teacher's could sample an id in its rows `teacher_rows..student_rows-1`, which
    the teacher's embedding does not have (an IndexError in the teacher's forward). Those ids are taken out of the
    rollouts' sampling: transformers' `suppress_tokens` (their logits set to -inf) and, for vLLM, a logit bias of
    -100 (vLLM's floor). Rollouts are still checked when generated ([`~trl_tip.trainer.model_checks.RolloutWatch`]).
    """
    if student_rows <= teacher_rows:
        return
    extra = range(teacher_rows, student_rows)
    suppressed = sorted({*(trainer.generation_kwargs.get("suppress_tokens") or []), *extra})
    trainer.generation_kwargs["suppress_tokens"] = suppressed
    trainer.generation_config.suppress_tokens = suppressed
    vllm = getattr(trainer, "vllm_generation", None)
    if vllm is not None:
        bias = {**(vllm.generation_kwargs.get("logit_bias") or {}), **dict.fromkeys(extra, -100.0)}
        vllm.generation_kwargs = {**vllm.generation_kwargs, "logit_bias": bias}


def _trl_sizes(student_rows: int, teacher_rows: int) -> str:
    """The two sizes in the words of TRL's `DistillationTrainer`, which users search for."""
    if student_rows == teacher_rows:
        return f"both models have vocab_size {student_rows}"
    return f"The student model has vocab_size {student_rows} but the teacher model has vocab_size {teacher_rows}"


def check_same_tokenizer(tokenizer, teacher_tokenizer, student_rows: int, teacher_rows: int) -> None:
    """
    Compares the student's tokenizer with the one saved with the teacher by content, not size: their vocabularies
    without added tokens must be the same token -> id map (a tokenizer of the same size but other tokens makes the
    teacher read each id as another token). Added tokens that differ (a pad token added to one, a renamed reserved
    token) are logged, not refused.

    Raises:
        ValueError: the vocabularies differ, naming how many ids and one example, and both `vocab_size`s.
    """
    student, teacher = _base_vocab(tokenizer), _base_vocab(teacher_tokenizer)
    if student != teacher:
        student_ids = {i: t for t, i in student.items()}
        teacher_ids = {i: t for t, i in teacher.items()}
        differ = sorted(i for i in student_ids.keys() | teacher_ids.keys() if student_ids.get(i) != teacher_ids.get(i))
        example = differ[0]
        raise ValueError(
            f"The student and teacher use different tokenizers ({len(tokenizer)} and {len(teacher_tokenizer)} "
            f"tokens; {_trl_sizes(student_rows, teacher_rows)}): {len(differ)} token ids map to different tokens, "
            f"e.g. id {example} is {student_ids.get(example)!r} for the student and {teacher_ids.get(example)!r} for "
            "the teacher. Distillation compares the two models' next-token distributions token id by token id, "
            "which needs one tokenizer: use a teacher with the student's tokenizer, or GOLD for cross-tokenizer "
            "distillation."
        )
    added, teacher_added = tokenizer.get_added_vocab(), teacher_tokenizer.get_added_vocab()
    if added != teacher_added:
        only = sorted(set(added.items()) ^ set(teacher_added.items()), key=lambda item: item[1])
        logger.warning(
            f"The student's and the teacher's tokenizers share their vocabulary but not all their added tokens "
            f"({len(only)} differ, e.g. {only[0][0]!r} at id {only[0][1]}): the teacher reads those ids as it was "
            "trained to, which may not be what the student's tokenizer means by them."
        )


def _base_vocab(tokenizer) -> dict[str, int]:
    """A tokenizer's vocabulary without its added tokens."""
    added = tokenizer.get_added_vocab()
    return {token: index for token, index in tokenizer.get_vocab().items() if token not in added}


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
    if teacher_tokenizer is not None and _base_vocab(teacher_tokenizer) != _base_vocab(tokenizer):
        raise ValueError(
            f"{_trl_sizes(student_rows, teacher_rows)}. The student and teacher use different tokenizers ({length} "
            f"and {len(teacher_tokenizer)} tokens; {sizes}). Distillation compares the two models' next-token "
            "distributions token id by token id, which needs one tokenizer: use a teacher with the student's "
            "tokenizer, or GOLD for cross-tokenizer distillation."
        )
    if teacher_tokenizer is not None:
        check_same_tokenizer(tokenizer, teacher_tokenizer, student_rows, teacher_rows)  # logs added-token changes
    shared = min(student_rows, teacher_rows)
    if length > shared:
        raise ValueError(
            f"{_trl_sizes(student_rows, teacher_rows)}. The tokenizer has {length} tokens but {sizes}: every token "
            "id needs a row in both heads. Use a student and teacher whose heads cover the tokenizer (a shared "
            "tokenizer padded to different sizes is fine)."
        )
    longer = "student" if student_rows > teacher_rows else "teacher"
    return (
        f"The student head has {student_rows} rows and the teacher head {teacher_rows}, for a tokenizer of {length} "
        f"tokens: TIP's statistics and loss use the {shared} rows both heads share and ignore the {longer} head's "
        f"rows {shared}-{max(student_rows, teacher_rows) - 1} (padding past the tokenizer, which no token id reaches)."
    )
