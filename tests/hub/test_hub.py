"""Hub integration against a local Hub-compatible server (tests/hub_server.py) with the real huggingface_hub client
and datasets: push a run, read it back, survive a failed commit, refuse to start without a token; and the golden
model card of the tiny end-to-end run."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import paths
import pytest
from hub_server import HubServer

from trl_tip.utils.files import read_jsonl


HERE = Path(__file__).parent
TOKEN = "hf_localTestToken_9f3c1e"
GOLDEN_CARD = paths.TESTS / "golden" / "tiny_run_card.md"


def make_tiny_run(output_dir: Path, benchmark: Path) -> Path:
    """The tiny end-to-end run: 2 steps of soft_or 50% on tiny local models, a 3-problem benchmark, saved with its
    card."""
    from trl_tip import TIPConfig, TIPGKDTrainer
    from trl_tip.testing import tiny_causal_lm, tiny_math_dataset, tiny_tokenizer
    from trl_tip.trainer.benchmark_callback import BenchmarkArguments

    tokenizer = tiny_tokenizer()
    args = TIPConfig(
        output_dir=str(output_dir),
        max_steps=2,
        per_device_train_batch_size=2,
        max_completion_length=8,
        learning_rate=1e-2,
        report_to="none",
        bf16=False,
        use_cpu=True,
        save_strategy="no",
        seed=7,
        token_selector="soft_or",
        selection_ratio=0.5,
    )
    trainer = TIPGKDTrainer(
        model=tiny_causal_lm(tokenizer, seed=0),
        teacher_model=tiny_causal_lm(tokenizer, hidden_size=128, seed=1),
        args=args,
        train_dataset=tiny_math_dataset(8),
        processing_class=tokenizer,
        benchmark_args=BenchmarkArguments(
            benchmarks=[str(benchmark)], benchmark_num_samples=2, benchmark_limit=3, benchmark_max_new_tokens=4
        ),
    )
    trainer.train()
    trainer.save_model()
    trainer.create_model_card(model_name="tiny-tip-student", dataset_name="tiny-sums")
    return output_dir


@pytest.fixture(scope="module")
def pristine_run(tmp_path_factory, shared_data):
    return make_tiny_run(tmp_path_factory.mktemp("tiny-run"), shared_data / "gsm8k_test.jsonl")


@pytest.fixture
def tiny_run(pristine_run, tmp_path):
    """A copy of the tiny run per test: pushing re-renders its card with the dataset link."""
    import shutil

    return Path(shutil.copytree(pristine_run, tmp_path / "run"))


def folder_digest(folder: Path, skip=()) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name not in skip
    }


def hub_env(hub, tmp_path: Path, token: str | None = TOKEN) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    # The local server speaks the legacy LFS protocol, not Xet (see hub_server.py); a fresh cache per test.
    env.update(
        HF_ENDPOINT=hub.endpoint,
        HF_HUB_DISABLE_XET="1",
        HF_HOME=str(tmp_path / "hf-home"),
        HF_HUB_DISABLE_TELEMETRY="1",
        TRL_TIP_CACHE=str(tmp_path / "trl-tip-cache"),
    )
    if token:
        env["HF_TOKEN"] = token
    return env


def run(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=600)


def push(run_dir, hub, tmp_path, *extra, token=TOKEN):
    return run(["-m", "trl_tip.cli", "push", str(run_dir), *extra], hub_env(hub, tmp_path, token))


def read_back(hub, tmp_path, model_id, stats_id, revision=None) -> dict:
    done = run(
        [str(HERE / "scripts" / "hub_read_back.py"), model_id, stats_id, *([revision] if revision else [])],
        hub_env(hub, tmp_path / "reader"),
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_push_a_finished_run_and_read_it_back(tiny_run, tmp_path):
    with HubServer(tmp_path / "hub", TOKEN) as hub:
        done = push(tiny_run, hub, tmp_path, "--model-id", "tiny-tip-student", "--private")
        assert done.returncode == 0, done.stderr[-4000:]
        assert "Pushed" in done.stdout
        got = read_back(hub, tmp_path, "tester/tiny-tip-student", "tester/tiny-tip-student-tip-stats")
        assert hub.repo("model", "tester/tiny-tip-student")["private"]
        assert hub.repo("dataset", "tester/tiny-tip-student-tip-stats")["private"]
        pushed = dict(hub.files("model", "tester/tiny-tip-student").items())
        stats_files = hub.files("dataset", "tester/tiny-tip-student-tip-stats")
        requests = list(hub.requests)

    # The model repo is the run folder (card re-rendered with the dataset link), nothing more, nothing less.
    local = folder_digest(tiny_run)
    assert {p: h for p, h in got["model_files"].items() if p != ".gitattributes"} == local
    assert {
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "README.md",
        "quadrants.png",
        "tip_stats/steps.jsonl",
        "tip_stats/histogram.jsonl",
        "tip_stats/tracker.json",
    } <= set(local)
    # The student was built in memory: it has no base model, so no licence is claimed for it.
    assert {"trl", "trl-tip", "distillation", "tip"} <= set(got["card_tags"]) and got["card_license"] is None
    summary = json.loads((tiny_run / "eval" / "gsm8k_test" / "summary.json").read_text())
    assert got["eval_results"] == [["gsm8k_test", "mean@2", round(100 * summary["mean@2"], 2)]]
    assert ("POST", "/api/validate-yaml") in [(m, p) for m, p, _ in requests]  # the server checked the card's YAML
    link = "[tester/tiny-tip-student-tip-stats](https://huggingface.co/datasets/tester/tiny-tip-student-tip-stats)"
    assert link in got["card_text"]
    # The statistics: both configurations load with `datasets` and equal the run's jsonl files.
    assert got["steps"] == read_jsonl(tiny_run / "tip_stats" / "steps.jsonl")
    assert got["histogram"] == read_jsonl(tiny_run / "tip_stats" / "histogram.jsonl")
    assert sorted(got["stats_configs"]) == ["histogram", "steps"]
    assert "quadrants.png" in got["stats_files"] and "quadrant-statistics" in got["stats_card_tags"]
    assert "[tester/tiny-tip-student](https://huggingface.co/tester/tiny-tip-student)" in got["stats_card_text"]
    # The token is sent as a header and nowhere else: not in output, not in any pushed file.
    assert TOKEN not in done.stdout + done.stderr
    assert not any(TOKEN.encode() in content for content in [*pushed.values(), *stats_files.values()])


@pytest.mark.slow
def test_a_failed_commit_leaves_the_run_intact_and_a_rerun_completes_it(tiny_run, tmp_path):
    with HubServer(tmp_path / "clean", TOKEN) as clean:
        assert push(tiny_run, clean, tmp_path, "--model-id", "tiny").returncode == 0
        expected_model = clean.files("model", "tester/tiny")
        expected_stats = clean.files("dataset", "tester/tiny-tip-stats")
    model_files = folder_digest(tiny_run, skip=("README.md", "tip_card.json"))
    with HubServer(tmp_path / "flaky", TOKEN) as hub:
        hub.fail("POST", "/commit/", status=500, times=-1)
        failed = push(tiny_run, hub, tmp_path, "--model-id", "tiny", "--retries", "1", "--retry-wait", "0.01")
        assert failed.returncode != 0
        assert "500" in failed.stderr and "run the same command again" in failed.stderr
        assert "retry 1 of 1" in failed.stderr
        assert folder_digest(tiny_run, skip=("README.md", "tip_card.json")) == model_files
        hub.clear_failures()
        done = push(tiny_run, hub, tmp_path, "--model-id", "tiny")
        assert done.returncode == 0, done.stderr[-4000:]
        assert hub.files("model", "tester/tiny") == expected_model
        assert hub.files("dataset", "tester/tiny-tip-stats") == expected_stats


@pytest.mark.slow
def test_a_single_server_error_is_retried_within_the_push(tiny_run, tmp_path):
    with HubServer(tmp_path / "hub", TOKEN) as hub:
        hub.fail("POST", "/commit/", status=503, times=1)
        done = push(tiny_run, hub, tmp_path, "--model-id", "tiny", "--retry-wait", "0.01")
        assert done.returncode == 0, done.stderr[-4000:]
        commits = [path for method, path, _ in hub.requests if method == "POST" and "/commit/" in path]
        assert commits[0] == commits[1] == "/api/models/tester/tiny/commit/main"
        assert "retry 1 of 4" in done.stderr


@pytest.mark.slow
def test_push_to_a_branch(tiny_run, tmp_path):
    with HubServer(tmp_path / "hub", TOKEN) as hub:
        done = push(tiny_run, hub, tmp_path, "--model-id", "tiny", "--stats-id", "stats", "--revision", "v1")
        assert done.returncode == 0, done.stderr[-4000:]
        got = read_back(hub, tmp_path, "tester/tiny", "tester/stats", revision="v1")
        assert "model.safetensors" in got["model_files"] and got["steps"]
        assert set(hub.files("model", "tester/tiny", "main")) == {".gitattributes"}


@pytest.mark.slow
def test_no_token_fails_before_anything_is_sent(tiny_run, tmp_path):
    with HubServer(tmp_path / "hub", TOKEN) as hub:
        done = push(tiny_run, hub, tmp_path, "--model-id", "tiny", token=None)
        assert done.returncode != 0
        assert "needs a token" in done.stderr and "hf auth login" in done.stderr and "HF_TOKEN" in done.stderr
        assert hub.requests == []


def test_trainer_refuses_push_to_hub_without_a_token_before_training(tmp_path, monkeypatch):
    import huggingface_hub.constants

    from trl_tip import TIPConfig, TIPGKDTrainer
    from trl_tip.hub.push import HubPushError
    from trl_tip.testing import tiny_causal_lm, tiny_math_dataset, tiny_tokenizer

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    tokenizer = tiny_tokenizer()
    args = TIPConfig(
        output_dir=str(tmp_path / "run"),
        push_to_hub=True,
        hub_model_id="tiny",
        use_cpu=True,
        report_to="none",
        bf16=False,
    )
    with pytest.raises(HubPushError, match="needs a token.*hf auth login.*HF_TOKEN"):
        TIPGKDTrainer(
            model=tiny_causal_lm(tokenizer),
            teacher_model=tiny_causal_lm(tokenizer),
            args=args,
            train_dataset=tiny_math_dataset(4),
            processing_class=tokenizer,
        )
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_push_refuses_a_folder_that_is_not_a_run(tmp_path):
    (tmp_path / "empty").mkdir()
    with HubServer(tmp_path / "hub", TOKEN) as hub:
        done = push(tmp_path / "empty", hub, tmp_path, "--model-id", "tiny")
        assert done.returncode != 0 and "is not a finished trl-tip run" in done.stderr
        assert "config.json" in done.stderr and "tip_stats/tracker.json" in done.stderr


@pytest.mark.slow
def test_trainer_push_to_hub_pushes_the_student_and_the_statistics(tmp_path):
    with HubServer(tmp_path / "hub", TOKEN) as hub:
        done = run(
            [str(HERE / "scripts" / "hub_train_push.py"), str(tmp_path / "run"), "tiny-trained"],
            hub_env(hub, tmp_path),
        )
        assert done.returncode == 0, done.stderr[-4000:]
        assert "PUSHED tester/tiny-trained tester/tiny-trained-tip-stats" in done.stdout
        model = hub.files("model", "tester/tiny-trained")
        stats = hub.files("dataset", "tester/tiny-trained-tip-stats")
        assert hub.repo("model", "tester/tiny-trained")["private"]
    assert {"model.safetensors", "README.md", "quadrants.png", "tip_stats/steps.jsonl"} <= set(model)
    assert b"https://huggingface.co/datasets/tester/tiny-trained-tip-stats" in model["README.md"]
    assert {"README.md", "quadrants.png"} <= set(stats)
    assert any(p.startswith("steps/") and p.endswith(".parquet") for p in stats)
    assert any(p.startswith("histogram/") and p.endswith(".parquet") for p in stats)
    assert TOKEN not in done.stdout + done.stderr


@pytest.mark.slow
def test_trainer_push_to_hub_to_a_branch(tmp_path):
    with HubServer(tmp_path / "hub", TOKEN) as hub:
        done = run(
            [str(HERE / "scripts" / "hub_train_push.py"), str(tmp_path / "run"), "tiny-branch", "v1"],
            hub_env(hub, tmp_path),
        )
        assert done.returncode == 0, done.stderr[-4000:]
        assert {"model.safetensors", "README.md"} <= set(hub.files("model", "tester/tiny-branch", "v1"))
        assert set(hub.files("model", "tester/tiny-branch", "main")) == {".gitattributes"}
        assert {"README.md", "quadrants.png"} <= set(hub.files("dataset", "tester/tiny-branch-tip-stats", "v1"))


def test_tiny_run_card_matches_the_golden_file(pristine_run):
    from huggingface_hub import ModelCard

    card = (pristine_run / "README.md").read_text()
    if os.environ.get("TRL_TIP_UPDATE_GOLDEN") == "1":
        GOLDEN_CARD.parent.mkdir(exist_ok=True)
        GOLDEN_CARD.write_text(card)
    assert card == GOLDEN_CARD.read_text(), "card changed; rerun with TRL_TIP_UPDATE_GOLDEN=1 and review the diff"
    parsed = ModelCard(card)
    assert parsed.data.datasets == ["tiny-sums"] and parsed.data.pipeline_tag == "text-generation"


def local_model_trainer(tmp_path: Path, student_card: str | None):
    """A trainer whose student and teacher were loaded from local folders (the student's with `student_card` as its
    README.md), as `trl-tip train --model_name_or_path <folder>` builds it."""
    from transformers import AutoModelForCausalLM

    from trl_tip import TIPConfig, TIPGKDTrainer
    from trl_tip.testing import tiny_causal_lm, tiny_math_dataset, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    for name, model in (
        ("student", tiny_causal_lm(tokenizer, seed=0)),
        ("teacher", tiny_causal_lm(tokenizer, seed=1)),
    ):
        model.save_pretrained(tmp_path / name)
    if student_card is not None:
        (tmp_path / "student" / "README.md").write_text(student_card)
    args = TIPConfig(output_dir=str(tmp_path / "run"), report_to="none", use_cpu=True, bf16=False, max_steps=1)
    return TIPGKDTrainer(
        model=AutoModelForCausalLM.from_pretrained(tmp_path / "student"),
        teacher_model=AutoModelForCausalLM.from_pretrained(tmp_path / "teacher"),
        args=args,
        train_dataset=tiny_math_dataset(8),
        processing_class=tokenizer,
    )


@pytest.mark.parametrize("student_card, license", [("---\nlicense: mit\n---\n\n# Student\n", "mit"), (None, None)])
def test_trainer_card_takes_the_students_licence_and_names_local_models_without_paths(tmp_path, student_card, license):
    from huggingface_hub import ModelCard

    local_model_trainer(tmp_path, student_card).create_model_card(model_name="tip-student")
    card = ModelCard.load(tmp_path / "run" / "README.md")
    assert card.data.license == license and card.data.base_model is None
    assert ("license:" in card.content) == (license is not None), "no licence line when the base states none"
    assert "| teacher | teacher (local model) |" in card.text and "| student | student (local model) |" in card.text
    assert "model_name_or_path: student\n" in card.text and "teacher_model_name_or_path: teacher\n" in card.text
    for name in ("README.md", "tip_card.json"):
        assert str(tmp_path) not in (tmp_path / "run" / name).read_text(), name


def test_a_card_write_that_fails_midway_leaves_the_previous_card_whole(pristine_run, tmp_path):
    from trl_tip.core.quadrants import QuadrantTracker
    from trl_tip.hub.model_card import load_card_context, write_student_card

    run_dir = tmp_path / "run"
    (run_dir / "tip_stats").mkdir(parents=True)
    tracker = QuadrantTracker.load(pristine_run / "tip_stats")
    context = load_card_context(pristine_run)
    first = write_student_card(run_dir, tracker, **context)
    # A lone surrogate cannot be encoded as UTF-8: the write fails after the file was opened, as a full disk would.
    with pytest.raises(UnicodeEncodeError):
        write_student_card(run_dir, tracker, **{**context, "model_name": "broken \ud800 name"})
    assert (run_dir / "README.md").read_text(encoding="utf-8") == first
