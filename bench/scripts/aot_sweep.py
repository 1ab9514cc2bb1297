"""Ahead-of-time compile sweep of every pmkernels Triton kernel for sm_90 and sm_80, no GPU needed.

For every kernel × launch variant (the specialisations a real launch produces) × dtype × arch, it asks
the kernel module's pruner (the same pure function the runtime autotuner's ``early_config_prune``
calls) which autotune configs it keeps, compiles each with Triton's bundled ptxas, and reads
registers, spill bytes and stack from ptxas's ``-v`` log and shared memory from the kernel metadata.

    python bench/scripts/aot_sweep.py                 # full sweep, prints the table
    python bench/scripts/aot_sweep.py --write-results # ... and replaces its section in bench/RESULTS.md
    python bench/scripts/aot_sweep.py --subset        # the representative subset the test suite runs
    python bench/scripts/aot_sweep.py --shapes aligned # only one shape family (default: both)

Every variant is compiled at aligned sizes (multiples of 16: Triton specialises them as divisible) and at
odd sizes (tokens, in, out minus 7, 3, 5: no divisibility hints, the masked loads a ragged batch gets).

Exit status 1 (after printing everything) when any compile fails, when a (kernel, variant, dtype,
arch, shapes) has no config that fits shared memory, when a kept config spills at r <= 64, or when an
aligned GEMM main loop is not software-pipelined (odd shapes report it, and are not failed by it); 77 when this
Triton has no CUDA compiler. Each worker process compiles into a fresh TRITON_CACHE_DIR, so every
kernel really goes through ptxas (nothing is read from a cache).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import multiprocessing as mp
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMEM_LIMIT = {90: 232448, 80: 166912}  # bytes of dynamic shared memory one block may opt into (H100, A100)
DTYPES = ("bf16", "fp16", "fp32")
ARCHS = (90, 80)
TOKENS, IN, OUT = 8192, 4096, 4096  # aligned contiguous example shapes (docs/design.md §5 LLM attention)
DECODE = 16


@dataclass
class Spec:
    """One launch variant: a kernel, its runtime arguments (pointer dtypes and int values) and fixed constexprs."""
    kernel: str          # "gemm" | "shrink" | "core_grad" | "wd_pass"
    variant: str         # e.g. "fwd+bias r=16"
    dtype: str
    arch: int
    r: int
    args: dict           # arg name -> "*fp16"-style pointer type, or an int value (specialised like a launch)
    consts: dict         # launch-fixed constexprs (BLOCK_R, PRECISION, flags)
    configs: list = field(default_factory=list)  # [(kwargs, num_warps, num_stages)] kept by the pruner
    aligned: bool = True  # sizes multiples of 16 (else odd sizes: no divisibility specialisation)


def _gemm_args(dt, M, N, K, R, a_strides, b_strides, c_dt, t_dt, u_dt, lora, split=1, fused=None):
    """Pointer types and int values of one _gemm_kernel launch (as pmkernels' _gemm passes them).
    fused: (B, NUM_OBJ) for the one-launch forward (FUSE_SHRINK: V (K, R), G (R, R, NUM_OBJ) contiguous in
    A's dtype, read as H = Gᵀ; γ (B, NUM_OBJ) fp32; no t), else None (t read when lora)."""
    k_per_split = -(-max(K, 1) // (256 * split)) * 256
    B, n_obj = fused if fused else (1, 1)
    return dict(a_ptr="*" + dt, b_ptr="*" + b_strides[2], c_ptr="*" + c_dt, t_ptr="*" + t_dt,
                u_ptr="*" + u_dt, bias_ptr="*" + dt,
                p_ptr="*" + dt, h_ptr="*" + dt, g_ptr="*fp32",
                M=M, N=N, K=K, R=R if lora else 1, K_PER_SPLIT=k_per_split, NUM_OBJ=n_obj, L=max(M // B, 1),
                stride_am=a_strides[0], stride_ak=a_strides[1], stride_bn=b_strides[0], stride_bk=b_strides[1],
                stride_cm=N, stride_cn=1, stride_cs=M * N if split > 1 else 0,
                stride_tm=R if lora and not fused else 0, stride_tr=1 if lora and not fused else 0,
                stride_un=R if lora else 0, stride_ur=1 if lora else 0,
                stride_pk=R if fused else 0, stride_pr=1 if fused else 0,
                stride_ha=n_obj if fused else 0, stride_hc=R * n_obj if fused else 0, stride_hk=1 if fused else 0,
                stride_gb=n_obj if fused else 0, stride_gk=1 if fused else 0,
                M_BUCKET=(0 if M <= 64 else 1) + (0 if _aligned(K, a_strides[:2], b_strides[:2]) else 2))


def _aligned(K, a_strides, b_strides) -> bool:
    from pmkernels.triton_configs import loads_aligned
    return loads_aligned(K, *a_strides, *b_strides)


# The test suite's slice: per arch, the big forward GEMM in bf16 and fp32 at r = 64 (aligned and odd sizes),
# the hybrid pass, the one-launch forward (per-sample prefill in bf16, shared decode in fp32 at odd sizes),
# the per-sample shrink at r = 64 and at r = 128, K = 64 in fp32 (the case that had no
# fitting config on sm_80), the shared-γ shrink (in-kernel fold) at r = 128 in fp32 and at odd sizes, and
# the weight-distances pass at r = 128 in fp32. (kernel, variant, dtype, aligned)
SUBSET = {("gemm", "fwd+bias r=64", "bf16", True), ("gemm", "fwd+bias r=64", "fp32", True),
          ("gemm", "fwd+bias r=64", "bf16", False), ("gemm", "hybrid ADD_C r=16", "bf16", True),
          ("gemm", "one-launch fwd per-sample+bias r=16 K=8", "bf16", True),
          ("gemm", "one-launch decode shared+bias r=16 K=8", "fp32", False),
          ("shrink", "prefill per-sample r=64 K=8", "fp16", True),
          ("shrink", "prefill per-sample r=128 K=64", "fp32", True),
          ("shrink", "prefill shared r=128 K=8", "fp32", True), ("shrink", "decode shared r=16 K=8", "bf16", False),
          ("wd_pass", "r=128", "fp32", True)}
SHAPES = ("aligned", "unaligned")


def specs(subset: bool = False, shapes: tuple[str, ...] = SHAPES, kernels: Optional[set] = None,
          dtypes: Optional[set] = None, variant: str = "") -> list[Spec]:
    """Every launch variant to compile at the given shape families (``subset``: only those named in SUBSET;
    ``kernels``, ``dtypes``: only those; ``variant``: only variants whose name contains it)."""
    out: list[Spec] = []
    for shape in shapes:
        out += _specs_at(shape == "aligned")
    if subset:
        out = [s for s in out if (s.kernel, s.variant, s.dtype, s.aligned) in SUBSET]
    return [s for s in out if (kernels is None or s.kernel in kernels) and (dtypes is None or s.dtype in dtypes)
            and variant in s.variant]


def _specs_at(aligned: bool) -> list[Spec]:
    import pmkernels.triton_configs as tcfg  # the configs the runtime pruners keep: no kernel module needed
    from pmkernels._dispatch import pad_rank

    out: list[Spec] = []
    n_tok, n_in, n_out = (TOKENS, IN, OUT) if aligned else (TOKENS - 7, IN - 3, OUT - 5)
    n_dec = DECODE if aligned else DECODE - 3
    for arch in ARCHS:
        for dt in DTYPES:
            prec = "tf32" if dt == "fp32" else "ieee"
            fwd = dict(HAS_LORA=True, HAS_BIAS=True, ADD_C=False, FUSE_SHRINK=False, SHARED_PREF=False)
            plain = dict(fwd, HAS_LORA=False, HAS_BIAS=False)
            one = dict(fwd, FUSE_SHRINK=True)  # the one-launch forward (no t input)
            gemm = [  # (variant, bucket, r, flags, args)
                # forward GEMM with the expand t Uᵀ (+ bias) in its epilogue, prefill and decode
                ("fwd+bias r=16", "large_m", 16, fwd, _gemm_args(dt, n_tok, n_out, n_in, 16, (n_in, 1), (n_in, 1, dt),
                                                                 dt, "fp32", dt, True)),
                ("fwd r=16", "large_m", 16, dict(fwd, HAS_BIAS=False),
                 _gemm_args(dt, n_tok, n_out, n_in, 16, (n_in, 1), (n_in, 1, dt), dt, "fp32", dt, True)),
                ("fwd+bias r=64", "large_m", 64, fwd, _gemm_args(dt, n_tok, n_out, n_in, 64, (n_in, 1), (n_in, 1, dt),
                                                                 dt, "fp32", dt, True)),
                ("fwd+bias r=128", "large_m", 128, fwd, _gemm_args(dt, n_tok, n_out, n_in, 128, (n_in, 1),
                                                                   (n_in, 1, dt), dt, "fp32", dt, True)),
                ("decode+bias r=16", "small_m", 16, fwd, _gemm_args(dt, n_dec, n_out, n_in, 16, (n_in, 1),
                                                                    (n_in, 1, dt), dt, "fp32", dt, True)),
                ("decode+bias r=128", "small_m", 128, fwd, _gemm_args(dt, n_dec, n_out, n_in, 128, (n_in, 1),
                                                                      (n_in, 1, dt), dt, "fp32", dt, True)),
                # cuBLAS hybrid: empty reduction, accumulator seeded with C (ADD_C), expand + bias
                ("hybrid ADD_C r=16", "large_m", 16, dict(fwd, ADD_C=True),
                 _gemm_args(dt, n_tok, n_out, 0, 16, (n_in, 1), (n_in, 1, dt), dt, "fp32", dt, True)),
                # backward: dx = dy W + s Vᵀ (B = Wᵀ: unit stride along N), dW = dyᵀ x, dU = dyᵀ t (split-K)
                ("dx r=16", "large_m", 16, dict(fwd, HAS_BIAS=False),
                 _gemm_args(dt, n_tok, n_in, n_out, 16, (n_out, 1), (1, n_in, dt), dt, "fp32", dt, True)),
                ("dW", "large_m", 16, plain,
                 _gemm_args(dt, n_out, n_in, n_tok, 16, (1, n_out), (1, n_in, dt), dt, "fp32", dt, False)),
                ("dU split-K r=16", "thin_n", 16, plain,
                 _gemm_args(dt, n_out, 16, n_tok, 16, (1, n_out), (1, 16, "fp32"), "fp32", "fp32", dt, False, split=3)),
            ]
            # the one-launch forward (FUSE_SHRINK: z = x V in the K loop, t = z M_bᵀ in the epilogue), at the
            # ranks one_launch_forward enables it for (pad_rank(r) <= FUSED_FWD_MAX_BLOCK_R), prefill and decode,
            # shared γ (SHARED_PREF) and per-sample γ (64 samples at prefill, one per token at decode)
            for r in sorted({16, tcfg.FUSED_FWD_MAX_BLOCK_R}):
                for ps in (False, True):
                    fl, mode = dict(one, SHARED_PREF=not ps), "per-sample" if ps else "shared"
                    gemm += [(f"one-launch fwd {mode}+bias r={r} K=8", "large_m", r, fl,
                              _gemm_args(dt, n_tok, n_out, n_in, r, (n_in, 1), (n_in, 1, dt), dt, "fp32", dt, True,
                                         fused=(64 if ps else 1, 8))),
                             (f"one-launch decode {mode}+bias r={r} K=8", "small_m", r, fl,
                              _gemm_args(dt, n_dec, n_out, n_in, r, (n_in, 1), (n_in, 1, dt), dt, "fp32", dt, True,
                                         fused=(n_dec if ps else 1, 8)))]
            for variant, bucket, r, flags, args in gemm:
                R = pad_rank(r)
                kept = tcfg.gemm_configs(dt, bucket, has_lora=flags["HAS_LORA"], add_c=flags["ADD_C"], block_r=R,
                                        capability=arch, b_dtype="fp32" if bucket == "thin_n" else None,
                                        aligned=args["M_BUCKET"] < 2, fuse_shrink=flags["FUSE_SHRINK"])
                out.append(Spec("gemm", variant, dt, arch, r, args, dict(flags, BLOCK_R=R, PRECISION=prec),
                                [_cfg(c) for c in kept], aligned))
            # shrink: z = x V, t = z M_bᵀ; shared γ (SHARED_PREF: M = Σ_k γ_k G_k folded per CTA in registers)
            # and per-sample γ (K dots on γ-scaled z). G is read in x's dtype, transposed (forward's H = Gᵀ).
            cases = [(n_tok, r, 8, False) for r in (16, 64, 128)]
            cases += [(n_tok, r, 8, True) for r in (16, 32, 64, 128)] + [(n_tok, 64, 64, True), (n_tok, 128, 64, True)]
            cases += [(n_dec, 16, 8, False), (n_dec, 128, 8, False), (n_dec, 16, 8, True), (n_dec, 128, 64, True)]
            for n, r, K, per_sample in cases:
                R = pad_rank(r)
                B = (64 if n > n_dec else n) if per_sample else 1
                args = dict(a_ptr="*" + dt, p_ptr="*" + dt, h_ptr="*" + dt, g_ptr="*fp32", z_ptr="*fp32",
                            t_ptr="*fp32", N=n, D=n_in, R=r, K=K, L=max(n // B, 1),
                            stride_an=n_in, stride_ad=1, stride_pd=r, stride_pr=1,
                            stride_ha=K, stride_hc=r * K, stride_hk=1,
                            stride_gb=K, stride_gk=1, stride_zn=r, stride_tn=r,
                            N_BUCKET=(0 if n <= 64 else 1) + (0 if tcfg.loads_aligned(n_in, n_in, 1, r, 1) else 2))
                kept = tcfg.shrink_configs(dt, R, K, per_sample, arch, small_n=n <= 64, aligned=args["N_BUCKET"] < 2)
                name = f"{'decode' if n <= 64 else 'prefill'} {'per-sample' if per_sample else 'shared'} r={r} K={K}"
                out.append(Spec("shrink", name, dt, arch, r, args,
                                dict(BLOCK_R=R, PRECISION=prec, SHARED_PREF=not per_sample),
                                [_cfg(c) for c in kept], aligned))
            # weight_distances pass over one delta D_k (out, in) in the deltas' dtype; U, V fp32
            for r in (16, 32, 64, 128):
                R = pad_rank(r)
                args = dict(D="*" + dt, stride_dm=n_in, stride_dn=1, U="*fp32", V="*fp32", Y="*fp32", Z="*fp32",
                            SQ="*fp32", OUT=n_out, IN=n_in, R=r)
                out.append(Spec("wd_pass", f"r={r}", dt, arch, r, args, dict(BLOCK_R=R, PRECISION="ieee"),
                                [_cfg(c) for c in tcfg.wd_configs(dt, R, arch)], aligned))
        # core gradient dM_b = w_bᵀ z_b (fp32 only)
        for r in (16, 64, 128):
            R = pad_rank(r)
            lc = tcfg.core_grad_launch(R)
            rows = 128 if aligned else 125
            args = dict(w_ptr="*fp32", z_ptr="*fp32", out_ptr="*fp32", L=rows, R=r, CHUNK=rows,
                        stride_wn=r, stride_zn=r, stride_ob=r * r, stride_os=r * r)
            out.append(Spec("core_grad", f"r={r}", "fp32", arch, r, args,
                            dict(BLOCK_R=R), [({"BLOCK_L": lc["BLOCK_L"]}, lc["num_warps"], 1)], aligned))
    return out


def _cfg(c):
    return (dict(c.kwargs), c.num_warps, c.num_stages)


# ------------------------------------------------------------------------------------------------
# compiling one (spec, config)
# ------------------------------------------------------------------------------------------------

_PTXAS_RE = {
    "regs": re.compile(r"Used (\d+) registers"),
    "spill": re.compile(r"(\d+) bytes spill stores"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
}


def _worker_init():
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="pmk-aot-")  # fresh: every compile runs ptxas
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    sys.path.insert(0, ROOT)


def _kernel_fn(name):
    import pmkernels.triton_pareto_linear as tpl
    import pmkernels.triton_weight_distances as twd
    return {"gemm": tpl._gemm_kernel, "shrink": tpl._shrink_kernel, "core_grad": tpl._core_grad_kernel,
            "wd_pass": twd._wd_pass_kernel}[name]


def _ptxas_log_of(kernel, arch):
    """Fallback when this Triton does not print ptxas's log: run the bundled ptxas -v on the PTX."""
    import subprocess

    from triton.backends.nvidia.compiler import get_ptxas
    ptxas = get_ptxas().path if hasattr(get_ptxas(), "path") else get_ptxas()
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(kernel.asm["ptx"])
        gpu = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
        res = subprocess.run([ptxas, "-v", f"--gpu-name={gpu}", src, "-o", os.path.join(d, "k.cubin")],
                             capture_output=True, text=True)
        return res.stderr


def compile_one(job):
    """(spec fields, config) -> result dict with regs, spill, stack, smem, pipelined, seconds, error."""
    kernel, args, consts, arch, (kwargs, warps, stages) = job
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _kernel_fn(kernel)
    allc = dict(consts, **kwargs)
    sig, attrs, cexpr = {}, {}, dict(allc)
    for i, name in enumerate(fn.arg_names):
        if name in allc:
            sig[name] = "constexpr"
            continue
        v = args[name]
        if isinstance(v, str):  # pointer: torch allocations are 16-byte aligned
            sig[name] = v
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif v == 1:  # Triton specialises ints equal to 1 to constants
            sig[name] = "constexpr"
            cexpr[name] = 1
        else:
            sig[name] = "i32"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    t0 = time.time()
    res = dict(regs=None, spill=None, stack=None, smem=None, pipelined=None, error=None)
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=cexpr, attrs=attrs),
                               target=GPUTarget("cuda", arch, 32), options={"num_warps": warps, "num_stages": stages})
        log = buf.getvalue()
        if "Used" not in log:
            log = _ptxas_log_of(k, arch)
        for key, rx in _PTXAS_RE.items():
            m = rx.search(log)
            res[key] = int(m.group(1)) if m else None
        res["smem"] = int(k.metadata.shared)
        ttgir = k.asm.get("ttgir", "")
        res["pipelined"] = ("async_copy_global_to_local" in ttgir or "async_tma_copy" in ttgir)
    except Exception as e:  # a compile error is a finding, not a crash of the sweep
        res["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
    res["seconds"] = time.time() - t0
    return res


# ------------------------------------------------------------------------------------------------
# the sweep and its table
# ------------------------------------------------------------------------------------------------


def run(all_specs: list[Spec], procs: int) -> list[tuple[Spec, tuple, dict]]:
    jobs = [(s.kernel, s.args, s.consts, s.arch, c) for s in all_specs for c in s.configs]
    owners = [(s, c) for s in all_specs for c in s.configs]
    ctx = mp.get_context("spawn")
    results = [None] * len(jobs)
    t0 = time.time()
    with ctx.Pool(procs, initializer=_worker_init) as pool:
        for done, (i, res) in enumerate(pool.imap_unordered(_indexed_compile, enumerate(jobs)), 1):
            results[i] = res
            if done % 50 == 0 or done == len(jobs):
                print(f"  {done}/{len(jobs)} compiled, {time.time() - t0:.0f} s", flush=True)
    return [(s, c, r) for (s, c), r in zip(owners, results)]


def _indexed_compile(item):
    i, job = item
    return i, compile_one(job)


def _shape(s: Spec) -> str:
    return "aligned" if s.aligned else "odd"


def check(all_specs, rows) -> list[str]:
    """Failures: compile errors, variants with no config that fits, spills in kept configs at r <= 64, and
    at aligned shapes a GEMM main loop without async copies (not software-pipelined)."""
    fails = []
    by_spec = {}
    for s, c, r in rows:
        by_spec.setdefault(id(s), []).append((c, r))
        tag = f"{s.kernel} [{s.variant}] {s.dtype} sm_{s.arch} {_shape(s)} {c}"
        if r["error"]:
            fails.append(f"compile error: {tag}: {r['error']}")
        elif r["smem"] > SMEM_LIMIT[s.arch]:
            fails.append(f"over shared memory ({r['smem']} > {SMEM_LIMIT[s.arch]}): {tag}")
        elif r["spill"] and s.r <= 64:
            fails.append(f"spills {r['spill']} B at r = {s.r}: {tag}")
        elif s.aligned and s.kernel == "gemm" and s.args["K"] != 0 and not r["pipelined"]:
            fails.append(f"GEMM main loop not pipelined: {tag}")
    for s in all_specs:
        ok = [r for c, r in by_spec.get(id(s), []) if not r["error"] and r["smem"] <= SMEM_LIMIT[s.arch]]
        if not ok:
            fails.append(f"no fitting config: {s.kernel} [{s.variant}] {s.dtype} sm_{s.arch} {_shape(s)}")
    return fails


def table(rows) -> str:
    """kernel × dtype × arch × shapes: variants, kept configs, max registers, max spill, max smem, r = 128 spills."""
    agg = {}
    for s, c, r in rows:
        a = agg.setdefault((s.kernel, s.dtype, s.arch, _shape(s)), dict(variants=set(), n=0, regs=0, spill=0, smem=0,
                                                              spill128=0, err=0, unpiped=0))
        a["variants"].add(s.variant)
        a["n"] += 1
        if r["error"]:
            a["err"] += 1
            continue
        a["regs"] = max(a["regs"], r["regs"] or 0)
        a["smem"] = max(a["smem"], r["smem"])
        if s.r <= 64:
            a["spill"] = max(a["spill"], r["spill"] or 0)
        else:
            a["spill128"] = max(a["spill128"], r["spill"] or 0)
        if s.kernel in ("gemm", "shrink") and r["pipelined"] is False and s.args.get("K", 1) != 0:
            a["unpiped"] += 1
    lines = ["| kernel | dtype | arch | shapes | variants | kept configs | max regs | max spill r≤64 (B) "
             "| max spill r=128 (B) | max smem (KB) | not pipelined | errors |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (k, dt, arch, sh), a in sorted(agg.items(), key=lambda kv: (kv[0][0], kv[0][1], -kv[0][2], kv[0][3])):
        lines.append(f"| {k} | {dt} | sm_{arch} | {sh} | {len(a['variants'])} | {a['n']} | {a['regs']} | {a['spill']} | "
                     f"{a['spill128']} | {a['smem'] / 1024:.0f} | {a['unpiped']} | {a['err']} |")
    return "\n".join(lines)


def variant_table(rows) -> str:
    """One line per (kernel, variant, dtype, arch): kept configs and the worst resources among them."""
    agg = {}
    for s, c, r in rows:
        a = agg.setdefault((s.kernel, s.variant, s.dtype, s.arch, _shape(s)), [0, 0, 0, 0])
        a[0] += 1
        if not r["error"]:
            a[1], a[2], a[3] = max(a[1], r["regs"] or 0), max(a[2], r["spill"] or 0), max(a[3], r["smem"])
    lines = ["| kernel | variant | dtype | arch | shapes | kept | max regs | max spill (B) | max smem (KB) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (k, v, dt, arch, sh), a in agg.items():
        lines.append(f"| {k} | {v} | {dt} | sm_{arch} | {sh} | {a[0]} | {a[1]} | {a[2]} | {a[3] / 1024:.0f} |")
    return "\n".join(lines)


RESULTS_BEGIN = "<!-- aot-sweep:begin -->"
RESULTS_END = "<!-- aot-sweep:end -->"


def write_results(text: str, path: str = os.path.join(ROOT, "bench", "RESULTS.md"),
                  begin: str = RESULTS_BEGIN, end: str = RESULTS_END) -> None:
    """Replace the section of bench/RESULTS.md between the markers begin/end (appended when absent)."""
    with open(path) as f:
        doc = f.read()
    block = f"{begin}\n{text}\n{end}"
    if begin in doc:
        pre, rest = doc.split(begin, 1)
        doc = pre + block + rest.split(end, 1)[1]
    else:
        doc = doc.rstrip("\n") + "\n\n" + block + "\n"
    with open(path, "w") as f:
        f.write(doc)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subset", action="store_true", help="the representative subset the test suite runs")
    ap.add_argument("--shapes", choices=("both",) + SHAPES, default="both",
                    help="aligned sizes, odd sizes (no divisibility specialisation) or both (default)")
    ap.add_argument("--unaligned", action="store_true", help="same as --shapes unaligned")
    ap.add_argument("--kernels", help="comma-separated: only these kernels (gemm, shrink, core_grad, wd_pass)")
    ap.add_argument("--dtypes", help="comma-separated: only these dtypes (bf16, fp16, fp32)")
    ap.add_argument("--variant", default="", help="only launch variants whose name contains this")
    ap.add_argument("--procs", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--write-results", action="store_true", help="write the table into bench/RESULTS.md")
    ap.add_argument("--details", action="store_true", help="also print one line per launch variant")
    a = ap.parse_args(argv)
    _worker_init()
    try:
        import triton
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except Exception as e:  # pragma: no cover
        print(f"no Triton CUDA compiler here: {e}")
        return 77
    t0 = time.time()
    shapes = ("unaligned",) if a.unaligned else SHAPES if a.shapes == "both" else (a.shapes,)
    split = lambda v: set(v.split(",")) if v else None  # noqa: E731
    all_specs = specs(subset=a.subset, shapes=shapes, kernels=split(a.kernels), dtypes=split(a.dtypes),
                      variant=a.variant)
    partial = a.subset or bool(a.kernels or a.dtypes or a.variant) or len(shapes) < len(SHAPES)
    n = sum(len(s.configs) for s in all_specs)
    print(f"triton {triton.__version__}: {len(all_specs)} launch variants, {n} compiles on {a.procs} processes",
          flush=True)
    rows = run(all_specs, a.procs)
    fails = check(all_specs, rows)
    wall = time.time() - t0
    summary = table(rows)
    print(summary)
    if a.details:
        print(variant_table(rows))
    print(f"{n} compiles in {wall:.0f} s; {len(fails)} failures")
    for f in fails:
        print("FAIL", f)
    if a.write_results:
        shape = " and ".join("odd (unaligned)" if sh == "unaligned" else sh for sh in shapes)
        cmd = " ".join(["python bench/scripts/aot_sweep.py"] + (argv if argv is not None else sys.argv[1:]))
        scope = "every config the pruners keep" if not partial else "a partial sweep (filters in the command)"
        text = (f"## Ahead-of-time compile sweep{' (partial)' if partial else ''} (Triton {triton.__version__}, "
                f"{shape} shapes, {time.strftime('%Y-%m-%d')})\n\n"
                f"`{cmd}`: {scope}, compiled for "
                f"sm_90 and sm_80 with the wheel's ptxas ({n} compiles, {wall:.0f} s on {a.procs} processes, "
                f"2-core CPU VM). Limits: shared memory {SMEM_LIMIT[90] // 1024} KB (sm_90), "
                f"{SMEM_LIMIT[80] // 1024} KB (sm_80). {len(fails)} failures.\n\n{summary}\n\n"
                f"<details><summary>per launch variant</summary>\n\n{variant_table(rows)}\n\n</details>")
        if partial:  # a filtered run never overwrites the full sweep's table; one section per filter set
            slug = "-".join(["+".join(shapes), a.kernels or "all", a.dtypes or "all", a.variant or "all"]
                            + (["subset"] if a.subset else [])).replace(",", "+").replace(" ", "_")
            write_results(text, begin=f"<!-- aot-sweep-partial {slug}:begin -->",
                          end=f"<!-- aot-sweep-partial {slug}:end -->")
        else:
            write_results(text)
    if not fails:
        print("SWEEP OK")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
