"""Schedules over training and PACED's problem weights (`trl_tip.core.schedules`), as specifications.

- The kept ratio: `constant` is the final ratio throughout; `linear` and `cosine` go from the start ratio down to the
  final one over the first `decay_fraction` of training and stay there; `adaptive` is AdaKD's LATF rule, which moves
  the ratio by a relative step when the moving average of the loss leaves a tolerance band around its anchor.
- `beta`: a piecewise-constant schedule over training progress that must cover the whole run.
- PACED: a problem of pass rate `p` weighs `p^a (1 - p)^b`, rescaled over a batch so its tokens keep their total.

Every expected value below is worked out by hand in the test, never by calling the code under test.
"""

import json
import math

import pytest
import torch

from trl_tip.core.schedules import (
    AdaptiveRatio,
    BetaSchedule,
    check_paced_exponents,
    check_ratio_schedule,
    group_pass_rates,
    paced_weight,
    paced_weights,
    scheduled_ratio,
    training_progress,
)


PROGRESS = (0.0, 0.25, 0.5, 0.75, 1.0)
SQRT2 = math.sqrt(2.0)


# scheduled_ratio: the kept ratio as a function of the share of training done.


def test_constant_schedule_is_the_final_ratio_at_every_progress():
    for progress in (*PROGRESS, 0.1, 0.9):
        assert scheduled_ratio("constant", progress, start=1.0, final=0.2) == 0.2


def test_linear_schedule_goes_in_a_straight_line_from_start_to_final():
    # 1.0 - 0.8 t: 1.0, 0.8, 0.6, 0.4, 0.2.
    expected = (1.0, 0.8, 0.6, 0.4, 0.2)
    for progress, ratio in zip(PROGRESS, expected):
        assert scheduled_ratio("linear", progress, 1.0, 0.2, decay_fraction=1.0) == pytest.approx(ratio, abs=1e-12)


def test_cosine_schedule_follows_half_a_cosine_from_start_to_final():
    # 0.2 + 0.8 * 0.5 * (1 + cos(pi t)) = 0.6 + 0.4 cos(pi t); cos(pi/4) = sqrt(2)/2, so 0.4 cos(pi/4) = 0.2 sqrt(2).
    expected = (1.0, 0.6 + 0.2 * SQRT2, 0.6, 0.6 - 0.2 * SQRT2, 0.2)
    for progress, ratio in zip(PROGRESS, expected):
        assert scheduled_ratio("cosine", progress, 1.0, 0.2, decay_fraction=1.0) == pytest.approx(ratio, abs=1e-12)
    # Cosine stays above linear in the first half (slow start) and below it in the second (slow landing).
    assert 0.6 + 0.2 * SQRT2 > 0.8 and 0.6 - 0.2 * SQRT2 < 0.4


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_decay_fraction_reaches_the_final_ratio_early_and_stays_there(schedule):
    # decay_fraction 0.5: progress 0.25 is halfway through the decay, 0.5 is its end.
    halfway = {"linear": 0.6, "cosine": 0.6}[schedule]  # 1.0 - 0.8 * 0.5; 0.6 + 0.4 cos(pi/2)
    assert scheduled_ratio(schedule, 0.0, 1.0, 0.2, decay_fraction=0.5) == pytest.approx(1.0)
    assert scheduled_ratio(schedule, 0.25, 1.0, 0.2, decay_fraction=0.5) == pytest.approx(halfway)
    for progress in (0.5, 0.6, 0.75, 0.99, 1.0):
        assert scheduled_ratio(schedule, progress, 1.0, 0.2, decay_fraction=0.5) == pytest.approx(0.2, abs=1e-12)


def test_ratio_schedule_clips_progress_outside_the_run():
    assert scheduled_ratio("linear", -0.5, 1.0, 0.2) == pytest.approx(1.0)
    assert scheduled_ratio("linear", 1.5, 1.0, 0.2) == pytest.approx(0.2)


@pytest.mark.parametrize("schedule", ["exponential", "adaptive", ""])
def test_scheduled_ratio_refuses_other_schedules(schedule):
    # `adaptive` depends on the losses seen, not on progress: `AdaptiveRatio` computes it.
    with pytest.raises(ValueError, match=r"`scheduled_ratio` takes `constant`, `linear` or `cosine`"):
        scheduled_ratio(schedule, 0.5, 1.0, 0.2)


