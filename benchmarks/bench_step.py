"""Whole training steps of `trl.DistillationTrainer` against `TIPGKDTrainer` (and TRL's experimental `GKDTrainer`).

Same models, data, seed and settings for every case; repetitions are interleaved, with the case order rotated every
repetition. Per case it reports:

- `step_s`: one optimizer step without generation (`on_step_begin` -> `on_step_end`, synchronized on CUDA: rollout
  bookkeeping, student and teacher forwards, loss, backward, gradient clipping, AdamW). The rollouts are fixed:
  every trainer is handed the same pre-drawn completions of exactly `--lengths` tokens in place of sampling (a
  `_generate_single_turn` override for TRL/TIP, a collator with `lmbda=0` for GKD), so every case trains on the
  same tokens and the step time does not depend on how long sampled rollouts happened to be.
- `gen_s`: generation timed on its own, right after, through the trainer's own generation path (`transformers`
  `generate`, `min_new_tokens = max_new_tokens = --gen-tokens`); `step_with_gen_s = step_s + gen_s`. On the big pair
  the default is a short 32 tokens (decoding 16k tokens with `generate` would take minutes per case): read `gen_s`
  as the per-rollout decoding cost for that many tokens, identical for every case since all share the student.
- `head_s` = `head_fwd_s + head_bwd_s`: time in the loss head. Forward: wall time of TRL's
  `_chunked_divergence_loss` (TRL) or `TIPGKDTrainer._tip_divergence_loss` (TIP: statistics + selection + masked
  loss) or `GKDTrainer.generalized_jsd_loss` (GKD: its full logits come from the model's own `lm_head`, which is not
  counted). Backward: autograd hooks, one on the head's loss output (fires when the backward reaches the head) and
  one on the student hidden states it was given (fires once their gradient is complete, i.e. the head's whole
  backward, head-weight gradient included, is done), each synchronizing CUDA. Measured inside the real step, so it is
  the head's share of that step; the synchronizations cost a few microseconds each.
- `stats_sel_s` (TIP): `compute_token_stats` + `resolve_selection`, and `stats_sel_share` of `step_s`.
- `peak_mib`: `torch.cuda.max_memory_allocated` over the training steps on GPU (absolute: models, gradients, AdamW
  states, activations); on CPU the process's `ru_maxrss` after training, each (case, repetition) in its own process.
- ratios `*_vs_trl` against `trl` measured in the same run.

Pairs:

    python benchmarks/bench_step.py --pair tiny                 # tiny random Qwen3 pair (seconds; a smoke test)
    python benchmarks/bench_step.py --pair smollm2              # embedded SmolLM2-135M / 26-layer student, CPU
    python benchmarks/bench_step.py --pair qwen3-1.7b-8b --lengths 1024 4096 8192 16384   # GPU, bf16, random weights

`qwen3-1.7b-8b` builds Qwen3-1.7B (student, tied embeddings) and Qwen3-8B (teacher) from their published configs with
random weights directly on the GPU in bf16 (no download), trains with gradient checkpointing and AdamW, batch 1.
Prompts come from `trl_tip.testing`'s tiny tokenizer (ids < 320), which both vocabularies contain.

Output: one JSON line per (case, repetition) and one `summary` line per case in `<output-dir>/bench_step_<pair>.jsonl`,
and a markdown table per length, printed and written to `<output-dir>/bench_step_<pair>.md`.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402


# name: (trainer, selector, ratio)
CASES = {
    "trl": ("trl", None, None),
    "tip_all": ("tip", "all", 1.0),
    "tip_soft_or_50": ("tip", "soft_or", 0.5),
    "tip_q3_10": ("tip", "q3", 0.1),
    "gkd": ("gkd", None, None),
}
PAIRS = {
    # device default, lengths, batch, repetitions, warmup steps, timed steps, generation tokens (None: the length), gkd
    # isolate: every (case, repetition) in its own process, so that CPU peak RSS is per case
    "tiny": {
        "device": None,
        "lengths": [16],
        "batch": 2,
        "reps": 2,
        "warmup": 1,
        "steps": 1,
        "gen": None,
        "gkd": True,
        "isolate": False,
    },
    "smollm2": {
        "device": "cpu",
        "lengths": [64],
        "batch": 2,
        "reps": 2,
        "warmup": 1,
        "steps": 1,
        "gen": 16,
        "gkd": True,
        "isolate": True,
    },
    "qwen3-1.7b-8b": {
        "device": "cuda",
        "lengths": [1024, 4096, 8192, 16384],
        "batch": 1,
        "reps": 2,
        "warmup": 1,
        "steps": 2,
        "gen": 32,
        "gkd": False,
        "isolate": False,
    },
}
# Qwen3-1.7B and Qwen3-8B `config.json` values (Hugging Face Hub, Qwen/Qwen3-1.7B and Qwen/Qwen3-8B).
QWEN3_CONFIGS = {
    "qwen3-1.7b": {
        "hidden_size": 2048,
        "intermediate_size": 6144,
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "tie_word_embeddings": True,
    },
    "qwen3-8b": {
        "hidden_size": 4096,
        "intermediate_size": 12288,
        "num_hidden_layers": 36,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "tie_word_embeddings": False,
    },
}
QWEN3_COMMON = {
    "vocab_size": 151936,
    "max_position_embeddings": 40960,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "use_sliding_window": False,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
}
SEED = 1234


# ---------------------------------------------------------------------------------------------------------------------
# Models


class Pair:
    """Student, teacher, tokenizer and prompts of one benchmark pair, plus a way back to the initial student."""

    def __init__(self, name: str, device: str):
        self.name, self.device = name, torch.device(device)
        from trl_tip.testing import tiny_math_dataset, tiny_tokenizer

        self.prompts = tiny_math_dataset(64, seed=SEED)
        if name == "tiny":
            from trl_tip.testing import tiny_causal_lm

            self.tokenizer = tiny_tokenizer()
            self.student = tiny_causal_lm(self.tokenizer, seed=0).to(self.device)
            self.teacher = tiny_causal_lm(self.tokenizer, hidden_size=128, num_layers=2, seed=1).to(self.device)
            self.dtype = torch.float32
        elif name == "smollm2":
            from trl_tip.models import load_causal_lm, smollm2_path
            from trl_tip.pair.student_layers import compress_layers, default_layers_to_keep

            path = str(smollm2_path())
            dtype = torch.float32 if self.device.type == "cpu" else torch.bfloat16
            self.teacher, self.tokenizer = load_causal_lm(path, dtype=dtype)
            student, _ = load_causal_lm(path, dtype=dtype)
            keep = default_layers_to_keep(self.teacher.config.num_hidden_layers, 26)  # as `trl-tip demo` builds it
            self.student = compress_layers(student, keep)
            self.student.to(self.device), self.teacher.to(self.device)
            self.dtype = dtype
        elif name == "qwen3-1.7b-8b":
            self.tokenizer = tiny_tokenizer()
            self.dtype = torch.bfloat16
            started = time.perf_counter()
            self.teacher = random_qwen3("qwen3-8b", self.device, self.dtype, seed=1, tokenizer=self.tokenizer)
            self.student = random_qwen3("qwen3-1.7b", self.device, self.dtype, seed=0, tokenizer=self.tokenizer)
            self.build_s = time.perf_counter() - started
        else:
            raise ValueError(f"unknown pair {name!r}")
        self.teacher.eval()
        self._initial = None
        if name != "qwen3-1.7b-8b":
            self._initial = {k: v.detach().to("cpu", copy=True) for k, v in self.student.state_dict().items()}

    def reset_student(self):
        """The same initial student for every case: reloaded (small pairs) or re-drawn from its seed (big pair)."""
        self.student.zero_grad(set_to_none=True)
        if self._initial is not None:
            self.student.load_state_dict(self._initial)
        else:
            init_random_(self.student, seed=0)
        self.student.train()

    def completion_ids(self, length: int, batch: int) -> list[list[int]]:
        """Fixed rollouts: `batch` completions of exactly `length` ordinary (non-special) token ids, seeded."""
        special = set(self.tokenizer.all_special_ids)
        pool = torch.tensor([i for i in range(len(self.tokenizer)) if i not in special])
        g = torch.Generator().manual_seed(SEED + length)
        return [pool[torch.randint(0, len(pool), (length,), generator=g)].tolist() for _ in range(batch)]


def random_qwen3(kind: str, device, dtype, seed: int, tokenizer=None):
    """A Qwen3 model from the published config with random weights, built on `meta` and materialized on `device`
    (skipping transformers' slow per-module init), then filled like its `_init_weights`: N(0, 0.02), norms 1."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(**QWEN3_COMMON, **QWEN3_CONFIGS[kind])
    if tokenizer is not None:
        config.pad_token_id = tokenizer.pad_token_id
    with torch.device("meta"):
        model = Qwen3ForCausalLM(config)
    model = model.to(dtype=dtype).to_empty(device=device)
    model.tie_weights()
    # Non-persistent buffers (rotary inverse frequencies) are empty after `to_empty`: rebuild them.
    model.model.rotary_emb = type(model.model.rotary_emb)(config).to(device)
    init_random_(model, seed)
    if tokenizer is not None:
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


@torch.no_grad()
def init_random_(model, seed: int):
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    seen = set()
    for name, p in model.named_parameters(remove_duplicate=True):
        if id(p) in seen:
            continue
        seen.add(id(p))
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        else:
            p.normal_(0.0, 0.02, generator=g)


# ---------------------------------------------------------------------------------------------------------------------
# Trainers with fixed rollouts


def trainer_classes():
    from trl import DistillationTrainer

    from trl_tip import TIPGKDTrainer

    class FixedRollouts:
        """Hands out the pre-drawn completions instead of sampling (on-policy path of TRL and TIP)."""

        bench_completions: list[list[int]] | None = None

        def _generate_single_turn(self, prompt_ids, images, multimodal_fields, has_tool_images=False):
            if self.bench_completions is None:
                return super()._generate_single_turn(prompt_ids, images, multimodal_fields, has_tool_images)
            n = len(self.bench_completions)
            return [list(self.bench_completions[i % n]) for i in range(len(prompt_ids))]

    class BenchDistillation(FixedRollouts, DistillationTrainer):
        pass

    class BenchTIP(FixedRollouts, TIPGKDTrainer):
        pass

    return BenchDistillation, BenchTIP


class FixedBatchCollator:
    """GKD's batches: chat-templated prompts (left-padded) followed by the fixed completions; labels on completions."""

    def __init__(self, tokenizer, completions):
        self.tokenizer, self.completions = tokenizer, completions

    def __call__(self, examples):
        pad = self.tokenizer.pad_token_id
        prompts = [
            self.tokenizer.apply_chat_template(e["prompt"], add_generation_prompt=True, tokenize=True)
            for e in examples
        ]
        prompts = [p["input_ids"] if isinstance(p, dict) or hasattr(p, "keys") else p for p in prompts]
        width = max(len(p) for p in prompts)
        rows, labels, prompt_rows, prompt_masks = [], [], [], []
        for i, p in enumerate(prompts):
            c = self.completions[i % len(self.completions)]
            fill = [pad] * (width - len(p))
            rows.append(fill + list(p) + list(c))
            labels.append([-100] * width + list(c))
            prompt_rows.append(fill + list(p))
            prompt_masks.append([0] * len(fill) + [1] * len(p))
        input_ids = torch.tensor(rows)
        prompt_mask = torch.tensor(prompt_masks)
        attention_mask = torch.cat([prompt_mask, torch.ones(len(rows), len(self.completions[0]), dtype=torch.long)], 1)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": torch.tensor(labels),
            "prompts": torch.tensor(prompt_rows),
            "prompt_attention_mask": prompt_mask,
        }


