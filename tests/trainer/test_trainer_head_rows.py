"""TIPGKDTrainer on a student and teacher whose heads pad one tokenizer to different sizes, like Qwen2.5-1.5B (151936
rows) and Qwen2.5-14B (152064) over a 151665-token tokenizer: it trains on the shared rows, says which rows it ignores,
and still refuses a pair that does not share a tokenizer fitting both heads."""

import logging
import math

import pytest
from tiny_runs import TINY_CPU_RUN
from trl import DistillationConfig, DistillationTrainer
from trl.trainer import distillation_trainer as trl_distillation

from trl_tip import TIPConfig, TIPGKDTrainer
from trl_tip.testing import save_tiny_pair, tiny_causal_lm, tiny_math_dataset, tiny_tokenizer


COMMON = {**TINY_CPU_RUN, "max_steps": 2}
TOKENS = 320  # len(tiny_tokenizer())


@pytest.fixture(scope="module")
def tokenizer():
    tokenizer = tiny_tokenizer()
    assert len(tokenizer) == TOKENS
    return tokenizer


def pair(tokenizer, student_rows, teacher_rows):
    return (
        tiny_causal_lm(tokenizer, seed=0, vocab_size=student_rows),
        tiny_causal_lm(tokenizer, hidden_size=128, seed=1, vocab_size=teacher_rows),
    )


@pytest.mark.parametrize(
    "student_rows, teacher_rows, lmbda",
    [
        (TOKENS + 8, TOKENS + 40, 1.0),
        # Dataset completions (lmbda 0): a random student samples its padding rows, past the shorter teacher head's
        # embedding; trained heads all but never do.
        (TOKENS + 40, TOKENS + 8, 0.0),
    ],
    ids=["longer-teacher", "longer-student"],
)
def test_heads_of_different_sizes_train_on_their_shared_rows(
    student_rows, teacher_rows, lmbda, tokenizer, tmp_path, caplog
):
    student, teacher = pair(tokenizer, student_rows, teacher_rows)
    with pytest.raises(ValueError, match=f"vocab_size {student_rows} but the teacher model has vocab_size"):
        # What TRL does alone.
        DistillationTrainer(
            model=student,
            teacher_model=teacher,
            args=DistillationConfig(output_dir=str(tmp_path / "trl"), **COMMON),
            train_dataset=tiny_math_dataset(4),
            processing_class=tokenizer,
        )

    with caplog.at_level(logging.WARNING, logger="trl_tip"):
        trainer = TIPGKDTrainer(
            model=student,
            teacher_model=teacher,
            args=TIPConfig(output_dir=str(tmp_path), lmbda=lmbda, **COMMON),
            train_dataset=tiny_math_dataset(8, with_completions=lmbda < 1),
            processing_class=tokenizer,
        )
    notes = [r.getMessage() for r in caplog.records if "rows both heads share" in r.getMessage()]
    shared, longer = min(student_rows, teacher_rows), max(student_rows, teacher_rows)
    assert notes == [
        f"The student head has {student_rows} rows and the teacher head {teacher_rows}, for a tokenizer of {TOKENS} "
        f"tokens: TIP's statistics and loss use the {shared} rows both heads share and ignore the "
        f"{'student' if student_rows > teacher_rows else 'teacher'} head's rows {shared}-{longer - 1} (padding past "
        "the tokenizer, which no token id reaches)."
    ]
    # TRL saw equal sizes only while it built the trainer.
    assert teacher.config.vocab_size == teacher_rows and student.config.vocab_size == student_rows
    head = trainer.model.get_output_embeddings().weight
    before = head.detach().clone()

    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(math.isfinite(loss) and loss > 0 for loss in losses)
    assert not head[:shared].detach().equal(before[:shared])
    # With plain AdamW and no weight decay, the student's rows past the teacher's (zero gradient) stay as they were.
    assert head[shared:].detach().equal(before[shared:])


def test_a_tokenizer_longer_than_a_head_is_refused(tokenizer, tmp_path):
    student, teacher = pair(tokenizer, TOKENS + 8, TOKENS - 20)
    with pytest.raises(
        ValueError,
        match=f"The tokenizer has {TOKENS} tokens but the student head has {TOKENS + 8} rows and the teacher head "
        f"{TOKENS - 20}: every token id needs a row in both heads",
    ):
        TIPGKDTrainer(
            model=student,
            teacher_model=teacher,
            args=TIPConfig(output_dir=str(tmp_path), **COMMON),
            train_dataset=tiny_math_dataset(4),
            processing_class=tokenizer,
        )
    assert teacher.config.vocab_size == TOKENS - 20


def test_a_teacher_with_another_tokenizer_is_refused(tokenizer, tmp_path):
    """The teacher is loaded from a path (inside TRL's `__init__`), with the tokenizer saved beside it."""
    save_tiny_pair(str(tmp_path / "pair"), student_vocab_size=TOKENS + 8, teacher_vocab_size=TOKENS + 40)
    other = tiny_tokenizer(vocab_size=300)
    other.save_pretrained(tmp_path / "pair" / "teacher")
    with pytest.raises(
        ValueError,
        match=rf"The student and teacher use different tokenizers \({TOKENS} and 300 tokens; the student head has "
        f"{TOKENS + 8} rows and the teacher head {TOKENS + 40}\\)",
    ):
        TIPGKDTrainer(
            model=str(tmp_path / "pair" / "student"),
            teacher_model=str(tmp_path / "pair" / "teacher"),
            args=TIPConfig(output_dir=str(tmp_path / "out"), **COMMON),
            train_dataset=tiny_math_dataset(4),
        )
    assert trl_distillation.create_model_from_path.__module__ == "trl.trainer.utils"


def test_a_teacher_folder_without_a_tokenizer_is_checked_by_length_alone(tmp_path):
    """Without a tokenizer saved beside the teacher, there is nothing to compare (and `AutoTokenizer` would build an
    empty one from such a folder): the trainer is built, the pair checked against the student's tokenizer only."""
    save_tiny_pair(str(tmp_path / "pair"), student_vocab_size=TOKENS + 8, teacher_vocab_size=TOKENS + 40)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        (tmp_path / "pair" / "teacher" / name).unlink(missing_ok=True)
    trainer = TIPGKDTrainer(
        model=str(tmp_path / "pair" / "student"),
        teacher_model=str(tmp_path / "pair" / "teacher"),
        args=TIPConfig(output_dir=str(tmp_path / "out"), **COMMON),
        train_dataset=tiny_math_dataset(4),
    )
    teacher = trainer.accelerator.unwrap_model(trainer.teacher_model)
    assert teacher.config.vocab_size == TOKENS + 40 and teacher.get_output_embeddings().weight.shape[0] == TOKENS + 40
