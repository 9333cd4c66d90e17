"""`benchmarks/teacher_entropy.py` runs on a pair of tiny local models and prints the distribution it reports."""

import subprocess
import sys
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_teacher_entropy_report_on_a_tiny_pair(tiny_models):
    command = [sys.executable, str(REPO / "benchmarks" / "teacher_entropy.py")]
    command += ["--teacher", str(tiny_models / "teacher"), "--student", str(tiny_models / "student")]
    command += ["--prompts", "4", "--max-new-tokens", "6"]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("4 prompts, ") and "rollout tokens sampled from the student" in lines[0]
    for expected in ("teacher entropy (nats): mean", "student entropy (nats): mean", "Pearson correlation"):
        assert any(line.startswith(expected) for line in lines), expected
    assert sum(line.startswith("Q") for line in lines) >= 2, "tokens on both sides of the medians"
