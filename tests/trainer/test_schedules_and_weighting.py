"""Schedules and PACED problem weighting in `TIPGKDTrainer`, on tiny local models: the kept ratio and beta each step
trains with, the normalizer that follows them, a resume that repeats them, and per-problem weights that equal PACED's
formula and give the float64 reference loss."""

import math

import pytest
import torch
from reference import reference_gjsd, reference_logits
from tiny_runs import TINY_CPU_RUN

from trl_tip import TIPConfig, TIPGKDTrainer
from trl_tip.core import loss as core_loss
from trl_tip.testing import tiny_causal_lm, tiny_math_dataset


SETTINGS = {**TINY_CPU_RUN, "per_device_train_batch_size": 4}


def make_trainer(tokenizer, tmp_path, dataset=None, reward_func=None, **overrides):
    student, teacher = tiny_causal_lm(tokenizer, seed=0), tiny_causal_lm(tokenizer, hidden_size=128, seed=1)
    with torch.no_grad():  # a sharper teacher than a random one, so the divergences and losses move visibly
        teacher.lm_head.weight.mul_(20.0)
    return TIPGKDTrainer(
        model=student,
        teacher_model=teacher,
        args=TIPConfig(output_dir=str(tmp_path), **{**SETTINGS, **overrides}),
        train_dataset=dataset if dataset is not None else tiny_math_dataset(16),
        processing_class=tokenizer,
        reward_func=reward_func,
    )


def step_logs(trainer):
    return [h for h in trainer.state.log_history if "loss" in h]


def kept_count(valid_lengths, ratio):
    """The ratio selectors' count by hand: floor(ratio * m) of each rollout's m valid tokens, at least one."""
    return sum(max(1, math.floor(ratio * m)) for m in valid_lengths if m)


# ---------------------------------------------------------------------------------------------------------------------
# Kept-ratio schedules


@pytest.mark.slow
@pytest.mark.parametrize(
    "schedule, expected",
    [
        # From 1.0 to 0.2 over the run: progress 0, 1/3, 2/3, 1 at the four steps (the last trains at the final ratio);
        # cosine: 0.2 + 0.4 (1 + cos(pi t)), cos(pi/3) = 1/2.
        ("linear", [1.0, 1.0 - 0.8 / 3, 1.0 - 1.6 / 3, 0.2]),
        ("cosine", [1.0, 0.8, 0.4, 0.2]),
        ("constant", [0.2, 0.2, 0.2, 0.2]),
    ],
)
def test_a_ratio_schedule_sets_the_documented_ratio_and_the_normalizer_is_the_kept_count(
    schedule, expected, tokenizer, loss_calls, tmp_path
):
    trainer = make_trainer(
        tokenizer,
        tmp_path,
        token_selector="entropy_topk",
        selection_ratio=0.2,
        selection_ratio_schedule=schedule,
        max_steps=4,
    )
    trainer.train()
    logged = [log["tip/selection_ratio"] for log in step_logs(trainer)]
    assert logged == pytest.approx(expected, abs=1e-12)
    assert len(loss_calls) == 4
    for call, ratio in zip(loss_calls, expected):
        count = kept_count(call["valid_mask"].sum(dim=1).tolist(), ratio)
        assert int(call["selected"].sum()) == count
        assert int(call["num_items_in_batch"]) == count, "the global normalizer is the kept count at this ratio"


def test_linear_schedule_reaches_the_final_ratio_at_the_decay_fraction_and_stays(tokenizer, tmp_path):
    trainer = make_trainer(
        tokenizer,
        tmp_path,
        token_selector="random",
        selection_ratio=0.5,
        selection_ratio_schedule="linear",
        selection_ratio_decay_fraction=0.5,
        max_steps=4,
    )
    trainer.train()
    # Progress 0, 1/3, 2/3, 1; the decay ends at progress 1/2: 1.0, 1 - 0.5 x (2/3), then 0.5.
    assert [log["tip/selection_ratio"] for log in step_logs(trainer)] == pytest.approx([1.0, 2 / 3, 0.5, 0.5])
    # The model card names the schedule, not the ratio it ended at, and its recipe repeats the run.
    trainer.create_model_card()
    card = (tmp_path / "README.md").read_text()
    assert "linear from 100% to 50% of each rollout's valid tokens over 50% of training" in card
    assert "selection_ratio_schedule: linear" in card and "selection_ratio_decay_fraction: 0.5" in card
    assert "problem_weighting" not in card, "settings left at their defaults stay out of the recipe"