def common_args(pair: Pair, length: int, settings: dict, output_dir: str) -> dict:
    return {
        "output_dir": output_dir,
        "max_steps": settings["warmup"] + settings["steps"],
        "per_device_train_batch_size": settings["batch"],
        "gradient_accumulation_steps": 1,
        "learning_rate": 1e-6,
        "lr_scheduler_type": "constant",
        "optim": "adamw_torch",
        "gradient_checkpointing": pair.name == "qwen3-1.7b-8b",
        "bf16": False,  # the big pair's weights are bf16 already: no autocast wrapper, the same for every case
        "use_cpu": pair.device.type == "cpu",
        "logging_steps": 1,
        "report_to": "none",
        "save_strategy": "no",
        "disable_tqdm": True,
        "seed": SEED,
        "temperature": 1.0,
        "beta": 1.0,
    }


def build_trainer(case: str, pair: Pair, length: int, settings: dict, output_dir: str):
    kind, selector, ratio = CASES[case]
    completions = pair.completion_ids(length, settings["batch"])
    args = common_args(pair, length, settings, output_dir)
    if kind == "gkd":
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        config = GKDConfig(**args, lmbda=0.0, seq_kd=False, max_new_tokens=length)
        trainer = GKDTrainer(
            model=pair.student,
            teacher_model=pair.teacher,
            args=config,
            data_collator=FixedBatchCollator(pair.tokenizer, completions),
            train_dataset=pair.prompts,
            processing_class=pair.tokenizer,
        )
        return trainer
    BenchDistillation, BenchTIP = trainer_classes()
    if kind == "trl":
        from trl import DistillationConfig

        config = DistillationConfig(**args, max_completion_length=length)
        trainer = BenchDistillation(
            model=pair.student,
            teacher_model=pair.teacher,
            args=config,
            train_dataset=pair.prompts,
            processing_class=pair.tokenizer,
        )
    else:
        from trl_tip import TIPConfig

        config = TIPConfig(
            **args,
            max_completion_length=length,
            token_selector=selector,
            selection_ratio=ratio,
            num_rollouts_per_prompt=1,
            lmbda=1.0,
        )
        trainer = BenchTIP(
            model=pair.student,
            teacher_model=pair.teacher,
            args=config,
            train_dataset=pair.prompts,
            processing_class=pair.tokenizer,
        )
    trainer.bench_completions = completions
    return trainer


