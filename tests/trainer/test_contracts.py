"""Issue 24's contracts on the trainer, one or more tests per pattern: a bad input is refused with a message naming
the field, or the run proceeds and what it runs, logs and writes is right.

- 4: custom selectors are checked (tests/core/test_selector_contract.py holds the per-call rules).
- 5: every selection setting the user gave is used or refused, and the card says what was kept.
- 6: models are checked (tokenizer content, finite heads, context length, local paths, rows past the teacher's).
- 10: with `token_selector="all"` the trainer is a drop-in for TRL's `DistillationTrainer`.
(9, the teacher's entropy at low temperature, is pure math: tests/core/test_teacher_entropy_temperature.py.)
"""

import json
import logging
import math

import pytest
import torch
import yaml
from tiny_runs import TINY_CPU_RUN
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast
from trl import DistillationConfig, DistillationTrainer

from trl_tip import QUADRANT_NAMES, TIPConfig, TIPGKDTrainer
from trl_tip.core.quadrants import QuadrantTracker
from trl_tip.core.selectors import Q3Overconfidence, SoftOr, kept_per_sequence
from trl_tip.core.stats import TokenStats
from trl_tip.demo.command import demo_config, parse_args
from trl_tip.testing import tiny_causal_lm, tiny_math_dataset
from trl_tip.train import run as train_run
from trl_tip.trainer.selector_contract import selector_and_config


ONE_STEP = {**TINY_CPU_RUN, "max_steps": 1}


def trainer_for(tokenizer, tmp_path, token_selector=None, student=None, teacher=None, **settings):
    student = student if student is not None else tiny_causal_lm(tokenizer, seed=0)
    teacher = teacher if teacher is not None else tiny_causal_lm(tokenizer, hidden_size=128, seed=1)
    return TIPGKDTrainer(
        model=student,
        teacher_model=teacher,
        args=TIPConfig(output_dir=str(tmp_path), **{**ONE_STEP, **settings}),
        train_dataset=tiny_math_dataset(4),
        processing_class=tokenizer,
        token_selector=token_selector,
    )


def logged(trainer, key):
    return [h[key] for h in trainer.state.log_history if key in h]


# --------------------------------------------------------------------------------------------------------------------
# Pattern 4: custom selectors are trusted.


def test_a_selector_class_is_refused_when_the_trainer_is_built(tokenizer, tmp_path):
    with pytest.raises(ValueError, match=r"`token_selector` got the class `SoftOr`, not a selector: pass an instance"):
        trainer_for(tokenizer, tmp_path, token_selector=SoftOr)


