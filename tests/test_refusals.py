"""What trl-tip refuses, and when (issue 24): a used output folder, too little data, bad rows, bad options and a
reward function's bad values are refused before any model loads (or, for the output folder through the API, before
training starts), naming the field, file, row and column; a command prints `trl-tip <command>: <message>` and exits
with status 2. One test per pattern at least; every model here is tiny."""

import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import trl
from datasets import Dataset
from huggingface_hub.utils import filter_repo_objects

from trl_tip import TIPConfig, TIPGKDTrainer
from trl_tip.cli import main as cli_main
from trl_tip.data import load_prompt_dataset
from trl_tip.demo.command import DemoArguments, run_demo
from trl_tip.demo.command import parse_args as parse_demo
from trl_tip.eval.harness import load_benchmark
from trl_tip.hub.push import IGNORED_IN_MODEL_REPO, render_stats_card
from trl_tip.hub.push import parse_args as parse_push
from trl_tip.study import StudyArguments, StudyFolderError, run_study
from trl_tip.study.runner import cached_baselines, model_fingerprint
from trl_tip.testing import tiny_causal_lm, tiny_math_dataset, tiny_tokenizer
from trl_tip.trainer.problem_weighting import checked_rewards
from trl_tip.utils.command_errors import UsageExit


ROOT = Path(__file__).resolve().parents[1]
TINY_RECIPE = ROOT / "recipes" / "tiny_cpu.yaml"
CPU = {
    "per_device_train_batch_size": 2,
    "max_completion_length": 8,
    "report_to": "none",
    "bf16": False,
    "use_cpu": True,
    "save_strategy": "no",
    "max_steps": 1,
    "logging_steps": 1,
}
# What an earlier run left in a folder: a checkpoint, a stale weight shard, its card and statistics.
OLD_RUN = {
    "checkpoint-3/trainer_state.json": "{}",
    "model-00001-of-00002.safetensors": "old weights",
    "README.md": "---\nlicense: mit\n---\n# the old run\n",
    "tip_card.json": "{}",
    "tip_stats/tracker.json": "{}",
    "config.json": "{}",
}


@pytest.fixture
def no_model_loads(monkeypatch):
    """Fails a test as soon as a model would load: TRL's trainer (which loads them) or the embedded pair."""

    def loaded(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was refused")

    import trl_tip.demo.command as demo_command
    import trl_tip.pair.loading as pair_loading

    monkeypatch.setattr(trl.DistillationTrainer, "__init__", loaded)
    monkeypatch.setattr(pair_loading, "load_models", loaded)
    monkeypatch.setattr(demo_command, "load_models", loaded)


def write_files(folder: Path, files: dict) -> Path:
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return folder


def digest(folder: Path) -> dict:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in folder.rglob("*")
        if p.is_file()
    }


def trainer(output_dir, dataset, teacher=True, reward_func=None, eval_dataset=None, **fields):
    tokenizer = tiny_tokenizer()
    return TIPGKDTrainer(
        model=tiny_causal_lm(tokenizer, seed=0),
        teacher_model=tiny_causal_lm(tokenizer, hidden_size=128, seed=1) if teacher else None,
        args=TIPConfig(output_dir=str(output_dir), **{**CPU, **fields}),
        train_dataset=dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        reward_func=reward_func,
    )


def train_argv(models: Path, output_dir: Path, dataset: str | None = None) -> list[str]:
    return [
        "train",
        "--config",
        str(TINY_RECIPE),
        "--model_name_or_path",
        str(models / "student"),
        "--teacher_model_name_or_path",
        str(models / "teacher"),
        "--dataset_name",
        dataset or str(models / "prompts.jsonl"),
        "--output_dir",
        str(output_dir),
    ]


# ---------------------------------------------------------------------------------------------------------------------
# 1. A used folder is trusted.