# ---------------------------------------------------------------------------------------------------------------------
# Timers


class Timers:
    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.step, self.head_fwd, self.head_bwd, self.stats_sel = [], [], [], []
        self._bwd_start = None
        self._stats_sel_now = 0.0

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def now(self):
        self.sync()
        return time.perf_counter()

    def timed_head(self, fn, input_index=0):
        """Wraps a loss head: times its forward, and its backward with hooks on its output and student input."""

        def wrapper(*args, **kwargs):
            self._stats_sel_now = 0.0
            start = self.now()
            out = fn(*args, **kwargs)
            self.head_fwd.append(self.now() - start)
            self.stats_sel.append(self._stats_sel_now)
            # TIP's head returns a RoutedLoss: TRL's (loss, entropy sum, count) plus what the trainer records.
            from trl_tip.trainer.loss_routing import RoutedLoss

            value = out.value if isinstance(out, RoutedLoss) else out
            loss = value[0] if isinstance(value, tuple) else value
            hidden = kwargs.get("student_logits") if input_index is None else args[input_index]
            if loss.requires_grad and hidden is not None and hidden.requires_grad:
                loss.register_hook(self._backward_started)
                hidden.register_hook(self._backward_done)
            return out

        return wrapper

    def _backward_started(self, grad):
        self._bwd_start = self.now()

    def _backward_done(self, grad):
        if self._bwd_start is not None:
            self.head_bwd.append(self.now() - self._bwd_start)
            self._bwd_start = None

    def timed_part(self, fn):
        def wrapper(*args, **kwargs):
            start = self.now()
            out = fn(*args, **kwargs)
            self._stats_sel_now += self.now() - start
            return out

        return wrapper


