"""One data-free step (objective + STCH + backward) of one layer: dense deltas vs compressed task vectors.

    PYTHONPATH=.:python_api python bench/scripts/time_lowrank_datafree_cpu.py [--repeats 5] [--threads 1]

Per layer shape and rank R: the dense step (``pmkernels.weight_distances``, impls torch and cpp when it builds)
and the low-rank step (``pmkernels.low_rank_distances`` on truncated SVDs of the same deltas at rank R).
Reported: best-of-``repeats`` wall time (one warm-up, impls interleaved), the step's peak memory above its inputs
(VmHWM − VmRSS, see bench/pmbench_util.py), the bytes of the stored deltas, the one-time SVD cost, and the
relative error of f (the K objectives) against the dense f at a mid-training point (‖U M Vᵀ‖ = half the mean
‖D_k‖), and the relative Frobenius error of the compressed deltas. Task vectors are synthetic with a decaying spectrum
σ_i = exp(−i/32) + 0.01 (fresh random singular vectors per task); U, G, V random (a mid-training point).
Markdown table on stdout.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # bench/, for pmbench_util

import pmkernels  # noqa: E402
from pmbench_util import peak_memory, tune_glibc_malloc  # noqa: E402
from pmkernels.weight_distances import cpp_available  # noqa: E402

from paretomerge.methods.pareto_merging.objectives import stch  # noqa: E402
from paretomerge.pools.compress import truncated_svd  # noqa: E402

SHAPES = [(1024, 1024), (1024, 4096), (4096, 1024)]
RANKS = [16, 64, 256]


def synthetic_task_vector(out: int, in_: int, g: torch.Generator) -> torch.Tensor:
    n = min(out, in_)
    P = torch.linalg.qr(torch.randn(out, n, generator=g))[0]
    Q = torch.linalg.qr(torch.randn(in_, n, generator=g))[0]
    s = torch.exp(-torch.arange(n, dtype=torch.float32) / 32) + 0.01
    return (P * s) @ Q.t() * 1e-2


def fmt_bytes(b) -> str:
    if b is None:
        return "–"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if b < 1024 or unit == "GiB":
            return f"{b:.3g} {unit}" if unit != "B" else f"{int(b)} B"
        b /= 1024


def fmt_t(s: float) -> str:
    return f"{s * 1e3:.3g} ms" if s >= 1e-3 else f"{s * 1e6:.3g} µs"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--K", type=int, default=4)
    ap.add_argument("--r", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tune_glibc_malloc()
    K, r = args.K, args.r
    g = torch.Generator().manual_seed(0)
    pref = torch.full((K,), 1.0 / K)
    print(f"K = {K}, r = {r}, fp32, torch threads = {args.threads}, best of {args.repeats}\n")
    print("| shape (out×in) | deltas | impl | step time | × dense best | step peak mem | stored deltas | "
          "delta mem ÷ | SVD (once, K tasks) | rel. err of deltas | rel. err of f |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for out, in_ in SHAPES:
        D = [synthetic_task_vector(out, in_, g) for _ in range(K)]
        U = torch.randn(out, r, generator=g)
        G = torch.randn(r, r, K, generator=g)
        V = torch.randn(in_, r, generator=g) / in_**0.5
        # a mid-training point: ‖U M Vᵀ‖ = half the mean ‖D_k‖ (f then weighs the deltas as training does)
        dw = (U @ pmkernels.core_matrix(G, pref) @ V.t()).norm()
        U *= 0.5 * float(torch.stack([d.norm() for d in D]).mean()) / float(dw)
        for t in (U, G, V):
            t.requires_grad_()
        params = (U, G, V)

        def step(fn):
            def run():
                for p in params:
                    p.grad = None
                f = fn()
                stch(f / f.detach(), pref).backward()  # normalised as the trainer does
                return f.detach()
            return run

        cases = {}
        dense_impls = ["torch"] + (["cpp"] if cpp_available() else [])
        for impl in dense_impls:
            cases[("dense", impl)] = step(lambda impl=impl: pmkernels.weight_distances(U, G, V, pref, D, impl=impl,
                                                                                       check_values=False))
        lowrank = {}
        t0 = time.perf_counter()
        full = [truncated_svd(d, rank=max(RANKS))[0] for d in D]  # one SVD per task; rank-R = its first R columns
        svd_s = time.perf_counter() - t0
        for R in RANKS:
            A, B = [f.A[:, :R].contiguous() for f in full], [f.B[:, :R].contiguous() for f in full]
            dsq = pmkernels.low_rank_delta_sq(A, B)
            lowrank[R] = (A, B, svd_s)
            cases[(f"R = {R}", "torch")] = step(lambda A=A, B=B, dsq=dsq: pmkernels.low_rank_distances(
                U, G, V, pref, A, B, delta_sq=dsq, check_values=False))
        f_dense = cases[("dense", "torch")]().double()
        best = {k: float("inf") for k in cases}
        for fn in cases.values():
            fn()  # warm-up
        for _ in range(args.repeats):
            for k, fn in cases.items():
                t0 = time.perf_counter()
                fn()
                best[k] = min(best[k], time.perf_counter() - t0)
        dense_best = min(v for (kind, _), v in best.items() if kind == "dense")
        dense_bytes = sum(d.numel() * d.element_size() for d in D)
        for (kind, impl), fn in cases.items():
            f = fn().double()
            mem = peak_memory(fn)
            if kind == "dense":
                stored, ratio, svd, err, derr = dense_bytes, "1×", "–", "0", "0"
            else:
                A, B, svd_s = lowrank[int(kind.split("= ")[1])]
                stored = sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in zip(A, B))
                ratio, svd = f"{dense_bytes / stored:.1f}×", f"{svd_s:.2f} s"
                err = f"{float(((f - f_dense).abs() / f_dense).max()):.2e}"
                derr = f"{max(float((d - a @ b.t()).norm() / d.norm()) for d, a, b in zip(D, A, B)):.3f}"
            print(f"| {out}×{in_} | {kind} | {impl} | {fmt_t(best[(kind, impl)])} | "
                  f"{best[(kind, impl)] / dense_best:.3f}× | {fmt_bytes(mem)} | {fmt_bytes(stored)} | {ratio} | "
                  f"{svd} | {derr} | {err} |")


if __name__ == "__main__":
    main()
