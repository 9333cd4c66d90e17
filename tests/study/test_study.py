"""`trl-tip study`: a quick grid end to end on tiny models, resumption, determinism, the summary's statistics and
the argument checks that must fail before any model is loaded."""

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from tiny_runs import TINY_PAIR_RUN

from trl_tip.cli import main as cli_main
from trl_tip.core.quadrants import QUADRANT_NAMES
from trl_tip.study import StudyArguments, aggregate, mean_se, paired_difference, parse_args, run_study
from trl_tip.study import runner as study_runner
from trl_tip.study.grid import (
    DEFAULT_RULES,
    DEFAULT_SEEDS,
    RULE_OPTIONS,
    STUDY_SELECTORS,
    Rule,
    parse_rule,
    study_rule_options,
)
from trl_tip.study.report import plot_study, summary_markdown
from trl_tip.utils.files import read_jsonl


REPO = Path(__file__).resolve().parents[2]
FIXTURE = REPO / "tests" / "data" / "study_results.jsonl"
# The columns results.jsonl documents for every run.
RESULT_COLUMNS = {
    "run_id",
    "rule",
    "selector",
    "ratio",
    "seed",
    "reverse_kl",
    "forward_kl",
    "accuracy",
    "completion_tokens",
    "tokens_trained",
    "tokens_valid",
    "kept_fraction",
    *(f"kept_share/{q}" for q in QUADRANT_NAMES),
    *(f"valid_share/{q}" for q in QUADRANT_NAMES),
    "losses",
    "train_time_s",
    "eval_time_s",
    "wall_time_s",
    "cpu_time_s",
    "teacher_model",
    "student_model",
    "held_out_problems",
    *StudyArguments().settings(),
}
TIMES = ("train_time_s", "eval_time_s", "wall_time_s", "cpu_time_s")


def quick_settings(tiny_models) -> dict:
    return {"teacher": str(tiny_models / "teacher"), "student_layers": 1, **TINY_PAIR_RUN}


def quick_args(tiny_models, output_dir, rules=("all:1.0", "soft_or:0.5"), seeds=(0,), **changes) -> StudyArguments:
    settings = {**quick_settings(tiny_models), **changes}
    return StudyArguments(rules=list(rules), seeds=list(seeds), output_dir=str(output_dir), **settings)


def without_times(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMES} for row in rows]


@pytest.fixture(scope="module")
def clean_grid(tiny_models, tmp_path_factory):
    """Two rules, one seed, two steps each: run through the command line from a YAML config, uninterrupted."""
    folder = tmp_path_factory.mktemp("study") / "clean"
    config = folder.parent / "quick.yaml"
    config.write_text(
        yaml.safe_dump({"rules": ["all:1.0", "soft_or:0.5"], "seeds": [0], **quick_settings(tiny_models)})
    )
    cli_main(["study", "--config", str(config), "--output-dir", str(folder)])
    return folder


