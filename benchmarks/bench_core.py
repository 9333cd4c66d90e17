"""Peak memory and time of TIP's statistics pass and masked loss, against TRL's chunked loss and full-logit GJSD.

Each case runs forward + backward of the loss on random hidden states and heads (the statistics pass is no-grad).
`tip@50%` is the whole TIP step: statistics pass, `soft_or` selection and the masked loss on the kept half.
`tip_stats_pass` is the statistics pass as the trainer runs it, with the teacher-entropy accumulator;
`tip_stats_pass_no_H_T` the same pass with `teacher_entropy=False` (TRL's fold alone). When both run, the cost of the
teacher's entropy (one more accumulator over the same tiles) is printed after the table. `--teacher-entropy-overhead`
times just these two in one process, alternating them so that a shared machine's load weighs on both alike.

    python benchmarks/bench_core.py                       # tiny CPU shapes
    python benchmarks/bench_core.py --shape qwen3 --device cuda   # Qwen3-1.7B student / Qwen3-8B teacher heads
    python benchmarks/bench_core.py --teacher-entropy-overhead --repeats 10   # cost of the teacher's entropy

On CPU every case runs in a fresh process and peak memory is that process's resident-set growth; on CUDA it is
`torch.cuda.max_memory_allocated` above the inputs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch


SHAPES = {
    # batch, completion tokens, student hidden, teacher hidden, vocabulary
    "tiny": (4, 2048, 128, 256, 8192),
    "qwen3": (4, 4096, 2048, 4096, 151936),
}
CASES = [
    "full_logit_gjsd",
    "trl_chunked@100%",
    "tip_stats_pass",
    "tip_stats_pass_no_H_T",
    "tip@100%",
    "tip@50%",
    "tip@20%",
    "tip@10%",
]


def make_inputs(shape, device, dtype):
    b, c, h_s, h_t, v = SHAPES[shape]
    g = torch.Generator(device="cpu").manual_seed(0)

    def randn(*size, scale=1.0):
        return (torch.randn(*size, generator=g) * scale).to(device=device, dtype=dtype)

    return {
        "h_s": randn(b, c, h_s).requires_grad_(True),
        "h_t": randn(b, c, h_t),
        "w_s": randn(v, h_s, scale=h_s**-0.5).requires_grad_(True),
        "w_t": randn(v, h_t, scale=h_t**-0.5),
        "mask": torch.ones(b, c, dtype=torch.long, device=device),
    }


def run_case(case, x, beta):
    from trl.experimental.gkd import GKDTrainer
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    from trl_tip import build_selector, compute_token_stats, masked_gjsd_loss, resolve_selection

    if case == "full_logit_gjsd":
        logits_s, logits_t = x["h_s"] @ x["w_s"].T, x["h_t"] @ x["w_t"].T
        loss = GKDTrainer.generalized_jsd_loss(
            logits_s, logits_t, labels=torch.where(x["mask"] == 1, 0, -100), beta=beta
        )
    elif case == "trl_chunked@100%":
        loss = _chunked_divergence_loss(x["h_s"], x["h_t"], x["w_s"], x["w_t"], x["mask"], beta)[0]
    elif case == "tip_stats_pass_no_H_T":
        compute_token_stats(x["h_s"], x["h_t"], x["w_s"], x["w_t"], x["mask"], teacher_entropy=False)
        return
    else:
        stats = compute_token_stats(x["h_s"], x["h_t"], x["w_s"], x["w_t"], x["mask"])
        if case == "tip_stats_pass":
            return
        ratio = int(case.split("@")[1].rstrip("%")) / 100
        selector = build_selector("all") if ratio == 1.0 else build_selector("soft_or", ratio=ratio)
        keep = resolve_selection(selector, stats, torch.Generator().manual_seed(0)).mask
        loss = masked_gjsd_loss(x["h_s"], x["h_t"], x["w_s"], x["w_t"], keep, beta=beta, stats=stats)[0]
    loss.backward()


def teacher_entropy_overhead(shape, device, dtype, repeats) -> dict:
    """Times of the statistics pass with and without the teacher-entropy accumulator, alternated in one process."""
    from trl_tip import compute_token_stats

    x = make_inputs(shape, device, getattr(torch, dtype))
    times = {True: [], False: []}
    for i in range(repeats + 1):
        for flag in (True, False) if i % 2 == 0 else (False, True):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            compute_token_stats(x["h_s"], x["h_t"], x["w_s"], x["w_t"], x["mask"], teacher_entropy=flag)
            if device == "cuda":
                torch.cuda.synchronize()
            if i > 0:  # the first round warms up (Triton compilation, allocator)
                times[flag].append(time.perf_counter() - start)
    return times


def print_teacher_entropy_overhead(times: dict) -> None:
    with_it, without = sorted(times[True]), sorted(times[False])
    print(f"statistics pass, {len(with_it)} alternated runs each:")
    print(f"{'':<24}{'min (s)':>10}{'median (s)':>12}")
    for name, values in (("with teacher entropy", with_it), ("without", without)):
        print(f"{name:<24}{values[0]:>10.3f}{values[len(values) // 2]:>12.3f}")
    by_min = with_it[0] / without[0] - 1
    by_median = with_it[len(with_it) // 2] / without[len(without) // 2] - 1
    print(f"teacher-entropy overhead: {by_min:+.1%} (min), {by_median:+.1%} (median)")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(case, shape, device, dtype, beta, repeats):
    x = make_inputs(shape, device, getattr(torch, dtype))
    run_case(case, x, beta)  # warm-up (Triton compilation, allocator)
    times = []
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_bytes()
    for _ in range(repeats):
        x["h_s"].grad = x["w_s"].grad = None
        start = time.perf_counter()
        run_case(case, x, beta)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"case": case, "time_s": min(times), "peak_mib": peak / 2**20}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=SHAPES, default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 on CPU, bfloat16 on CUDA by default")
    parser.add_argument("--beta", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cases", nargs="*", default=CASES, choices=CASES)
    parser.add_argument(
        "--teacher-entropy-overhead",
        action="store_true",
        help="time only the statistics pass with and without the teacher-entropy accumulator, alternated",
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")

    if args.one:
        print(json.dumps(measure(args.one, args.shape, args.device, dtype, args.beta, args.repeats)))
        return

    b, c, h_s, h_t, v = SHAPES[args.shape]
    print(
        f"shape {args.shape}: {b} x {c} tokens, H_s={h_s}, H_t={h_t}, V={v}, {dtype} on {args.device}, "
        f"beta={args.beta}"
    )
    if args.teacher_entropy_overhead:
        print_teacher_entropy_overhead(teacher_entropy_overhead(args.shape, args.device, dtype, args.repeats))
        return
    print(f"{'case':<24}{'time (s)':>10}{'peak (MiB)':>12}")
    results = []
    for case in args.cases:
        if args.device == "cpu":
            # A fresh process per case: the resident-set high-water mark is per process.
            cmd = [sys.executable, __file__, "--one", case, "--shape", args.shape, "--device", "cpu", "--dtype", dtype]
            cmd += ["--beta", str(args.beta), "--repeats", str(args.repeats)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            result = json.loads(out)
        else:
            try:
                result = measure(case, args.shape, args.device, dtype, args.beta, args.repeats)
            except torch.OutOfMemoryError:
                result = {"case": case, "time_s": float("nan"), "peak_mib": float("inf")}
            torch.cuda.empty_cache()
        results.append(result)
        print(f"{result['case']:<24}{result['time_s']:>10.3f}{result['peak_mib']:>12.1f}", flush=True)
    print_teacher_entropy_cost({r["case"]: r for r in results})


def print_teacher_entropy_cost(results: dict) -> None:
    """The teacher-entropy accumulator's time and peak-memory cost: the statistics pass with it against without."""
    if not {"tip_stats_pass", "tip_stats_pass_no_H_T"} <= results.keys():
        return
    with_it, without = results["tip_stats_pass"], results["tip_stats_pass_no_H_T"]
    extra = with_it["time_s"] - without["time_s"]
    print(
        f"teacher-entropy accumulator: {with_it['time_s']:.3f} s with, {without['time_s']:.3f} s without: "
        f"{extra:+.3f} s ({extra / without['time_s']:+.1%} of the statistics pass), "
        f"peak {with_it['peak_mib'] - without['peak_mib']:+.1f} MiB"
    )


if __name__ == "__main__":
    main()