def latf_ratios(losses, start, floor, decay, step, tolerance):
    """LATF's rule written out: the ratio in force at each generation batch, given the losses of the batches before."""
    ratios, ratio, ema, anchor = [start], start, None, None
    for loss in losses[:-1]:
        ema = loss if ema is None else decay * ema + (1 - decay) * loss
        if anchor is None:
            anchor = ema
        elif anchor - ema > tolerance * anchor:
            ratio, anchor = max(ratio * (1 - step), floor), ema
        elif ema - anchor > tolerance * anchor:
            ratio, anchor = min(ratio * (1 + step), 1.0), ema
        ratios.append(ratio)
    return ratios


@pytest.mark.slow
@pytest.mark.parametrize("loss_normalization", ["selected", "all"])
def test_adaptive_ratio_follows_latf_on_the_mean_divergence_of_the_kept_tokens(
    loss_normalization, tokenizer, tmp_path
):
    latf = {"adaptive_ratio_ema_decay": 0.5, "adaptive_ratio_step": 0.2, "adaptive_ratio_tolerance": 0.01}
    trainer = make_trainer(
        tokenizer,
        tmp_path,
        token_selector="divergence_topk",
        selection_ratio=0.1,
        selection_ratio_schedule="adaptive",
        loss_normalization=loss_normalization,
        max_steps=6,
        **latf,
    )
    trainer.train()
    logs = step_logs(trainer)
    rows = trainer.quadrant_tracker.step_rows()
    # LATF follows the mean divergence over the kept tokens, whatever the loss is divided by: the logged loss with
    # `selected`, the logged loss x valid / kept tokens with `all` (whose loss would fall with the ratio itself).
    scale = [1.0 if loss_normalization == "selected" else row["num_tokens"] / row["num_selected"] for row in rows]
    means = [log["loss"] * k for log, k in zip(logs, scale)]
    expected = latf_ratios(means, 1.0, 0.1, 0.5, 0.2, 0.01)
    assert [log["tip/selection_ratio"] for log in logs] == pytest.approx(expected, rel=1e-6)
    assert min(expected) < 1.0, "the run is long enough for the ratio to move"


# ---------------------------------------------------------------------------------------------------------------------
# Divergence schedule


def test_beta_schedule_trains_forward_kl_then_reverse_kl_reusing_the_statistics_pass(
    tokenizer, loss_calls, monkeypatch, tmp_path
):
    projections = []
    original = core_loss._chunked_divergence
    monkeypatch.setattr(core_loss, "_chunked_divergence", lambda *a, **k: projections.append(1) or original(*a, **k))
    trainer = make_trainer(tokenizer, tmp_path, token_selector="soft_or", beta_schedule="0:0,0.5:1", max_steps=4)
    trainer.train()
    logs = step_logs(trainer)
    assert [log["tip/beta"] for log in logs] == [0.0, 0.0, 1.0, 1.0]
    assert [call["beta"] for call in loss_calls] == [0.0, 0.0, 1.0, 1.0]
    assert not projections, "at both KL endpoints the loss reads the divergence from the statistics pass"
    for call in loss_calls:
        student = reference_logits(call["student_hidden"], call["student_head"])
        teacher = reference_logits(call["teacher_hidden"], call["teacher_head"])
        expected = reference_gjsd(student, teacher, call["beta"])[call["selected"].bool()].sum()
        torch.testing.assert_close(call["loss"].double(), expected / call["num_items_in_batch"], rtol=1e-5, atol=1e-8)


# ---------------------------------------------------------------------------------------------------------------------
# Resume


