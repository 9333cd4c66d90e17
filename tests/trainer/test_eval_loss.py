"""`eval_loss` is plain on-policy distillation's loss on every valid token, whatever the selector, so it compares with
TRL's `DistillationTrainer` and across rules; the selected-token objective is logged beside it."""

import pytest
from tiny_runs import TINY_CPU_RUN
from trl import DistillationConfig, DistillationTrainer

from trl_tip import TIPConfig, TIPGKDTrainer
from trl_tip.testing import tiny_causal_lm, tiny_math_dataset


COMMON = {**TINY_CPU_RUN, "per_device_train_batch_size": 4, "per_device_eval_batch_size": 4}


def evaluate(tokenizer, args, trainer_cls=TIPGKDTrainer) -> dict:
    """`evaluate()` on the same tiny student, teacher and 8 eval prompts (two batches); the seed fixes the rollouts."""
    trainer = trainer_cls(
        model=tiny_causal_lm(tokenizer, seed=0),
        teacher_model=tiny_causal_lm(tokenizer, hidden_size=128, seed=1),
        args=args,
        train_dataset=tiny_math_dataset(8),
        eval_dataset=tiny_math_dataset(8, seed=1),
        processing_class=tokenizer,
    )
    return trainer.evaluate()


def test_eval_loss_equals_trl_distillation_trainer_and_the_selected_loss_is_logged_beside(tokenizer, tmp_path):
    selection = {"token_selector": "soft_or", "selection_ratio": 0.5}
    ours = evaluate(tokenizer, TIPConfig(output_dir=str(tmp_path / "tip"), **selection, **COMMON))
    theirs = evaluate(
        tokenizer, DistillationConfig(output_dir=str(tmp_path / "trl"), **COMMON), trainer_cls=DistillationTrainer
    )
    assert ours["eval_completions/mean_length"] == theirs["eval_completions/mean_length"]
    assert ours["eval_loss"] == pytest.approx(theirs["eval_loss"], rel=1e-5)
    assert ours["eval_tip/selected_fraction"] == 0.5
    # soft_or keeps the tokens of high entropy or divergence: their mean divergence is not the all-token mean.
    assert ours["eval_tip/selected_loss"] != pytest.approx(ours["eval_loss"], rel=1e-3)


def test_eval_loss_tokens_selected_reports_the_training_objective(tokenizer, tmp_path):
    selection = {"token_selector": "soft_or", "selection_ratio": 0.5}
    default = evaluate(tokenizer, TIPConfig(output_dir=str(tmp_path / "all"), **selection, **COMMON))
    selected = evaluate(
        tokenizer, TIPConfig(output_dir=str(tmp_path / "sel"), eval_loss_tokens="selected", **selection, **COMMON)
    )
    assert selected["eval_loss"] == pytest.approx(selected["eval_tip/selected_loss"], rel=1e-6)
    assert selected["eval_loss"] == pytest.approx(default["eval_tip/selected_loss"], rel=1e-6)
    assert selected["eval_loss"] != pytest.approx(default["eval_loss"], rel=1e-3)


def test_eval_loss_tokens_accepts_only_all_or_selected(tmp_path):
    with pytest.raises(ValueError, match=r"`eval_loss_tokens` must be one of 'all', 'selected'; got 'kept'"):
        TIPConfig(output_dir=str(tmp_path), eval_loss_tokens="kept", use_cpu=True, bf16=False)
