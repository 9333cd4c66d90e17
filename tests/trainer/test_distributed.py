"""Two gloo processes (DDP on CPU) train like one process with the same global batch: global normalization and
globally reduced quadrant counts, end to end through `accelerate launch`, also when one or every process keeps no
token."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import paths
import pytest


ROOT = paths.ROOT
# Every test launches 2 processes with `accelerate launch`: the quick tier (`-m "not slow"`) leaves them out.
pytestmark = pytest.mark.slow


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
    gradient_accumulation_steps=2,
    entry=None,
    timeout=600,
    extra=(),
    teacher=True,
):
    """Runs a tiny recipe on `processes` processes and returns its logged losses and `tip_stats` step rows.

    `entry` is a script run in place of `-m trl_tip.train` (e.g. one that gives the trainer a custom selector);
    flags in `extra` come last and override the ones above; `teacher=False` leaves out the separate teacher (for a
    self teacher set in `extra`)."""
    recipe = ROOT / "recipes" / "tiny_cpu.yaml"
    if not teacher:
        output_dir.mkdir(parents=True, exist_ok=True)
        lines = recipe.read_text().splitlines(keepends=True)
        recipe = output_dir / "recipe.yaml"
        recipe.write_text("".join(x for x in lines if not x.startswith("teacher_model_name_or_path:")))
    recipe_args = [
        "--config",
        str(recipe),
        "--model_name_or_path",
        str(tiny_models / "student"),
        *(("--teacher_model_name_or_path", str(tiny_models / "teacher")) if teacher else ()),
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
        str(gradient_accumulation_steps),
        "--shuffle_dataset",
        "false",
        "--save_strategy",
        "steps",
        "--save_steps",
        str(save_steps),
        *extra,
    ]
    target = ["-m", "trl_tip.train"] if entry is None else [str(entry)]
    if processes == 1:
        command = [sys.executable, *target, *recipe_args]
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
            *target,
            *recipe_args,
        ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
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


# ---------------------------------------------------------------------------------------------------------------------
# A process that keeps no token. A selector whose kept count follows from the statistics (`quadrant`, any callable) can
# keep nothing on one process while another keeps many. With `loss_normalization="selected"` TIP then normalizes each
# micro-batch by its kept count summed over processes (`TIPGKDTrainer._estimated_selected_count`): every process
# divides its own kept divergence by `max(K * accumulation_steps, 1) / processes`, K the count kept by all processes,
# and DDP / ZeRO-3 average the gradients. With one accumulation step the global micro-batch is the one-process
# micro-batch, so that is exactly the one-process loss `sum / K` and its gradient: the logged loss (the mean over
# processes) and the SGD update must equal one process's on the same 4 rollouts per step, and a step where K = 0 has
# loss 0 and a zero gradient. With more accumulation steps they need not be equal: TRL shuffles each process's
# generation batch before cutting it into micro-batches, so one and two processes group the rollouts differently, and
# each micro-batch's count stands for the others' (the documented estimate). (`loss_normalization="all"` divides by
# TRL's valid-token count, fixed by the masks at rollout time, which the selection cannot make zero.)

SHORT_ROLLOUTS_RUN = paths.TESTS / "trainer" / "scripts" / "short_rollouts_run.py"
# Row by row, which dataset completions are long (dropped whole by `keep_short_rollouts`). With 4 rollouts per step,
# rows 0-1 of each step go to process 0 and rows 2-3 to process 1: step 1 leaves process 1 with nothing, step 2 leaves
# everybody with nothing, step 3 leaves the main process with nothing, and in step 4 the processes keep 1 and 2
# rollouts (there a per-process count would differ from the global one).
LONG_ROWS = [False, False, True, True] + [True] * 4 + [True, True, False, False] + [False, True, False, False]
SHORT_ROLLOUTS_FLAGS = (
    "--max_completion_length",
    "16",  # long completions are cut to 16 tokens; short ones have 11-13 (short_rollouts_run.SHORT_ROLLOUT_TOKENS)
    # Plain SGD at a constant rate without clipping: the update is the gradient times the rate, so it compares the
    # gradients' scale too (Adam's first step and clipping would hide a wrong normalizer).
    "--optim",
    "sgd",
    "--learning_rate",
    "0.5",
    "--lr_scheduler_type",
    "constant",
    "--max_grad_norm",
    "0",
)


def long_and_short_completions(path: Path):
    from trl_tip.testing import tiny_math_dataset

    def lengthen(row, index):
        if LONG_ROWS[index]:
            content = row["completion"][0]["content"] + " Tom has 3 apples and buys 5 more. He has 8 apples."
            row["completion"] = [{"role": "assistant", "content": content}]
        return row

    tiny_math_dataset(len(LONG_ROWS), with_completions=True).map(lengthen, with_indices=True).to_json(str(path))


def run_keeping_short_rollouts(
    tiny_models, data, output_dir, processes, accelerate_config="ddp_cpu.yaml", save_steps=4
):
    losses, steps = launch(
        tiny_models,
        data,
        output_dir,
        processes=processes,
        per_device_batch=4 // processes,
        accelerate_config=accelerate_config,
        max_steps=4,
        save_steps=save_steps,
        gradient_accumulation_steps=1,
        entry=SHORT_ROLLOUTS_RUN,
        timeout=240,  # a hang fails the test rather than the suite
        extra=SHORT_ROLLOUTS_FLAGS,
    )
    rows = [json.loads(line) for path in output_dir.glob("selection_rank*.jsonl") for line in open(path)]
    return losses, steps, {(row["step"], row["rank"]): row for row in rows}


def student_weights(directory: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(directory / "model.safetensors"))


@pytest.fixture(scope="module")
def one_process_keeping_short_rollouts(tiny_models, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("short-rollouts")
    data = tmp / "long_and_short.jsonl"
    long_and_short_completions(data)
    output_dir = tmp / "single"
    # Checkpoints after every step, to see that the step that keeps nothing leaves the student as it was.
    losses, steps, per_process = run_keeping_short_rollouts(tiny_models, data, output_dir, processes=1, save_steps=1)
    return data, losses, steps, per_process, output_dir


@pytest.mark.timeout(900)
@pytest.mark.parametrize("accelerate_config", ["ddp_cpu.yaml", "zero3_cpu.yaml"])
def test_a_process_that_keeps_nothing_trains_like_one_process(
    accelerate_config, one_process_keeping_short_rollouts, tiny_models, tmp_path
):
    if accelerate_config.startswith("zero3"):
        pytest.importorskip("deepspeed", reason="the `deepspeed` extra is not installed")
    import torch

    data, single_losses, single_steps, single_rows, single_dir = one_process_keeping_short_rollouts
    losses, steps, rows = run_keeping_short_rollouts(tiny_models, data, tmp_path, 2, accelerate_config)

    # The runs hold the cases they are meant to: per step, what each process kept.
    kept = {step: [rows[step, rank]["kept"] for rank in (0, 1)] for step in (1, 2, 3, 4)}
    assert kept[1][0] > 0 and kept[1][1] == 0, "step 1: process 1 keeps nothing"
    assert kept[2] == [0, 0], "step 2: no process keeps anything"
    assert kept[3][0] == 0 and kept[3][1] > 0, "step 3: the main process keeps nothing"
    assert 0 < kept[4][0] < kept[4][1], "step 4: both keep, unequally"
    for (step, rank), row in rows.items():
        assert row["valid"] > 0 and math.isfinite(row["loss"]), (step, rank)
        if row["kept"] == 0:
            assert row["loss"] == 0.0, (step, rank)
        assert single_rows[step, 0]["kept"] == sum(kept[step]), step

    # The logged loss of every step is the one-process loss: 0 where nothing was kept, finite everywhere.
    assert len(losses) == len(single_losses) == 4
    assert single_losses[1] == losses[1] == 0.0
    assert all(math.isfinite(loss) for loss in losses)
    assert losses == pytest.approx(single_losses, rel=1e-4)
    for one, two in zip(single_steps, steps):
        assert (two["num_tokens"], two["num_selected"]) == (one["num_tokens"], one["num_selected"])
    assert steps[1]["num_selected"] == 0 < steps[1]["num_tokens"]

    # The step that keeps nothing leaves the student unchanged (a zero, not a NaN, gradient), and the four SGD
    # updates of two processes equal those of one.
    after_step_1 = student_weights(single_dir / "checkpoint-1")
    after_step_2 = student_weights(single_dir / "checkpoint-2")
    initial, single, ours = (student_weights(d) for d in (tiny_models / "student", single_dir, tmp_path))
    moved = 0.0
    for name, weight in initial.items():
        assert torch.equal(after_step_1[name], after_step_2[name]), name
        assert torch.isfinite(ours[name]).all(), name
        torch.testing.assert_close(ours[name] - weight, single[name] - weight, rtol=1e-3, atol=1e-6, msg=name)
        moved = max(moved, float((single[name] - weight).abs().max()))
    assert moved > 1e-3, "steps 1, 3 and 4 train the student"


# ---------------------------------------------------------------------------------------------------------------------
# Heads that pad one tokenizer to different sizes (Qwen2.5-14B: 152064 rows, Qwen2.5-1.5B: 151936). Under ZeRO-3 the
# teacher's head is still partitioned when the loss runs, so the statistics and the loss must cut the heads to their
# shared rows after gathering them (a partitioned parameter cut before has no rows); the student's is gathered by the
# engine's forward, and a longer one is cut by views that TRL's own gather must leave alone.


@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    "student_rows, teacher_rows", [(328, 360), (360, 328)], ids=["longer-teacher", "longer-student"]
)
def test_zero3_trains_heads_of_different_sizes_like_one_process(student_rows, teacher_rows, tmp_path):
    pytest.importorskip("deepspeed", reason="the `deepspeed` extra is not installed")
    from trl_tip.testing import save_tiny_pair

    models = tmp_path / "models"  # the tiny tokenizer has 320 tokens
    save_tiny_pair(str(models), student_vocab_size=student_rows, teacher_vocab_size=teacher_rows)
    data = tmp_path / "completions.jsonl"
    completions_dataset(data)
    common = {"max_steps": 2, "save_steps": 2, "gradient_accumulation_steps": 1, "timeout": 300}
    single_losses, single_steps = launch(models, data, tmp_path / "single", processes=1, per_device_batch=4, **common)
    zero3_losses, zero3_steps = launch(
        models, data, tmp_path / "zero3", processes=2, per_device_batch=2, accelerate_config="zero3_cpu.yaml", **common
    )
    assert len(zero3_losses) == 2 and all(math.isfinite(loss) and loss > 0 for loss in zero3_losses)
    assert zero3_losses == pytest.approx(single_losses, rel=1e-4)
    assert [s["num_selected"] for s in zero3_steps] == [s["num_selected"] for s in single_steps]


# ---------------------------------------------------------------------------------------------------------------------
# PACED and the adaptive ratio on two processes. TRL hands each process a contiguous slice of the generation batch, so
# with 3 rollouts per process and 2 rollouts per prompt the batch [a a b b c c] is split [a a b | b c c]: problem `b`
# has one rollout on each process, and its pass rate must combine both. The weights are rescaled over the tokens of the
# whole generation batch, both processes' (`paced_weights`). (With 2 rollouts per process every problem would sit on
# one process; with 1, every batch holds one problem, whose weights are all 1 or all 0 whatever the token counts.)
# The adaptive ratio is updated from the loss averaged over processes, so both hold the same ratio at every step.

PACED_RUN = paths.TESTS / "trainer" / "scripts" / "paced_run.py"


def paced_formula(rollouts: list[dict], alpha: float = 1.0, beta: float = 1.0) -> list[float]:
    """PACED's weights written out: w(p) = p^alpha (1 - p)^beta of each rollout's problem, p the mean reward of the
    problem's rollouts in `rollouts`, rescaled so that sum_i w_i n_i = sum_i n_i (all zero when that sum is zero)."""
    rewards: dict = {}
    for rollout in rollouts:
        rewards.setdefault(rollout["question"], []).append(rollout["reward"])
    raw = []
    for rollout in rollouts:
        p = sum(rewards[rollout["question"]]) / len(rewards[rollout["question"]])
        raw.append(p**alpha * (1 - p) ** beta)
    tokens = [rollout["tokens"] for rollout in rollouts]
    weighted = sum(w * n for w, n in zip(raw, tokens))
    return [0.0] * len(raw) if weighted <= 0 else [w * sum(tokens) / weighted for w in raw]


