"""Launch configs of the Triton kernels and their pruners: pure functions, importable without the kernels.

``gemm_configs`` / ``shrink_configs`` (pareto_linear's autotuned GEMM and shrink kernels), ``core_grad_launch``
(its core-gradient kernel) and ``wd_configs`` (weight_distances' pass) are functions of dtype, shape bucket,
rank, K, variant flags and the GPU's compute capability. The kernels' runtime ``early_config_prune`` hooks call
them with the device's capability; bench/scripts/aot_sweep.py enumerates exactly the configs they keep and
compiles each for sm_80 / sm_90 without a GPU (shared memory, registers, spills; docs/design.md §9). Per-GPU
overrides (e.g. a JSON table measured on one GPU) would plug in here.

Needs triton (for ``triton.Config``), not the kernel modules.
"""
from __future__ import annotations

import torch

from ._dispatch import interpreting

try:
    import triton
except Exception as e:  # pragma: no cover - depends on the install
    raise ImportError(f"pmkernels.triton_configs needs triton: {e}") from e

__all__ = ["FUSED_FWD_MAX_BLOCK_R", "FUSED_FWD_MAX_OUT_SM80", "FUSED_FWD_MAX_OUT_SM90", "GEMM_BUCKET_CONFIGS",
           "GEMM_CONFIGS", "GEMM_UNALIGNED_CONFIGS", "SHRINK_CONFIGS", "WD_TILES", "core_grad_launch", "dtype_name", "gemm_bucket", "gemm_configs",
           "loads_aligned", "one_launch_forward", "shrink_block_c", "shrink_configs", "smem_limit", "wd_configs"]

_INTERPRET = interpreting()  # fixed at import, as in the kernel modules


# ---------------------------------------------------------------------- pareto_linear: GEMM and shrink
# The pruners are pure functions of (dtype, shape bucket, rank, K, variant flags, GPU capability), so
# bench/scripts/aot_sweep.py enumerates exactly the configs the runtime autotuner may pick and compiles
# each for sm_90 and sm_80 (shared memory, registers, spills). The runtime ``early_config_prune`` hooks
# call the same functions with the capability of the tensors' device.

# Max dynamic shared memory one block may opt into, by compute capability (major * 10 + minor).
_SMEM_LIMIT = {75: 65536, 80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448, 100: 232448,
               103: 232448, 120: 101376}
_ELEM_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def smem_limit(capability: int) -> int:
    """Bytes of shared memory a block may use on a GPU of this capability (unknown: the most common 99 KB)."""
    return _SMEM_LIMIT.get(capability, 101376)


def dtype_name(dtype) -> str:
    """torch.float32/bfloat16/float16 (or "fp32"/"bf16"/"fp16") -> "fp32"/"bf16"/"fp16"."""
    if isinstance(dtype, str):
        return dtype
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def _cfg(bm, bn, bk, stages, warps, group=8):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group},
                         num_stages=stages, num_warps=warps)


