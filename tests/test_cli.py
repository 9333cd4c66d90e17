"""`trl-tip` command-line conventions: every command parses with transformers' `HfArgumentParser`, so each option is
spelled `--a_b` (as for `trl-tip train` and TRL's commands) or `--a-b`; bad values get argparse's error naming the
option; `trl-tip --version` names the versions. Parse only: nothing here loads a model or runs a command."""

from importlib.metadata import version

import pytest

from trl_tip.cli import main as cli_main
from trl_tip.cli import parse_tiny_models_args
from trl_tip.demo.command import DemoArguments
from trl_tip.demo.command import parse_args as parse_demo
from trl_tip.eval.harness import parse_args as parse_eval
from trl_tip.hub.push import parse_args as parse_push
from trl_tip.study import parse_args as parse_study


# Each command's parser and the arguments it needs besides the one under test.
PARSERS = {
    "demo": (parse_demo, []),
    "eval": (parse_eval, ["--model", "smollm2"]),
    "push": (parse_push, ["--model_id", "me/student"]),
    "study": (parse_study, []),
    "tiny-models": (parse_tiny_models_args, []),
}


@pytest.mark.parametrize("command", list(PARSERS))
@pytest.mark.parametrize("flag", ["--output_dir", "--output-dir"])
def test_every_command_takes_output_dir_in_both_spellings(command, flag):
    parse, required = PARSERS[command]
    assert parse([*required, flag, "runs/x"]).output_dir == "runs/x"


@pytest.mark.parametrize(
    "command, underscored, dashed, value, attribute",
    [
        ("demo", "--student_layers", "--student-layers", "24", 24),
        ("eval", "--max_new_tokens", "--max-new-tokens", "64", 64),
        ("eval", "--max_batch_tokens", "--max-batch-tokens", "100000", 100000),
        ("push", "--retry_wait", "--retry-wait", "0.5", 0.5),
        ("study", "--eval_batch_size", "--eval-batch-size", "12", 12),
        ("tiny-models", "--num_prompts", "--num-prompts", "8", 8),
    ],
)
def test_multi_word_options_parse_the_same_in_both_spellings(command, underscored, dashed, value, attribute):
    parse, required = PARSERS[command]
    required = [*required, "--output_dir", "runs/x"]
    name = underscored.removeprefix("--")
    assert getattr(parse([*required, underscored, value]), name) == attribute
    assert getattr(parse([*required, dashed, value]), name) == attribute


def test_documented_spellings_keep_working():
    # The README's forms: the push run folder first with dashed flags, the study's YAML config, demo's bare flags.
    args = parse_push(["outputs/my-run", "--model-id", "my-student", "--stats-id", "my-stats", "--private"])
    assert (args.output_dir, args.model_id, args.stats_id, args.private) == (
        "outputs/my-run",
        "my-student",
        "my-stats",
        True,
    )
    assert parse_study(["--config", "recipes/study/default.yaml"]).output_dir == "outputs/study"
    demo = parse_demo(["--selector", "q3", "--ratio", "0.2", "--overwrite"])
    assert (demo.selector, demo.ratio, demo.overwrite) == ("q3", 0.2, True)
    assert parse_demo([]) == DemoArguments(), "every default is the dataclass's"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["demo", "--steps", "many"], "argument --steps: invalid int value: 'many'"),
        (["demo", "--selector", "best"], "argument --selector: invalid choice: 'best'"),
        (["eval", "--model", "m", "--k", "many"], "argument --k: invalid int value: 'many'"),
        (["push", "run", "--model-id", "m", "--retries", "many"], "argument --retries: invalid int value: 'many'"),
        (["push", "--model-id", "m"], "the run folder is required"),
        (["push", "run", "--output_dir", "other", "--model-id", "m"], "the run folder is given twice"),
        (["study", "--learning_rate", "fast"], "argument --learning_rate/--learning-rate: invalid float value"),
        (["tiny-models", "--num-prompts", "x"], "argument --num_prompts/--num-prompts: invalid int value: 'x'"),
    ],
)
def test_bad_values_get_argparses_error_naming_the_option(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(argv)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert f"trl-tip {argv[0]}: error: {message}" in error and error.startswith("usage: trl-tip")


def test_version_names_trl_tip_and_the_libraries_it_builds_on(capsys):
    cli_main(["--version"])
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"{name} {version(name)}" for name in ("trl-tip", "trl", "transformers", "torch")]
    assert lines[0] == f"trl-tip {version('trl-tip')}"