@pytest.mark.slow
def test_quick_grid_writes_results_summary_and_plot(clean_grid, tiny_models):
    rows = read_jsonl(clean_grid / "results.jsonl")
    assert [(r["rule"], r["seed"]) for r in rows] == [("all:1", 0), ("soft_or:0.5", 0)]
    for row in rows:
        assert RESULT_COLUMNS <= set(row), RESULT_COLUMNS - set(row)
        assert 0.0 <= row["accuracy"] <= 1.0 and row["reverse_kl"] > 0 and row["forward_kl"] > 0
        assert len(row["losses"]) == 2 and row["steps"] == 2 and row["eval_problems"] == 4
        assert math.isclose(sum(row[f"kept_share/{q}"] for q in QUADRANT_NAMES), 1.0)
        assert math.isclose(sum(row[f"valid_share/{q}"] for q in QUADRANT_NAMES), 1.0)
    full, half = rows
    assert full["kept_fraction"] == 1.0 and full["tokens_trained"] == full["tokens_valid"]
    assert half["kept_fraction"] == 0.5 and half["tokens_trained"] == half["tokens_valid"] / 2
    assert sorted(p.name for p in (clean_grid / "runs").iterdir()) == ["all-1-seed0.json", "soft_or-0.5-seed0.json"]
    assert not (clean_grid / "models").exists(), "students are not kept by default"

    summary = (clean_grid / "summary.md").read_text()
    assert "| `all:1` | 1 |" in summary and "| `soft_or:0.5` | 1 |" in summary
    assert "2 of 2 runs finished" in summary and "mean ± standard error across seeds" in summary
    assert "Δ vs all" in summary and "| teacher |" in summary and "| student before training |" in summary
    # Models are named, never by a local path: the summary and the model columns are meant to be shared.
    assert (
        str(tiny_models) not in summary
        and "Teacher teacher (local model); student teacher (local model) with" in summary
    )
    assert {r["teacher_model"] for r in rows} == {"teacher (local model)"}
    assert all(r["student_model"].startswith("teacher (local model) with decoder layers") for r in rows)
    png = (clean_grid / "study.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    baselines = json.loads((clean_grid / "baselines.json").read_text())
    assert len(baselines["teacher_rollouts"]["completion_ids"]) == 4
    assert {"accuracy", "reverse_kl", "forward_kl"} <= set(baselines["student_before"])


@pytest.mark.slow
def test_interrupted_grid_resumes_without_retraining_and_matches_a_clean_run(
    clean_grid, tiny_models, tmp_path, monkeypatch
):
    folder = tmp_path / "resumed"
    args = quick_args(tiny_models, folder)
    real = study_runner.train_and_evaluate
    trained = []

    def interrupted_after_one_run(ctx, rule, seed, staging, model_dir):
        if trained:
            raise KeyboardInterrupt("stopped in the middle of the second run")
        trained.append(rule.run_id(seed))
        return real(ctx, rule, seed, staging, model_dir)

    monkeypatch.setattr(study_runner, "train_and_evaluate", interrupted_after_one_run)
    with pytest.raises(KeyboardInterrupt):
        run_study(args)
    assert trained == ["all-1-seed0"]
    assert [p.name for p in (folder / "runs").glob("*.json")] == ["all-1-seed0.json"], "the half run is not counted"
    assert (folder / "runs" / ".soft_or-0.5-seed0.incomplete").is_dir(), "the interrupted run's staging folder"
    # A torn result file (as from a crash of a non-atomic writer) does not count as finished either.
    (folder / "runs" / "soft_or-0.5-seed0.json").write_text('{"run_id": "soft_or-0.5-seed0", ')

    def counting(ctx, rule, seed, staging, model_dir):
        trained.append(rule.run_id(seed))
        return real(ctx, rule, seed, staging, model_dir)

    monkeypatch.setattr(study_runner, "train_and_evaluate", counting)
    run_study(args)
    assert trained == ["all-1-seed0", "soft_or-0.5-seed0"], "the finished run was not trained again"
    assert not [p for p in (folder / "runs").iterdir() if p.name.startswith(".")], "no staging folder is left"

    # Determinism on CPU: the same seed gives identical metrics, whatever ran before it in the process.
    resumed, clean = read_jsonl(folder / "results.jsonl"), read_jsonl(clean_grid / "results.jsonl")
    assert without_times(resumed) == without_times(clean)
    assert (folder / "summary.md").is_file() and (folder / "study.png").is_file()

    # Everything finished: a third call trains nothing.
    run_study(args)
    assert len(trained) == 2


def test_summary_mean_and_standard_error_match_a_hand_computation(tmp_path):
    rows = read_jsonl(FIXTURE)
    stats = aggregate(rows)
    assert list(stats) == ["all:1", "soft_or:0.5", "q3:0.1"]
    # all: reverse KL 0.50, 0.40, 0.45 -> mean 0.45, sd 0.05, s.e. 0.05 / sqrt(3).
    assert stats["all:1"]["reverse_kl"] == pytest.approx((0.45, 0.05 / math.sqrt(3)))
    assert stats["soft_or:0.5"]["reverse_kl"] == pytest.approx((0.41, 0.03 / math.sqrt(3)))
    # q3 ran seeds 0 and 2 only: 0.60, 0.50 -> mean 0.55, sd 0.0707, s.e. 0.05.
    assert stats["q3:0.1"]["reverse_kl"] == pytest.approx((0.55, 0.05))
    # Paired by seed: soft_or - all = -0.06, -0.02, -0.04 -> mean -0.04, sd 0.02, s.e. 0.02 / sqrt(3).
    assert paired_difference(rows, "soft_or:0.5", "reverse_kl") == pytest.approx((-0.04, 0.02 / math.sqrt(3), 3))
    # q3 pairs with all on seeds 0 and 2: 0.10, 0.05 -> mean 0.075, s.e. 0.025.
    assert paired_difference(rows, "q3:0.1", "reverse_kl") == pytest.approx((0.075, 0.025, 2))
    assert paired_difference(rows, "soft_or:0.5", "forward_kl") == pytest.approx((-0.05, 0.0, 3))
    assert mean_se([3.0]) == (3.0, None)

    summary = summary_markdown(rows, None, grid_size=9)
    assert "8 of 9 runs finished" in summary
    main_table = summary.split("## Shared baselines")[0].split("## Kept tokens")[0]
    lines = {line.split(" | ")[0]: line for line in main_table.splitlines() if line.startswith("| `")}
    all_row, soft_or_row, q3_row = lines["| `all:1`"], lines["| `soft_or:0.5`"], lines["| `q3:0.1`"]
    # reverse KL, forward KL, accuracy (s.e. 0.05 / sqrt(3) = 2.9 points), tokens, wall time (2, 3, 2.5 min).
    assert "| 3 | 0.4500 ± 0.0289 | – | 0.9000 ± 0.0577 | – | 15.0% ± 2.9% | – |" in all_row
    assert "| 100.0% ± 0.0% | 1000 ± 58 | 2.5 ± 0.3 |" in all_row
    assert "| 3 | 0.4100 ± 0.0173 | -0.0400 ± 0.0115 | 0.8500 ± 0.0577 | -0.0500 ± 0.0000 |" in soft_or_row
    assert "| 20.0% ± 0.0% | +5.0 ± 2.9 |" in soft_or_row
    assert "| 2 | 0.5500 ± 0.0500 | +0.0750 ± 0.0250 |" in q3_row
    assert "| `q3:0.1` | 10.0% | 0.0% | 80.0% | 10.0% | 25.0% |" in summary

    one_seed = summary_markdown([r for r in rows if r["seed"] == 0], None).split("## Kept tokens")[0]
    assert "| `all:1` | 1 | 0.5000 | – |" in one_seed, "no ± with a single seed"
    assert "| `soft_or:0.5` | 1 | 0.4400 | -0.0600 |" in one_seed
    png = Path(
        plot_study(rows, {"teacher": {"accuracy": 0.3}, "student_before": {"accuracy": 0.02}}, tmp_path / "s.png")
    )
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not list(tmp_path.glob("*.incomplete"))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--rules", "all:1.0", "magic:0.5"], "unknown rule 'magic'.*soft_or_bottom"),
        (["--rules", "soft_or:1.5"], r"--rules: the ratio in 'soft_or:1.5' must be in \(0, 1\]"),
        (["--rules", "soft_or:0"], r"must be in \(0, 1\]"),
        (["--rules", "soft_or:half"], "is not a number"),
        (["--rules", "soft_or"], "needs a ratio"),
        (["--rules", "all:0.5"], "its ratio is 1.0"),
        (["--rules", "quadrant:0.5"], "not a study rule"),
        (["--rules", "q3:0.1", "q3:0.10"], "lists a rule twice"),
        (["--seeds", "0", "0"], "lists a seed twice"),
        (["--steps", "0"], "--steps must be a positive integer"),
        (["--batch-size", "6", "--num-rollouts-per-prompt", "4"], "must divide --batch-size"),
    ],
)
def test_bad_grid_fails_before_any_model_is_loaded(argv, message, tmp_path, monkeypatch, capsys):
    import trl_tip.pair.loading as pair_loading

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(pair_loading, "load_models", no_loading)
    out = tmp_path / "study"
    with pytest.raises(ValueError, match=message):
        parse_args([*argv, "--output-dir", str(out)])
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["study", *argv, "--output-dir", str(out)])
    assert str(exit_info.value.code).startswith("trl-tip study: ")
    assert not out.exists(), "nothing is written for a bad grid"