# Small token counts (decode, M <= 64) get thin-M tiles, large ones square-ish tiles, rank-sized
# outputs (dU = dyᵀ t, dV = xᵀ s: N = r, a reduction over all tokens) thin-N tiles.
GEMM_BUCKET_CONFIGS = {
    "small_m": [
        _cfg(16, 32, 256, 4, 4), _cfg(16, 32, 128, 5, 2),  # more CTAs for decode-sized M
        _cfg(16, 64, 128, 4, 4), _cfg(16, 128, 128, 4, 4), _cfg(16, 256, 64, 3, 4),
        _cfg(32, 64, 128, 4, 4), _cfg(32, 128, 64, 4, 4), _cfg(64, 64, 64, 4, 4), _cfg(64, 128, 64, 3, 4),
    ],
    "large_m": [
        _cfg(128, 256, 64, 3, 8), _cfg(256, 128, 64, 3, 8), _cfg(128, 128, 64, 4, 8), _cfg(128, 128, 64, 3, 4),
        _cfg(128, 128, 32, 4, 4), _cfg(128, 64, 64, 4, 4), _cfg(64, 128, 64, 4, 4), _cfg(64, 64, 64, 5, 4),
    ],
    "thin_n": [
        _cfg(64, 16, 128, 4, 4), _cfg(128, 16, 128, 3, 4), _cfg(64, 32, 128, 4, 4), _cfg(128, 32, 64, 4, 4),
        _cfg(32, 32, 256, 3, 4), _cfg(64, 32, 64, 3, 4),
    ],
}
# Launches whose A/B loads Triton cannot prove 16-element aligned (an odd K or row stride: odd in/out
# features, odd-width views) load element by element, unpipelined for half precision, with 64-bit addresses
# per element: nearly every config above spilled there (AOT sweep at odd sizes, sm_80/sm_90, 8 B to 7 KB).
# These keep BLOCK_K = 32 (a third of the registers of the loaded tiles) and <= 32 accumulators per thread.
# (Each was spill-free at odd sizes on sm_80 in bf16 and fp32 for the forward, decode, dx and dW launches.)
GEMM_UNALIGNED_CONFIGS = {
    "small_m": [_cfg(16, 32, 64, 4, 4), _cfg(16, 64, 64, 4, 4), _cfg(32, 32, 64, 3, 4), _cfg(16, 64, 32, 3, 4)],
    "large_m": [_cfg(64, 128, 32, 3, 8), _cfg(128, 64, 32, 3, 8), _cfg(64, 64, 32, 3, 4), _cfg(32, 64, 32, 3, 4)],
}
GEMM_CONFIGS = [c for cs in list(GEMM_BUCKET_CONFIGS.values()) + list(GEMM_UNALIGNED_CONFIGS.values()) for c in cs]


# The forward's launch plan, decided here only (``one_launch_forward``). One launch (_gemm_kernel with
# FUSE_SHRINK: z = x V in its K loop, t = z M_bᵀ and t Uᵀ in its epilogue) when
#  * no gradient is needed (inference, decode): autograd's backward needs z and t, which the fused kernel
#    keeps in registers (storing them from one column tile would make it exact but couple the GEMM to
#    autograd and split-K; the training forward keeps the two launches);
#  * the base GEMM is the Triton one (the cuBLAS hybrid has no K loop to fold x V into);
#  * the padded rank is at most FUSED_FWD_MAX_BLOCK_R: z is a BLOCK_M × BLOCK_R fp32 accumulator beside the
#    output tile. From the AOT sweep (bench/scripts/aot_sweep.py, Triton 3.8, sm_80/sm_90): at BLOCK_R = 16
#    the fused GEMM has spill-free tiles of every size the unfused one uses (rules in gemm_configs); at
#    BLOCK_R = 32 the epilogue's core contraction (an IEEE-fp32 dot on z, plus the folded M for a shared γ)
#    spilled 4-832 B in every prefill tile with BLOCK_M >= 128 and in 32-row decode tiles;
#  * and it pays: every column tile recomputes z for its rows, BLOCK_R / BLOCK_N more MMA work, to save
#    the shrink's second read of x (2 in bytes per token in half precision) and a launch. Per token that is
#    2 in·out·BLOCK_R / BLOCK_N FLOPs against 2 in bytes: a win while out·BLOCK_R / BLOCK_N stays under the
#    GPU's FLOP:byte balance (bf16: H100 ≈ 260 with the fused tiles' BLOCK_N = 256 -> out ≲ 4100; A100 ≈ 135
#    with BLOCK_N = 128, its spill-free fused tiles -> out ≲ 1100): FUSED_FWD_MAX_OUT_*. A per-sample γ also
#    recomputes its K IEEE-fp32 core dots (CUDA cores) per column tile: before sm_90 (A100: fp32 at 1/16
#    of the tensor rate) that alone costs more than the read of x it saves, so per-sample prefill keeps two
#    launches there. Decode-sized token counts (<= 64 rows, memory- and launch-bound) always fuse. These
#    limits are roofline predictions (bench/scripts/perf_model.py), not measurements.
# Otherwise two launches: _shrink_kernel (z, t to HBM), then the GEMM reading t.
FUSED_FWD_MAX_BLOCK_R = 16
FUSED_FWD_MAX_OUT_SM90 = 4096  # sm_90 and later
FUSED_FWD_MAX_OUT_SM80 = 1024  # earlier GPUs (and no GPU), shared γ only