def test_a_folder_holding_a_run_is_refused_untouched_or_cleared_with_overwrite(tmp_path):
    used = write_files(tmp_path / "used", {**OLD_RUN, "notes.txt": "mine"})
    before = digest(used)
    with pytest.raises(ValueError, match=r"`output_dir` '.*used' already holds a run \(README.md, checkpoint-3"):
        trainer(used, tiny_math_dataset(4)).train()
    assert digest(used) == before, "a refused run writes nothing"

    run = trainer(used, tiny_math_dataset(4), overwrite_output_dir=True)
    run.train()
    run.save_model()
    names = {p.name for p in used.iterdir()}
    assert not {"checkpoint-3", "model-00001-of-00002.safetensors"} & names, "nothing of the old run is left"
    assert "notes.txt" in names, "files that are no run's are kept"
    # Saved without a checkpoint, the run still has its card (what `trl-tip push` publishes) and its statistics.
    card = (used / "README.md").read_text()
    assert "the old run" not in card and "trl-tip" in card and (used / "tip_card.json").read_text() != "{}"
    tracker = json.loads((used / "tip_stats" / "tracker.json").read_text())
    assert tracker != {}
    # The statistics dataset's card claims no licence when the run states none, else the run's.
    from huggingface_hub import DatasetCardData

    from trl_tip.core.quadrants import QuadrantTracker

    stats = QuadrantTracker.load(str(used / "tip_stats"))
    card_text = render_stats_card(DatasetCardData(), stats, "me/stats", "me/model", None, {})
    assert "license" not in card_text.split("---")[1]
    assert "license: mit" in render_stats_card(DatasetCardData(), stats, "me/s", "me/m", None, {"license": "mit"})


def test_train_command_and_config_refuse_a_used_folder_before_any_model_loads(tiny_models, tmp_path, no_model_loads):
    used = write_files(tmp_path / "used", OLD_RUN)
    with pytest.raises(UsageExit) as refused:
        cli_main(train_argv(tiny_models, used))
    assert str(refused.value.code).startswith("trl-tip train: `output_dir` ")
    assert "--overwrite_output_dir" in str(refused.value.code) and "resume_from_checkpoint" in str(refused.value.code)
    study = write_files(tmp_path / "study", {"study.json": "{}"})
    with pytest.raises(UsageExit, match="is a `trl-tip study` folder"):
        cli_main(train_argv(tiny_models, study))
    with pytest.raises(ValueError, match="`resume_from_checkpoint`=.* is set in the TIPConfig, but `train\\(\\)`"):
        from trl_tip.trainer.run_folder import claim_output_dir

        class Stub:
            args = TIPConfig(output_dir=str(tmp_path / "new"), resume_from_checkpoint="ckpt", **CPU)

        claim_output_dir(Stub(), None)


def test_study_and_demo_refuse_a_training_runs_folder(tiny_models, tmp_path, no_model_loads):
    run = write_files(tmp_path / "run", OLD_RUN)
    with pytest.raises(ValueError, match="--output-dir '.*run' holds a training run .*trl-tip push"):
        run_study(StudyArguments(teacher=str(tiny_models / "teacher"), output_dir=str(run)))
    with pytest.raises(ValueError, match="--output-dir '.*run' holds a training run"):
        run_demo(DemoArguments(teacher=str(tiny_models / "teacher"), output_dir=str(run)))
    assert not (run / ".lock").exists() and not (run / "study.json").exists()


def test_study_baselines_are_keyed_by_the_models_content(tmp_path):
    tokenizer = tiny_tokenizer()
    same = model_fingerprint(tiny_causal_lm(tokenizer, seed=0), tokenizer)
    assert same == model_fingerprint(tiny_causal_lm(tokenizer, seed=0), tokenizer), "content, not object or path"
    other = model_fingerprint(tiny_causal_lm(tokenizer, seed=1), tokenizer)
    assert other != same
    baselines = {"models": {"teacher": same, "student": same}, "teacher_rollouts": {}}
    assert cached_baselines(tmp_path, dict(baselines), {"teacher": same, "student": same}) is not None
    changed = {"teacher": other, "student": same}
    assert cached_baselines(tmp_path, dict(baselines), changed) is None, "recomputed when no run used them"
    run = {"result_version": 1, "run_id": "all-1-seed0"}
    write_files(tmp_path, {"runs/all-1-seed0.json": json.dumps(run)})
    with pytest.raises(StudyFolderError, match="The teacher weights differ from those the 1 finished runs"):
        cached_baselines(tmp_path, dict(baselines), changed)


def test_push_uploads_no_lock_or_staging_files_and_reads_the_folder_after_private():
    files = ["config.json", ".lock", "runs/.lock", "runs/.all-1-seed0.incomplete/model/config.json", "a.incomplete"]
    assert list(filter_repo_objects(files, ignore_patterns=IGNORED_IN_MODEL_REPO)) == ["config.json"]
    args = parse_push(["--private", "outputs/run", "--model-id", "me/student"])
    assert (args.private, args.output_dir) == (True, "outputs/run")
    assert parse_push(["outputs/run", "--private", "false", "--model-id", "m"]).private is False


# ---------------------------------------------------------------------------------------------------------------------
# 2. Too little data is never an error.