def test_empty_or_malformed_grid_names_the_option(tmp_path, monkeypatch, capsys):
    import trl_tip.pair.loading as pair_loading

    monkeypatch.setattr(pair_loading, "load_models", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(ValueError, match="--rules is empty"):
        StudyArguments(rules=[])
    with pytest.raises(ValueError, match="--seeds is empty"):
        StudyArguments(seeds=[])
    with pytest.raises(ValueError, match="--seeds must be non-negative integers.*'x' is not one"):
        StudyArguments(seeds="0,x")
    with pytest.raises(ValueError, match="--seeds must be non-negative integers"):
        StudyArguments(seeds=[-1])
    assert StudyArguments(seeds="0, 1 2").seeds == [0, 1, 2]
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({"rules": [], "seeds": [0]}))
    with pytest.raises(ValueError, match="--rules is empty"):
        parse_args(["--config", str(config)])
    config.write_text(yaml.safe_dump({"seeds": ["zero"]}))
    with pytest.raises(ValueError, match="--seeds must be non-negative integers"):
        parse_args(["--config", str(config)])
    # On the command line argparse itself rejects what does not parse, naming the option.
    with pytest.raises(SystemExit):
        cli_main(["study", "--seeds", "a", "--output-dir", str(tmp_path / "o")])
    assert "argument --seeds: invalid int value: 'a'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["study", "--rules", "--output-dir", str(tmp_path / "o")])
    assert "argument --rules" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# Rule options: a rule may set schedule and weighting fields of `TIPConfig` after its ratio.


