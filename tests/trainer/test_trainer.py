"""TIPGKDTrainer end to end on tiny local models: it trains, logs quadrants, matches TRL, resumes exactly."""

import json
import os
import shutil

import pytest
import torch
from datasets import load_dataset
from peft import LoraConfig
from tiny_runs import TINY_CPU_RUN
from trl import DistillationConfig, DistillationTrainer

from trl_tip import QUADRANT_NAMES, SELECTORS, TIPConfig, TIPGKDTrainer
from trl_tip.testing import tiny_causal_lm, tiny_math_dataset, tiny_tokenizer
from trl_tip.trainer.benchmark_callback import BenchmarkArguments


COMMON = TINY_CPU_RUN


def models(tokenizer):
    return tiny_causal_lm(tokenizer, seed=0), tiny_causal_lm(tokenizer, hidden_size=128, num_layers=2, seed=1)


def make_trainer(
    tokenizer,
    tmp_path,
    dataset=None,
    trainer_cls=TIPGKDTrainer,
    config_cls=TIPConfig,
    benchmark_args=None,
    **overrides,
):
    student, teacher = models(tokenizer)
    args = config_cls(output_dir=str(tmp_path), **{**COMMON, **overrides})
    return trainer_cls(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=dataset if dataset is not None else tiny_math_dataset(16),
        processing_class=tokenizer,
        **({} if benchmark_args is None else {"benchmark_args": benchmark_args}),
    )


def train_logs(trainer):
    trainer.train()
    return [h for h in trainer.state.log_history if "loss" in h]


@pytest.mark.slow
@pytest.mark.parametrize("selector", list(SELECTORS))
def test_every_builtin_selector_trains_and_logs_quadrants(selector, tokenizer, tmp_path):
    kwargs = {"token_selector_kwargs": {"quadrants": ["Q1", "Q3"]}} if selector == "quadrant" else {}
    trainer = make_trainer(tokenizer, tmp_path, token_selector=selector, max_steps=3, **kwargs)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    logs = train_logs(trainer)
    assert len(logs) == 3
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])]
    assert "lm_head.weight" in changed and any("layers.0" in n for n in changed)
    for log in logs:
        assert sum(log[f"tip/quadrant_share/{q}"] for q in QUADRANT_NAMES) == pytest.approx(1.0)
        assert 0.0 < log["tip/selected_fraction"] <= 1.0
        assert sum(log[f"tip/selected_share/{q}"] for q in QUADRANT_NAMES) == pytest.approx(1.0)
        assert torch.isfinite(torch.tensor(log["loss"]))
    if selector == "all":
        assert all(log["tip/selected_fraction"] == 1.0 for log in logs)
    if selector == "soft_or":
        assert all(log["tip/selected_fraction"] == pytest.approx(0.5, abs=0.1) for log in logs)
    steps = load_dataset("json", data_files=str(tmp_path / "tip_stats" / "steps.jsonl"), split="train")
    assert steps["step"] == [1, 2, 3]
    hist = load_dataset("json", data_files=str(tmp_path / "tip_stats" / "histogram.jsonl"), split="train")
    assert sum(hist["tokens"]) == sum(steps["num_tokens"])


def parameters_after_one_step(trainer):
    trainer.train()
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}, trainer.state.log_history[0]["loss"]