def test_a_float_mask_stops_the_first_step_naming_the_rule(tokenizer, tmp_path):
    """A float mask of values < 0.5 used to keep 100% of the tokens."""
    trainer = trainer_for(
        tokenizer, tmp_path, token_selector=lambda stats, generator: torch.full(stats.mask.shape, 0.3)
    )
    with pytest.raises(ValueError, match="broke the mask rule: a selector's mask must be a boolean tensor"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_a_selector_that_keeps_nothing_is_warned_about(tokenizer, tmp_path, caplog):
    def nothing(stats, generator):
        return torch.zeros_like(stats.mask)

    trainer = trainer_for(tokenizer, tmp_path, token_selector=nothing)
    with caplog.at_level(logging.WARNING, logger="trl_tip"):
        trainer.train()
    warnings = [r.getMessage() for r in caplog.records if "kept none of the" in r.getMessage()]
    assert len(warnings) == 1, "warned once, not at every micro-batch"
    assert warnings[0].startswith("The token selector `nothing` kept none of the ")
    assert "(step 1)" in warnings[0] and "trains nothing (loss 0)" in warnings[0]
    assert logged(trainer, "loss") == [0.0] and logged(trainer, "tip/selected_fraction") == [0.0]


# --------------------------------------------------------------------------------------------------------------------
# Pattern 5: a setting the user gave is dropped or misreported.


def test_the_trainers_selector_runs_at_the_configs_ratio_and_the_card_says_so(tokenizer, tmp_path):
    """`TIPGKDTrainer(token_selector="q3", args=TIPConfig(selection_ratio=0.1))` used to run q3 at 50%."""
    args = TIPConfig(output_dir=str(tmp_path), selection_ratio=0.1, **ONE_STEP)
    trainer = TIPGKDTrainer(
        model=tiny_causal_lm(tokenizer, seed=0),
        teacher_model=tiny_causal_lm(tokenizer, hidden_size=128, seed=1),
        args=args,
        train_dataset=tiny_math_dataset(4),
        processing_class=tokenizer,
        token_selector="q3",
    )
    assert isinstance(trainer.token_selector, Q3Overconfidence) and trainer.token_selector.ratio == 0.1
    assert (trainer.args.token_selector, trainer.args.selection_ratio) == ("q3", 0.1)
    assert args.token_selector == "soft_or", "the config given is not changed (it may be shared by trainers)"
    trainer.train()
    mask = trainer._buffered_inputs[0]["completion_mask"]
    kept = kept_per_sequence(mask, 0.1).sum().item()
    assert logged(trainer, "tip/selected_fraction") == [pytest.approx(kept / mask.sum().item())]
    trainer.create_model_card()
    card = (tmp_path / "README.md").read_text()
    assert "**`q3`** selector (10% of each rollout's valid tokens)" in card
    recipe = yaml.safe_load(card.split("```yaml\n")[1].split("```")[0])
    assert (recipe["token_selector"], recipe["selection_ratio"]) == ("q3", 0.1)


@pytest.mark.parametrize(
    "settings, token_selector, message",
    [
        ({"selection_ratio": 0.1}, "all", r'`selection_ratio`=0.1 has no effect with `token_selector="all"`'),
        (
            {"selection_ratio": 0.1},
            {"name": "q3", "ratio": 0.2},
            r"sets `ratio`=0.2, but the TIPConfig sets `selection_ratio`=0.1",
        ),
        (
            {"selection_ratio": 0.1},
            SoftOr(ratio=0.3),
            r"`selection_ratio`=0.1 is set in the TIPConfig, but the selector",
        ),
        ({"selection_ratio_schedule": "linear"}, "all", "has nothing to move with"),
        ({"quadrant_thresholds": "0.5,0.1"}, {"name": "quadrant", "entropy_threshold": 1.0}, "Give them once"),
    ],
    ids=["all-with-ratio", "dict-ratio-conflict", "object-ratio-conflict", "all-with-schedule", "thresholds-twice"],
)
def test_a_selector_override_that_would_drop_a_setting_is_refused(settings, token_selector, message, tmp_path):
    args = TIPConfig(output_dir=str(tmp_path), **{**ONE_STEP, **settings})
    with pytest.raises(ValueError, match=message):
        selector_and_config(args, token_selector)


def test_selector_overrides_that_agree_with_the_config_run_with_it(tmp_path):
    args = TIPConfig(output_dir=str(tmp_path), selection_scope="batch", **ONE_STEP)
    run_args, selector = selector_and_config(args, "quadrant")
    assert (selector.ratio, selector.scope, run_args.selection_ratio) == (1.0, "batch", 1.0), "quadrant's default"
    run_args, selector = selector_and_config(args, {"name": "divergence_topk", "ratio": 0.2})
    assert (selector.ratio, selector.scope, run_args.selection_ratio) == (0.2, "batch", 0.2)
    run_args, selector = selector_and_config(args, Q3Overconfidence(ratio=0.3))
    assert (run_args.token_selector, run_args.selection_ratio, run_args.selection_scope) == ("q3", 0.3, "sequence")
    assert (args.token_selector, args.selection_ratio, args.selection_scope) == ("soft_or", 0.5, "batch")


def test_a_quadrant_card_reports_the_share_kept_measured(tokenizer, tmp_path):
    """`quadrant` cards used to say "50% of valid tokens" while 12.5% were kept."""
    trainer = trainer_for(tokenizer, tmp_path, token_selector="quadrant", selection_ratio=0.5)
    # 16 valid tokens, 2 kept: what the tracker recorded over the run.
    mask = torch.ones(2, 8, dtype=torch.bool)
    stats = TokenStats(torch.rand(2, 8), torch.rand(2, 8), torch.rand(2, 8), mask)
    keep = torch.zeros_like(mask)
    keep[:, 0] = True
    trainer.quadrant_tracker = QuadrantTracker()
    trainer.quadrant_tracker.update(1, trainer.quadrant_tracker.measure(stats, keep))
    trainer.create_model_card()
    card = (tmp_path / "README.md").read_text()
    assert (
        "| retention ratio | a random 50% of the tokens of quadrants Q1, Q3: 12.5% of the valid tokens kept, "
        "measured over the 16 tokens recorded |" in card
    )
    assert "50% of each rollout's valid tokens" not in card


def test_a_custom_selectors_card_reports_the_share_kept_and_its_recipe_names_no_builtin(tokenizer, tmp_path):
    def first_token(stats, generator):
        keep = torch.zeros_like(stats.mask)
        keep[:, 0] = True
        return keep & stats.mask

    trainer = trainer_for(tokenizer, tmp_path, token_selector=first_token)
    mask = torch.ones(2, 4, dtype=torch.bool)
    keep = torch.zeros_like(mask)
    keep[:, 0] = True
    stats = TokenStats(torch.rand(2, 4), torch.rand(2, 4), torch.rand(2, 4), mask)
    trainer.quadrant_tracker.update(1, trainer.quadrant_tracker.measure(stats, keep))
    trainer.create_model_card()
    card = (tmp_path / "README.md").read_text()
    assert "a custom rule (`first_token`): 25.0% of the valid tokens kept, measured over the 8 tokens recorded" in card
    recipe_text = card.split("```yaml\n")[1].split("```")[0]
    assert recipe_text.startswith("# token_selector: the custom Python selector `first_token`")
    recipe = yaml.safe_load(recipe_text)
    assert "token_selector" not in recipe and "selection_ratio" not in recipe


@pytest.mark.parametrize(
    "argv, outcome",
    [
        (["--selector", "quadrant", "--ratio", "0.3"], 0.3),
        (["--selector", "quadrant"], 1.0),
        (["--selector", "soft_or"], 0.5),
        (["--selector", "all", "--ratio", "0.3"], "--ratio 0.3 has no effect with --selector all"),
        (
            ["--teacher-model-kind", "live", "--student-layers", "4"],
            "--student-layers has no effect here: --teacher-model-kind live trains the full model against itself",
        ),
        (
            ["--teacher-model-kind", "ema", "--drop-layers", "1,2"],
            "--drop-layers has no effect here: --teacher-model-kind ema",
        ),
        (["--student", "x", "--drop-layers", "1"], "--drop-layers has no effect here: --student gives the student"),
    ],
)
def test_demo_uses_or_refuses_each_flag(argv, outcome, tmp_path):
    if isinstance(outcome, str):
        with pytest.raises(ValueError, match=outcome):
            parse_args(argv)
        return
    args = parse_args(argv)
    config = demo_config(args, str(tmp_path))
    assert args.ratio == config.selection_ratio == config.build_selector().ratio == outcome


def test_a_recipe_that_sets_a_field_twice_is_refused_before_anything_loads(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "model_name_or_path: ./no-such-student\nteacher_model_name_or_path: ./no-such-teacher\n"
        "selection_ratio: 0.2\ntoken_selector: q3\nselection_ratio: 0.5\n"
    )
    with pytest.raises(SystemExit) as exit_info:
        train_run(["--config", str(recipe), "--output_dir", str(tmp_path / "out")])
    assert exit_info.value.code == (
        f"trl-tip train: {recipe}: `selection_ratio` is set twice (lines 3 and 5); a recipe sets each field once. "
        "Remove one of them."
    )


@pytest.mark.parametrize("template", ["{prompt}", "  {prompt}\n"])
def test_a_self_teacher_that_reads_only_the_students_prompt_is_refused(template, tmp_path):
    with pytest.raises(ValueError, match=r"`teacher_prompt_template` .* gives the self teacher exactly the student's"):
        TIPConfig(output_dir=str(tmp_path), teacher_model_kind="live", teacher_prompt_template=template, **ONE_STEP)


# --------------------------------------------------------------------------------------------------------------------
# Pattern 6: models are trusted.


def _permuted_tokenizer(tokenizer) -> PreTrainedTokenizerFast:
    """The same tokens, sizes and special tokens, with two ordinary tokens' ids swapped: another tokenizer."""
    data = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = data["model"]["vocab"]
    by_id = {index: token for token, index in vocab.items()}
    a, b = by_id[100], by_id[200]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    other = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(data)), eos_token="<|im_end|>", pad_token="<|pad|>"
    )
    assert len(other) == len(tokenizer) and other.get_vocab() != tokenizer.get_vocab()
    return other