def step_timer_callback(timers):
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start = timers.now()

        def on_step_end(self, args, state, control, **kwargs):
            timers.step.append(timers.now() - self.start)

    return StepTimer()


@contextlib.contextmanager
def instrumented(trainer, case, timers):
    """Puts the loss-head timers in place for the length of one run."""
    from trl.trainer import distillation_trainer as trl_distillation

    import trl_tip.trainer.tip_trainer as tip_module

    kind = CASES[case][0]
    restore = []
    if kind == "trl":
        restore.append((trl_distillation, "_chunked_divergence_loss", trl_distillation._chunked_divergence_loss))
        trl_distillation._chunked_divergence_loss = timers.timed_head(trl_distillation._chunked_divergence_loss)
    elif kind == "tip":
        trainer._tip_divergence_loss = timers.timed_head(trainer._tip_divergence_loss)
        for name in ("compute_token_stats", "resolve_selection"):
            restore.append((tip_module, name, getattr(tip_module, name)))
            setattr(tip_module, name, timers.timed_part(getattr(tip_module, name)))
    else:
        trainer.generalized_jsd_loss = timers.timed_head(type(trainer).generalized_jsd_loss, input_index=None)
    try:
        yield
    finally:
        for module, name, original in restore:
            setattr(module, name, original)


