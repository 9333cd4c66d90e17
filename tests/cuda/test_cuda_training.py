"""A two-step tiny `TIPGKDTrainer` run on CUDA gives the same per-step losses as the same run on CPU.

Each run is its own process (`python tests/cuda/test_cuda_training.py --device ...`), because accelerate's device
state is process-wide. The rollouts are the dataset's own completions (`lmbda=0`), so both devices train on the same
tokens: on-policy sampling would draw different rollouts from the CUDA and CPU random streams.

    pytest -m cuda tests/cuda/test_cuda_training.py                          # needs a GPU; skipped without one
    TRL_TIP_TEST_DEVICE=cpu pytest -m cuda tests/cuda/test_cuda_training.py  # both runs on CPU, to test the test

Tolerances (relative, per step):

- float32 on both devices, 1e-4: step 1 differs only in fp32 reduction order (~1e-6 of the loss). Step 2 adds one
  AdamW update, about `lr * sign(g)` per weight at the first step; weights whose gradient is at rounding level may
  move differently, but the loss is first-order insensitive to exactly those, so 1e-4 leaves ~100x headroom. With
  `soft_or` the kept tokens must also be the same: a near-tie at the selection boundary flipping on one device would
  change the loss by far more than 1e-4, so this also checks that the selection is device-independent.
- bf16 autocast on CUDA (`bf16=True`, fp32 weights) against float32 on CPU, 3e-2, `all` only: every matmul rounds its
  operands to bf16 (2^-9 relative each). The tiny random pair's logits are small (entropy ~5.76 of ln 324 = 5.78
  nats, KL ~0.04 nats), so a logit moves by ~1e-4 and the KL, ~E[(z_s - z_t) dz], by ~1e-4 of itself per layer
  and head: 3e-2 is ~10x the worst case through two layers, two heads and one AdamW step, and with `all` no
  selection can flip. (CPU runs never autocast, so this case compares float32 with float32 there.)
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


pytestmark = pytest.mark.cuda

REPO = Path(__file__).resolve().parents[2]
CASES = {
    # id: (selector, ratio, dtype on the tested device, relative tolerance per step)
    "all-float32": ("all", 1.0, "float32", 1e-4),
    "soft_or50-float32": ("soft_or", 0.5, "float32", 1e-4),
    "q3_10-float32": ("q3", 0.1, "float32", 1e-4),
    "all-bf16": ("all", 1.0, "bfloat16", 3e-2),
}


def train_two_steps(device: str, selector: str, ratio: float, dtype: str, output_dir: str) -> dict:
    """Two AdamW steps of TIP distillation on tiny local models; returns the per-micro-batch losses and counts."""
    import torch

    from trl_tip import TIPConfig, TIPGKDTrainer
    from trl_tip.testing import tiny_causal_lm, tiny_math_dataset, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    student = tiny_causal_lm(tokenizer, seed=0)
    teacher = tiny_causal_lm(tokenizer, hidden_size=128, num_layers=2, seed=1)
    args = TIPConfig(
        output_dir=output_dir,
        max_steps=2,
        per_device_train_batch_size=4,
        max_completion_length=16,
        learning_rate=1e-3,
        optim="adamw_torch",
        lr_scheduler_type="constant",
        lmbda=0.0,  # the dataset's completions: the same tokens on every device
        token_selector=selector,
        selection_ratio=ratio,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        seed=7,
        use_cpu=device == "cpu",
        bf16=dtype == "bfloat16",
    )
    trainer = TIPGKDTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=tiny_math_dataset(16, with_completions=True),
        processing_class=tokenizer,
    )
    losses, kept, valid = [], [], []
    compute_loss = trainer.compute_loss

    def recording_compute_loss(*a, **kw):
        loss = compute_loss(*a, **kw)
        losses.append(float(loss.detach().float()))
        return loss

    record = trainer._record_selection

    def recording_selection(stats, keep, selected_loss):
        kept.append(int(keep.sum()))
        valid.append(int(stats.mask.sum()))
        record(stats, keep, selected_loss)

    trainer.compute_loss = recording_compute_loss
    trainer._record_selection = recording_selection
    trainer.train()
    return {
        "device": str(trainer.accelerator.device),
        "model_dtype": str(next(trainer.model.parameters()).dtype),
        "losses": losses,
        "kept": kept,
        "valid": valid,
        "torch": torch.__version__,
    }


def start_run(device, case, tmp_path):
    selector, ratio, dtype, _ = CASES[case]
    if device == "cpu":
        dtype = "float32"
    tag = f"{device.replace(':', '_')}-{case}"
    out = tmp_path / f"{tag}.json"
    cmd = [sys.executable, __file__, "--device", device, "--selector", selector, "--ratio", str(ratio)]
    cmd += ["--dtype", dtype, "--output-dir", str(tmp_path / f"run-{tag}"), "--json", str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    return device, proc, out


def finish_run(run):
    device, proc, out = run
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, f"{device} run failed:\n{stdout[-3000:]}\n{stderr[-6000:]}"
    return json.loads(out.read_text())


@pytest.mark.parametrize("case", list(CASES))
def test_two_step_losses_match_cpu(device, case, tmp_path):
    tolerance = CASES[case][3]
    if device.type == "cpu":  # checking the test on a CPU machine: one training at a time
        on_device = finish_run(start_run(str(device), case, tmp_path))
        on_cpu = finish_run(start_run("cpu", case, tmp_path))
    else:  # the GPU and the CPU run side by side
        runs = [start_run(str(device), case, tmp_path), start_run("cpu", case, tmp_path)]
        on_device, on_cpu = (finish_run(run) for run in runs)
    print(f"{case}: {device} {on_device}\n{case}: cpu {on_cpu}")
    assert on_device["device"].startswith(device.type), on_device["device"]
    assert len(on_device["losses"]) == len(on_cpu["losses"]) == 2
    assert on_device["valid"] == on_cpu["valid"], "both devices must train on the same tokens"
    assert on_device["kept"] == on_cpu["kept"]
    for step, (ours, ref) in enumerate(zip(on_device["losses"], on_cpu["losses"]), start=1):
        assert ours == pytest.approx(ref, rel=tolerance), f"step {step}: {device} {ours} vs cpu {ref}"


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", required=True)
    parser.add_argument("--selector", default="all")
    parser.add_argument("--ratio", type=float, default=1.0)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--json", required=True)
    a = parser.parse_args()
    result = train_two_steps(a.device, a.selector, a.ratio, a.dtype, a.output_dir)
    Path(a.json).write_text(json.dumps(result))