def test_a_teacher_tokenizer_of_the_same_size_but_other_tokens_is_refused(tokenizer, tmp_path):
    teacher_dir = tmp_path / "teacher"
    tiny_causal_lm(tokenizer, hidden_size=128, seed=1).save_pretrained(teacher_dir)
    _permuted_tokenizer(tokenizer).save_pretrained(teacher_dir)
    with pytest.raises(
        ValueError,
        match=rf"different tokenizers \({len(tokenizer)} and {len(tokenizer)} tokens; both models have vocab_size "
        rf"{len(tokenizer)}\): 2 token ids map to different tokens, e.g. id 100 is ",
    ):
        trainer_for(tokenizer, tmp_path / "run", teacher=str(teacher_dir))
    # The teacher's own tokenizer passes.
    tokenizer.save_pretrained(teacher_dir)
    trainer_for(tokenizer, tmp_path / "run", teacher=str(teacher_dir))


@pytest.mark.parametrize("role", ["student", "teacher"])
def test_a_head_with_nan_weights_is_refused_naming_the_model(role, tokenizer, tmp_path):
    models = {"student": tiny_causal_lm(tokenizer, seed=0), "teacher": tiny_causal_lm(tokenizer, hidden_size=128)}
    with torch.no_grad():
        models[role].lm_head.weight[5, 3] = math.nan
        models[role].lm_head.weight[7, 0] = math.inf
    with pytest.raises(ValueError, match=rf"The {role} model's output head \(`lm_head.weight`\) holds 2 NaN or inf"):
        trainer_for(tokenizer, tmp_path, **models)