@pytest.mark.slow
def test_resume_repeats_the_adaptive_ratio_the_beta_and_the_losses(tokenizer, tmp_path):
    settings = {
        "token_selector": "divergence_topk",
        "selection_ratio": 0.1,
        "selection_ratio_schedule": "adaptive",
        "adaptive_ratio_ema_decay": 0.5,
        "adaptive_ratio_step": 0.2,
        "adaptive_ratio_tolerance": 0.0,
        "beta_schedule": "0:0,0.5:1",
        "max_steps": 6,
        "save_strategy": "steps",
        "save_steps": 3,
    }
    full = make_trainer(tokenizer, tmp_path / "full", **settings)
    full.train()
    checkpoint = tmp_path / "full" / "checkpoint-3"
    assert (checkpoint / "tip_schedule_state.json").is_file()
    resumed = make_trainer(tokenizer, tmp_path / "resumed", **settings)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    keys = ("loss", "tip/selection_ratio", "tip/beta")
    full_logs, resumed_logs = step_logs(full)[3:], step_logs(resumed)[3:]
    assert [log["step"] for log in resumed_logs] == [4, 5, 6]
    assert len({log["tip/selection_ratio"] for log in step_logs(full)}) > 1, "the ratio moved during the run"
    for a, b in zip(full_logs, resumed_logs):
        assert [a[k] for k in keys] == pytest.approx([b[k] for k in keys], rel=1e-6)


def test_a_schedule_needs_a_selector_with_a_ratio(tokenizer, tmp_path):
    student = tiny_causal_lm(tokenizer, seed=0)
    args = TIPConfig(output_dir=str(tmp_path), selection_ratio_schedule="linear", selection_ratio=0.2, **SETTINGS)
    with pytest.raises(ValueError, match="has no float `ratio`"):
        TIPGKDTrainer(
            model=student,
            teacher_model=tiny_causal_lm(tokenizer, seed=1),
            args=args,
            train_dataset=tiny_math_dataset(4),
            processing_class=tokenizer,
            token_selector=lambda stats, generator: stats.mask,
        )


# ---------------------------------------------------------------------------------------------------------------------
# PACED problem weighting


def first_question(tokenizer, prompt_ids) -> str:
    return tokenizer.decode(prompt_ids, skip_special_tokens=True)


