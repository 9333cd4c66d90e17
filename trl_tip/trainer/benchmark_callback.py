"""After-training benchmarks as a `TrainerCallback`, the way transformers composes optional behaviour: their settings
are `BenchmarkArguments` (not training fields), and the trainer adds the callback only when benchmarks are asked for.
`trl-tip train` parses `BenchmarkArguments` beside `TIPConfig`, so a recipe sets `benchmarks: [gsm8k]` as before."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from transformers import TrainerCallback


@dataclass
class BenchmarkArguments:
    """
    The math benchmarks the student is evaluated on when training ends (`trl-tip eval`'s settings, transformers
    backend, on the in-memory student). Pass them as `TIPGKDTrainer(..., benchmark_args=BenchmarkArguments(...))`; the
    fields are also `trl-tip train` flags and recipe keys.

    Example:

    ```python
    >>> from trl_tip.trainer.benchmark_callback import BenchmarkArguments

    >>> BenchmarkArguments(benchmarks="gsm8k,math500", benchmark_num_samples=4).benchmarks
    ['gsm8k', 'math500']
    ```
    """

    benchmarks: list[str] | None = field(
        default=None,
        metadata={
            "help": "Math benchmarks to evaluate the student on when training ends (transformers backend, on the "
            "in-memory student): names among `math500`, `aime24`, `aime25`, `amc23`, `gsm8k`, or `.jsonl` paths (a "
            "list, or one comma-separated string). Results are logged, written to `<output_dir>/eval/<benchmark>/` "
            "and put in the model card's model-index.",
        },
    )
    benchmark_num_samples: int = field(
        default=16,
        metadata={
            "help": "Samples per problem for `benchmarks` (the k of mean@k).",
        },
    )
    benchmark_temperature: float = field(
        default=1.0,
        metadata={
            "help": "Sampling temperature for `benchmarks`.",
        },
    )
    benchmark_max_new_tokens: int | None = field(
        default=None,
        metadata={
            "help": "Longest response for `benchmarks`; defaults to `max_completion_length`.",
        },
    )
    benchmark_limit: int | None = field(
        default=None,
        metadata={
            "help": "Evaluate only the first N problems of each benchmark.",
        },
    )
    benchmark_batch_size: int = field(
        default=8,
        metadata={
            "help": "Problems per `generate` call for `benchmarks` (each with `benchmark_num_samples` samples).",
        },
    )
    benchmark_max_batch_tokens: int | None = field(
        default=65536,
        metadata={
            "help": "Token budget of one `generate` call for `benchmarks`: its sequences x (its longest prompt + "
            "`benchmark_max_new_tokens`), the tokens its KV cache holds at the end, stay within it (a problem's "
            "samples are split over calls when needed). Every process generates its share of the calls. `None` for "
            "no bound. For long generations on large benchmarks, evaluate the saved model with `trl-tip eval "
            "--backend vllm` instead.",
        },
    )

    def __post_init__(self):
        if isinstance(self.benchmarks, str):
            self.benchmarks = [b.strip() for b in self.benchmarks.split(",") if b.strip()]
        for name in self.benchmarks or []:
            # Checked with stand-ins for what only the trainer knows (where the model is, its completion length).
            self.eval_arguments(name, model="student", max_completion_length=1, seed=0)

    def eval_arguments(
        self, benchmark: str, model: str, max_completion_length: int, seed: int, output_dir: str | None = None
    ):
        """The `trl-tip eval` settings for one of `benchmarks`; raises ValueError naming the bad field."""
        from ..eval.harness import BENCHMARKS, EvalArguments

        if benchmark not in BENCHMARKS and not os.path.isfile(benchmark):
            raise ValueError(
                f"`benchmarks` entries must be one of {', '.join(BENCHMARKS)} or an existing .jsonl file; "
                f"got {benchmark!r}."
            )
        try:
            return EvalArguments(
                model=model,
                benchmark=benchmark,
                k=self.benchmark_num_samples,
                temperature=self.benchmark_temperature,
                max_new_tokens=self.benchmark_max_new_tokens or max_completion_length,
                limit=self.benchmark_limit,
                seed=seed,
                batch_size=self.benchmark_batch_size,
                max_batch_tokens=self.benchmark_max_batch_tokens,
                backend="transformers",
                output_dir=output_dir,
            )
        except ValueError as error:
            raise ValueError(f"Invalid benchmark settings (`benchmark_*` fields): {error}") from error


class BenchmarkCallback(TrainerCallback):
    """At the end of training, runs [`evaluate_benchmarks`] on the trainer's student with `benchmark_args`."""

    def __init__(self, trainer, benchmark_args: BenchmarkArguments):
        self.trainer = trainer
        self.benchmark_args = benchmark_args

    def on_train_end(self, args, state, control, **kwargs):
        evaluate_benchmarks(self.trainer, self.benchmark_args)


def evaluate_benchmarks(trainer, benchmark_args: BenchmarkArguments) -> list[dict]:
    """
    Evaluates the student on `benchmark_args.benchmarks` (mean@k with math-verify, transformers backend, `benchmark_*`
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
        for name in benchmark_args.benchmarks:
            output_dir = os.path.join(trainer.args.output_dir, "eval", benchmark_label(name))
            arguments = benchmark_args.eval_arguments(
                name, trainer.args.output_dir, trainer.args.max_completion_length, trainer.args.seed, output_dir
            )
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