@pytest.mark.timeout(900)
def test_paced_pass_rates_and_the_adaptive_ratio_are_global_on_two_processes(tiny_models, tmp_path):
    from trl_tip.core.schedules import AdaptiveRatio

    max_steps = 4
    latf = {"ema_decay": 0.5, "step": 0.2, "tolerance": 0.0}
    flags = {
        "lmbda": 1,  # on-policy: the student's rollouts, graded by the entry script's `parity_reward`
        "num_rollouts_per_prompt": 2,
        "problem_weighting": "paced",
        "token_selector": "divergence_topk",
        "selection_ratio": 0.1,
        "selection_ratio_schedule": "adaptive",
        **{f"adaptive_ratio_{name}": value for name, value in latf.items()},
    }
    launch(
        tiny_models,
        tiny_models / "prompts.jsonl",
        tmp_path,
        processes=2,
        per_device_batch=3,
        max_steps=max_steps,
        save_steps=max_steps,
        gradient_accumulation_steps=1,
        entry=PACED_RUN,
        extra=[item for name, value in flags.items() for item in (f"--{name}", str(value))],
    )
    rows = {}
    for name in ("paced", "loss"):
        for rank in (0, 1):
            for line in open(tmp_path / f"{name}_rank{rank}.jsonl"):
                row = json.loads(line)
                rows[name, row["step"], row["rank"]] = row
    steps = range(1, max_steps + 1)
    assert set(rows) == {(name, step, rank) for name in ("paced", "loss") for step in steps for rank in (0, 1)}

    split_half_passed = local_differs = False
    pass_rates = set()
    for step in steps:
        local = [rows["paced", step, rank]["rollouts"] for rank in (0, 1)]
        union = local[0] + local[1]
        questions = [rollout["question"] for rollout in union]
        assert all(questions.count(q) == 2 for q in questions) and len(set(questions)) == 3, step
        # Every process's weights are PACED's formula over the whole generation batch, both processes' rollouts.
        expected = paced_formula(union)
        actual = [rollout["weight"] for rollout in union]
        assert actual == pytest.approx(expected, rel=1e-5, abs=1e-7), step
        # The cases the run must hold, so the comparison above is not vacuous.
        split = {r["question"] for r in local[0]} & {r["question"] for r in local[1]}
        assert len(split) == 1, "one problem has a rollout on each process"
        rewards = {q: [r["reward"] for r in union if r["question"] == q] for q in questions}
        pass_rates.update(sum(v) / 2 for v in rewards.values())
        split_half_passed |= sum(rewards[split.pop()]) == 1
        local_differs |= paced_formula(local[0]) + paced_formula(local[1]) != pytest.approx(expected)
    assert pass_rates == {0.0, 0.5, 1.0}
    assert split_half_passed, "at some step the problem split across the processes passes once in two (p = 1/2)"
    assert local_differs, "at some step weights from one process's rollouts alone differ from the global ones"

    # Both processes hold the same ratio at every step: LATF's rule fed the loss averaged over processes.
    ratios = [[rows["paced", step, rank]["ratio"] for rank in (0, 1)] for step in steps]
    assert all(a == b for a, b in ratios), ratios
    controller = AdaptiveRatio(ratio=1.0, floor=0.1, **latf)
    expected_ratios = []
    for step in steps:
        expected_ratios.append(controller.ratio)
        controller.update(sum(rows["loss", step, rank]["loss"] for rank in (0, 1)) / 2)
    assert [a for a, _ in ratios] == pytest.approx(expected_ratios, rel=1e-6)
    assert len({a for a, _ in ratios}) > 1, "the ratio moved during the run"