# training_progress: step / max_steps, in [0, 1].


def test_training_progress_goes_from_zero_at_the_first_step_to_one_at_the_last():
    # Steps are 0-based: of 11 steps, step 0 is the first (0) and step 10 the last (1), so a schedule ends on its
    # final value at the last step that trains.
    assert training_progress(0, 11) == 0.0
    assert training_progress(5, 11) == 0.5
    assert training_progress(3, 5) == 0.75
    assert training_progress(10, 11) == 1.0
    assert training_progress(15, 11) == 1.0
    assert training_progress(-3, 11) == 0.0


@pytest.mark.parametrize("max_steps", [1, 0, -1])
def test_training_progress_of_a_single_step_or_without_a_step_budget_is_zero(max_steps):
    assert training_progress(7, max_steps) == 0.0


# check_ratio_schedule: a schedule that cannot run as written fails naming the field.


def test_unknown_ratio_schedule_names_the_field_and_the_allowed_values():
    with pytest.raises(ValueError) as error:
        check_ratio_schedule("exponential", 1.0, 0.2, 1.0)
    message = str(error.value)
    assert "`selection_ratio_schedule`" in message and "'exponential'" in message
    for allowed in ("'constant'", "'linear'", "'cosine'", "'adaptive'"):
        assert allowed in message


@pytest.mark.parametrize("schedule", ["linear", "cosine", "adaptive"])
def test_a_decaying_schedule_refuses_a_start_below_the_final_ratio(schedule):
    with pytest.raises(ValueError) as error:
        check_ratio_schedule(schedule, 0.3, 0.5, 1.0)
    message = str(error.value)
    assert "`selection_ratio_start`=0.3 is below `selection_ratio`=0.5" in message
    assert f"`{schedule}` schedule decays" in message and "[0.5, 1.0]" in message
    check_ratio_schedule(schedule, 0.5, 0.5, 1.0)  # equal is a flat schedule, allowed


def test_constant_schedule_ignores_the_start_ratio():
    check_ratio_schedule("constant", 0.3, 0.5, 1.0)


@pytest.mark.parametrize(
    "start, final, fraction, field",
    [
        (0.0, 0.2, 1.0, "selection_ratio_start"),
        (1.0, 1.5, 1.0, "selection_ratio"),
        (1.0, 0.2, 0.0, "selection_ratio_decay_fraction"),
    ],
)
def test_ratio_schedule_numbers_must_be_ratios(start, final, fraction, field):
    with pytest.raises(ValueError, match=rf"^`{field}` must be a number in \(0, 1\]"):
        check_ratio_schedule("linear", start, final, fraction)


# AdaptiveRatio: AdaKD's LATF rule.


def test_adaptive_ratio_follows_the_latf_rule_step_by_step():
    rule = AdaptiveRatio(ratio=1.0, floor=0.5, ema_decay=0.5, step=0.1, tolerance=0.05)
    assert (rule.ratio, rule.ema, rule.anchor) == (1.0, None, None)
    steps = [
        # loss, then the expected (ratio, ema, anchor) after it, worked out by hand.
        # First update: ema = 1.0, anchor = 1.0, ratio unchanged.
        (1.0, (1.0, 1.0, 1.0)),
        # ema = 0.5 * 1.0 + 0.5 * 0.8 = 0.9; anchor - ema = 0.1 > 0.05 * 1.0: shrink to 0.9, anchor 0.9.
        (0.8, (0.9, 0.9, 0.9)),
        # ema = 0.45 + 0.4 = 0.85; 0.9 - 0.85 = 0.05 > 0.05 * 0.9 = 0.045: shrink to 0.81, anchor 0.85.
        (0.8, (0.81, 0.85, 0.85)),
        # ema = 0.425 + 0.45 = 0.875; 0.875 - 0.85 = 0.025 <= 0.0425: unchanged, the anchor stays 0.85.
        (0.9, (0.81, 0.875, 0.85)),
        # ema = 0.4375 + 0.75 = 1.1875; 1.1875 - 0.85 = 0.3375 > 0.0425: grow to 0.81 * 1.1 = 0.891, anchor 1.1875.
        (1.5, (0.891, 1.1875, 1.1875)),
        # ema = 0.59375 + 0.59375 = 1.1875: no change at all.
        (1.1875, (0.891, 1.1875, 1.1875)),
        # ema = 0.59375 + 0.25 = 0.84375; 1.1875 - 0.84375 = 0.34375 > 0.059375: shrink to 0.8019, anchor 0.84375.
        (0.5, (0.8019, 0.84375, 0.84375)),
    ]
    for loss, (ratio, ema, anchor) in steps:
        returned = rule.update(loss)
        assert returned == rule.ratio
        assert (rule.ratio, rule.ema, rule.anchor) == pytest.approx((ratio, ema, anchor), abs=1e-12), loss