# ---------------------------------------------------------------------------------------------------------------------
# One run: one case, one repetition


def time_generation(trainer, case, pair: Pair, settings, timers) -> float:
    """Seconds to sample `gen` new tokens for one batch of prompts through the trainer's own generation path."""
    import copy

    from trl.models import unwrap_model_for_generation

    tokens = settings["gen"] or settings["length"]
    examples = [pair.prompts[i] for i in range(settings["batch"])]
    kind = CASES[case][0]
    if kind == "gkd":
        inputs = FixedBatchCollator(pair.tokenizer, pair.completion_ids(1, settings["batch"]))(examples)
        inputs = {k: v.to(pair.device) for k, v in inputs.items()}
        config = copy.deepcopy(trainer.generation_config)
        config.max_new_tokens = config.min_new_tokens = tokens

        def generate():
            with unwrap_model_for_generation(
                trainer.model_wrapped,
                trainer.accelerator,
                generation_kwargs=trainer.generation_kwargs,
                gradient_checkpointing_kwargs=trainer.args.gradient_checkpointing_kwargs,
            ) as unwrapped:
                return type(trainer).generate_on_policy_outputs(unwrapped, inputs, config)[0]

    else:
        from trl import DistillationTrainer

        prompt_ids, images, multimodal = trainer._tokenize_prompts([e["prompt"] for e in examples])
        config = copy.deepcopy(trainer.generation_config)
        config.max_new_tokens = config.min_new_tokens = tokens
        original = trainer.generation_config

        def generate():
            trainer.generation_config = config
            try:
                return DistillationTrainer._generate_single_turn(trainer, prompt_ids, images, multimodal)
            finally:
                trainer.generation_config = original

    real_tokens, tokens = tokens, 2
    config.max_new_tokens = config.min_new_tokens = tokens
    generate()  # untimed: the first `generate` of a run pays one-off set-up costs
    tokens = config.max_new_tokens = config.min_new_tokens = real_tokens
    start = timers.now()
    out = generate()
    elapsed = timers.now() - start
    lengths = [len(c) for c in out] if isinstance(out, list) else None
    if lengths is not None and min(lengths) != tokens:
        raise RuntimeError(f"generation produced {lengths} tokens, expected {tokens}")
    return elapsed


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_once(pair: Pair, case: str, length: int, settings: dict, rep: int) -> dict:
    from transformers import PrinterCallback

    settings = {**settings, "length": length}
    pair.reset_student()
    torch.manual_seed(SEED)
    timers = Timers(pair.device)
    cuda = pair.device.type == "cuda"
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build_trainer(case, pair, length, settings, tmp)
        trainer.add_callback(step_timer_callback(timers))
        trainer.remove_callback(PrinterCallback)  # no per-step log dicts on stdout
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base_mib = torch.cuda.memory_allocated() / 2**20
        else:
            base_mib = rss_mib()
        error = None
        try:
            with instrumented(trainer, case, timers):
                trainer.train()
        except torch.OutOfMemoryError as oom:
            error = f"out of memory: {str(oom).splitlines()[0]}"
        if cuda:
            peak_mib = torch.cuda.max_memory_allocated() / 2**20
        else:
            peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        gen_s = None
        if error is None and settings["gen"] != 0:
            trainer.model.eval()
            with torch.no_grad():
                gen_s = time_generation(trainer, case, pair, settings, timers)
        trainer.accelerator.free_memory()
        del trainer
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    warm = settings["warmup"]

    def timed(values):
        values = values[warm:]
        return statistics.median(values) if values else None

    step_s = timed(timers.step)
    result = {
        "type": "run",
        "pair": pair.name,
        "device": str(pair.device),
        "case": case,
        "length": length,
        "batch": settings["batch"],
        "rep": rep,
        "step_s": step_s,
        "step_times": timers.step,
        "head_fwd_s": timed(timers.head_fwd),
        "head_bwd_s": timed(timers.head_bwd),
        "stats_sel_s": timed(timers.stats_sel) if CASES[case][0] == "tip" else None,
        "gen_tokens": (settings["gen"] or length) if settings["gen"] != 0 else 0,
        "gen_s": gen_s,
        "peak_mib": peak_mib,
        "base_mib": base_mib,
        "losses": losses,
        "error": error,
    }
    if result["head_fwd_s"] is not None and result["head_bwd_s"] is not None:
        result["head_s"] = result["head_fwd_s"] + result["head_bwd_s"]
    return result


