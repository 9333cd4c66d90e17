"""Where TIP's loss head spends its time on a GPU: statistics pass, selection, masked loss forward + backward.

Runs the head once at Qwen3-1.7B/8B head shapes (bf16 hidden states and heads, vocabulary 151936) under
`torch.profiler`, and prints per phase the wall time (CUDA events), the GPU kernel time, and the host-device
synchronizations (`cudaStreamSynchronize`/`cudaDeviceSynchronize`/`cudaMemcpy*` device-to-host waits), next to the
matmul lower bound of the projections.

    python benchmarks/profile_head.py --tokens 16384 --ratio 0.5
"""

from __future__ import annotations

import argparse

import torch


SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpyAsync", "cudaMemcpy")


def phase_report(name: str, fn, repeats: int = 3):
    from torch.profiler import ProfilerActivity, profile

    fn()  # warm-up (Triton compile, allocator)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    wall = start.elapsed_time(end) / repeats / 1e3
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = prof.key_averages()
    kernel_s = sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA") / 1e6
    syncs = {e.key: e.count for e in events if e.key in SYNC_EVENTS}
    top = sorted((e for e in events if e.device_type.name == "CUDA"), key=lambda e: -e.self_device_time_total)[:4]
    print(f"{name:<22} wall {wall * 1e3:8.1f} ms   GPU kernels {kernel_s * 1e3:8.1f} ms   host syncs {syncs}")
    for e in top:
        print(f"{'':<24}{e.self_device_time_total / 1e3:8.1f} ms  x{e.count:<4} {e.key[:90]}")
    return wall


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--selector", default="soft_or")
    args = parser.parse_args()

    from trl_tip import build_selector, compute_token_stats, masked_gjsd_loss, resolve_selection

    device, dtype = torch.device("cuda"), torch.bfloat16
    n, h_s, h_t, v = args.tokens, 2048, 4096, 151936
    g = torch.Generator(device=device).manual_seed(0)
    h_student = torch.randn(1, n, h_s, device=device, dtype=dtype, generator=g).requires_grad_(True)
    h_teacher = torch.randn(1, n, h_t, device=device, dtype=dtype, generator=g)
    w_student = (torch.randn(v, h_s, device=device, generator=g) * h_s**-0.5).to(dtype).requires_grad_(True)
    w_teacher = (torch.randn(v, h_t, device=device, generator=g) * h_t**-0.5).to(dtype)
    mask = torch.ones(1, n, dtype=torch.long, device=device)
    selector = build_selector(args.selector, ratio=args.ratio)
    generator = torch.Generator(device=device).manual_seed(0)
    flops = 2 * n * v * (h_s + h_t)
    print(
        f"{n} tokens, H_s {h_s}, H_t {h_t}, V {v}, bf16, {args.selector} {args.ratio:g}; "
        f"one projection of both heads = {flops / 1e12:.1f} TFLOP"
    )

    state = {}

    def stats_pass():
        state["stats"] = compute_token_stats(h_student, h_teacher, w_student, w_teacher, mask)

    def selection():
        state["keep"] = resolve_selection(selector, state["stats"], generator).mask

    def loss_forward_backward():
        loss, _, _ = masked_gjsd_loss(
            h_student, h_teacher, w_student, w_teacher, state["keep"], beta=1.0, stats=state["stats"]
        )
        loss.backward()

    def trl_forward_backward():
        from trl.trainer.distillation_trainer import _chunked_divergence_loss

        loss, _, _ = _chunked_divergence_loss(h_student, h_teacher, w_student, w_teacher, mask, beta=1.0)
        loss.backward()

    walls = {
        "statistics pass": phase_report("statistics pass", stats_pass),
        "selection": phase_report("selection", selection),
        "masked loss fwd+bwd": phase_report("masked loss fwd+bwd", loss_forward_backward),
        "TRL loss fwd+bwd": phase_report("TRL loss fwd+bwd @100%", trl_forward_backward),
    }
    matmul = torch.randn(8192, 8192, device=device, dtype=dtype)
    phase_report("8192^3 bf16 matmul", lambda: matmul @ matmul)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        matmul @ matmul
    end.record()
    torch.cuda.synchronize()
    rate = 2 * 8192**3 / (start.elapsed_time(end) / 10 / 1e3)
    print(
        f"measured bf16 matmul rate {rate / 1e12:.0f} TFLOP/s -> projection lower bound "
        f"{flops / rate * 1e3:.1f} ms; statistics pass at {flops / rate / walls['statistics pass']:.0%} of it"
    )


if __name__ == "__main__":
    main()
