"""Roofline performance model of pareto_linear at the docs/design.md §5 shapes (PREDICTIONS, not measurements).

For every launch each implementation makes (the fused Triton kernels, F.linear, the factored torch
form, the naive merge) it counts FLOPs (tensor-core and CUDA-core) and compulsory HBM bytes, and
predicts a time

    t = max(t_compute, bytes / (bw · eff_bw)) + launch
    t_compute = waves · tile_flops (K rounded up to 64) / (peak / SMs · eff_gemm)   for a GEMM (wave quantisation, 128×256 tiles)
              = flops / (peak · eff_gemm)                       otherwise (+ CUDA-core flops at the fp32 rate)

The forward follows ``pmkernels.triton_configs.one_launch_forward`` (no gradient, r ≤ 16; decode-sized, or
out within the GPU's limit): one GEMM that also accumulates z = x V in its main loop (R / BLOCK_N more MMA
work per tile, BLOCK_N the widest tile that fused GEMM keeps on that GPU) and recomputes the core contraction
per column tile, with no shrink launch and no (N, r) round-trip. Elsewhere, and in the forward+backward
columns (autograd needs z and t), the two-launch forward.

on an H100 SXM (989 TFLOP/s dense bf16, 3.35 TB/s, 132 SMs) and an A100 SXM 80 GB (312 TFLOP/s,
2.04 TB/s, 108 SMs). eff_gemm, eff_bw and the per-launch cost are assumptions (printed with the table).
It assumes the Triton GEMM reaches cuBLAS's per-tile efficiency and that operands are read once
(ideal L2 reuse): the fused rows are the best these kernels can do, not what they do.

    python bench/scripts/perf_model.py                 # print the tables
    python bench/scripts/perf_model.py --write-results # and replace their section in bench/RESULTS.md

The check against docs/design.md §5's measured H100 ratios is printed beside the predictions.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from aot_sweep import ROOT, write_results  # noqa: E402  (one writer for the marked RESULTS.md sections)

sys.path.insert(0, ROOT)
from pmkernels.triton_configs import one_launch_forward  # noqa: E402  (the launch plan the kernels follow)

BF16, FP32 = 2, 4


@dataclass(frozen=True)
class Gpu:
    name: str
    tc_flops: float   # dense bf16 tensor-core FLOP/s
    fma_flops: float  # fp32 CUDA-core FLOP/s (the IEEE core contraction of the per-sample shrink)
    bw: float         # HBM bytes/s
    sms: int
    capability: int    # compute capability, major * 10 + minor (the launch plan depends on it)
    fused_tile_n: int  # widest BLOCK_N of the one-launch GEMM's prefill tiles (gemm_configs, fuse_shrink, r = 16)


H100 = Gpu("H100 SXM", 989e12, 67e12, 3.35e12, 132, 90, 256)  # sm_90 keeps 128×256 (8 warps) spill-free
A100 = Gpu("A100 SXM 80GB", 312e12, 19.5e12, 2.039e12, 108, 80, 128)  # sm_80: ≤ 64 accumulators/thread
EFF_GEMM = 0.75   # fraction of peak a well-tuned GEMM tile loop sustains (assumption)
EFF_BW = 0.85     # fraction of HBM bandwidth a streaming kernel sustains (assumption)
LAUNCH = 5e-6     # per kernel launch, host + gap, eager mode (assumption, calibrated on §5's decode ratios)
LAUNCH_GRAPH = 2e-6  # per kernel inside a replayed CUDA graph (no host work; the gap between kernels; assumption)

SHAPES = {  # name: (tokens, in, out, samples B for per-sample γ)
    "ViT 768→768": (6400, 768, 768, 64),
    "ViT 768→3072": (6400, 768, 3072, 64),
    "LLM 4096→4096": (8192, 4096, 4096, 64),
    "LLM 4096→14336": (8192, 4096, 14336, 64),
    "decode 16 tokens": (16, 4096, 4096, 16),
}
R, K = 16, 8


@dataclass
class Launch:
    name: str
    bytes: float
    tc_flops: float = 0.0
    fma_flops: float = 0.0
    gemm: tuple | None = None  # (M, N, Kdim) for wave quantisation
    mma_extra: float = 0.0     # extra MMA work of each main-loop step, as a fraction of the tile's (fused z = x V)

    def time(self, g: Gpu, launch: float = LAUNCH) -> float:
        if self.gemm is not None and self.gemm[0] > 64 and self.gemm[1] > 64:
            M, N, Kd = self.gemm
            tiles = math.ceil(M / 128) * math.ceil(N / 256)
            waves = math.ceil(tiles / g.sms)
            k_steps = math.ceil(Kd / 64) * 64  # the main loop runs whole 64-deep K tiles
            t_c = waves * 2 * 128 * 256 * k_steps * (1 + self.mma_extra) / (g.tc_flops / g.sms * EFF_GEMM)
        else:
            t_c = self.tc_flops / (g.tc_flops * EFF_GEMM)
        t_c += self.fma_flops / g.fma_flops
        return max(t_c, self.bytes / (g.bw * EFF_BW)) + launch


def gemm(name, M, N, Kd, a_es=BF16, b_es=BF16, c_es=BF16, extra_bytes=0.0, extra_flops=0.0, read_c=False):
    """C (M, N) = A (M, Kd) Bᵀ: operands read once, C written once (and read when accumulated into)."""
    by = M * Kd * a_es + N * Kd * b_es + M * N * c_es * (2 if read_c else 1) + extra_bytes
    return Launch(name, by, 2 * M * N * Kd + extra_flops, gemm=(M, N, Kd))


def ew(name, nbytes):
    """An elementwise / tiny torch op."""
    return Launch(name, nbytes)


# ------------------------------------------------------------------------------------------------
# the launches of each implementation (mirroring pmkernels' code paths)
# ------------------------------------------------------------------------------------------------


def f_linear(N, I, O, bwd):
    ls = [gemm("F.linear", N, O, I, extra_bytes=O * BF16)]
    if bwd:
        ls.append(gemm("dx = dy W", N, I, O))
    return ls


def fused(N, I, O, B, per_sample, bwd, g=H100, two_launch=False):
    """pmkernels.triton_pareto_linear's launches (no host-side op on γ in the forward).

    Forward without gradients where ``one_launch_forward`` says so: one GEMM that accumulates z = x V beside
    x Wᵀ in its main loop and adds t Uᵀ, t = z M_bᵀ, in its epilogue; every column tile recomputes z and the
    core contraction for its rows (R / BLOCK_N extra MMA work; V, G read from L2 after the first tile).
    Otherwise (``bwd``: autograd needs z, t) two launches: the shrink (x read once; z, t to HBM), then the GEMM
    reading t (``two_launch`` forces this plan on a forward). A shared γ is folded into M per CTA (K r×r loads
    and FMAs per CTA, then one r×r dot per row); per-sample γ runs K r×r dots per row."""
    def core_fma(rows_per_cta):
        if per_sample:
            return 2 * N * R * R * K
        return 2 * N * R * R + math.ceil(N / rows_per_cta) * 2 * R * R * K  # the per-CTA fold

    if not bwd and not two_launch and one_launch_forward(R, False, N, O, per_sample, g.capability):
        bn = g.fused_tile_n if N > 64 else 64  # decode: the small_m tiles (BLOCK_N <= 128)
        cols = math.ceil(O / bn)
        ln = gemm("GEMM + z = xV in the main loop, t = zMᵀ, t Uᵀ epilogue", N, O, I,
                  extra_bytes=I * R * BF16 + R * R * K * BF16 + O * R * BF16 + O * BF16,
                  extra_flops=2 * N * R * O + cols * 2 * N * I * R)
        ln.mma_extra = R / bn
        ln.fma_flops = cols * core_fma(128 if N > 64 else 16)
        return [ln]
    ls = []
    ls.append(Launch("shrink z=xV, t=zMᵀ", N * I * BF16 + I * R * BF16 + R * R * K * BF16 + 2 * N * R * FP32,
                     tc_flops=2 * N * I * R, fma_flops=core_fma(64 if N > 64 else 16)))
    ls.append(gemm("GEMM + expand epilogue", N, O, I, extra_bytes=N * R * FP32 + O * R * BF16 + O * BF16,
                   extra_flops=2 * N * R * O))
    if bwd:
        ls.append(Launch("shrink w=dyU, s=wM", N * O * BF16 + O * R * BF16 + 2 * N * R * FP32,
                         tc_flops=2 * N * O * R, fma_flops=core_fma(64 if N > 64 else 16)))
        ls.append(gemm("dx GEMM + s Vᵀ epilogue", N, I, O, extra_bytes=N * R * FP32 + I * R * BF16,
                       extra_flops=2 * N * R * I))
        ls.append(Launch("dU = dyᵀ t", N * O * BF16 + N * R * FP32 + O * R * FP32, tc_flops=2 * N * O * R))
        ls.append(Launch("dV = xᵀ s", N * I * BF16 + N * R * FP32 + I * R * FP32, tc_flops=2 * N * I * R))
        ls.append(Launch("core grad dM_b", 2 * N * R * FP32, fma_flops=2 * N * R * R))
        # host torch ops on the (B, r, r) partials: split sum, dG einsum + cast to bf16, G.float() + dγ einsum
        ls += [ew(n, B * R * R * FP32 * 4) for n in ("split sum", "dG einsum", "dG to bf16", "G.float()", "dγ einsum")]
    return ls


def factored_torch(N, I, O, B, per_sample, bwd):
    """pmkernels.reference.torch_pareto_linear, eager (forward; backward by autograd)."""
    ls = [ew("G.float()", R * R * K * 6), ew("core_matrix einsum", R * R * K * 4 + (B if per_sample else 1) * R * R * 4),
          Launch("x @ V", N * I * BF16 + N * R * BF16, tc_flops=2 * N * I * R), ew("xv.float()", N * R * 6),
          ew("xv @ Mᵀ (bmm when per-sample)", N * R * 8), ew("t.to(bf16)", N * R * 6),
          gemm("t @ Uᵀ", N, O, R), gemm("F.linear", N, O, I, extra_bytes=O * BF16), ew("add", 3 * N * O * BF16)]
    if bwd:  # autograd: dx through both branches, dU, dV, dM, dG
        ls += [gemm("dy W", N, I, O), Launch("dy U", N * O * BF16, tc_flops=2 * N * O * R),
               gemm("(dy U M) Vᵀ", N, I, R), ew("dx add", 3 * N * I * BF16),
               Launch("dUᵀ = tᵀ dy", N * O * BF16 + N * R * BF16, tc_flops=2 * N * O * R),
               Launch("dVᵀ = sᵀ x", N * I * BF16 + N * R * BF16, tc_flops=2 * N * I * R)]
        ls += [ew("rank-sized autograd ops", N * R * 8)] * 8
    return ls


def naive(N, I, O, B, per_sample, fp32_merge=True):
    """pmkernels.reference.naive_pareto_linear: merged_weight (B copies per-sample), then F.linear / bmm.

    fp32_merge: W(γ) built in fp32 then rounded (as the code does now); False: built in bf16 (3 passes over
    W-sized tensors instead of 4 at twice the width), which is what docs/design.md §5's measured ratios match."""
    nb = B if per_sample else 1
    W = O * I
    ls = [ew("G.float()", R * R * K * 6), ew("core_matrix einsum", nb * R * R * 4), ew("U @ M", nb * O * R * 8)]
    if fp32_merge:
        ls += [ew("U.float()", O * R * 6), ew("V.float()", I * R * 6),
               Launch("(U M) @ Vᵀ", nb * W * FP32, tc_flops=2 * nb * W * R), ew("weight.float()", W * 6),
               ew("W + ΔW", nb * W * FP32 * 2 + W * FP32), ew("to(bf16)", nb * W * 6)]
    else:
        ls += [Launch("(U M) @ Vᵀ", nb * W * BF16, tc_flops=2 * nb * W * R), ew("W + ΔW", nb * W * BF16 * 2 + W * BF16)]
    if per_sample:
        ls += [Launch("bmm", N * I * BF16 + nb * W * BF16 + N * O * BF16, tc_flops=2 * N * I * O),
               ew("+ bias", 3 * N * O * BF16)]
    else:
        ls.append(gemm("F.linear", N, O, I, extra_bytes=O * BF16))
    return ls