@pytest.mark.slow
def test_all_selector_reproduces_trl_distillation_trainer(tokenizer, tmp_path):
    """Same seed, same batch: one SGD step of TIP with `all` equals one step of plain DistillationTrainer."""
    settings = {"max_steps": 1, "optim": "sgd", "lr_scheduler_type": "constant"}
    ours, our_loss = parameters_after_one_step(
        make_trainer(tokenizer, tmp_path / "tip", token_selector="all", **settings)
    )
    theirs, their_loss = parameters_after_one_step(
        make_trainer(
            tokenizer, tmp_path / "trl", trainer_cls=DistillationTrainer, config_cls=DistillationConfig, **settings
        )
    )
    assert our_loss == pytest.approx(their_loss, rel=1e-5)
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.slow
def test_gradient_accumulation_1x4_equals_4x1(tokenizer, tmp_path):
    """The selected-token normalizer is global across accumulation steps, so the update does not depend on the
    split."""
    selector = {"token_selector": "soft_or", "selection_ratio": 0.5, "normalization_scope": "sequence"}
    settings = dict(max_steps=1, optim="sgd", lr_scheduler_type="constant", **selector)
    one_by_four, _ = parameters_after_one_step(
        make_trainer(tokenizer, tmp_path / "a", **{**settings, "per_device_train_batch_size": 4})
    )
    four_by_one, _ = parameters_after_one_step(
        make_trainer(
            tokenizer,
            tmp_path / "b",
            **{**settings, "per_device_train_batch_size": 1, "gradient_accumulation_steps": 4},
        )
    )
    for name in one_by_four:
        torch.testing.assert_close(one_by_four[name], four_by_one[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
def test_lora_student_trains_and_saves_adapters_only(tokenizer, tmp_path):
    student, teacher = models(tokenizer)
    args = TIPConfig(output_dir=str(tmp_path), max_steps=2, **COMMON)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = TIPGKDTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=tiny_math_dataset(8),
        processing_class=tokenizer,
        peft_config=lora,
    )
    lora_b = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    assert any(not torch.equal(p, lora_b[n]) for n, p in trainer.model.named_parameters() if "lora_B" in n)
    files = os.listdir(tmp_path / "final")
    assert "adapter_model.safetensors" in files and "adapter_config.json" in files
    assert "model.safetensors" not in files
    assert "tip_stats" in files


@pytest.mark.parametrize("lmbda, expect_generation", [(0.0, False), (1.0, True)])
def test_lmbda_chooses_between_dataset_completions_and_rollouts(
    lmbda, expect_generation, tokenizer, tmp_path, monkeypatch
):
    calls = []
    original = DistillationTrainer._generate_single_turn

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DistillationTrainer, "_generate_single_turn", counting)
    dataset = tiny_math_dataset(8, with_completions=True)
    trainer = make_trainer(tokenizer, tmp_path, dataset=dataset, lmbda=lmbda, max_steps=2, max_completion_length=12)
    logs = train_logs(trainer)
    assert bool(calls) is expect_generation
    assert all(log["tip/on_policy"] == (1.0 if expect_generation else 0.0) for log in logs)
    if not expect_generation:
        batch = trainer._buffered_inputs[0]
        text = tokenizer.decode(batch["completion_ids"][0][batch["completion_mask"][0].bool()])
        assert text.startswith("The answer is ") and text.endswith("<|im_end|>")


