"""After-training benchmarks on two gloo processes (DDP, and ZeRO-3 where generation is collective): every process
generates its share of the `generate` calls, both make the same number of calls, and the files equal one process's."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import paths
import pytest
from benchmark_run import SETTINGS, run

from trl_tip.utils.files import read_jsonl


HERE = Path(__file__).parent
# 2-process `accelerate launch` runs: the quick tier (`-m "not slow"`) leaves them out.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory, shared_data) -> Path:
    output_dir = tmp_path_factory.mktemp("single")
    run(str(output_dir), str(shared_data / "gsm8k_test.jsonl"))
    return output_dir


def launch_two_processes(output_dir: Path, benchmark: Path, accelerate_config: str) -> None:
    accelerate = shutil.which("accelerate") or "accelerate"
    config = paths.ROOT / "recipes" / "accelerate" / accelerate_config
    command = [accelerate, "launch", "--config_file", str(config), "--main_process_port", "0"]
    command += [str(HERE / "scripts" / "benchmark_run.py"), str(output_dir), str(benchmark)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]


def summary_without_paths_and_time(run_dir: Path) -> dict:
    summary = json.loads((run_dir / "eval" / "gsm8k_test" / "summary.json").read_text())
    del summary["model"], summary["settings"]["output_dir"], summary["wall_time_s"]
    return summary


def generate_calls(run_dir: Path, rank: int) -> list[dict]:
    return json.loads((run_dir / f"generate_calls-rank{rank}.json").read_text())


@pytest.mark.timeout(600)
@pytest.mark.parametrize("accelerate_config", ["ddp_cpu.yaml", "zero3_cpu.yaml"])
def test_two_processes_share_the_generation_and_match_one_process(
    accelerate_config, single_process_run, tmp_path, shared_data
):
    if accelerate_config.startswith("zero3"):
        pytest.importorskip("deepspeed", reason="the `deepspeed` extra is not installed")
    launch_two_processes(tmp_path, shared_data / "gsm8k_test.jsonl", accelerate_config)

    results = "eval/gsm8k_test/results.jsonl"
    assert read_jsonl(tmp_path / results) == read_jsonl(single_process_run / results)
    single = summary_without_paths_and_time(single_process_run)
    assert summary_without_paths_and_time(tmp_path) == single
    assert single["num_problems"] == 5 and single["k"] == 2

    # One process makes all 7 calls, each within the token budget. Two processes make 4 each: the even calls on
    # rank 0, the odd ones on rank 1, then a throwaway 1-token call there, without which ZeRO-3 would hang.
    budget, new_tokens = SETTINGS["benchmark_max_batch_tokens"], SETTINGS["benchmark_max_new_tokens"]
    alone = generate_calls(single_process_run, 0)
    assert [c["rows"] for c in alone] == [1, 1, 2, 2, 2, 1, 1]
    assert all(c["rows"] * (c["width"] + new_tokens) <= budget for c in alone)
    rank0, rank1 = generate_calls(tmp_path, 0), generate_calls(tmp_path, 1)
    assert len(rank0) == len(rank1) == 4
    assert rank0 == alone[0::2] and rank1[:3] == alone[1::2]
    assert rank1[3]["rows"] == 1 and rank1[3]["max_new_tokens"] == 1