@pytest.mark.parametrize("field", ["model", "teacher_model"])
def test_a_missing_local_model_path_is_no_such_folder(field, tokenizer, tmp_path):
    missing = str(tmp_path / "no" / "such" / "model")
    with pytest.raises(ValueError, match=rf"`{field}`: model path '{missing}' does not exist: no such folder"):
        TIPGKDTrainer(
            model=missing if field == "model" else tiny_causal_lm(tokenizer),
            teacher_model=missing if field == "teacher_model" else tiny_causal_lm(tokenizer),
            args=TIPConfig(output_dir=str(tmp_path), **ONE_STEP),
            train_dataset=tiny_math_dataset(4),
            processing_class=tokenizer,
        )


def test_a_longer_student_head_never_samples_past_the_teachers_rows_and_long_prompts_are_warned(
    tokenizer, tmp_path, caplog
):
    """The student's 40 extra rows are made the likeliest tokens; without suppression nearly every rollout would
    sample them and the teacher's forward would fail with an IndexError. Its context is shorter than the prompts."""
    rows = len(tokenizer)
    student = tiny_causal_lm(tokenizer, seed=0, vocab_size=rows + 40)
    teacher = tiny_causal_lm(tokenizer, hidden_size=128, seed=1, vocab_size=rows)
    with torch.no_grad():
        student.lm_head.weight[rows:] *= 50.0
    student.config.max_position_embeddings = 24
    with caplog.at_level(logging.WARNING, logger="trl_tip"):
        trainer = trainer_for(tokenizer, tmp_path, student=student, teacher=teacher)
        assert trainer.generation_config.suppress_tokens == list(range(rows, rows + 40))
        trainer.train()
    completion = trainer._buffered_inputs[0]["completion_ids"]
    assert completion.max().item() < rows
    assert math.isfinite(logged(trainer, "loss")[0])
    notes = [r.getMessage() for r in caplog.records if "max_position_embeddings" in r.getMessage()]
    assert len(notes) == 1 and "past the student's context (`max_position_embeddings`=24)" in notes[0]