def test_adaptive_ratio_never_falls_below_its_floor():
    # ema_decay 0 (ema = the last loss) and tolerance 0: every fall shrinks by 10%:
    # 0.9, 0.81, 0.729, 0.6561, 0.59049, 0.531441, then 0.4782969 -> clamped to 0.5, and 0.5 from then on.
    rule = AdaptiveRatio(ratio=1.0, floor=0.5, ema_decay=0.0, step=0.1, tolerance=0.0)
    rule.update(100.0)
    ratios = [rule.update(100.0 - k) for k in range(1, 21)]
    assert ratios[:6] == pytest.approx([0.9, 0.81, 0.729, 0.6561, 0.59049, 0.531441])
    assert ratios[6:] == [0.5] * 14


def test_adaptive_ratio_never_rises_above_its_ceiling():
    # Every rise grows by 10%: 0.66, 0.726, 0.7986, 0.87846, 0.966306, then 1.0629366 -> clamped to 1.0.
    rule = AdaptiveRatio(ratio=0.6, floor=0.5, ema_decay=0.0, step=0.1, tolerance=0.0)
    rule.update(1.0)
    ratios = [rule.update(1.0 + k) for k in range(1, 16)]
    assert ratios[:5] == pytest.approx([0.66, 0.726, 0.7986, 0.87846, 0.966306])
    assert ratios[5:] == [1.0] * 10
    # A lower ceiling: 0.66, 0.726, then 0.7986 -> 0.75.
    low = AdaptiveRatio(ratio=0.6, floor=0.5, ceiling=0.75, ema_decay=0.0, step=0.1, tolerance=0.0)
    low.update(1.0)
    assert [low.update(1.0 + k) for k in range(1, 6)] == pytest.approx([0.66, 0.726, 0.75, 0.75, 0.75])


def test_adaptive_ratio_starts_within_its_bounds():
    assert AdaptiveRatio(ratio=0.3, floor=0.5).ratio == 0.5
    assert AdaptiveRatio(ratio=1.0, floor=0.2, ceiling=0.8).ratio == 0.8


def test_small_drifts_add_up_against_the_unchanged_anchor():
    # ema = the loss (decay 0). Anchor 1.0, tolerance 0.05 x 1.0 = 0.05. Each update falls by only 0.02, within the
    # tolerance, so the anchor stays at 1.0 and the falls add up: 0.02, 0.04, then 0.06 > 0.05 moves the ratio.
    rule = AdaptiveRatio(ratio=1.0, floor=0.1, ema_decay=0.0, step=0.1, tolerance=0.05)
    rule.update(1.0)
    assert rule.update(0.98) == 1.0 and rule.anchor == 1.0
    assert rule.update(0.96) == 1.0 and rule.anchor == 1.0
    assert rule.update(0.94) == pytest.approx(0.9) and rule.anchor == 0.94
    # The same holds upward: from the new anchor 0.94 (tolerance 0.047), rises of 0.03 add up to 0.06 > 0.047.
    assert rule.update(0.97) == pytest.approx(0.9) and rule.anchor == 0.94
    assert rule.update(1.00) == pytest.approx(0.99) and rule.anchor == 1.0