@pytest.mark.parametrize(
    "selector, ratio, alpha, beta",
    [("all", None, 1.0, 1.0), ("soft_or", 0.5, 2.0, 0.5)],
    ids=["all-a1b1", "soft_or-a2b05"],
)
def test_paced_weights_equal_the_formula_and_the_loss_equals_a_float64_reference(
    selector, ratio, alpha, beta, tokenizer, loss_calls, tmp_path
):
    """Two problems of two rollouts each: the first passes once (p = 1/2), the second twice (p = 1, weight 0)."""
    dataset = tiny_math_dataset(2, with_answers=True)
    first = dataset[0]["prompt"][0]["content"]
    seen = []

    def reward(prompts, completions, completion_ids, answer, **kwargs):
        rewards = []
        for prompt in prompts:
            question = prompt[0]["content"]
            rewards.append(float(question != first or seen.count(question) == 0))
            seen.append(question)
        return rewards

    trainer = make_trainer(
        tokenizer,
        tmp_path,
        dataset=dataset,
        reward_func=reward,
        token_selector=selector,
        selection_ratio=ratio,
        problem_weighting="paced",
        paced_alpha=alpha,
        paced_beta=beta,
        num_rollouts_per_prompt=2,
        max_steps=1,
    )
    trainer.train()
    batch = trainer._buffered_inputs[0]
    lengths = batch["completion_mask"].sum(dim=1).tolist()
    # The tokens the normalizer counts: every valid one for `all`, floor(m / 2) (at least one) kept for soft_or 50%.
    counted = torch.tensor([m if ratio is None else max(1, m // 2) for m in lengths], dtype=torch.float64)
    is_first = torch.tensor([first in first_question(tokenizer, ids) for ids in batch["prompt_ids"]])
    assert int(is_first.sum()) == 2
    # w(p) = p^a (1 - p)^b: 0.5^a 0.5^b for the first problem, 0 for the second; rescaled so that
    # sum_i w_i c_i = sum_i c_i over the counted tokens c_i.
    raw = torch.where(is_first, 0.5**alpha * 0.5**beta, 0.0).double()
    expected_weights = raw * counted.sum() / (raw * counted).sum()
    torch.testing.assert_close(batch["rollout_weights"].double(), expected_weights, rtol=1e-6, atol=0)
    (call,) = loss_calls
    keep = call["selected"].bool()
    assert not keep[~is_first].any(), "problems of weight 0 leave the loss"
    assert keep.sum(dim=1)[is_first].tolist() == counted[is_first].long().tolist()
    assert int(call["num_items_in_batch"]) == int(counted.sum()), "the normalizer is unchanged: the counted tokens"
    student = reference_logits(call["student_hidden"], call["student_head"])
    teacher = reference_logits(call["teacher_hidden"], call["teacher_head"])
    per_token = reference_gjsd(student, teacher, 1.0) * expected_weights.unsqueeze(-1)
    expected = per_token[keep].sum() / counted.sum()
    torch.testing.assert_close(call["loss"].double(), expected, rtol=1e-5, atol=1e-8)
    log = step_logs(trainer)[0]
    assert log["tip/pass_rate_mean"] == pytest.approx(0.75)
    assert log["tip/pass_rate_one_share"] == pytest.approx(0.5)
    assert log["tip/paced_weighted_share"] == pytest.approx(0.5)


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({"token_selector": "soft_or", "selection_ratio": 0.5}, [1, 4, 2, 0]),  # floor(m / 2), at least 1
        ({"token_selector": "soft_or", "selection_ratio": 0.5, "loss_normalization": "all"}, [3, 8, 5, 0]),
        ({"token_selector": "all"}, [3, 8, 5, 0]),
    ],
)
def test_paced_rescales_over_the_tokens_the_normalizer_counts(overrides, expected, tokenizer, tmp_path):
    trainer = make_trainer(
        tokenizer,
        tmp_path,
        dataset=tiny_math_dataset(4, with_answers=True),
        problem_weighting="paced",
        num_rollouts_per_prompt=2,
        **overrides,
    )
    mask = torch.zeros(4, 8, dtype=torch.long)
    for row, length in enumerate([3, 8, 5, 0]):
        mask[row, :length] = 1
    assert trainer._normalizer_share(mask).tolist() == expected


def test_paced_grades_rollouts_with_math_verify_against_the_answer_column(tokenizer, tmp_path):
    trainer = make_trainer(
        tokenizer,
        tmp_path,
        dataset=tiny_math_dataset(4, with_answers=True),
        problem_weighting="paced",
        num_rollouts_per_prompt=2,
        max_steps=1,
    )
    texts = ["So the sum is \\boxed{\\frac{10}{2}}.", "It is \\boxed{6}.", "5", "\\boxed{1,234}"]
    encoded = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    width = max(map(len, encoded))
    output = {
        "completion_ids": torch.tensor([ids + [0] * (width - len(ids)) for ids in encoded]),
        "completion_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in encoded]),
    }
    inputs = [{"prompt": "p", "answer": 5}, {"prompt": "p", "answer": 5}, {"prompt": "q", "answer": 5}]
    inputs.append({"prompt": "r", "answer": "#### 1,234"})  # a GSM8K reference: the text after ####
    assert trainer._grade_rollouts(inputs, output) == [1.0, 0.0, 0.0, 1.0]  # "5" is not boxed


def test_paced_without_answers_or_reward_function_fails_at_construction(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="`answer` column \\(`paced_answer_column`\\), which it lacks"):
        make_trainer(tokenizer, tmp_path, problem_weighting="paced", num_rollouts_per_prompt=2)
    with pytest.raises(ValueError, match='for `problem_weighting="paced"` only'):
        make_trainer(tokenizer, tmp_path, reward_func=lambda **kwargs: [1.0])


def test_a_reward_outside_zero_one_fails_naming_the_reward_function(tokenizer, tmp_path):
    trainer = make_trainer(
        tokenizer,
        tmp_path,
        reward_func=lambda prompts, **kwargs: [2.0] * len(prompts),
        problem_weighting="paced",
        num_rollouts_per_prompt=2,
        max_steps=1,
    )
    with pytest.raises(
        ValueError, match=r"`reward_func` must return one reward in \[0, 1\] \(1.0 correct, 0.0 wrong\) or None"
    ):
        trainer.train()


def test_a_trl_reward_function_is_called_as_grpo_calls_it_and_its_none_is_left_out(tokenizer, tmp_path, caplog):
    calls = []

    def reward(completions, log_metric, log_extra, trainer_state, answer, **kwargs):
        # GRPO's keywords: `log_metric` / `log_extra` callables, the trainer state, the other columns by name.
        calls.append(kwargs)
        log_metric("graded", 0.0)
        return [None] * len(completions)  # TRL's "cannot grade" (accuracy_reward on an unparsable answer)

    trainer = make_trainer(
        tokenizer,
        tmp_path,
        dataset=tiny_math_dataset(4, with_answers=True),
        reward_func=reward,
        problem_weighting="paced",
        num_rollouts_per_prompt=2,
        max_steps=1,
    )
    with caplog.at_level("WARNING"):
        trainer.train()
    assert "completion_ids" in calls[0] and "prompts" in calls[0]
    log = step_logs(trainer)[0]
    assert log["paced/graded"] == 0.0
    assert log["tip/paced_weighted_share"] == 0.0, "problems none of whose rollouts could be graded weigh 0"
    assert torch.equal(trainer._buffered_inputs[0]["rollout_weights"], torch.zeros(4))
    assert "trains on nothing" in caplog.text and "`paced_answer_format`" in caplog.text


def test_reward_function_settings_that_would_be_ignored_are_refused(tokenizer, tmp_path):
    paced = {"problem_weighting": "paced", "num_rollouts_per_prompt": 2}
    with pytest.raises(ValueError, match="`paced_answer_column`='solution' has no effect with `reward_func`"):
        make_trainer(tokenizer, tmp_path, reward_func=lambda **kwargs: [], paced_answer_column="solution", **paced)

    async def graded_later(**kwargs):
        return []

    with pytest.raises(TypeError, match="`reward_func` is an async function"):
        make_trainer(tokenizer, tmp_path, reward_func=graded_later, **paced)


def test_a_ratio_schedule_refuses_the_all_selector_passed_to_the_trainer(tokenizer, tmp_path):
    args = TIPConfig(output_dir=str(tmp_path), selection_ratio_schedule="cosine", selection_ratio=0.2, **SETTINGS)
    with pytest.raises(ValueError, match="has nothing to move with the `all` selector"):
        TIPGKDTrainer(
            model=tiny_causal_lm(tokenizer, seed=0),
            teacher_model=tiny_causal_lm(tokenizer, seed=1),
            args=args,
            train_dataset=tiny_math_dataset(4),
            processing_class=tokenizer,
            token_selector="all",
        )


def test_schedules_set_their_starting_values_before_the_first_batch(tokenizer, tmp_path):
    trainer = make_trainer(
        tokenizer,
        tmp_path,
        token_selector="soft_or",
        selection_ratio=0.2,
        selection_ratio_schedule="linear",
        selection_ratio_start=0.9,
        beta_schedule="0:0,0.5:1",
    )
    assert (trainer.selection_ratio_in_force, trainer.beta) == (0.9, 0.0)


def test_teacher_entropy_is_computed_only_on_steps_that_record_quadrant_statistics(tokenizer, monkeypatch, tmp_path):
    from trl_tip.trainer import tip_trainer

    flags = []
    original = tip_trainer.compute_token_stats
    monkeypatch.setattr(
        tip_trainer,
        "compute_token_stats",
        lambda *args, teacher_entropy=True, **kwargs: (
            flags.append(teacher_entropy) or original(*args, teacher_entropy=teacher_entropy, **kwargs)
        ),
    )
    trainer = make_trainer(tokenizer, tmp_path, token_selector="soft_or", log_quadrant_stats_every=2, max_steps=4)
    trainer.train()
    assert flags == [True, False, True, False]  # global steps 0..3, recorded at 0 and 2
    assert all("teacher_entropy" in row for row in trainer.quadrant_tracker.step_rows())