@pytest.mark.parametrize(
    "dataset, fields, message",
    [
        (tiny_math_dataset(1), {}, "has 1 row, fewer than the 2 distinct prompts one optimizer step needs"),
        (Dataset.from_list([]), {}, "has 0 rows, fewer than the 2 distinct prompts"),
        (
            tiny_math_dataset(3),
            {"gradient_accumulation_steps": 2},
            r"has 3 rows, fewer than the 4 .*\(per_device_train_batch_size=2 x gradient_accumulation_steps=2\)",
        ),
    ],
)
def test_too_few_rows_for_one_step_are_refused_at_construction(tmp_path, no_model_loads, dataset, fields, message):
    with pytest.raises(ValueError, match=f"`train_dataset` {message}"):
        trainer(tmp_path, dataset, **fields)


def test_empty_malformed_or_too_small_files_name_the_file(tiny_models, tmp_path, no_model_loads):
    empty, bad, small = tmp_path / "empty.jsonl", tmp_path / "bad.jsonl", tmp_path / "small.jsonl"
    empty.write_text("\n")
    bad.write_text('{"prompt": "a"}\n{"prompt": \n')
    small.write_text("".join(json.dumps({"question": f"{i} + 1?", "answer": str(i + 1)}) + "\n" for i in range(3)))
    with pytest.raises(ValueError, match=r"'.*empty.jsonl' is empty: it holds no rows"):
        load_prompt_dataset(str(empty))
    with pytest.raises(ValueError, match=r"'.*bad.jsonl' line 2 is not valid JSON"):
        load_prompt_dataset(str(bad))
    with pytest.raises(UsageExit) as refused:
        cli_main(train_argv(tiny_models, tmp_path / "out", str(small)))
    assert str(refused.value.code).startswith(f"trl-tip train: `dataset_name` '{small}' (split `train`) has 3 rows")
    assert "fewer than the 4 distinct prompts" in str(refused.value.code)
    demo = DemoArguments(teacher=str(tiny_models / "teacher"), dataset=str(small), eval_problems=2, batch_size=2)
    with pytest.raises(ValueError, match=r"--dataset '.*small.jsonl' leaves 1 training rows .* needs 2"):
        run_demo(demo)
    study = StudyArguments(dataset=str(small), eval_problems=2, batch_size=2, output_dir=str(tmp_path / "study"))
    with pytest.raises(ValueError, match="leaves 1 training rows"):
        run_study(study)
    assert not (tmp_path / "study").exists(), "nothing is written for a dataset that cannot train"
    for steps in ("0", "-1"):
        with pytest.raises(ValueError, match=f"--steps must be a positive integer; got {steps}"):
            parse_demo(["--steps", steps])


# ---------------------------------------------------------------------------------------------------------------------
# 3. Rows checked late or not at all.


def with_row(dataset, index, **values):
    return dataset.map(lambda row, i: values if i == index else {}, with_indices=True)


@pytest.mark.parametrize(
    "case, message",
    [
        ("no prompt column", r"`train_dataset` has no `prompt` column \(columns: \['question'\]\)"),
        ("null prompt", r"`train_dataset` row 3 \(0-based\), column `prompt`: the value is null"),
        ("empty prompt", r"row 1 \(0-based\), column `prompt`: the value is empty"),
        ("no messages", r"row 0 \(0-based\), column `prompt`: the value is a conversation with no messages"),
        ("null context", r"row 3 \(0-based\), column `privileged_context`: the value is null"),
        ("null answer", r"row 2 \(0-based\), column `answer`: the value is null\. PACED grades"),
        ("null eval prompt", r"`eval_dataset` row 0 \(0-based\), column `prompt`: the value is null"),
    ],
)
def test_columns_and_rows_are_checked_at_construction(tmp_path, no_model_loads, case, message):
    data, fields, teacher, eval_dataset = tiny_math_dataset(4), {}, True, None
    if case == "no prompt column":
        data = Dataset.from_list([{"question": "1 + 1?"}] * 4)
    elif case == "null prompt":
        data = Dataset.from_list([{"prompt": "1 + 1?"}] * 3 + [{"prompt": None}])
    elif case == "empty prompt":
        data = Dataset.from_list([{"prompt": "1 + 1?"}, {"prompt": "  "}])
    elif case == "no messages":
        data = Dataset.from_list([{"prompt": []}, {"prompt": [{"role": "user", "content": "1 + 1?"}]}])
    elif case == "null context":
        data = with_row(data.map(lambda row: {"privileged_context": "2"}), 3, privileged_context=None)
        teacher = False
        fields = {"teacher_model_kind": "live", "teacher_prompt_template": "{prompt}\n{privileged_context}"}
    elif case == "null answer":
        data = tiny_math_dataset(4, with_answers=True).map(lambda row: {"answer": str(row["answer"])})
        data = with_row(data, 2, answer=None)
        fields = {"problem_weighting": "paced", "num_rollouts_per_prompt": 2}
    elif case == "null eval prompt":
        eval_dataset = Dataset.from_list([{"prompt": None}])
    with pytest.raises(ValueError, match=message):
        trainer(tmp_path, data, teacher=teacher, eval_dataset=eval_dataset, **fields)