# ---------------------------------------------------------------------------------------------------------------------
# Driver


def summarize(runs: list[dict], cases: list[str]) -> list[dict]:
    def med(values):
        values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
        return statistics.median(values) if values else None

    summaries = []
    for length in sorted({r["length"] for r in runs}):
        rows = {}
        for case in cases:
            mine = [r for r in runs if r["case"] == case and r["length"] == length]
            if not mine:
                continue
            row = {
                "type": "summary",
                "pair": mine[0]["pair"],
                "device": mine[0]["device"],
                "case": case,
                "length": length,
                "batch": mine[0]["batch"],
                "reps": len(mine),
                "step_s": med([r["step_s"] for r in mine]),
                "gen_tokens": mine[0]["gen_tokens"],
                "gen_s": med([r["gen_s"] for r in mine]),
                "head_s": med([r.get("head_s") for r in mine]),
                "head_fwd_s": med([r["head_fwd_s"] for r in mine]),
                "head_bwd_s": med([r["head_bwd_s"] for r in mine]),
                "stats_sel_s": med([r["stats_sel_s"] for r in mine]),
                "peak_mib": max(r["peak_mib"] for r in mine),
                "errors": sorted({r["error"] for r in mine if r["error"]}),
            }
            if row["step_s"] is not None and row["gen_s"] is not None:
                row["step_with_gen_s"] = row["step_s"] + row["gen_s"]
            if row["stats_sel_s"] is not None and row["step_s"]:
                row["stats_sel_share"] = row["stats_sel_s"] / row["step_s"]
            rows[case] = row
        base = rows.get("trl")
        for row in rows.values():
            for key in ("step_s", "step_with_gen_s", "head_s", "peak_mib"):
                ours, theirs = row.get(key), (base or {}).get(key)
                row[f"{key}_vs_trl"] = ours / theirs if ours is not None and theirs else None
            summaries.append(row)
    return summaries