def test_adaptive_ratio_state_round_trips_and_continues_identically():
    losses = [2.0, 1.7, 1.5, 1.6, 1.2, 1.25, 1.9, 0.7, 0.71, 0.5]
    original = AdaptiveRatio(ratio=1.0, floor=0.2, ema_decay=0.6, step=0.05, tolerance=0.03)
    for loss in losses[:5]:
        original.update(loss)
    state = original.state_dict()
    assert set(state) == {"ratio", "floor", "ceiling", "ema_decay", "step", "tolerance", "ema", "anchor"}
    restored = AdaptiveRatio.from_state_dict(json.loads(json.dumps(state)))  # as the trainer writes it to disk
    assert restored == original
    for loss in losses[5:]:
        assert restored.update(loss) == original.update(loss)
        assert restored == original


def test_a_fresh_state_round_trips_before_any_update():
    rule = AdaptiveRatio(ratio=1.0, floor=0.5)
    restored = AdaptiveRatio.from_state_dict(rule.state_dict())
    assert restored == rule and restored.ema is None and restored.anchor is None


@pytest.mark.parametrize("loss", [float("nan"), float("inf"), float("-inf")])
def test_adaptive_ratio_refuses_a_non_finite_loss(loss):
    rule = AdaptiveRatio(ratio=1.0, floor=0.5)
    rule.update(1.0)
    with pytest.raises(ValueError, match="AdaptiveRatio needs a finite loss"):
        rule.update(loss)
    assert (rule.ratio, rule.ema, rule.anchor) == (1.0, 1.0, 1.0), "a refused loss changes nothing"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"ema_decay": 1.0}, r"`ema_decay` must be a number in \[0, 1\); got 1.0"),
        ({"ema_decay": -0.1}, r"`ema_decay` must be a number in \[0, 1\)"),
        ({"step": 0.0}, r"`step` must be a number in \(0, 1\); got 0.0"),
        ({"step": 1.0}, r"`step` must be a number in \(0, 1\)"),
        ({"tolerance": 1.0}, r"`tolerance` must be a number in \[0, 1\); got 1.0"),
        ({"tolerance": True}, r"`tolerance` must be a number in \[0, 1\)"),
        ({"floor": 0.9, "ceiling": 0.5}, r"`floor`=0.9 must not exceed `ceiling`=0.5"),
        ({"floor": 0.0}, r"`floor` must be a number in \(0, 1\]"),
        ({"ceiling": 1.5}, r"`ceiling` must be a number in \(0, 1\]"),
        ({"ratio": 0.0}, r"`ratio` must be a number in \(0, 1\]"),
    ],
)
def test_adaptive_ratio_refuses_bad_settings_naming_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AdaptiveRatio(**{"ratio": 1.0, "floor": 0.5, **kwargs})


def test_adaptive_ratio_accepts_the_closed_ends():
    # ema_decay 0 (the average is the last loss) and tolerance 0 (any change moves the ratio) are allowed.
    AdaptiveRatio(ratio=1.0, floor=0.5, ema_decay=0.0, tolerance=0.0)


# BetaSchedule: a piecewise-constant beta over training progress.


def test_beta_schedule_parses_text_and_pairs_alike():
    from_text = BetaSchedule.parse("0:0.0,0.5:1.0")
    assert from_text == BetaSchedule.parse([[0, 0.0], [0.5, 1.0]])
    assert from_text == BetaSchedule.parse(" 0 : 0 , 0.5 : 1 ")
    assert (from_text.starts, from_text.betas) == ((0.0, 0.5), (0.0, 1.0))


def test_beta_schedule_holds_each_beta_from_its_start_until_the_next():
    schedule = BetaSchedule.parse("0:0.0,0.5:1.0")
    for progress, beta in [(0.0, 0.0), (0.49, 0.0), (0.5, 1.0), (0.99, 1.0), (1.0, 1.0)]:
        assert schedule(progress) == beta, progress
    three = BetaSchedule.parse("0:0,0.25:0.5,0.75:1")
    assert [three(p) for p in (0.0, 0.2, 0.25, 0.5, 0.75, 0.9)] == [0.0, 0.0, 0.5, 0.5, 1.0, 1.0]
    assert BetaSchedule.parse("0:0.3")(0.7) == 0.3


def test_beta_schedule_text_round_trips():
    assert str(BetaSchedule.parse("0:0.0,0.5:1.0")) == "0:0,0.5:1"
    for text in ("0:0,0.5:1", "0:0.25,0.1:0.5,0.9:1"):
        assert str(BetaSchedule.parse(text)) == text
        assert BetaSchedule.parse(str(BetaSchedule.parse(text))) == BetaSchedule.parse(text)


