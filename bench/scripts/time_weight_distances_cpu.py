"""CPU timing of one weight_distances forward+backward, naive / torch / cpp.

    PYTHONPATH=. python bench/scripts/time_weight_distances_cpu.py [--repeats 7] [--list]

Best of --repeats runs per impl (after one warm-up; impls interleaved), torch.set_num_threads left at its default.
"""
from __future__ import annotations

import argparse
import time

import torch

import pmkernels
from pmkernels.weight_distances import cpp_available


def one(impl, U, G, V, pref, deltas):
    for t in (U, G, V, pref):
        t.grad = None
    f = pmkernels.weight_distances(U, G, V, pref, deltas, impl=impl)
    f.sum().backward()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--list", action="store_true", help="pass the deltas as a list of K tensors")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--impls", default="naive,torch,cpp")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default: leave as is)")
    ap.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                    help="wall: time.perf_counter; cpu: time.process_time (robust to a loaded machine, "
                         "meaningful with --threads 1)")
    args = ap.parse_args()
    assert cpp_available()
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    r, K = 16, 8
    dt = getattr(torch, args.dtype)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, clock {args.clock}, r={r}, K={K}, "
          f"deltas {args.dtype}"
          f"{' (list)' if args.list else ' (stacked)'}, best of {args.repeats}")
    print("| out x in | " + " | ".join(f"{i} (ms)" for i in args.impls.split(",")) + " | torch/cpp | naive/cpp |")
    print("|---" * (len(args.impls.split(",")) + 3) + "|")
    for out, in_ in ((768, 768), (3072, 768), (768, 3072)):
        g = torch.Generator().manual_seed(0)
        U = (torch.randn(out, r, generator=g) / r**0.5).requires_grad_()
        G = torch.randn(r, r, K, generator=g).requires_grad_()
        V = (torch.randn(in_, r, generator=g) / in_**0.5).requires_grad_()
        pref = torch.full((K,), 1.0 / K).requires_grad_()
        D = (torch.randn(K, out, in_, generator=g) * 0.01).to(dt)
        deltas = [D[k].clone() for k in range(K)] if args.list else D
        impls = args.impls.split(",")
        for impl in impls:  # warm-up (and the one-time C++ build)
            one(impl, U, G, V, pref, deltas)
        best = {impl: float("inf") for impl in impls}
        for _ in range(args.repeats):  # interleaved, so load from other processes hits every impl alike
            for impl in impls:
                t0 = clock()
                one(impl, U, G, V, pref, deltas)
                best[impl] = min(best[impl], clock() - t0)
        times = {impl: t * 1e3 for impl, t in best.items()}
        row = " | ".join(f"{times[i]:.2f}" for i in args.impls.split(","))
        rt = times.get("torch", float("nan")) / times.get("cpp", float("nan"))
        rn = times.get("naive", float("nan")) / times.get("cpp", float("nan"))
        print(f"| {out}x{in_} | {row} | {rt:.2f}x | {rn:.2f}x |")


if __name__ == "__main__":
    main()