def one_launch_forward(block_r: int, need_grad: bool, n_tokens: int, n_out: int, per_sample: bool,
                       capability: int, base: str = "triton") -> bool:
    """True when the forward runs as one fused launch (the rules above); block_r = pad_rank(r), n_tokens the
    rows of x, n_out the output features, per_sample: one γ row per sample (else one shared row),
    capability major * 10 + minor (0 when not on CUDA)."""
    if base != "triton" or need_grad or block_r > FUSED_FWD_MAX_BLOCK_R:
        return False
    if n_tokens <= 64:
        return True
    if capability >= 90:
        return n_out <= FUSED_FWD_MAX_OUT_SM90
    return not per_sample and n_out <= FUSED_FWD_MAX_OUT_SM80


def loads_aligned(K: int, *strides: int) -> bool:
    """True when the reduction length and every non-unit stride of A and B are multiples of 16 elements,
    i.e. Triton specialises them as divisible and vectorises (and pipelines) the tile loads."""
    return K % 16 == 0 and all(s == 1 or s % 16 == 0 for s in strides)


def gemm_bucket(M: int, N: int) -> str:
    """Shape bucket of a _gemm_kernel launch: "small_m" (decode), "thin_n" (rank-sized N) or "large_m"."""
    if M <= 64:
        return "small_m"
    return "thin_n" if N <= 32 else "large_m"


def _gemm_smem(c: triton.Config, a_bytes: int, b_bytes: int, lora: bool, block_r: int, fuse: bool = False) -> int:
    """Shared memory estimate: num_stages buffers of the A and B tiles (+ the fused shrink's V tile; + the
    expand's t and U tiles)."""
    bm, bn, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
    smem = c.num_stages * (bm * a_bytes + bn * b_bytes + (block_r * a_bytes if fuse else 0)) * bk
    if lora:
        smem = max(smem, (bm + bn) * block_r * a_bytes)
    return smem


# Register rules that only older Triton codegen needs (the pruners are exact per installed version).
_TRITON_BEFORE_3_8 = tuple(int(v) for v in triton.__version__.split(".")[:2]) < (3, 8)


