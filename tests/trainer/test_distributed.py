"""Two gloo processes (DDP on CPU) train like one process with the same global batch: global normalization and
globally reduced quadrant counts, end to end through `accelerate launch`."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import paths
import pytest


ROOT = paths.ROOT


def completions_dataset(path: Path, n: int = 16):
    # Dataset completions (lmbda=0) make every batch deterministic, so runs with different process counts (and so
    # different per-process sampling seeds) see the same tokens.
    from trl_tip.testing import tiny_math_dataset

    tiny_math_dataset(n, with_completions=True).to_json(str(path))


def launch(
    tiny_models,
    data,
    output_dir,
    processes,
    per_device_batch,
    accelerate_config="ddp_cpu.yaml",
    max_steps=3,
    save_steps=3,
    extra=(),
):
    recipe_args = [
        "--config",
        str(ROOT / "recipes" / "tiny_cpu.yaml"),
        "--model_name_or_path",
        str(tiny_models / "student"),
        "--teacher_model_name_or_path",
        str(tiny_models / "teacher"),
        "--dataset_name",
        str(data),
        "--output_dir",
        str(output_dir),
        "--lmbda",
        "0",
        "--token_selector",
        "entropy_topk",
        "--max_steps",
        str(max_steps),
        "--per_device_train_batch_size",
        str(per_device_batch),
        "--gradient_accumulation_steps",
        "2",
        "--shuffle_dataset",
        "false",
        "--save_strategy",
        "steps",
        "--save_steps",
        str(save_steps),
        *extra,
    ]
    if processes == 1:
        command = [sys.executable, "-m", "trl_tip.train", *recipe_args]
    else:
        accelerate = shutil.which("accelerate") or "accelerate"
        config = ROOT / "recipes" / "accelerate" / accelerate_config
        command = [
            accelerate,
            "launch",
            "--config_file",
            str(config),
            "--main_process_port",
            "0",
            "-m",
            "trl_tip.train",
            *recipe_args,
        ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    state = json.loads((output_dir / f"checkpoint-{max_steps}" / "trainer_state.json").read_text())
    losses = [h["loss"] for h in state["log_history"] if "loss" in h]
    steps = [json.loads(line) for line in (output_dir / "tip_stats" / "steps.jsonl").read_text().splitlines()]
    return losses, steps


@pytest.mark.timeout(900)
def test_ddp_on_two_processes_matches_one_process(tiny_models, tmp_path):
    data = tmp_path / "completions.jsonl"
    completions_dataset(data)
    single_losses, single_steps = launch(tiny_models, data, tmp_path / "single", processes=1, per_device_batch=4)
    ddp_losses, ddp_steps = launch(tiny_models, data, tmp_path / "ddp", processes=2, per_device_batch=2)
    checkpoint = tmp_path / "ddp" / "checkpoint-3"
    assert (checkpoint / "tip_rng_state_1.pt").is_file(), "two processes ran, each saving its selection state"
    assert len(single_losses) == len(ddp_losses) == 3
    assert ddp_losses == pytest.approx(single_losses, rel=1e-4)
    # The tracker holds counts summed over both processes: the global batch's tokens, not one rank's.
    for single, ddp in zip(single_steps, ddp_steps):
        assert ddp["num_tokens"] == single["num_tokens"] > 0
        assert ddp["num_selected"] == single["num_selected"]
    assert not any((tmp_path / "ddp").glob("tip_stats*/rank*")), "tip_stats is written once, by the main process"


@pytest.mark.timeout(900)
def test_zero3_on_two_processes_matches_ddp_resumes_and_saves_a_loadable_student(tiny_models, tmp_path):
    pytest.importorskip("deepspeed", reason="the `deepspeed` extra is not installed")
    from transformers import AutoModelForCausalLM

    data = tmp_path / "completions.jsonl"
    completions_dataset(data)
    common = {"processes": 2, "per_device_batch": 2, "max_steps": 4, "save_steps": 2}
    ddp_losses, ddp_steps = launch(tiny_models, data, tmp_path / "ddp", **common)
    zero3_losses, zero3_steps = launch(
        tiny_models, data, tmp_path / "zero3", accelerate_config="zero3_cpu.yaml", **common
    )
    assert len(zero3_losses) == 4
    assert zero3_losses == pytest.approx(ddp_losses, rel=1e-4)
    assert [s["num_selected"] for s in zero3_steps] == [s["num_selected"] for s in ddp_steps]

    # Resuming the sharded checkpoint of step 2 repeats steps 3 and 4 exactly, and the tracker history continues.
    checkpoint = tmp_path / "zero3" / "checkpoint-2"
    resumed_losses, resumed_steps = launch(
        tiny_models,
        data,
        tmp_path / "resumed",
        accelerate_config="zero3_cpu.yaml",
        extra=("--resume_from_checkpoint", str(checkpoint)),
        **common,
    )
    assert resumed_losses[2:] == pytest.approx(zero3_losses[2:], rel=1e-5)
    assert [s["step"] for s in resumed_steps] == [1, 2, 3, 4]
    assert resumed_steps[2:] == zero3_steps[2:]

    # save_model consolidates the ZeRO-3 shards into one state dict that plain transformers loads.
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "zero3")
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "ddp")
    for (name, a), (_, b) in zip(student.named_parameters(), reference.named_parameters()):
        assert a.shape == b.shape and a.abs().sum() > 0, name
    assert (tmp_path / "zero3" / "tip_stats" / "steps.jsonl").is_file()
    assert (checkpoint / "tip_stats" / "steps.jsonl").is_file()