def markdown(summaries: list[dict], header: str) -> str:
    def f(value, digits=3, suffix=""):
        if value is None:
            return "–"
        return f"{value:.{digits}f}{suffix}"

    lines = [header, ""]
    for length in sorted({s["length"] for s in summaries}):
        rows = [s for s in summaries if s["length"] == length]
        gen = rows[0]["gen_tokens"]
        lines += [
            f"**{length} completion tokens** x batch {rows[0]['batch']}, {rows[0]['device']}, median of "
            f"{rows[0]['reps']} interleaved repetitions; generation: {gen} new tokens",
            "",
            "| case | step w/o gen (s) | vs TRL | gen (s) | step + gen (s) | vs TRL | loss head fwd+bwd (s) | vs TRL "
            "| stats+selection (s) | share of step | peak (MiB) | vs TRL |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for s in rows:
            share = 100 * s["stats_sel_share"] if s.get("stats_sel_share") is not None else None
            name = s["case"] + (f" ({'; '.join(s['errors'])})" if s["errors"] else "")
            lines.append(
                f"| `{name}` | {f(s['step_s'])} | {f(s['step_s_vs_trl'], 2, 'x')} | {f(s['gen_s'])} "
                f"| {f(s.get('step_with_gen_s'))} | {f(s['step_with_gen_s_vs_trl'], 2, 'x')} "
                f"| {f(s['head_s'])} ({f(s['head_fwd_s'])}+{f(s['head_bwd_s'])}) | {f(s['head_s_vs_trl'], 2, 'x')} "
                f"| {f(s['stats_sel_s'])} | {f(share, 1, '%')} "
                f"| {f(s['peak_mib'], 0)} | {f(s['peak_mib_vs_trl'], 3, 'x')} |"
            )
        lines.append("")
    return "\n".join(lines)


def settings_from(args, pair_defaults) -> dict:
    return {
        "batch": args.batch_size or pair_defaults["batch"],
        "warmup": pair_defaults["warmup"] if args.warmup is None else args.warmup,
        "steps": args.steps or pair_defaults["steps"],
        "gen": pair_defaults["gen"] if args.gen_tokens is None else args.gen_tokens,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pair", choices=PAIRS, default="smollm2")
    parser.add_argument("--device", default=None, help="cpu or cuda; default: the pair's (smollm2: cpu)")
    parser.add_argument("--lengths", type=int, nargs="+", default=None, help="completion tokens per rollout")
    parser.add_argument("--batch-size", type=int, default=None, help="rollouts per step")
    parser.add_argument("--repetitions", type=int, default=None, help="interleaved repetitions per case")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps at the start of every run")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per run")
    parser.add_argument("--gen-tokens", type=int, default=None, help="new tokens in the generation timing (0: skip)")
    parser.add_argument("--cases", nargs="+", choices=CASES, default=None)
    gkd = parser.add_mutually_exclusive_group()
    gkd.add_argument("--gkd", dest="gkd", action="store_true", default=None, help="include TRL's GKDTrainer")
    gkd.add_argument("--no-gkd", dest="gkd", action="store_false", help="leave GKDTrainer out")
    isolate = parser.add_mutually_exclusive_group()
    isolate.add_argument(
        "--isolate", dest="isolate", action="store_true", default=None, help="every run in its own process"
    )
    isolate.add_argument("--in-process", dest="isolate", action="store_false", help="all runs in this process")
    parser.add_argument("--output-dir", default="bench_results")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:  # one (case, length, repetition) in this process; prints its JSON line
        spec = json.loads(args.worker)
        pair = Pair(spec["pair"], spec["device"])
        result = run_once(pair, spec["case"], spec["length"], spec["settings"], spec["rep"])
        print("BENCH_RESULT " + json.dumps(result), flush=True)
        return

    defaults = PAIRS[args.pair]
    device = args.device or defaults["device"] or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")
    settings = settings_from(args, defaults)
    lengths = args.lengths or defaults["lengths"]
    reps = args.repetitions or defaults["reps"]
    with_gkd = defaults["gkd"] if args.gkd is None else args.gkd
    cases = args.cases or [c for c in CASES if c != "gkd" or with_gkd]
    if args.isolate is not None:
        isolate = args.isolate
    else:  # per-case RSS needs a process per case on CPU; on GPU the allocator's peak is reset per case
        isolate = defaults["isolate"] and device == "cpu"
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    jsonl, md_path = out_dir / f"bench_step_{args.pair}.jsonl", out_dir / f"bench_step_{args.pair}.md"
    jsonl.write_text("")

    started = time.perf_counter()
    header = (
        f"`bench_step.py --pair {args.pair}` on {device}: {platform_line(device)}; cases {', '.join(cases)}; "
        f"{settings['warmup']} warm-up + {settings['steps']} timed steps per run, batch {settings['batch']}"
    )
    print(header, flush=True)
    pair = None
    if not isolate:
        pair = Pair(args.pair, device)
        if hasattr(pair, "build_s"):
            print(f"models built in {pair.build_s:.1f} s", flush=True)
    runs, summaries = [], []
    if not isolate:
        # One untimed run first: the process's one-off costs (CUDA context, cuBLAS, lazy imports) are nobody's.
        t0 = time.perf_counter()
        run_once(pair, cases[0], lengths[0], {**settings, "steps": 1, "gen": 0}, -1)
        print(f"  process warm-up run ({cases[0]}, {lengths[0]} tokens): {time.perf_counter() - t0:.0f} s", flush=True)
    for length in lengths:
        for rep in range(reps):
            shift = rep % len(cases)
            for case in cases[shift:] + cases[:shift]:
                t0 = time.perf_counter()
                if isolate:
                    result = run_isolated(args.pair, device, case, length, settings, rep)
                else:
                    result = run_once(pair, case, length, settings, rep)
                runs.append(result)
                with jsonl.open("a") as f:
                    f.write(json.dumps(result) + "\n")
                peak = result.get("peak_mib")
                print(
                    f"  length {length} rep {rep} {case:<15} step {fmt(result.get('step_s'))} s  "
                    f"head {fmt(result.get('head_s'))} s  gen {fmt(result.get('gen_s'))} s  "
                    f"peak {fmt(peak, 0)} MiB (base {fmt(result.get('base_mib'), 0)})  "
                    f"({time.perf_counter() - t0:.0f} s)  {result.get('error') or ''}",
                    flush=True,
                )
        length_summaries = summarize([r for r in runs if r["length"] == length], cases)
        summaries += length_summaries
        with jsonl.open("a") as f:
            for row in length_summaries:
                f.write(json.dumps(row) + "\n")
        md_path.write_text(
            markdown(summaries, header) + f"\nwall time so far: {time.perf_counter() - started:.0f} s\n"
        )
    table = markdown(summaries, header)
    wall = time.perf_counter() - started
    md_path.write_text(table + f"\nwall time: {wall:.0f} s\n")
    print("\n" + table)
    print(f"wall time: {wall:.0f} s; results in {jsonl} and {md_path}")


def fmt(value, digits=3):
    return "–" if value is None else f"{value:.{digits}f}"


def platform_line(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    return f"{os.cpu_count()} CPU cores, torch {torch.__version__}"


def run_isolated(pair_name, device, case, length, settings, rep) -> dict:
    spec = {"pair": pair_name, "device": device, "case": case, "length": length, "settings": settings, "rep": rep}
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True, cwd=REPO
    )
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH_RESULT "):
            return json.loads(line[len("BENCH_RESULT ") :])
    raise RuntimeError(f"worker for {case} at {length} failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")


if __name__ == "__main__":
    main()