def test_a_rule_with_an_option_parses_labels_and_names_its_runs():
    rule = parse_rule("soft_or:0.5+selection_ratio_schedule=adaptive")
    assert rule == Rule(name="soft_or", ratio=0.5, options=(("selection_ratio_schedule", "adaptive"),))
    assert rule.label == "soft_or:0.5+selection_ratio_schedule=adaptive"
    assert parse_rule(rule.label) == rule
    run_id = rule.run_id(1)
    assert run_id == "soft_or-0.5_selection_ratio_schedule_adaptive-seed1"
    assert re.fullmatch(r"[A-Za-z0-9_.-]+", run_id), "file-name safe"
    assert run_id != parse_rule("soft_or:0.5").run_id(1) == "soft_or-0.5-seed1"
    two = parse_rule("soft_or:0.5+beta_schedule=0:0,0.5:1+paced_alpha=2")
    assert two.options == (("beta_schedule", "0:0,0.5:1"), ("paced_alpha", "2"))
    assert parse_rule(two.label) == two
    assert re.fullmatch(r"[A-Za-z0-9_.-]+", two.run_id(0))


def test_rule_options_become_config_keyword_arguments_with_numbers_as_floats():
    rule = parse_rule("random:0.5+selection_ratio_start=0.9+paced_alpha=2+problem_weighting=paced")
    options = rule.config_options()
    assert options == {"selection_ratio_start": 0.9, "paced_alpha": 2.0, "problem_weighting": "paced"}
    assert isinstance(options["paced_alpha"], float)
    assert parse_rule("soft_or:0.5").config_options() == {}


@pytest.mark.parametrize(
    "text, message",
    [
        ("soft_or:0.5+learning_rate=1e-4", r"--rules: unknown option 'learning_rate' in .*; a rule may set "),
        (
            "soft_or:0.5+selection_ratio_schedule",
            r"--rules: .* must be `option=value`, e\.g\. \+problem_weighting=paced",
        ),
        ("soft_or:0.5+selection_ratio_schedule=", "must be `option=value`"),
        ("soft_or:0.5+paced_alpha=1+paced_alpha=2", r"--rules: 'soft_or:0.5\+paced_alpha=1\+paced_alpha=2' sets an "),
    ],
)
def test_malformed_rule_options_are_refused_naming_rules(text, message):
    with pytest.raises(ValueError, match=message) as error:
        parse_rule(text)
    if "unknown option" in message:
        for option in RULE_OPTIONS:
            assert option in str(error.value)