def gemm_configs(dtype, bucket: str, *, has_lora: bool, add_c: bool, block_r: int, capability: int,
                 b_dtype=None, aligned: bool = True, fuse_shrink: bool = False) -> list:
    """The _gemm_kernel configs the autotuner may try for this launch, in order; never empty.

    dtype: A's dtype (B is cast to it; b_dtype: B's own dtype when it differs, fp32 for dU/dV).
    aligned: ``loads_aligned`` of the launch; unaligned small_m / large_m launches draw from
    ``GEMM_UNALIGNED_CONFIGS`` instead (thin_n's tiles were spill-free at odd sizes too).
    Kept: shared memory estimate within the capability's limit, and register rules the AOT sweep
    (bench/scripts/aot_sweep.py) found spill-free on sm_80/sm_90: at most 128 fp32 accumulators per
    thread, at most 64 with the expand epilogue at block_r >= 64 or in the accumulate-into-C pass
    (``add_c``, the cuBLAS hybrid: it has no main loop, so big tiles buy nothing there).
    fuse_shrink: the one-launch forward's GEMM (FUSE_SHRINK; V's tile is a third stream in shared memory,
    z = x V a second accumulator), at block_r <= FUSED_FWD_MAX_BLOCK_R.
    """
    a_bytes = _ELEM_BYTES[dtype_name(dtype)]
    b_bytes = _ELEM_BYTES[dtype_name(b_dtype)] if b_dtype is not None else a_bytes
    limit = smem_limit(capability)
    keep = []
    cands = GEMM_BUCKET_CONFIGS[bucket] if aligned or bucket not in GEMM_UNALIGNED_CONFIGS \
        else GEMM_UNALIGNED_CONFIGS[bucket]
    for c in cands:
        acc_per_thread = c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] // (32 * c.num_warps)
        if _gemm_smem(c, a_bytes, b_bytes, has_lora, block_r, fuse_shrink) > limit:
            continue
        if acc_per_thread > 128 or ((add_c or (has_lora and block_r >= 64)) and acc_per_thread > 64):
            continue
        if a_bytes == 4 and capability < 90 and acc_per_thread > 64:  # fp32 on sm_80: 128×128/4 warps spilled
            continue
        if fuse_shrink and capability < 90 and acc_per_thread > 64:
            continue  # the fused forward, sm_80, r = 16: every 128-accumulator tile spilled 36-364 B (bf16 and fp32)
        if fuse_shrink and bucket == "small_m" and c.kwargs["BLOCK_N"] >= 256:
            continue  # the fused decode tile 16×256 spilled 72-312 B (sm_80 and sm_90, shared and per-sample γ)
        if a_bytes == 2 and capability < 90 and c.num_stages >= 5:  # Triton 3.9, sm_80: 64×64×64 at 5 stages spilled 4 B
            continue
        if add_c and not aligned and a_bytes == 2 and capability < 90 and c.num_warps < 8:
            continue  # the hybrid pass at odd sizes, sm_80, half precision: 64×64 on 4 warps spilled 52 B
        if _TRITON_BEFORE_3_8 and capability < 90 and a_bytes == 2:
            # Triton 3.6's sm_80 codegen (not 3.8/3.9's) spilled 8-72 B in the 128-accumulator half-precision
            # tiles and 4 B in the 128×128 A tile of dU/dV (fp32 B cast in the loop): found by the AOT sweep.
            if acc_per_thread > 64 or (b_bytes == 4 and c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_K"] >= 128 * 128):
                continue
        keep.append(c)
    if not keep and fuse_shrink and aligned and bucket in GEMM_UNALIGNED_CONFIGS:
        # fp32 on sm_80: the V tile puts every aligned-list tile over shared memory or the register rules
        # (the smallest, 128×128×32 on 4 warps, spilled 144 B); the BLOCK_K = 32 tiles fit and do not spill
        return gemm_configs(dtype, bucket, has_lora=has_lora, add_c=add_c, block_r=block_r, capability=capability,
                            b_dtype=b_dtype, aligned=False, fuse_shrink=True)
    return keep or [min(cands, key=lambda c: _gemm_smem(c, a_bytes, b_bytes, has_lora, block_r, fuse_shrink))]


SHRINK_CONFIGS = {  # (BLOCK_N, BLOCK_D, num_stages, num_warps)
    "small_n": [(16, 128, 4, 4), (16, 256, 3, 4), (32, 128, 4, 4), (16, 64, 4, 4)],
    "large_n": [(64, 64, 4, 4), (64, 128, 3, 4), (128, 64, 3, 8), (64, 32, 4, 4)],
}


def shrink_block_c(block_r: int, K: int) -> int:
    """Width of the H blocks the core contraction runs over (see _shrink_kernel): all of r up to 32."""
    return block_r if block_r <= 32 else 32


def shrink_configs(dtype, block_r: int, K: int, per_sample: bool, capability: int, small_n: bool,
                   aligned: bool = True) -> list:
    """The _shrink_kernel configs the autotuner may try, in order; never empty.

    dtype: x's (A's) dtype; block_r: r padded (pad_rank); K: core slices;
    small_n: N <= 64 (decode). Kept: shared memory estimate (num_stages buffers of the A and P tiles)
    within the limit, at most 64 fp32 z accumulators per thread; BLOCK_C from shrink_block_c.
    aligned: ``loads_aligned`` of the launch; at odd sizes (element-wise loads) the prefill configs with
    BLOCK_D >= 64 spilled 4-36 B (AOT sweep, sm_80/sm_90), so unaligned prefill launches keep BLOCK_D <= 32.
    """
    es = _ELEM_BYTES[dtype_name(dtype)]
    limit = smem_limit(capability)
    cands = SHRINK_CONFIGS["small_n" if small_n else "large_n"]
    block_c = shrink_block_c(block_r, K)

    def smem(bn, bd, st):
        return st * (bn + block_r) * bd * es

    def spills(bn, bd, w):  # register rules from the AOT sweep (sm_80 spilled 12-40 B in these)
        return ((es == 4 and block_r >= 32 and bd >= 128)
                or (capability < 90 and block_r >= 64 and bn >= 128)
                or (not aligned and not small_n and bd >= 64))

    keep = [triton.Config({"BLOCK_N": bn, "BLOCK_D": bd, "BLOCK_C": block_c}, num_stages=st, num_warps=w)
            for bn, bd, st, w in cands
            if smem(bn, bd, st) <= limit and bn * block_r // (32 * w) <= 64 and not spills(bn, bd, w)]
    if not keep:
        bn, bd, st, w = min(cands, key=lambda c: smem(*c[:3]))
        keep = [triton.Config({"BLOCK_N": bn, "BLOCK_D": bd, "BLOCK_C": block_c}, num_stages=st, num_warps=w)]
    return keep


def core_grad_launch(block_r: int) -> dict:
    """Launch constants of _core_grad_kernel (no autotuning: it reads only the (N, r) fp32 intermediates)."""
    return {"BLOCK_L": 16 if _INTERPRET else 32, "num_warps": 8 if block_r >= 64 else 4}


# ---------------------------------------------------------------------- weight_distances: the one-pass kernel
# (BLOCK_M, BLOCK_N, num_warps, num_stages) by BLOCK_R. The pass's IEEE-fp32 dots run on CUDA cores,
# and an FMA dot keeps its whole contraction extent per thread in registers: the AOT sweep
# (bench/scripts/aot_sweep.py) found 64×64 tiles spilling 8-204 B at r = 16 (bf16/fp16, sm_90), 1-13 KB at r = 64 and 12-33 KB at r = 128 on
# sm_80/sm_90 (tf32x3 dots spill too), while these tiles compile spill-free. Smaller row blocks mean
# more Z atomics ((out / BLOCK_M) · in · r adds), the price of no spills at large r.
WD_TILES = {16: (32, 32, 4, 3), 32: (32, 32, 4, 3), 64: (16, 32, 4, 3), 128: (32, 32, 4, 3)}


def wd_configs(dtype, block_r: int, capability: int) -> list:
    """The pass's launch config for deltas of ``dtype`` at BLOCK_R ``block_r`` (one, no autotuning: the
    pass accumulates Z with atomics, so a tuning rerun would compound it). Pure, like the pareto_linear
    pruners; the shared memory it needs (at most ~60 KB) fits every GPU from sm_75 on, so ``capability``
    does not change it today."""
    bm, bn, warps, stages = WD_TILES[min(max(block_r, 16), 128)]
    if block_r <= 16 and str(dtype) in ("fp32", "torch.float32"):
        # fp32 at r = 16: 64×64 tiles (32×32 spilled 4 B on sm_90), 8 warps: with 4, odd sizes (no
        # divisibility hints) spilled 280 B (sm_90) / 324 B (sm_80); 8 warps compile spill-free at both
        bm, bn, warps = 64, 64, 8
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)]