def t(launches, g, launch=LAUNCH):
    return sum(x.time(g, launch) for x in launches)


# docs/design.md §5, measured on one H100 (bf16, forward, multiples of F.linear)
MEASURED = {
    "ViT 768→768": dict(naive=1.8, torch=2.6, naive_ps=41, gemm16=1.09, cat=0.68, xv=0.62, expand=0.86),
    "ViT 768→3072": dict(naive=1.9, torch=2.5, naive_ps=26, gemm16=1.08, cat=0.25, xv=0.22, expand=0.88),
    "LLM 4096→4096": dict(naive=1.15, torch=1.3, naive_ps=7.3, gemm16=1.07, cat=0.14, xv=0.10, expand=0.19),
    "LLM 4096→14336": dict(naive=1.06, torch=1.4, naive_ps=3.3, gemm16=1.04, cat=0.04, xv=0.03, expand=0.18),
    "decode 16 tokens": dict(naive=4.0, torch=3.8, naive_ps=110, gemm16=1.05, cat=0.21, xv=0.40, expand=0.28),
}


def pieces(N, I, O):
    """The hybrid-design pieces of docs/design.md §5, each as one launch."""
    return dict(gemm16=[gemm("[x|t][W|U]ᵀ", N, O, I + R, extra_bytes=O * BF16)],
                cat=[ew("cat(x, t)", 2 * N * (I + R) * BF16)],
                xv=[Launch("x @ V", N * I * BF16, tc_flops=2 * N * I * R)],
                expand=[gemm("y += t Uᵀ", N, O, R, read_c=True)])


