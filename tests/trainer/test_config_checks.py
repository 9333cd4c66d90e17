"""A `TIPConfig` setting either takes effect or is refused when the config is built: never silently ignored, and one
source for each setting. Each error names the field, the value, what is allowed and how to fix it."""

import re

import pytest

from trl_tip import TIPConfig, TIPGKDTrainer
from trl_tip.testing import tiny_causal_lm, tiny_math_dataset, tiny_tokenizer


CPU = {"use_cpu": True, "bf16": False, "report_to": "none"}


def config(tmp_path, **fields) -> TIPConfig:
    return TIPConfig(output_dir=str(tmp_path), **CPU, **fields)


# selection_ratio: one meaning per selector, or an error.


def test_selection_ratio_unset_means_half_for_ratio_selectors(tmp_path):
    for name in ("random", "entropy_topk", "entropy_sampling", "divergence_topk", "soft_or", "soft_or_bottom", "q3"):
        args = config(tmp_path, token_selector=name)
        assert args.selection_ratio == 0.5
        assert args.build_selector().ratio == 0.5
    assert config(tmp_path, token_selector="q3", selection_ratio=0.1).build_selector().ratio == 0.1


def test_selection_ratio_with_all_is_refused_unless_unset_or_one(tmp_path):
    with pytest.raises(ValueError) as error:
        config(tmp_path, token_selector="all", selection_ratio=0.5)
    message = str(error.value)
    assert '`selection_ratio`=0.5 has no effect with `token_selector="all"`' in message
    assert "Leave `selection_ratio` unset (or 1.0)" in message and '`token_selector="random"`' in message
    # `trl-tip study --rules all:1.0` passes 1.0 explicitly.
    for ratio in (None, 1.0, 1):
        assert config(tmp_path, token_selector="all", selection_ratio=ratio).selection_ratio == 1.0


def test_selection_ratio_is_the_quadrant_selectors_ratio(tmp_path):
    assert config(tmp_path, token_selector="quadrant").build_selector().ratio == 1.0
    args = config(tmp_path, token_selector="quadrant", selection_ratio=0.3)
    assert args.selection_ratio == 0.3 and args.build_selector().ratio == 0.3


def test_ratio_in_token_selector_kwargs_is_refused(tmp_path):
    message = re.escape(
        "`token_selector_kwargs` sets `ratio`=0.3, but `selection_ratio` is that setting's one source (the model card "
        "and its recipe report it). Remove `ratio` from `token_selector_kwargs` and set `selection_ratio` instead, "
        "e.g. `selection_ratio=0.3`."
    )
    for name in ("soft_or", "quadrant"):
        with pytest.raises(ValueError, match=message):
            config(tmp_path, token_selector=name, token_selector_kwargs={"ratio": 0.3})


# vllm_enforce_eager applies to the colocated engine only.


def test_vllm_enforce_eager_is_refused_in_server_mode(tmp_path):
    with pytest.raises(ValueError) as error:
        config(tmp_path, vllm_mode="server", vllm_enforce_eager=True)
    message = str(error.value)
    assert '`vllm_enforce_eager=True` has no effect with `vllm_mode="server"`' in message
    assert "`trl vllm-serve --enforce_eager true`" in message and '`vllm_mode="colocate"`' in message
    assert config(tmp_path, vllm_mode="server").vllm_enforce_eager is False  # the default stays accepted
    assert config(tmp_path, vllm_mode="colocate", vllm_enforce_eager=True).vllm_enforce_eager is True


# quadrant_thresholds: one split for the selection and the logged statistics.


def test_quadrant_thresholds_split_both_the_quadrant_selector_and_the_statistics(tmp_path):
    tokenizer = tiny_tokenizer()
    args = config(
        tmp_path,
        token_selector="quadrant",
        token_selector_kwargs={"quadrants": ["Q3"]},
        quadrant_thresholds="0.5,0.1",
        per_device_train_batch_size=2,
        max_completion_length=8,
    )
    trainer = TIPGKDTrainer(
        model=tiny_causal_lm(tokenizer, seed=0),
        teacher_model=tiny_causal_lm(tokenizer, hidden_size=128, seed=1),
        args=args,
        train_dataset=tiny_math_dataset(4),
        processing_class=tokenizer,
    )
    selector, tracker = trainer.token_selector, trainer.quadrant_tracker
    assert (selector.entropy_threshold, selector.divergence_threshold) == (0.5, 0.1)
    assert (tracker.entropy_threshold, tracker.divergence_threshold) == (0.5, 0.1)
    median = config(tmp_path, token_selector="quadrant").build_selector()
    assert (median.entropy_threshold, median.divergence_threshold) == ("median", "median")


@pytest.mark.parametrize("argument", ["entropy_threshold", "divergence_threshold"])
def test_quadrant_thresholds_in_token_selector_kwargs_are_refused(argument, tmp_path):
    message = re.escape(
        f"`token_selector_kwargs` sets `{argument}`=0.2, but `quadrant_thresholds` is that setting's one source (it "
        f"also splits the logged quadrant statistics). Remove `{argument}` from `token_selector_kwargs` and set "
        "`quadrant_thresholds` instead, e.g. `quadrant_thresholds='0.5,0.1'`."
    )
    with pytest.raises(ValueError, match=message):
        config(tmp_path, token_selector="quadrant", token_selector_kwargs={argument: 0.2})


