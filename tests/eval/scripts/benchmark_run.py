"""One step of TIP on tiny models with learning rate 0 (so the student stays as built), then the after-training
benchmarks, under however many processes started it: `python benchmark_run.py OUT BENCHMARK` or
`accelerate launch ... benchmark_run.py OUT BENCHMARK`. Each process also writes `generate_calls-rank<i>.json`, the
shape of every `generate` call the benchmarks made on it, for tests/eval/test_distributed_benchmarks.py."""

import json
import os
import sys

import torch
from transformers import TrainerCallback


# 5 GSM8K problems (prompts of 289, 142, 196, 155 and 454 tiny-tokenizer tokens), 2 greedy samples each, at most 2
# problems and 500 tokens per call: the budget splits them into 7 calls of 1, 1, 2, 2, 2, 1 and 1 samples, dealt out
# to 2 processes as 4 + 3 (and one throwaway call).
SETTINGS = {
    "benchmark_num_samples": 2,
    "benchmark_limit": 5,
    "benchmark_max_new_tokens": 6,
    "benchmark_temperature": 0.0,
    "benchmark_batch_size": 2,
    "benchmark_max_batch_tokens": 500,
}


class _RecordGenerateCalls(TrainerCallback):
    """Wraps the student's `generate` once training ends (before the benchmark callback runs) to record each call."""

    def __init__(self, model, path):
        self.model, self.path, self.calls = model, path, []

    def on_train_end(self, args, state, control, **kwargs):
        generate = self.model.generate

        def recorded(*args, **kwargs):
            rows, width = kwargs["input_ids"].shape
            self.calls.append({"rows": rows, "width": width, "max_new_tokens": kwargs["max_new_tokens"]})
            with open(self.path, "w") as f:
                json.dump(self.calls, f)
            return generate(*args, **kwargs)

        self.model.generate = recorded


def run(output_dir: str, benchmark: str) -> None:
    from trl_tip import TIPConfig, TIPGKDTrainer
    from trl_tip.testing import tiny_causal_lm, tiny_math_dataset, tiny_tokenizer
    from trl_tip.trainer.benchmark_callback import BenchmarkArguments

    tokenizer = tiny_tokenizer()
    args = TIPConfig(
        output_dir=output_dir,
        max_steps=1,
        per_device_train_batch_size=2,
        max_completion_length=4,
        learning_rate=0.0,
        report_to="none",
        bf16=False,
        use_cpu=True,
        save_strategy="no",
        seed=3,
    )
    student = tiny_causal_lm(tokenizer, seed=0)
    rank = int(os.environ.get("RANK", "0"))
    recorder = _RecordGenerateCalls(student, os.path.join(output_dir, f"generate_calls-rank{rank}.json"))
    trainer = TIPGKDTrainer(
        model=student,
        teacher_model=tiny_causal_lm(tokenizer, hidden_size=128, seed=1),
        args=args,
        train_dataset=tiny_math_dataset(8),
        processing_class=tokenizer,
        callbacks=[recorder],
        benchmark_args=BenchmarkArguments(benchmarks=[benchmark], **SETTINGS),
    )
    trainer.train()
    # Leave together: a process that exits (closing its gloo pairs) while the main one still writes the run's files
    # made the main process abort in gloo's teardown once, on a loaded machine.
    trainer.accelerator.wait_for_everyone()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    run(*sys.argv[1:3])