def test_eval_refuses_null_answers_naming_the_row(tmp_path):
    benchmark = tmp_path / "bench.jsonl"
    benchmark.write_text('{"problem": "1 + 1", "answer": "2"}\n{"problem": "2 + 2", "answer": null}\n')
    with pytest.raises(ValueError, match=r"bench.jsonl row 1 \(0-based\), column `answer`: the value is null"):
        load_benchmark(str(benchmark))
    with pytest.raises(UsageExit, match=r"^trl-tip eval: .*row 1 \(0-based\), column `answer`"):
        cli_main(["eval", "--model", "smollm2", "--benchmark", str(benchmark)])


# ---------------------------------------------------------------------------------------------------------------------
# 8. Late checks and raw tracebacks in the commands.


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"beta": math.nan}, r"`beta` must be a number in \[0, 1\].*got nan"),
        (
            {"selection_seed": "abc"},
            "`selection_seed` must be a non-negative integer, or None to use `seed`; got 'abc'",
        ),
        ({"learning_rate": math.nan}, "`learning_rate` must be a finite number >= 0; got nan"),
        ({"max_steps": 0}, "`max_steps` must be a positive number of optimizer steps, or -1"),
        ({"per_device_train_batch_size": 0}, "`per_device_train_batch_size` must be a positive integer; got 0"),
    ],
)
def test_config_refuses_unusable_inherited_fields(tmp_path, fields, message):
    with pytest.raises(ValueError, match=message):
        TIPConfig(output_dir=str(tmp_path), **{**CPU, **fields})


def test_commands_refuse_in_one_line_with_status_2(tmp_path, capsys):
    for argv, message in [
        (["demo", "--ratio", "2"], "trl-tip demo: --ratio must be a number in (0, 1]; got 2.0."),
        (["demo", "--batch-size", "0"], "trl-tip demo: --batch-size must be a positive integer; got 0."),
        (
            ["train", "--config", str(tmp_path / "nope.yaml")],
            f"trl-tip train: --config '{tmp_path}/nope.yaml': no such",
        ),
        (["train"], "trl-tip train: give a recipe: trl-tip train --config RECIPE.yaml"),
        (["study", "--temperature", "inf"], "trl-tip study: --temperature must be a positive finite number; got inf."),
    ]:
        with pytest.raises(UsageExit) as refused:
            cli_main(argv)
        assert str(refused.value.code).startswith(message), refused.value.code
    with pytest.raises(FileNotFoundError):  # --debug: the traceback instead of the line
        cli_main(["--debug", "train", "--config", str(tmp_path / "nope.yaml")])
    cli_main(["train", "--version"])
    assert capsys.readouterr().out.startswith("trl-tip ")
    # Run as the program: the line on stderr, status 2, no traceback.
    done = subprocess.run(
        [sys.executable, "-c", "from trl_tip.cli import main; main()", "train", "--config", "nope.yaml"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1].startswith("trl-tip train: --config")
    assert "Traceback" not in done.stderr


# ---------------------------------------------------------------------------------------------------------------------
# 9. A reward function returning NaN, strings or no list.


@pytest.mark.parametrize(
    "rewards, message",
    [
        ([math.nan, 1.0], "completion 0 got NaN. Return None for a completion it cannot grade"),
        ([1.0, "1"], r"completion 1 got '1' \(str\)"),
        (None, "as a list; got a NoneType: None"),
        ([1.0], "got 1 rewards for 2 completions"),
        ([1.5, 0.0], r"completion 0 got 1.5, outside \[0, 1\]"),
    ],
)
def test_a_reward_function_returning_nan_strings_or_no_list_is_refused_by_name(rewards, message):
    with pytest.raises(ValueError, match=f"^`reward_func` must return one reward in .*{message}"):
        checked_rewards(rewards, 2)
    assert checked_rewards([None, True], 2)[1] == 1.0 and math.isnan(checked_rewards([None, 0.0], 2)[0])