# temperature


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), float("inf")])
def test_temperature_must_be_a_positive_number(temperature, tmp_path):
    message = re.escape("`temperature` must be a positive number (the softmax temperature of the student and ")
    with pytest.raises(ValueError, match=message + rf".*got {temperature!r}\. Set e\.g\. `temperature=1\.0`"):
        config(tmp_path, temperature=temperature)


# num_rollouts_per_prompt divides the generation batch (item 9's config part).


def test_rollouts_per_prompt_must_divide_the_generation_batch_when_the_config_is_built(tmp_path):
    # TRL's default generation batch: per_device_train_batch_size 8 x 1 process x 1 accumulation step.
    with pytest.raises(ValueError) as error:
        config(tmp_path, num_rollouts_per_prompt=16)
    message = str(error.value)
    assert "`num_rollouts_per_prompt`=16 must divide the generation batch" in message
    assert "per_device_train_batch_size x processes x gradient_accumulation_steps = 8 x 1 x 1 = 8" in message
    assert "Set `gradient_accumulation_steps` to a multiple of 2" in message
    assert "choose `num_rollouts_per_prompt` among 1, 2, 4, 8" in message
    # The fix the message gives works; so do the paper's batches (4 x 4, 16 rollouts).
    config(tmp_path, num_rollouts_per_prompt=16, gradient_accumulation_steps=2)
    config(tmp_path, num_rollouts_per_prompt=16, per_device_train_batch_size=4, gradient_accumulation_steps=4)
    with pytest.raises(ValueError, match=r"4 x 1 x 3 = 12, which is not a multiple of it\. Set "):
        config(tmp_path, num_rollouts_per_prompt=8, per_device_train_batch_size=4, gradient_accumulation_steps=3)


def test_trainer_rechecks_rollouts_when_the_batch_changed_after_the_config_was_built(tmp_path):
    tokenizer = tiny_tokenizer()
    args = config(tmp_path, num_rollouts_per_prompt=4, per_device_train_batch_size=4, max_completion_length=8)
    args.per_device_train_batch_size = 6  # dataclass fields are not rechecked on assignment
    with pytest.raises(ValueError, match=r"= 6 x 1 x 1 = 6, which is not a multiple of it"):
        TIPGKDTrainer(
            model=tiny_causal_lm(tokenizer, seed=0),
            teacher_model=tiny_causal_lm(tokenizer, hidden_size=128, seed=1),
            args=args,
            train_dataset=tiny_math_dataset(4),
            processing_class=tokenizer,
        )


# Schedules: the kept ratio and beta over training.


def test_unknown_selection_ratio_schedule_lists_the_schedules(tmp_path):
    message = re.escape(
        "`selection_ratio_schedule` must be one of 'constant', 'linear', 'cosine', 'adaptive'; got 'exponential'."
    )
    with pytest.raises(ValueError, match=message):
        config(tmp_path, selection_ratio_schedule="exponential")


def test_a_decaying_ratio_schedule_must_start_at_or_above_the_final_ratio(tmp_path):
    with pytest.raises(ValueError) as error:
        config(tmp_path, selection_ratio_schedule="linear", selection_ratio=0.5, selection_ratio_start=0.3)
    message = str(error.value)
    assert "`selection_ratio_start`=0.3 is below `selection_ratio`=0.5" in message
    assert "Set `selection_ratio_start` to a value in [0.5, 1.0]" in message
    assert '`selection_ratio_schedule="constant"`' in message


def test_a_ratio_schedule_with_the_all_selector_is_refused(tmp_path):
    with pytest.raises(ValueError) as error:
        config(tmp_path, selection_ratio_schedule="cosine", token_selector="all")
    message = str(error.value)
    assert '`selection_ratio_schedule="cosine"` has nothing to move with `token_selector="all"`' in message
    assert '`token_selector="divergence_topk"`' in message and '`selection_ratio_schedule="constant"`' in message
    assert config(tmp_path, selection_ratio_schedule="constant", token_selector="all").selection_ratio == 1.0