@pytest.mark.parametrize(
    "value, message",
    [
        ("0.2:0.0,0.6:1.0", "`beta_schedule` must cover the whole run: its first piece starts at progress 0.2, not 0"),
        ([[0.1, 0.0]], "`beta_schedule` must cover the whole run"),
        ("0:0,0.5:1,0.5:0", r"`beta_schedule` progress points must increase strictly within \[0, 1\)"),
        ("0:0,0.6:1,0.4:0", r"`beta_schedule` progress points must increase strictly within \[0, 1\)"),
        ("0:0,1:1", r"`beta_schedule` progress points must increase strictly within \[0, 1\); got \[0.0, 1.0\]"),
        ("0:1.5", r"`beta_schedule` betas must be in \[0, 1\] \(0 forward KL, 1 reverse KL\); got 1.5"),
        ("0:0,0.5:-0.1", r"`beta_schedule` betas must be in \[0, 1\]"),
        ("0:nan", r"`beta_schedule` betas must be in \[0, 1\]"),
        ("fkl then rkl", "`beta_schedule` must be `progress:beta` pairs separated by commas"),
        ("0:0:1", "`beta_schedule` must be `progress:beta` pairs"),
        ("0:x", "`beta_schedule` must be `progress:beta` pairs"),
        ("", "`beta_schedule` must be `progress:beta` pairs"),
        ([], "`beta_schedule` must be `progress:beta` pairs"),
        ([[0, 0.0, 1.0]], "`beta_schedule` must be `progress:beta` pairs"),
        (0.5, "`beta_schedule` must be `progress:beta` pairs"),
    ],
)
def test_beta_schedule_refuses_a_schedule_it_cannot_run_naming_the_field(value, message):
    with pytest.raises(ValueError, match=message) as error:
        BetaSchedule.parse(value)
    assert "beta_schedule" in str(error.value)


# PACED: problem weights from the student's pass rates.


def test_paced_weight_is_p_to_the_a_times_one_minus_p_to_the_b():
    rates = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])
    # a = b = 1: p (1 - p) = 0, 0.1875, 0.25, 0.1875, 0.
    assert paced_weight(rates).tolist() == pytest.approx([0.0, 0.1875, 0.25, 0.1875, 0.0])
    # a = 2, b = 0.5: p^2 sqrt(1 - p) = 0, 0.0625 sqrt(0.75), 0.25 sqrt(0.5), 0.5625 sqrt(0.25), 0.
    expected = [0.0, 0.0625 * math.sqrt(0.75), 0.25 * math.sqrt(0.5), 0.5625 * 0.5, 0.0]
    assert paced_weight(rates, alpha=2.0, beta=0.5).tolist() == pytest.approx(expected)
    # 0^0 is 1: with a = 0 an unsolved problem (p = 0) weighs (1 - 0)^b = 1.
    assert paced_weight(torch.tensor([0.0, 1.0]), alpha=0.0, beta=1.0).tolist() == [1.0, 0.0]


@pytest.mark.parametrize("bad", [-0.1, 1.1, float("nan")])
def test_paced_weight_refuses_rates_outside_the_unit_interval(bad):
    with pytest.raises(ValueError, match=r"Pass rates must be in \[0, 1\]"):
        paced_weight(torch.tensor([0.5, bad]))


def test_paced_weights_rescale_so_the_tokens_keep_their_total_weight():
    pass_rate = torch.tensor([0.5, 0.5, 0.25, 1.0])
    num_tokens = torch.tensor([10, 20, 30, 40])
    # w(p) = 0.25, 0.25, 0.1875, 0; sum w n = 2.5 + 5 + 5.625 + 0 = 13.125; sum n = 100.
    # w_i = w(p_i) * 100 / 13.125: 25 / 13.125 = 40/21 and 18.75 / 13.125 = 10/7.
    weights = paced_weights(pass_rate, num_tokens)
    assert weights.dtype == torch.float32
    assert weights.tolist() == pytest.approx([40 / 21, 40 / 21, 10 / 7, 0.0])
    # 40/21 * 30 + 10/7 * 30 = 400/7 + 300/7 = 100 = sum n.
    assert float((weights.double() * num_tokens).sum()) == pytest.approx(100.0)


