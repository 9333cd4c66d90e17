"""After-training benchmarks (`TIPConfig.benchmarks`) as a `TrainerCallback`, the way transformers composes optional
behaviour: the trainer adds the callback only when benchmarks are asked for."""

from __future__ import annotations

import os

from transformers import TrainerCallback


class BenchmarkCallback(TrainerCallback):
    """At the end of training, runs [`evaluate_benchmarks`] on the trainer's student."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_end(self, args, state, control, **kwargs):
        evaluate_benchmarks(self.trainer)


def evaluate_benchmarks(trainer) -> list[dict]:
    """
    Evaluates the student on `args.benchmarks` (mean@k with math-verify, transformers backend, `benchmark_*`
    settings), writes `<output_dir>/eval/<benchmark>/{results.jsonl,summary.json}`, logs `benchmark/<name>/*`
    and keeps the summaries in `benchmark_results` for the model card's model-index.

    Every process generates: the `generate` calls (at most `benchmark_batch_size` problems and
    `benchmark_max_batch_tokens` tokens each) are dealt out to the processes and their samples gathered after each
    round, so no process waits on another for longer than one call, and the results are those of one process. Under
    ZeRO-3 the student is gathered first (TRL's `unwrap_model_for_generation`, as `ds3_gather_for_generation` says)
    and every process makes the same number of `generate` calls. The main process grades and writes the files.
    """
    from accelerate.utils import broadcast_object_list
    from trl.models.utils import unwrap_model_for_generation

    from ..eval.harness import benchmark_label, evaluate

    accelerator = trainer.accelerator
    results = []
    with unwrap_model_for_generation(
        trainer.model_wrapped, accelerator, gather_deepspeed3_params=trainer.args.ds3_gather_for_generation
    ) as student:
        for name in trainer.args.benchmarks:
            output_dir = os.path.join(trainer.args.output_dir, "eval", benchmark_label(name))
            arguments = trainer.args.benchmark_arguments(name, output_dir)
            summary = evaluate(arguments, model=student, tokenizer=trainer.processing_class, accelerator=accelerator)
            results.append(summary)
    student.train()
    results = broadcast_object_list([results])[0]
    trainer.benchmark_results = results
    metrics = {}
    for summary in results:
        k = summary["k"]
        for key in (f"mean@{k}", f"mean@{k}_stderr", f"pass@{k}", "mean_response_tokens"):
            metrics[f"benchmark/{summary['benchmark']}/{key}"] = summary[key]
    trainer.log(metrics)
    return results