@pytest.mark.parametrize(
    "beta_schedule, message",
    [
        ("0.2:0.0,0.6:1.0", "`beta_schedule` must cover the whole run: its first piece starts at progress 0.2, not 0"),
        ("0:1.5", r"`beta_schedule` betas must be in \[0, 1\] \(0 forward KL, 1 reverse KL\); got 1.5"),
        ("fkl then rkl", r"`beta_schedule` must be `progress:beta` pairs separated by commas, e.g\. "),
    ],
)
def test_a_beta_schedule_that_cannot_run_is_refused(beta_schedule, message, tmp_path):
    with pytest.raises(ValueError, match=message) as error:
        config(tmp_path, beta_schedule=beta_schedule)
    if "cover" in message or "pairs" in message:
        assert '`beta_schedule="0:0.0,0.5:1.0"`' in str(error.value), "the fix is spelled out"


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("adaptive_ratio_step", 0, r"`adaptive_ratio_step` must be a number in \(0, 1\); got 0\."),
        ("adaptive_ratio_step", 1.0, r"`adaptive_ratio_step` must be a number in \(0, 1\); got 1\.0\."),
        ("adaptive_ratio_tolerance", 1.0, r"`adaptive_ratio_tolerance` must be a number in \[0, 1\); got 1\.0\."),
        ("adaptive_ratio_ema_decay", 1.0, r"`adaptive_ratio_ema_decay` must be a number in \[0, 1\); got 1\.0\."),
    ],
)
def test_adaptive_ratio_settings_out_of_range_are_refused(field, value, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        config(tmp_path, selection_ratio_schedule="adaptive", **{field: value})


def test_valid_schedules_build_and_the_beta_schedule_is_normalized(tmp_path):
    args = config(tmp_path, beta_schedule="0:0,0.5:1")
    assert args.beta_schedule == "0:0,0.5:1"
    assert args.beta_schedule_value(0.25) == 0.0 and args.beta_schedule_value(0.75) == 1.0
    assert config(tmp_path, beta_schedule="0:0.0, 0.5:1.0").beta_schedule == "0:0,0.5:1"
    assert config(tmp_path).beta_schedule_value is None
    linear = config(tmp_path, selection_ratio_schedule="linear", selection_ratio=0.2)
    assert (linear.selection_ratio_schedule, linear.selection_ratio, linear.selection_ratio_start) == (
        "linear",
        0.2,
        1.0,
    )
    adaptive = config(tmp_path, selection_ratio_schedule="adaptive", selection_ratio=0.2, adaptive_ratio_tolerance=0)
    assert adaptive.adaptive_ratio_tolerance == 0


# Problem weighting (PACED).


def test_paced_weighting_needs_several_rollouts_per_prompt(tmp_path):
    with pytest.raises(ValueError) as error:
        config(tmp_path, problem_weighting="paced", num_rollouts_per_prompt=1)
    message = str(error.value)
    assert "needs `num_rollouts_per_prompt` >= 2; got 1" in message
    assert "`num_rollouts_per_prompt=4`" in message and '`problem_weighting="none"`' in message
    args = config(tmp_path, problem_weighting="paced", num_rollouts_per_prompt=4)
    assert (args.problem_weighting, args.paced_alpha, args.paced_beta) == ("paced", 1.0, 1.0)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"problem_weighting": "focal"}, "`problem_weighting` must be one of 'none', 'paced'; got 'focal'."),
        ({"paced_alpha": -1}, "`paced_alpha` must be a finite number >= 0 (PACED's default: 1.0); got -1."),
        ({"paced_beta": float("inf")}, "`paced_beta` must be a finite number >= 0 (PACED's default: 1.0); got inf."),
        ({"paced_answer_format": "latex"}, "`paced_answer_format` must be one of 'boxed', 'number'; got 'latex'."),
    ],
)
def test_bad_problem_weighting_settings_are_refused(fields, message, tmp_path):
    with pytest.raises(ValueError, match=re.escape(message)):
        config(tmp_path, **fields)


@pytest.mark.parametrize(
    "overrides, field, mode",
    [
        ({"selection_ratio_start": 0.8}, "selection_ratio_start", "linear"),
        ({"selection_ratio_decay_fraction": 0.5}, "selection_ratio_decay_fraction", "linear"),
        (
            {"selection_ratio_schedule": "adaptive", "selection_ratio_decay_fraction": 0.5},
            "selection_ratio_decay_fraction",
            "linear",
        ),
        ({"selection_ratio_schedule": "cosine", "adaptive_ratio_step": 0.1}, "adaptive_ratio_step", "adaptive"),
        ({"adaptive_ratio_tolerance": 0.1}, "adaptive_ratio_tolerance", "adaptive"),
        ({"paced_alpha": 2.0}, "paced_alpha", "paced"),
        ({"paced_answer_column": "solution"}, "paced_answer_column", "paced"),
    ],
)
def test_a_field_its_mode_never_reads_is_refused_naming_the_mode(overrides, field, mode, tmp_path):
    with pytest.raises(ValueError, match=f"`{field}`=.* has no effect here: it is read only with .*{mode}"):
        config(tmp_path, **overrides)


def test_beta_next_to_a_beta_schedule_is_refused(tmp_path):
    with pytest.raises(ValueError, match="`beta`=0.5 has no effect with `beta_schedule`"):
        config(tmp_path, beta=0.5, beta_schedule="0:0,0.5:1")


def test_paced_needs_the_dataset_columns_kept(tmp_path):
    with pytest.raises(ValueError, match="`remove_unused_columns=True` drops"):
        config(tmp_path, problem_weighting="paced", num_rollouts_per_prompt=2, remove_unused_columns=True)