def test_rule_options_are_checked_against_the_grids_knobs_before_any_run(tmp_path, monkeypatch):
    import trl_tip.pair.loading as pair_loading

    monkeypatch.setattr(pair_loading, "load_models", lambda *a, **k: pytest.fail("a model was loaded"))
    out = tmp_path / "study"
    # PACED grades a problem by the share of its rollouts that are right: one rollout per prompt cannot.
    with pytest.raises(ValueError) as error:
        StudyArguments(rules=["all:1.0+problem_weighting=paced"], output_dir=str(out))
    message = str(error.value)
    assert message.startswith("--rules: 'all:1+problem_weighting=paced': ")
    assert "`num_rollouts_per_prompt` >= 2" in message
    # A bad option value fails the same way, naming the field.
    named = r"--rules: 'soft_or:0.5\+selection_ratio_schedule=exponential': `selection_ratio_schedule` must be one of"
    with pytest.raises(ValueError, match=named):
        parse_args(["--rules", "soft_or:0.5+selection_ratio_schedule=exponential", "--output-dir", str(out)])
    with pytest.raises(ValueError, match=r"`selection_ratio_start`=0.3 is below `selection_ratio`=0.5"):
        StudyArguments(rules=["soft_or:0.5+selection_ratio_schedule=linear+selection_ratio_start=0.3"])
    assert not out.exists(), "nothing is written for a bad grid"
    args = StudyArguments(
        rules=["all:1.0+problem_weighting=paced"], num_rollouts_per_prompt=4, batch_size=8, output_dir=str(out)
    )
    assert args.rules == ["all:1+problem_weighting=paced"]
    assert [rule.options for rule, _ in args.grid] == [(("problem_weighting", "paced"),)] * len(DEFAULT_SEEDS)
    assert not out.exists(), "checking the options writes nothing"