# ---------------------------------------------------------------------------------------------------------------------
# Self-distillation under two processes. `ema` keeps one frozen copy of the student that TRL prepares like any teacher:
# under ZeRO-3 `prepare_deepspeed` shards it over the processes and TRL's EMA callback updates it with the shards
# gathered; each process saves its own shard in a checkpoint. `live` holds no copy: its forward runs through the
# student's own (sharded) layers inside the student's step.


def context_dataset(path: Path, n: int = 16):
    from trl_tip.testing import tiny_math_dataset

    data = tiny_math_dataset(n, with_completions=True, with_answers=True)
    data.map(lambda row: {"privileged_context": f"The answer is {row['answer']}."}).to_json(str(path))


@pytest.mark.timeout(900)
@pytest.mark.parametrize("kind", ["ema", "live"])
def test_a_self_teacher_trains_alike_under_zero3_and_ddp(kind, tiny_models, tmp_path):
    pytest.importorskip("deepspeed", reason="the `deepspeed` extra is not installed")
    data = tmp_path / "context.jsonl"
    context_dataset(data)
    self_teacher = ("--teacher_model_kind", kind, *(("--teacher_update_rate", "0.5") if kind == "ema" else ()))
    common = {"processes": 2, "per_device_batch": 2, "max_steps": 4, "save_steps": 2, "teacher": False}
    ddp_losses, ddp_steps = launch(tiny_models, data, tmp_path / "ddp", extra=self_teacher, **common)
    zero3_losses, zero3_steps = launch(
        tiny_models, data, tmp_path / "zero3", accelerate_config="zero3_cpu.yaml", extra=self_teacher, **common
    )
    assert len(zero3_losses) == 4 and all(math.isfinite(x) for x in zero3_losses)
    # The losses are small differences of log-probabilities near 1: ZeRO-3's and DDP's float reductions differ there
    # by ~1e-7 absolute (measured: 8e-8), a larger share of a small loss.
    assert zero3_losses == pytest.approx(ddp_losses, rel=1e-4, abs=1e-6)
    assert [s["num_selected"] for s in zero3_steps] == [s["num_selected"] for s in ddp_steps]
    assert ddp_losses[0] > 1e-4, "the context makes the teacher differ from the student"
    if kind == "live":
        return
    # Each ZeRO-3 process saves its shard of the EMA teacher; DDP saves the whole teacher once.
    zero3_checkpoint = tmp_path / "zero3" / "checkpoint-2"
    assert sorted(p.name for p in zero3_checkpoint.glob("self_teacher_*.pt")) == [
        "self_teacher_0.pt",
        "self_teacher_1.pt",
    ]
    assert (tmp_path / "ddp" / "checkpoint-2" / "self_teacher_all.pt").is_file()
    # Resuming from them is checked on one process (test_self_distillation.py): on two CPU processes a resume stops
    # in DeepSpeed's parameter-fetch trace (ZeRO-3) or in transformers' optimizer loading (DDP); see the README.
