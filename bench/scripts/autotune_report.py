"""Autotune the fused pareto_linear kernels at the docs/design.md §5 shapes on this GPU and list the picks.

    python bench/scripts/autotune_report.py [--md OUT.md]

Runs forward + backward and a no-grad forward once per (shape, dtype, γ mode) so every autotuned launch
(shrink, fused GEMM, the one-launch forward's GEMM, dx, dW/dU/dV) tunes over the configs its pruner keeps
for this GPU's capability, then prints one line per tuned key with the config it picked. Exits 2 with a
message (no traceback) when there is no CUDA device.
"""
from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

SHAPES = {"vit-attn": (6400, 768, 768), "vit-mlp": (6400, 768, 3072), "llm-attn": (8192, 4096, 4096),
          "llm-mlp": (8192, 4096, 14336), "decode": (16, 4096, 4096)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--md", help="also write the table here")
    a = ap.parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        print("autotune_report: no CUDA device here; the kernels' configs can only be tuned on a GPU "
              "(their compile-time resources: python bench/scripts/aot_sweep.py)")
        return 2
    import pmkernels
    import pmkernels.triton_pareto_linear as tpl

    dev = torch.device("cuda")
    r, K = 16, 8
    for name, (N, I, O) in SHAPES.items():
        for dt in (torch.bfloat16, torch.float16):
            for per_sample in (False, True):
                B = 16 if N <= 64 else 64
                x = torch.randn(N, I, device=dev, dtype=dt).requires_grad_()
                W = (torch.randn(O, I, device=dev, dtype=dt) / I ** 0.5).requires_grad_()
                U = (torch.randn(O, r, device=dev, dtype=dt) / r ** 0.5).requires_grad_()
                V = (torch.randn(I, r, device=dev, dtype=dt) / I ** 0.5).requires_grad_()
                G = torch.randn(r, r, K, device=dev, dtype=dt).requires_grad_()
                pref = torch.softmax(torch.randn(B if per_sample else 1, K, device=dev), -1)
                pref = pref if per_sample else pref[0]
                y = pmkernels.pareto_linear(x.reshape(B, N // B, I) if per_sample else x, W, None, U, G, V, pref, impl="triton")
                y.backward(torch.randn_like(y))
                with torch.no_grad():  # the one-launch forward (FUSE_SHRINK) tunes its own keys
                    pmkernels.pareto_linear(x.reshape(B, N // B, I) if per_sample else x, W, None, U, G, V, pref,
                                            impl="triton")
                torch.cuda.synchronize()
                del x, W, U, V, G, y
                torch.cuda.empty_cache()
    lines = [f"Autotuned on {torch.cuda.get_device_name(0)} (capability {pmkernels._dispatch.cuda_capability(dev)}), "
             f"torch {torch.__version__}, triton {__import__('triton').__version__}", "",
             "| kernel | autotune key | picked config |", "|---|---|---|"]
    for kname, launcher in (("gemm", tpl._gemm_launch), ("shrink", tpl._shrink_launch)):
        for key, cfg in getattr(launcher, "cache", {}).items():
            lines.append(f"| {kname} | `{key}` | {cfg} |")
    text = "\n".join(lines)
    print(text)
    if a.md:
        with open(a.md, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