# --------------------------------------------------------------------------------------------------------------------
# Pattern 10: with `all`, a drop-in for TRL's `DistillationTrainer`.


@pytest.mark.parametrize(
    "trainer_cls, config_cls", [(DistillationTrainer, DistillationConfig), (TIPGKDTrainer, TIPConfig)]
)
def test_a_teacher_whose_vocabulary_differs_is_refused_naming_vocab_size(trainer_cls, config_cls, tokenizer, tmp_path):
    rows = len(tokenizer)
    settings = {"token_selector": "all"} if config_cls is TIPConfig else {}
    with pytest.raises(
        ValueError, match=f"The student model has vocab_size {rows} but the teacher model has vocab_size {rows - 20}"
    ):
        trainer_cls(
            model=tiny_causal_lm(tokenizer),
            teacher_model=tiny_causal_lm(tokenizer, hidden_size=128, vocab_size=rows - 20),
            args=config_cls(output_dir=str(tmp_path), **ONE_STEP, **settings),
            train_dataset=tiny_math_dataset(4),
            processing_class=tokenizer,
        )


def test_eval_compute_loss_divides_by_a_given_num_items_in_batch_as_trl_does(tokenizer, tmp_path):
    student, teacher = tiny_causal_lm(tokenizer, seed=0), tiny_causal_lm(tokenizer, hidden_size=128, seed=1)
    common = {"model": student, "teacher_model": teacher, "train_dataset": tiny_math_dataset(4)}
    trl = DistillationTrainer(
        args=DistillationConfig(output_dir=str(tmp_path / "trl"), **ONE_STEP), processing_class=tokenizer, **common
    )
    tip = TIPGKDTrainer(
        args=TIPConfig(output_dir=str(tmp_path / "tip"), token_selector="all", **ONE_STEP),
        processing_class=tokenizer,
        **common,
    )
    for trainer in (trl, tip):
        trainer.model.eval()
    inputs = trl._generate_and_score_completions(list(tiny_math_dataset(2)))
    valid = inputs["completion_mask"].sum().item()
    with torch.no_grad():
        mean = {name: t.compute_loss(t.model, inputs).item() for name, t in (("trl", trl), ("tip", tip))}
        given = {
            name: t.compute_loss(t.model, inputs, num_items_in_batch=torch.tensor(5.0)).item()
            for name, t in (("trl", trl), ("tip", tip))
        }
    assert mean["tip"] == pytest.approx(mean["trl"], rel=1e-5)
    assert given["trl"] == pytest.approx(mean["trl"] * valid / 5, rel=1e-5)
    assert given["tip"] == pytest.approx(given["trl"], rel=1e-5)
    assert set(QUADRANT_NAMES)  # the quadrant names are what the eval metrics are logged under
