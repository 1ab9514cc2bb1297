"""CPU timing of ``pmkernels.pareto_linear`` as a multiple of ``F.linear``, and the naive/factored crossover.

    PYTHONPATH=.:python_api python bench/scripts/time_pareto_linear_cpu.py targets [--rounds 15]
    PYTHONPATH=.:python_api python bench/scripts/time_pareto_linear_cpu.py crossover [--rounds 9]

``targets``: the shapes of issue 23 (MiniLM 384→384 and 384→1536 at N = 4096, ViT-B 768² at N = 1600,
2048² at N = 512, and 128² at N = 4096), fp32 and bf16, forward (no_grad) and forward+backward with W
frozen (grads of x, U, G, V; for ``linear`` of x only), shared and per-sample γ (B = 16).
``crossover``: forward of a shared γ, ``torch`` (factored) against ``naive`` (merge W(γ), then F.linear)
for square layers over N: where merging first wins (the rule ``auto`` uses on CPU, pmkernels/_dispatch.py).

Round-robin: every round times each impl once, in a seeded shuffled order (whatever runs right after
naive's B per-sample weights pays for their memory), so load from other processes hits all alike; the clock is
the process's CPU time (``time.process_time``; meaningful with one thread, which the script sets), and the
figure is the median over rounds divided by ``linear``'s median of the same run. Run it on an idle machine
(``uptime``) and state the load with the numbers.
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
import torch.nn.functional as F

import pmkernels

R, K, B = 16, 8, 16
TARGET_SHAPES = [(4096, 384, 384), (4096, 384, 1536), (1600, 768, 768), (512, 2048, 2048), (4096, 128, 128)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make(N: int, d_in: int, d_out: int, dtype: torch.dtype, per_sample: bool, grad: bool) -> dict:
    g = torch.Generator().manual_seed(0)
    t = dict(x=torch.randn(B, N // B, d_in, generator=g), W=torch.randn(d_out, d_in, generator=g) / d_in**0.5,
             b=0.1 * torch.randn(d_out, generator=g), U=torch.randn(d_out, R, generator=g) / R**0.5,
             G=torch.randn(R, R, K, generator=g), V=torch.randn(d_in, R, generator=g) / d_in**0.5,
             dy=torch.randn(B, N // B, d_out, generator=g))
    t = {k: v.to(dtype) for k, v in t.items()}
    t["pref"] = torch.distributions.Dirichlet(torch.ones(K)).sample((B,) if per_sample else ()).double()
    if grad:
        for k in ("x", "U", "G", "V"):
            t[k].requires_grad_(True)
    return t


def call(impl: str, t: dict, grad: bool) -> None:
    if not grad:
        with torch.no_grad():
            _forward(impl, t)
        return
    for k in ("x", "U", "G", "V"):
        t[k].grad = None
    _forward(impl, t).backward(t["dy"])


def _forward(impl: str, t: dict) -> torch.Tensor:
    if impl == "linear":
        return F.linear(t["x"], t["W"], t["b"])
    return pmkernels.pareto_linear(t["x"], t["W"], t["b"], t["U"], t["G"], t["V"], t["pref"], impl=impl,
                                   check_values=False)


def ratios(impls: list[str], t: dict, grad: bool, rounds: int) -> tuple[dict, float]:
    """Median CPU time of each impl over ``rounds`` round-robin rounds, divided by linear's; linear's ms."""
    times: dict[str, list[float]] = {i: [] for i in impls}
    for i in impls:  # warm-up
        call(i, t, grad)
    order = random.Random(0)
    for _ in range(rounds):
        for i in order.sample(impls, len(impls)):  # shuffled: naive's B per-sample weights slow what follows
            t0 = time.process_time()
            call(i, t, grad)
            times[i].append(time.process_time() - t0)
    base = statistics.median(times["linear"])
    return {i: statistics.median(v) / base for i, v in times.items()}, base * 1e3


def targets(args) -> None:
    impls = ["linear", "torch", "naive", "auto"]
    print("| dtype | pass | γ | N, in→out | F.linear ms | " + " | ".join(impls[1:]) + " |")
    print("|---" * (5 + len(impls) - 1) + "|")
    for dname in args.dtypes.split(","):
        for grad in (False, True):
            for per_sample in (False, True):
                for N, d_in, d_out in TARGET_SHAPES:
                    t = make(N, d_in, d_out, DTYPES[dname], per_sample, grad)
                    r, ms = ratios(impls, t, grad, args.rounds)
                    print(f"| {dname} | {'fwd+bwd' if grad else 'fwd'} | {'per-sample' if per_sample else 'shared'} "
                          f"| {N}, {d_in}→{d_out} | {ms:.2f} | " + " | ".join(f"{r[i]:.2f}×" for i in impls[1:]) + " |",
                          flush=True)


def crossover(args) -> None:
    print("| dtype | in = out | N | torch | naive | naive/torch |")
    print("|---|---|---|---|---|---|")
    for dname in args.dtypes.split(","):
        for d in (64, 128, 256, 384, 768):
            for N in (64, 128, 256, 512, 1024, 2048):
                t = make(max(N, B), d, d, DTYPES[dname], False, False)
                r, _ = ratios(["linear", "torch", "naive"], t, False, args.rounds)
                print(f"| {dname} | {d} | {N} | {r['torch']:.2f}× | {r['naive']:.2f}× | {r['naive'] / r['torch']:.2f} |",
                      flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["targets", "crossover"])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--dtypes", default="fp32,bf16")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread, r={R}, K={K}, B={B}, CPU-time medians over {args.rounds} rounds")
    targets(args) if args.mode == "targets" else crossover(args)


if __name__ == "__main__":
    main()