def tables() -> str:
    out = []
    hdr = (f"Assumptions: GEMM tiles 128×256 with wave quantisation at {EFF_GEMM:.0%} of peak inside a wave, "
           f"streams at {EFF_BW:.0%} of HBM bandwidth, {LAUNCH * 1e6:.0f} µs per launch ({LAUNCH_GRAPH * 1e6:.0f} µs "
           f"inside a replayed CUDA graph), operands read once, "
           f"bf16, r = {R}, K = {K}, per-sample B as in bench/ (64; 16 for decode). "
           f"**Predictions, not measurements**: no GPU has run these kernels.")
    out.append(hdr + "\n")
    out.append("### Predicted time as a multiple of F.linear (fused Triton kernels)\n")
    out.append("Forward (no gradient): 1 launch where `one_launch_forward` says so (r ≤ 16, and decode-sized "
               "or out ≤ 4096 on H100 / out ≤ 1024 and a shared γ on A100; marked ¹): the GEMM with z = x V in "
               "its main loop (R / BLOCK_N extra MMA work: BLOCK_N 256 on H100, 128 on A100, 64 at decode) and "
               "t = z M_bᵀ, t Uᵀ in its epilogue, for shared and per-sample γ; elsewhere 2 launches. "
               "The 2-launch column is the forward as it runs when gradients are needed (shrink, then GEMM; z and t kept for the "
               "backward). Backward (W frozen): shrink, dx, dU, dV GEMMs, core gradient + 5 small torch ops. "
               "Graph column: fused and F.linear both replayed from a CUDA graph (a decode step).\n")
    out.append("| shape | GPU | F.linear fwd (µs) | fused fwd, shared γ | fused fwd, per-sample γ | "
               "fused fwd, shared γ, 2 launches | fused fwd+bwd, shared γ | fused fwd+bwd, per-sample γ | "
               "fused fwd, shared γ, CUDA graph | factored torch fwd | naive fwd |")
    out.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, (N, I, O, B) in SHAPES.items():
        for g in (H100, A100):
            lin, lin2 = t(f_linear(N, I, O, False), g), t(f_linear(N, I, O, True), g)
            one = ["¹" if one_launch_forward(R, False, N, O, ps, g.capability) else "" for ps in (False, True)]
            cells = [t(fused(N, I, O, B, ps, False, g), g) / lin for ps in (False, True)]
            cells.append(t(fused(N, I, O, B, False, False, g, two_launch=True), g) / lin)
            cells += [t(fused(N, I, O, B, ps, True, g), g) / lin2 for ps in (False, True)]
            cells.append(t(fused(N, I, O, B, False, False, g), g, LAUNCH_GRAPH) / t(f_linear(N, I, O, False), g,
                                                                                  LAUNCH_GRAPH))
            marks = one + ["", "", "", one[0]]  # ¹: the one-launch forward
            out.append(f"| {name} | {g.name} | {lin * 1e6:.0f} | "
                       + " | ".join(f"{c:.2f}×{m}" for c, m in zip(cells, marks))
                       + f" | {t(factored_torch(N, I, O, B, False, False), g) / lin:.2f}× | "
                       f"{t(naive(N, I, O, B, False), g) / lin:.2f}× |")
    out.append("\n### Model vs docs/design.md §5 measured H100 ratios (forward, multiple of F.linear)\n")
    out.append("| shape | naive (fp32 merge, as coded) | naive (bf16 merge) | factored torch | naive per-sample (bf16 merge) "
               "| GEMM inner +16 | cat(x,t) | x@V | y += tUᵀ |")
    out.append("|---|---|---|---|---|---|---|---|---|")
    for name, (N, I, O, B) in SHAPES.items():
        g, m = H100, MEASURED[name]
        lin = t(f_linear(N, I, O, False), g)
        pred = dict(naive32=t(naive(N, I, O, B, False), g) / lin, naive=t(naive(N, I, O, B, False, False), g) / lin,
                    torch=t(factored_torch(N, I, O, B, False, False), g) / lin,
                    naive_ps=t(naive(N, I, O, B, True, False), g) / lin)
        pred.update({k: t(v, g) / lin for k, v in pieces(N, I, O).items()})
        out.append(f"| {name} | {pred['naive32']:.2f} / {m['naive']} | " + " | ".join(
            f"{pred[k]:.2f} / {m[k]}" for k in ("naive", "torch", "naive_ps", "gemm16", "cat", "xv", "expand")) + " |")
    out.append("\n(cells: predicted / measured. The §5 naive numbers match a merge done in bf16; today's "
               "`naive_pareto_linear` merges in fp32 and is predicted slower. Small-shape pieces run slower "
               "than the model: its fixed launch cost is too low for them.)\n")
    out.append("### Per-launch bytes and FLOPs of the fused path (LLM 4096→4096, per-sample γ, fwd+bwd), H100\n")
    out.append("| launch | HBM bytes (MB) | tensor-core GFLOP | CUDA-core GFLOP | predicted µs |")
    out.append("|---|---|---|---|---|")
    N, I, O, B = SHAPES["LLM 4096→4096"]
    for ln in fused(N, I, O, B, True, True, H100):
        out.append(f"| {ln.name} | {ln.bytes / 1e6:.1f} | {ln.tc_flops / 1e9:.2f} | {ln.fma_flops / 1e9:.3f} | "
                   f"{ln.time(H100) * 1e6:.1f} |")
    out.append("\n### A decode step (16 tokens, 4096→4096, shared γ, forward), H100: every launch\n")
    out.append("| launch | HBM bytes (MB) | tensor-core GFLOP | CUDA-core GFLOP | predicted µs (eager) | "
               "predicted µs (CUDA graph) |")
    out.append("|---|---|---|---|---|---|")
    N, I, O, B = SHAPES["decode 16 tokens"]
    for ln in fused(N, I, O, B, False, False, H100) + f_linear(N, I, O, False):
        out.append(f"| {ln.name} | {ln.bytes / 1e6:.2f} | {ln.tc_flops / 1e9:.3f} | {ln.fma_flops / 1e9:.5f} | "
                   f"{ln.time(H100) * 1e6:.1f} | {ln.time(H100, LAUNCH_GRAPH) * 1e6:.1f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write-results", action="store_true")
    a = ap.parse_args(argv)
    text = tables()
    print(text)
    if a.write_results:
        write_results("## Performance model (roofline predictions, `python bench/scripts/perf_model.py`)\n\n" + text,
                      begin="<!-- perf-model:begin -->", end="<!-- perf-model:end -->")
    return 0


if __name__ == "__main__":
    sys.exit(main())