@pytest.mark.slow
def test_resume_from_checkpoint_repeats_the_next_selection_and_loss(tokenizer, tmp_path):
    settings = {
        "max_steps": 4,
        "token_selector": "random",
        "selection_ratio": 0.5,
        "save_strategy": "steps",
        "save_steps": 2,
    }
    full = make_trainer(tokenizer, tmp_path / "full", **settings)
    full_logs = train_logs(full)
    checkpoint = tmp_path / "full" / "checkpoint-2"
    assert (checkpoint / "tip_stats" / "steps.jsonl").is_file()
    assert (checkpoint / "tip_rng_state_0.pt").is_file()

    resumed = make_trainer(tokenizer, tmp_path / "resumed", **settings)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    resumed_logs = [h for h in resumed.state.log_history if "loss" in h][-2:]  # history restored up to step 2
    assert [h["step"] for h in resumed_logs] == [3, 4]
    for a, b in zip(full_logs[2:], resumed_logs):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    full_rows = {r["step"]: r for r in full.quadrant_tracker.step_rows()}
    resumed_rows = {r["step"]: r for r in resumed.quadrant_tracker.step_rows()}
    assert set(resumed_rows) == {1, 2, 3, 4}, "the tracker history continues from the checkpoint"
    for step in (3, 4):
        assert full_rows[step] == resumed_rows[step]


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"token_selector": "softer_or"}, "`token_selector` must be one of 'all', 'random'"),
        ({"selection_ratio": 0.0}, r"`selection_ratio` must be a number in \(0, 1\]; got 0.0"),
        ({"selection_ratio": 1.5}, r"`selection_ratio` must be a number in \(0, 1\]; got 1.5"),
        ({"loss_normalization": "tokens"}, "`loss_normalization` must be one of 'selected', 'all'"),
        ({"lmbda": -0.5}, r"`lmbda` must be a number in \[0, 1\]"),
        ({"quadrant_thresholds": "high"}, "`quadrant_thresholds` must be 'median' or 'H,D'"),
        ({"token_selector_kwargs": "{not json"}, "`token_selector_kwargs` must be a JSON object"),
        ({"log_quadrant_stats_every": 0}, "`log_quadrant_stats_every` must be a positive integer"),
    ],
)
def test_bad_config_fails_at_construction(overrides, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        TIPConfig(output_dir=str(tmp_path), **{**COMMON, **overrides})


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"benchmarks": ["math5000"]}, "`benchmarks` entries must be one of math500, aime24, aime25, amc23, gsm8k"),
        ({"benchmarks": ["gsm8k"], "benchmark_num_samples": 0}, r"`benchmark_\*` fields\): `k` must be at least 1"),
    ],
)
def test_bad_benchmark_settings_fail_at_construction(overrides, message):
    with pytest.raises(ValueError, match=message):
        BenchmarkArguments(**overrides)


def test_missing_teacher_and_vocab_mismatch_fail_at_construction(tokenizer, tmp_path):
    student, _ = models(tokenizer)
    args = TIPConfig(output_dir=str(tmp_path), **COMMON)
    with pytest.raises(ValueError, match="TIPGKDTrainer needs a teacher"):
        TIPGKDTrainer(model=student, args=args, train_dataset=tiny_math_dataset(4), processing_class=tokenizer)
    other = tiny_causal_lm(tiny_tokenizer(vocab_size=300))
    with pytest.raises(ValueError, match="320 tokens but the student head has 320 rows and the teacher head 300"):
        TIPGKDTrainer(
            model=student,
            teacher_model=other,
            args=args,
            train_dataset=tiny_math_dataset(4),
            processing_class=tokenizer,
        )


def test_lmbda_below_one_needs_completions(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="needs a `completion` column"):
        make_trainer(tokenizer, tmp_path, lmbda=0.5)


def test_selector_object_overrides_the_config(tokenizer, tmp_path):
    def first_token_only(stats, generator):
        keep = torch.zeros_like(stats.mask)
        keep[:, 0] = True
        return keep

    student, teacher = models(tokenizer)
    args = TIPConfig(output_dir=str(tmp_path), max_steps=1, **COMMON)
    trainer = TIPGKDTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=tiny_math_dataset(4),
        processing_class=tokenizer,
        token_selector=first_token_only,
    )
    logs = train_logs(trainer)
    assert logs[0]["tip/selected_fraction"] == pytest.approx(1 / 8)
    rows = [json.loads(line) for line in open(tmp_path / "tip_stats" / "steps.jsonl")]
    assert rows[0]["num_selected"] == 2


def test_several_rollouts_per_prompt(tokenizer, tmp_path):
    trainer = make_trainer(tokenizer, tmp_path, num_rollouts_per_prompt=2, per_device_train_batch_size=4, max_steps=1)
    trainer.train()
    prompts = trainer._buffered_inputs[0]["prompt_ids"]
    assert len({tuple(p.tolist()) for p in prompts}) == 2, "4 rollouts of 2 distinct prompts"
    with pytest.raises(ValueError, match="must divide the generation batch"):
        make_trainer(tokenizer, tmp_path, num_rollouts_per_prompt=3, per_device_train_batch_size=4)