def test_paced_weights_with_other_exponents_keep_the_token_total():
    pass_rate = torch.tensor([0.25, 0.75])
    num_tokens = torch.tensor([4, 4])
    # a = 2, b = 1: w = 0.0625 * 0.75 = 0.046875 and 0.5625 * 0.25 = 0.140625, sum w n = 0.75, sum n = 8.
    # w_i = w * 8 / 0.75: 0.5 and 1.5.
    weights = paced_weights(pass_rate, num_tokens, alpha=2.0, beta=1.0)
    assert weights.tolist() == pytest.approx([0.5, 1.5])
    assert float((weights * num_tokens).sum()) == pytest.approx(8.0)


def test_paced_weights_are_zero_when_no_problem_is_left_to_learn():
    # Every problem solved by all its rollouts or by none: nothing to learn from.
    weights = paced_weights(torch.tensor([0.0, 1.0, 1.0, 0.0]), torch.tensor([5, 6, 7, 8]))
    assert weights.dtype == torch.float32 and weights.tolist() == [0.0, 0.0, 0.0, 0.0]
    # Learnable problems but no valid tokens: zeros too, not a division by zero.
    empty = paced_weights(torch.tensor([0.5, 0.5]), torch.tensor([0, 0]))
    assert empty.dtype == torch.float32 and empty.tolist() == [0.0, 0.0]


def test_group_pass_rates_average_the_rollouts_of_each_problem():
    keys = ["a", "a", "b", "b", "c", "c"]
    correct = [1, 0, 1, 1, 0, 0]
    assert group_pass_rates(keys, correct) == [0.5, 0.5, 1.0, 1.0, 0.0, 0.0]


def test_group_pass_rates_do_not_need_a_problems_rollouts_side_by_side():
    keys = ["a", "b", "a", "c", "b", "a"]
    correct = [1.0, 0.0, 0.0, 1.0, 0.0, 1.0]
    # a: (1 + 0 + 1) / 3 = 2/3; b: 0 / 2 = 0; c: 1 / 1 = 1.
    assert group_pass_rates(keys, correct) == pytest.approx([2 / 3, 0.0, 2 / 3, 1.0, 0.0, 2 / 3])


def test_group_pass_rates_refuse_keys_and_grades_of_different_lengths():
    with pytest.raises(ValueError):
        group_pass_rates(["a", "b"], [1.0])


@pytest.mark.parametrize(
    "alpha, beta, field",
    [
        (-1.0, 1.0, "paced_alpha"),
        (1.0, -0.5, "paced_beta"),
        (math.inf, 1.0, "paced_alpha"),
        (1.0, math.inf, "paced_beta"),
        (math.nan, 1.0, "paced_alpha"),
        (True, 1.0, "paced_alpha"),
        (1.0, False, "paced_beta"),
        ("1", 1.0, "paced_alpha"),
    ],
)
def test_paced_exponents_must_be_finite_and_non_negative_naming_the_field(alpha, beta, field):
    with pytest.raises(ValueError, match=rf"^`{field}` must be a finite number >= 0 \(PACED's default: 1.0\)"):
        check_paced_exponents(alpha, beta)


def test_paced_exponents_are_returned_as_floats():
    alpha, beta = check_paced_exponents(2, 0)
    assert (alpha, beta) == (2.0, 0.0) and isinstance(alpha, float) and isinstance(beta, float)


def test_ungraded_rollouts_are_left_out_of_the_pass_rate_and_an_ungraded_problem_weighs_zero():
    nan = math.nan
    rates = group_pass_rates(["a", "a", "a", "b", "b"], [1.0, nan, 0.0, nan, nan])
    assert rates[:3] == [0.5, 0.5, 0.5]  # a: one right of the two graded
    assert math.isnan(rates[3]) and math.isnan(rates[4])  # b: none graded
    # a's rollouts share the weight: w(1/2) = 1/4 each, rescaled so that 3 x w x 2 tokens = 10 tokens.
    weights = paced_weights(torch.tensor(rates), torch.full((5,), 2.0))
    torch.testing.assert_close(weights, torch.tensor([10 / 6, 10 / 6, 10 / 6, 0.0, 0.0]))