def test_a_folder_with_other_settings_is_refused_before_loading(tiny_models, tmp_path, monkeypatch):
    import trl_tip.pair.loading as pair_loading

    folder = tmp_path / "study"
    folder.mkdir()
    args = quick_args(tiny_models, folder)
    (folder / "study.json").write_text(json.dumps({"settings": {**args.settings(), "steps": 99}}))

    class Loading(Exception):
        pass

    def loading(*args, **kwargs):
        raise Loading

    # Nothing was computed under the old settings (say a first attempt named a wrong model): the new ones apply.
    monkeypatch.setattr(pair_loading, "load_models", loading)
    with pytest.raises(Loading):
        run_study(args)
    assert json.loads((folder / "study.json").read_text())["settings"]["steps"] == 2
    # Once something was computed, other settings are refused before any model loads.
    (folder / "baselines.json").write_text("{}")
    monkeypatch.setattr(pair_loading, "load_models", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(ValueError, match="holds a study with other settings.*steps: 2 there, 3 now"):
        run_study(quick_args(tiny_models, folder, steps=3))


def test_default_grid_yaml_flags_and_help(capsys):
    defaults = StudyArguments()
    assert defaults.rules == [
        "all:1",
        "soft_or:0.5",
        "soft_or_bottom:0.5",
        "entropy_sampling:0.5",
        "q3:0.1",
        "random:0.5",
    ]
    assert defaults.seeds == list(DEFAULT_SEEDS) == [0, 1, 2] and len(defaults.grid) == 18
    assert parse_args(["--config", str(REPO / "recipes" / "study" / "default.yaml")]) == defaults
    args = parse_args(["--config", str(REPO / "recipes" / "study" / "default.yaml"), "--seeds", "4", "--steps", "3"])
    assert (args.seeds, args.steps, args.rules) == ([4], 3, defaults.rules)
    assert parse_args(["--output_dir", "a", "--learning-rate", "1e-4"]).output_dir == "a"
    assert parse_args(["--output-dir", "b"]).output_dir == "b"
    assert set(STUDY_SELECTORS) == {
        "all",
        "random",
        "entropy_topk",
        "entropy_sampling",
        "divergence_topk",
        "soft_or",
        "soft_or_bottom",
        "q3",
    }
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["study", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for needle in ("--rules", "--seeds", "name:ratio", "--config", "--keep-models", *DEFAULT_RULES[1:]):
        assert needle in text, needle
    cli_main(["--help"])
    assert "study" in capsys.readouterr().out


def test_keep_models_saves_each_student(tiny_models, tmp_path):
    from trl_tip.models import load_causal_lm

    args = quick_args(tiny_models, tmp_path / "kept", rules=("random:0.5",))
    args.keep_models = True
    run_study(args)
    model, _ = load_causal_lm(str(tmp_path / "kept" / "models" / "random-0.5-seed0"))
    assert model.config.num_hidden_layers == 1
    shutil.rmtree(tmp_path / "kept")


def test_held_out_kls_match_a_float64_reference_and_cached_teacher_states_change_nothing(tiny_models):
    from trl_tip.models import load_causal_lm
    from trl_tip.pair.scoring import completion_states, greedy_rollouts, token_kls

    teacher, tokenizer = load_causal_lm(str(tiny_models / "teacher"))
    student, _ = load_causal_lm(str(tiny_models / "student"))
    prompts = [[{"role": "user", "content": f"What is {i} plus {i + 2}?"}] for i in range(5)]
    rollouts = greedy_rollouts(teacher, tokenizer, prompts, 6, batch_size=2)
    kls = token_kls(student, teacher, tokenizer, rollouts, batch_size=2)
    # Reference: each rollout alone (no padding, no batching), full logits in float64.
    reverse = forward = count = 0.0
    with torch.no_grad():
        for p, c in zip(rollouts.prompt_ids, rollouts.completion_ids):
            ids = torch.cat([p, c])[None]
            span = slice(len(p) - 1, len(p) - 1 + len(c))
            log_s = student(ids).logits[0, span].double().log_softmax(-1)
            log_t = teacher(ids).logits[0, span].double().log_softmax(-1)
            reverse += float((log_s.exp() * (log_s - log_t)).sum())
            forward += float((log_t.exp() * (log_t - log_s)).sum())
            count += len(c)
    assert kls["reverse_kl"] == pytest.approx(reverse / count, rel=1e-4)
    assert kls["forward_kl"] == pytest.approx(forward / count, rel=1e-4) and kls["forward_kl"] > 0
    states = completion_states(teacher, tokenizer, rollouts, batch_size=2)
    assert [len(s) for s in states] == [len(c) for c in rollouts.completion_ids]
    assert token_kls(student, teacher, tokenizer, rollouts, batch_size=2, teacher_states=states) == kls
    same = token_kls(teacher, teacher, tokenizer, rollouts, batch_size=2, teacher_states=states)
    assert same["reverse_kl"] == pytest.approx(0.0, abs=1e-6) and same["forward_kl"] == pytest.approx(0.0, abs=1e-6)


def test_paced_in_the_study_reads_answers_as_numbers_unless_the_rule_says_otherwise():
    assert study_rule_options(parse_rule("all:1.0+problem_weighting=paced"))["paced_answer_format"] == "number"
    boxed = parse_rule("all:1.0+problem_weighting=paced+paced_answer_format=boxed")
    assert study_rule_options(boxed)["paced_answer_format"] == "boxed"
    assert "paced_answer_format" not in study_rule_options(parse_rule("soft_or:0.5+selection_ratio_schedule=linear"))


def test_a_self_teacher_rule_trains_against_the_student_told_the_answer(tiny_models, tmp_path, monkeypatch):
    from trl_tip.trainer import tip_trainer

    rule = parse_rule("soft_or:0.5+teacher_model_kind=live")
    assert rule.label == "soft_or:0.5+teacher_model_kind=live"
    options = study_rule_options(rule)
    assert options["teacher_prompt_template"] == "{prompt}\n\nThe correct final answer is {answer}."
    built = []
    original_init = tip_trainer.TIPGKDTrainer.__init__

    def recording_init(self, *args, **kwargs):
        built.append(kwargs.get("teacher_model"))
        original_init(self, *args, **kwargs)

    monkeypatch.setattr(tip_trainer.TIPGKDTrainer, "__init__", recording_init)
    run_study(quick_args(tiny_models, tmp_path / "self", rules=("soft_or:0.5+teacher_model_kind=live",)))
    assert built == [None], "no separate teacher: the student is its own"
    (row,) = read_jsonl(tmp_path / "self" / "results.jsonl")
    assert row["rule"] == "soft_or:0.5+teacher_model_kind=live" and len(row["losses"]) == 2
    # Evaluated like every rule, against the grid's teacher.
    assert row["reverse_kl"] > 0 and row["forward_kl"] > 0
    with pytest.raises(ValueError, match="`teacher_model_kind` must be one of 'base', 'live', 'ema'"):
        quick_args(tiny_models, tmp_path / "bad", rules=("soft_or:0.5+teacher_model_kind=self",))