@pytest.mark.slow
def test_trainer_writes_the_trl_tip_model_card(tokenizer, tmp_path):
    from huggingface_hub import ModelCard

    trainer = make_trainer(tokenizer, tmp_path, token_selector="q3", selection_ratio=0.2, max_steps=2)
    trainer.train()
    trainer.create_model_card(dataset_name="tiny-sums")
    card = ModelCard.load(tmp_path / "README.md")
    assert {"trl", "trl-tip", "distillation", "tip"} <= set(card.data.tags)
    assert card.data.datasets == ["tiny-sums"]
    assert "`q3`" in card.text and "20% of each rollout's valid tokens" in card.text
    assert "reverse KL(student ‖ teacher) (beta=1.0)" in card.text
    for q in QUADRANT_NAMES:
        assert f"| {q} |" in card.text
    assert (tmp_path / "quadrants.png").is_file() and "![Token quadrants](quadrants.png)" in card.text
    assert "token_selector: q3" in card.text and "selection_ratio: 0.2" in card.text


def test_benchmarks_run_after_training_and_reach_the_logs_and_the_model_index(
    tokenizer, tmp_path, shared_data, monkeypatch
):
    from huggingface_hub import ModelCard

    from trl_tip.eval.harness import score_results_file

    gsm8k = str(shared_data / "gsm8k_test.jsonl")
    trainer = make_trainer(
        tokenizer,
        tmp_path,
        max_steps=1,
        benchmark_args=BenchmarkArguments(
            benchmarks=[gsm8k], benchmark_num_samples=2, benchmark_limit=3, benchmark_max_new_tokens=4
        ),
    )
    monkeypatch.setattr(tokenizer, "padding_side", "right")  # evaluation pads left and must put it back
    trainer.train()
    summary = json.loads((tmp_path / "eval" / "gsm8k_test" / "summary.json").read_text())
    assert summary["num_problems"] == 3 and summary["k"] == 2 and summary["backend"] == "transformers"
    assert score_results_file(tmp_path / "eval" / "gsm8k_test" / "results.jsonl")["mean@2"] == summary["mean@2"]
    logged = trainer.state.log_history[-1]
    assert logged["benchmark/gsm8k_test/mean@2"] == summary["mean@2"]
    assert tokenizer.padding_side == "right" and trainer.model.training
    trainer.create_model_card()
    card = ModelCard.load(tmp_path / "README.md")
    card.validate = None  # offline: the Hub's validation endpoint is not reachable; the model-index parses below
    (result,) = card.data.eval_results
    assert (result.dataset_name, result.metric_type, result.task_type) == ("gsm8k_test", "mean@2", "text-generation")
    assert result.metric_value == round(100 * summary["mean@2"], 2)
    assert "| gsm8k_test | 3 | 2 | 1.0 |" in card.text


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda c: (c / "tip_rng_state_0.pt").unlink(), r"lacks `tip_rng_state_0.pt`"),
        (lambda c: shutil.rmtree(c / "tip_stats"), r"lacks `tip_stats/tracker.json`"),
        (
            lambda c: (c / "tip_stats" / "tracker.json").write_text('{"steps": [1,'),
            r"tracker.json is not readable JSON",
        ),
    ],
)
def test_a_checkpoint_missing_tip_state_is_refused_before_training(tokenizer, tmp_path, damage, message):
    settings = {"max_steps": 1, "token_selector": "random", "save_strategy": "steps", "save_steps": 1}
    train_logs(make_trainer(tokenizer, tmp_path / "full", **settings))
    checkpoint = tmp_path / "full" / "checkpoint-1"
    damage(checkpoint)
    resumed = make_trainer(tokenizer, tmp_path / "resumed", **{**settings, "max_steps": 2})
    with pytest.raises(ValueError, match=message):
        resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 0, "refused before any step"
