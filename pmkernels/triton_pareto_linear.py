"""Fused Triton kernels for ``pareto_linear`` (impl="triton"), in reading order: kernels -> autotune hooks and
host launchers -> the ``torch.library`` ops with their autograd and fake rules -> ``triton_pareto_linear``.

Inputs are already validated by ``pmkernels.pareto_linear``. The design (maths, launches, per-sample and shared
γ, precision, base GEMM, registration, what is not measured yet) is docs/design.md §10; the launch configs and
their pure pruners are ``pmkernels.triton_configs``.

Importing this module raises ImportError when triton is not importable.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from ._dispatch import cuda_capability, interpreting, pad_rank
from ._validation import check_triton_dtype
from .triton_configs import (GEMM_CONFIGS, SHRINK_CONFIGS, core_grad_launch, gemm_bucket, gemm_configs,
                             loads_aligned, one_launch_forward, shrink_block_c, shrink_configs)

try:
    import triton
    import triton.language as tl
except Exception as e:  # pragma: no cover - depends on the install
    raise ImportError(f"pmkernels.triton_pareto_linear needs triton: {e}") from e

__all__ = ["triton_pareto_linear"]

_INTERPRET = interpreting()  # fixed at import: it picks the launchers (autotuned or one fixed config)
# "triton": all-Triton GEMM with fused epilogue; "cublas": torch.mm base + Triton epilogue pass.
_BASE_GEMM = os.environ.get("PMKERNELS_BASE_GEMM", "triton")
# Big dots on fp32 inputs: tf32 on CUDA, exact fp32 under the interpreter (numpy has no tf32).
_DOT_PRECISION = "ieee" if _INTERPRET else "tf32"


def _autotune_max_configs() -> Optional[int]:
    """PMKERNELS_AUTOTUNE_CONFIGS=N: each autotuned launch tries at most the first N configs its pruner keeps
    (the bucket lists are ordered most-likely-best first), a fixed small set for short GPU windows
    (bench/gpu_check.sh uses 2). Unset or 0: every kept config."""
    raw = os.environ.get("PMKERNELS_AUTOTUNE_CONFIGS", "0").strip() or "0"
    if not raw.isdigit():
        raise ValueError(f"PMKERNELS_AUTOTUNE_CONFIGS must be a non-negative integer, got {raw!r}")
    return int(raw) or None


_AUTOTUNE_MAX = _autotune_max_configs()


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _core_block(z, t, h_block_ptr, h_mask, g_ptr, sample, row_ok, K, stride_hk, stride_gb, stride_gk,
                SHARED_PREF: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_C: tl.constexpr):
    """t + Σ_k γ_k z H_k over one (BLOCK_A × BLOCK_C) block of H (``h_block_ptr``: its offsets, ``h_mask``),
    fp32. Shared γ (g (1, K)): M = Σ_k γ_k H_k folded in registers, one dot. Per-sample γ: K dots on z
    scaled by each row's γ_{b,k} (b = ``sample``)."""
    if SHARED_PREF:
        m = tl.zeros((BLOCK_A, BLOCK_C), dtype=tl.float32)
        for k in range(0, K):
            h = tl.load(h_block_ptr + k * stride_hk, mask=h_mask, other=0.0).to(tl.float32)
            m += tl.load(g_ptr + k * stride_gk).to(tl.float32) * h
        t = tl.dot(z, m, t, input_precision="ieee")
    else:
        for k in range(0, K):
            h = tl.load(h_block_ptr + k * stride_hk, mask=h_mask, other=0.0).to(tl.float32)
            g = tl.load(g_ptr + sample * stride_gb + k * stride_gk, mask=row_ok, other=0.0).to(tl.float32)
            t = tl.dot(z * g[:, None], h, t, input_precision="ieee")
    return t


@triton.jit
def _shrink_kernel(
    a_ptr, p_ptr, h_ptr, g_ptr, z_ptr, t_ptr,
    N, D, R, K, L,
    stride_an, stride_ad, stride_pd, stride_pr,
    stride_ha, stride_hc, stride_hk, stride_gb, stride_gk,
    stride_zn, stride_tn,
    N_BUCKET,  # autotune key only: bit 0 small (decode) vs large token counts, bit 1 unaligned loads
    SHARED_PREF: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """z = A P (N, R) and t[n, c] = Σ_k g[n // L, k] Σ_a z[n, a] H[a, c, k], both fp32.

    Forward: A = x, P = V, H = G with its first two dims swapped (t = z M_bᵀ).
    Backward: A = dy, P = U, H = G (s = w M_b).
    SHARED_PREF (one γ row for all N rows, g (1, K)): each CTA folds M = Σ_k γ_k H_k per
    (BLOCK_C × BLOCK_C) block in registers and runs one dot per block, so a shared γ needs no
    host-side fold (no extra launches) and costs the core contraction of K = 1.
    Otherwise the z·H product over all K runs as K IEEE-fp32 dots per (BLOCK_C × BLOCK_C) block of H,
    each on z pre-scaled by the row's γ_{b,k}: no per-row or per-sample r×r matrix is
    built, and rows of different samples can share a block. BLOCK_C == BLOCK_R: one block,
    z stays in registers. BLOCK_C < BLOCK_R (large r, chosen by ``shrink_configs``): z is
    re-read in BLOCK_C-wide column slices from the z just stored (L1/L2-resident, after a
    CTA barrier), so no dot operand spans all r columns: an fp32 FMA dot keeps its whole
    contraction extent per thread in registers, which at r = 128 spilled kilobytes.
    """
    pid = tl.program_id(0)
    rows = (pid * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_ok = rows < N
    rr = tl.arange(0, BLOCK_R)
    r_ok = rr < R
    rd = tl.arange(0, BLOCK_D)

    z = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + rd
        d_ok = dd < D
        a = tl.load(a_ptr + rows[:, None] * stride_an + dd[None, :] * stride_ad,
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        p = tl.load(p_ptr + dd[:, None] * stride_pd + rr[None, :] * stride_pr,
                    mask=d_ok[:, None] & r_ok[None, :], other=0.0)
        z = tl.dot(a, p, z, input_precision=PRECISION)

    out_mask = row_ok[:, None] & r_ok[None, :]
    tl.store(z_ptr + rows[:, None] * stride_zn + rr[None, :], z, mask=out_mask)

    sample = rows // L
    if BLOCK_C == BLOCK_R:
        h_off = rr[:, None] * stride_ha + rr[None, :] * stride_hc
        h_mask = r_ok[:, None] & r_ok[None, :]
        t = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
        t = _core_block(z, t, h_ptr + h_off, h_mask, g_ptr, sample, row_ok, K, stride_hk, stride_gb, stride_gk,
                        SHARED_PREF, BLOCK_R, BLOCK_R)
        tl.store(t_ptr + rows[:, None] * stride_tn + rr[None, :], t, mask=out_mask)
    else:
        tl.debug_barrier()  # this CTA's z stores are visible to all its threads before the re-reads
        rc = tl.arange(0, BLOCK_C)
        for c0 in range(0, BLOCK_R, BLOCK_C):
            cc = c0 + rc
            c_ok = cc < R
            t = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
            for a0 in range(0, BLOCK_R, BLOCK_C):
                aa = a0 + rc
                a_ok = aa < R
                zc = tl.load(z_ptr + rows[:, None] * stride_zn + aa[None, :],
                             mask=row_ok[:, None] & a_ok[None, :], other=0.0)
                h_off = aa[:, None] * stride_ha + cc[None, :] * stride_hc
                h_mask = a_ok[:, None] & c_ok[None, :]
                t = _core_block(zc, t, h_ptr + h_off, h_mask, g_ptr, sample, row_ok, K, stride_hk, stride_gb,
                                stride_gk, SHARED_PREF, BLOCK_C, BLOCK_C)
            tl.store(t_ptr + rows[:, None] * stride_tn + cc[None, :], t, mask=row_ok[:, None] & c_ok[None, :])


@triton.jit
def _gemm_kernel(
    # operands: C = A Bᵀ [+ C] [+ T Uᵀ] [+ bias]
    a_ptr, b_ptr, c_ptr, t_ptr, u_ptr, bias_ptr,
    # FUSE_SHRINK only: T computed in-kernel from P (A's columns -> rank), H (r, r, NUM_OBJ) and g (B, NUM_OBJ)
    p_ptr, h_ptr, g_ptr,
    # sizes
    M, N, K, R, K_PER_SPLIT, NUM_OBJ, L,
    # strides
    stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn, stride_cs,
    stride_tm, stride_tr, stride_un, stride_ur,
    stride_pk, stride_pr, stride_ha, stride_hc, stride_hk, stride_gb, stride_gk,
    M_BUCKET,  # autotune key only: bit 0 small (decode) vs large token counts, bit 1 unaligned loads
    # variant flags and tiles
    HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr, ADD_C: tl.constexpr,
    FUSE_SHRINK: tl.constexpr, SHARED_PREF: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, PRECISION: tl.constexpr,
):
    """C (M, N) = A Bᵀ [+ C] [+ T Uᵀ] [+ bias], fp32 accumulator.

    A is (M, K), B is (N, K) (so C = A Bᵀ; transposes are just strides), T is
    (M, R) fp32 and U is (N, R). B tiles are cast to A's dtype (for dU = dyᵀ t
    and dV = xᵀ s, whose fp32 t/s meet a bf16/fp16 A). ADD_C seeds the
    accumulator with C (the cuBLAS-hybrid variant launches with K = 0).

    FUSE_SHRINK (the one-launch forward, with HAS_LORA): T is not read but computed here, as the
    shrink kernel would: the K loop also accumulates z = A P (P (K, R), A's tiles are loaded anyway),
    and the epilogue forms T = Σ_k g[row // L, k] z H_k with ``_core_block`` (SHARED_PREF: g has one
    row and M = Σ_k g_k H_k is folded in registers). Every column tile recomputes z and T for its rows:
    BLOCK_R / BLOCK_N extra MMA work over the main loop, and the core contraction repeated per column
    tile; in exchange no shrink launch, no second read of A and no (M, R) round-trip of T.

    Split-K (grid axis 1): program k reduces K range [k K_PER_SPLIT, (k+1) K_PER_SPLIT)
    into its own fp32 slice C + k stride_cs (K_PER_SPLIT is a multiple of every
    BLOCK_K, so tiles never straddle splits); the host sums the slices (deterministic).
    Only slice 0 adds the seed, the bias and a read T Uᵀ (masked, branch-free). A fused T is linear in
    z, so every slice adds the expand of its own partial z (over its K range) and the slices sum to the
    whole (up to the rounding of each partial T to A's dtype before the expand dot).
    """
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n
    gid = pid // group
    first_m = gid * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m

    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    m_ok = rm < M
    n_ok = rn < N
    # Rows this program seeds / adds the expand to: all of them in split 0, none in the others. Built as
    # a tensor comparison (not `m_ok & (pid_k == 0)`): Triton 3.9's interpreter rejects the int mask a
    # scalar bool combined with a tensor mask turns into.
    m_first = rm < tl.where(pid_k == 0, M, 0)
    rk = tl.arange(0, BLOCK_K)
    rr = tl.arange(0, BLOCK_R)
    r_ok = rr < R
    c_ptrs = c_ptr + pid_k * stride_cs + rm[:, None] * stride_cm + rn[None, :] * stride_cn
    c_mask = m_ok[:, None] & n_ok[None, :]

    if ADD_C:
        acc = tl.load(c_ptrs, mask=m_first[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    z = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)  # FUSE_SHRINK's z = A P (unused, and dropped, otherwise)
    k_start = pid_k * K_PER_SPLIT
    k_end = tl.minimum(K, k_start + K_PER_SPLIT)
    for k0 in range(k_start, k_end, BLOCK_K):
        kk = k0 + rk
        k_ok = kk < K
        a = tl.load(a_ptr + rm[:, None] * stride_am + kk[None, :] * stride_ak,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptr + kk[:, None] * stride_bk + rn[None, :] * stride_bn,
                    mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, b.to(a.dtype), acc, input_precision=PRECISION)
        if FUSE_SHRINK:  # the shrink's z = x V on the x tile just loaded
            p = tl.load(p_ptr + kk[:, None] * stride_pk + rr[None, :] * stride_pr,
                        mask=k_ok[:, None] & r_ok[None, :], other=0.0)
            z = tl.dot(a, p.to(a.dtype), z, input_precision=PRECISION)

    if HAS_LORA:
        u = tl.load(u_ptr + rr[:, None] * stride_ur + rn[None, :] * stride_un,
                    mask=r_ok[:, None] & n_ok[None, :], other=0.0)
        if FUSE_SHRINK:  # T = z M_bᵀ for this program's rows (and K range), as _shrink_kernel's BLOCK_C == BLOCK_R
            h_off = rr[:, None] * stride_ha + rr[None, :] * stride_hc
            t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            t = _core_block(z, t, h_ptr + h_off, r_ok[:, None] & r_ok[None, :], g_ptr, rm // L, m_ok, NUM_OBJ,
                            stride_hk, stride_gb, stride_gk, SHARED_PREF, BLOCK_R, BLOCK_R)
        else:
            t = tl.load(t_ptr + rm[:, None] * stride_tm + rr[None, :] * stride_tr,
                        mask=m_first[:, None] & r_ok[None, :], other=0.0)
        acc = tl.dot(t.to(u.dtype), u, acc, input_precision=PRECISION)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
        acc += tl.where(m_first[:, None], bias[None, :], 0.0)
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)


@triton.jit
def _core_grad_kernel(
    w_ptr, z_ptr, out_ptr,
    L, R, CHUNK,
    stride_wn, stride_zn, stride_ob, stride_os,
    BLOCK_L: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Partial dM_b = Σ_n w[n]ᵀ z[n] over rows [b L + s CHUNK, min(b L + L, ... + CHUNK)) of sample b.

    Grid (P, SPLITS); out (P, SPLITS, R, R) fp32, summed over SPLITS on the host
    (a deterministic split-L reduction, no atomics).
    """
    b = tl.program_id(0)
    sp = tl.program_id(1)
    start = b.to(tl.int64) * L + sp * CHUNK
    end = tl.minimum(b.to(tl.int64) * L + L, start + CHUNK)
    rr = tl.arange(0, BLOCK_R)
    r_ok = rr < R
    rl = tl.arange(0, BLOCK_L)
    acc = tl.zeros((BLOCK_R, BLOCK_R), dtype=tl.float32)
    for l0 in range(0, CHUNK, BLOCK_L):
        rows = start + l0 + rl
        mask = (rows < end)[:, None] & r_ok[None, :]
        w = tl.load(w_ptr + rows[:, None] * stride_wn + rr[None, :], mask=mask, other=0.0)
        z = tl.load(z_ptr + rows[:, None] * stride_zn + rr[None, :], mask=mask, other=0.0)
        acc = tl.dot(tl.trans(w), z, acc, input_precision="ieee")
    o = out_ptr + b * stride_ob + sp * stride_os + rr[:, None] * R + rr[None, :]
    tl.store(o, acc, mask=r_ok[:, None] & r_ok[None, :])


# --------------------------------------------------------------------------------------------
# Autotune: the pure config pruners live in triton_configs; these hooks feed them a launch's arguments
# --------------------------------------------------------------------------------------------


def _prune_gemm(configs, named_args, **kwargs):
    a, b = named_args["a_ptr"], named_args["b_ptr"]
    return gemm_configs(a.dtype, gemm_bucket(named_args["M"], named_args["N"]), has_lora=kwargs["HAS_LORA"],
                        add_c=kwargs["ADD_C"], block_r=kwargs["BLOCK_R"], capability=cuda_capability(a.device),
                        b_dtype=b.dtype, aligned=named_args["M_BUCKET"] < 2,
                        fuse_shrink=kwargs["FUSE_SHRINK"])[:_AUTOTUNE_MAX]


def _prune_shrink(configs, named_args, **kwargs):
    a = named_args["a_ptr"]
    return shrink_configs(a.dtype, kwargs["BLOCK_R"], named_args["K"], not kwargs["SHARED_PREF"],
                          cuda_capability(a.device), small_n=named_args["N"] <= 64,
                          aligned=named_args["N_BUCKET"] < 2)[:_AUTOTUNE_MAX]


if _INTERPRET:
    # One small fixed config: the interpreter runs every program in numpy.
    _GEMM_FIXED = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}
    _gemm_launch = _gemm_kernel
    _shrink_launch = _shrink_kernel
else:
    _GEMM_FIXED = {}
    _gemm_launch = triton.autotune(
        configs=GEMM_CONFIGS,
        key=["M_BUCKET", "N", "K", "R", "K_PER_SPLIT", "NUM_OBJ", "HAS_LORA", "HAS_BIAS", "ADD_C", "FUSE_SHRINK",
             "SHARED_PREF"],
        prune_configs_by={"early_config_prune": _prune_gemm},
        restore_value=["c_ptr"],  # ADD_C accumulates into C; tuning must not compound it
    )(_gemm_kernel)
    _shrink_launch = triton.autotune(
        configs=[triton.Config({"BLOCK_N": bn, "BLOCK_D": bd}, num_stages=st, num_warps=w)
                 for cs in SHRINK_CONFIGS.values() for bn, bd, st, w in cs],  # BLOCK_C is added by the pruner
        key=["N_BUCKET", "D", "R", "K", "SHARED_PREF"],
        prune_configs_by={"early_config_prune": _prune_shrink},
    )(_shrink_kernel)


def _shrink_fixed(block_r: int, K: int) -> dict:
    """Constexprs of an interpreter launch (no autotuner): small tiles, BLOCK_C as on the GPU."""
    return {"BLOCK_N": 16, "BLOCK_D": 32, "BLOCK_C": shrink_block_c(block_r, K)} if _INTERPRET else {}


# --------------------------------------------------------------------------------------------
# Host launchers
# --------------------------------------------------------------------------------------------


def _shrink(a: torch.Tensor, p: torch.Tensor, h: torch.Tensor, g: torch.Tensor, L: int,
            z: Optional[torch.Tensor] = None, t: Optional[torch.Tensor] = None):
    """z = a p, t[n] = Σ_k g[n // L, k] z[n] H[:, :, k]; a (N, D), p (D, r), h (r, r, K) view, g (B, K)
    in any float dtype (read and used in fp32). One launch; a single row of g (B = 1) runs the kernel's
    shared-γ variant (M folded per CTA in registers).

    z, t: optional preallocated (N, r) fp32 outputs with unit column stride (tests poison them).
    """
    N, D = a.shape
    r = p.shape[1]
    K = h.shape[2]
    if z is None:
        z = torch.empty((N, r), device=a.device, dtype=torch.float32)
    if t is None:
        t = torch.empty((N, r), device=a.device, dtype=torch.float32)
    if N == 0:
        return z, t
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    _shrink_launch[grid](
        a, p, h, g, z, t,
        N, D, r, K, L,
        a.stride(0), a.stride(1), p.stride(0), p.stride(1),
        h.stride(0), h.stride(1), h.stride(2), g.stride(0), g.stride(1),
        z.stride(0), t.stride(0),
        (0 if N <= 64 else 1) + (0 if loads_aligned(D, a.stride(0), a.stride(1), p.stride(0), p.stride(1)) else 2),
        SHARED_PREF=g.shape[0] == 1,
        BLOCK_R=pad_rank(r), PRECISION=_DOT_PRECISION, **_shrink_fixed(pad_rank(r), K),
    )
    return z, t


_SPLIT_ALIGN = 256  # K_PER_SPLIT is a multiple of this, hence of every BLOCK_K in the configs
_SM_COUNT: dict = {}


def _split_k(M: int, N: int, K: int, device: torch.device) -> int:
    """Split-K factor for a GEMM whose output has too few tiles to fill the GPU (the token-reduction
    GEMMs of backward: dU, dV at small r, dW at small layers). 1 under the interpreter / off CUDA.
    A heuristic, not yet measured on a GPU."""
    if _INTERPRET or device.type != "cuda" or K < 4096:
        return 1
    if device not in _SM_COUNT:
        _SM_COUNT[device] = torch.cuda.get_device_properties(device).multi_processor_count
    sms = _SM_COUNT[device]
    tiles = triton.cdiv(M, 64) * triton.cdiv(N, 64)
    if tiles * 2 > sms:
        return 1
    return max(1, min(16, triton.cdiv(sms, tiles), K // 2048))


def _gemm(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype, t: Optional[torch.Tensor] = None,
          u: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
          base: str = "triton", out: Optional[torch.Tensor] = None, split_k: int = 1,
          shrink: Optional[tuple] = None) -> torch.Tensor:
    """a (M, K) @ b (N, K)ᵀ [+ t (M, R) @ u (N, R)ᵀ] [+ bias (N,)] -> (M, N) in out_dtype.

    ``base="cublas"`` computes a bᵀ with torch.mm and runs the kernel with an
    empty reduction as a fused epilogue (the hybrid of docs/design.md §5). ``out``: an optional
    preallocated (M, N) result (any strides) for the Triton path (tests poison it). ``split_k``
    > 1 reduces K in that many fp32 slices summed on the host (Triton path only).

    ``shrink = (p, h, g, L)`` (Triton base, t None): t = Σ_k g[n // L, k] (a p)[n] h[:, :, k] is computed
    inside the kernel (FUSE_SHRINK), p (K, R), h (R, R, NUM_OBJ) view, g (B, NUM_OBJ) fp32/fp64, as
    ``_shrink`` would compute it; one launch in all.
    """
    M, K = a.shape
    N = b.shape[0]
    fuse = shrink is not None
    if fuse and (t is not None or base != "triton"):
        raise ValueError("_gemm: shrink= computes t in the Triton main loop (no t, no cuBLAS base)")
    lora = t is not None or fuse
    if bias is not None:
        bias = bias.contiguous()  # the kernel reads bias with unit stride; (N,) so the copy is cheap
    if M == 0 or N == 0:
        return torch.zeros((M, N), device=a.device, dtype=out_dtype)
    if base == "cublas":
        c = torch.mm(a, b.to(a.dtype).t()).to(out_dtype)
        if not lora and bias is None:
            return c
        k_run, add_c = 0, True
        split_k = 1
    else:
        k_run, add_c = K, False
    k_per_split = triton.cdiv(max(k_run, 1), _SPLIT_ALIGN * max(split_k, 1)) * _SPLIT_ALIGN
    splits = max(1, triton.cdiv(k_run, k_per_split))
    if base != "cublas":
        if splits > 1:
            c = torch.empty((splits, M, N), device=a.device, dtype=torch.float32)
        else:
            c = torch.empty((M, N), device=a.device, dtype=out_dtype) if out is None else out
    c2 = c[0] if splits > 1 else c
    R = u.shape[1] if lora else 1
    dummy = c
    p, h, g, L = shrink if fuse else (dummy, dummy, dummy, 1)
    t_strides = (t.stride(0), t.stride(1)) if t is not None else (0, 0)
    shrink_strides = (p.stride(0), p.stride(1), h.stride(0), h.stride(1), h.stride(2), g.stride(0), g.stride(1)) \
        if fuse else (0,) * 7
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), splits)  # noqa: E731
    _gemm_launch[grid](
        a, b, c, t if t is not None else dummy, u if lora else dummy, bias if bias is not None else dummy,
        p, h, g,
        M, N, k_run, R, k_per_split, h.shape[2] if fuse else 1, L,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), c2.stride(0), c2.stride(1),
        c.stride(0) if splits > 1 else 0,
        *t_strides, u.stride(0) if lora else 0, u.stride(1) if lora else 0,
        *shrink_strides,
        (0 if M <= 64 else 1) + (0 if loads_aligned(k_run, a.stride(0), a.stride(1), b.stride(0), b.stride(1)) else 2),
        HAS_LORA=lora, HAS_BIAS=bias is not None, ADD_C=add_c, FUSE_SHRINK=fuse, SHARED_PREF=fuse and g.shape[0] == 1,
        BLOCK_R=pad_rank(R), PRECISION=_DOT_PRECISION, **_GEMM_FIXED,
    )
    if splits > 1:
        res = c.sum(0, dtype=torch.float32)
        if out is None:
            return res.to(out_dtype)
        out.copy_(res)
        return out
    return c


def _core_grad(w: torch.Tensor, z: torch.Tensor, P: int, L: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """dM (P, r, r) fp32 with dM_b = w_bᵀ z_b over sample b's L rows; w, z (P L, r) fp32, unit column stride.

    ``out``: optional (P, splits, r, r) fp32 partials buffer (tests poison it; splits from _core_splits).
    """
    r = w.shape[1]
    w, z = w.contiguous(), z.contiguous()  # the kernel assumes unit column stride; ours already are
    splits, chunk = _core_splits(P, L)
    if out is None:
        out = torch.empty((P, splits, r, r), device=w.device, dtype=torch.float32)
    if P == 0 or L == 0:
        return out.new_zeros((P, r, r))
    R = pad_rank(r)
    _core_grad_kernel[(P, splits)](
        w, z, out, L, r, chunk, w.stride(0), z.stride(0), out.stride(0), out.stride(1),
        BLOCK_R=R, **core_grad_launch(R),
    )
    return out.sum(1)


def _core_splits(P: int, L: int) -> tuple[int, int]:
    """(splits, rows per split) for _core_grad: enough programs to fill a GPU, >= 256 rows each."""
    splits = max(1, min(triton.cdiv(L, 256), triton.cdiv(264, max(P, 1))))
    return splits, max(1, triton.cdiv(L, splits))


def _forward(x, weight, bias, U, G, V, pref):
    """Two launches, keeping z and t for the backward: the shrink, then the GEMM reading t."""
    N = x.shape[0]
    L = N // pref.shape[0] if pref.shape[0] else 1
    z, t = _shrink(x, V, G.transpose(0, 1), pref, max(L, 1))  # t = z M_bᵀ, γ contracted in-kernel (_shrink_kernel)
    y = _gemm(x, weight, x.dtype, t=t, u=U, bias=bias, base=_BASE_GEMM)
    return y, z, t


def _forward_one_launch(x, weight, bias, U, G, V, pref):
    """y only, in one launch: the GEMM computes z = x V in its K loop and t = z M_bᵀ in its epilogue."""
    N = x.shape[0]
    L = N // pref.shape[0] if pref.shape[0] else 1
    return _gemm(x, weight, x.dtype, u=U, bias=bias, shrink=(V, G.transpose(0, 1), pref, max(L, 1)))


def _backward(dy, x, weight, U, G, V, pref, z, t, need):
    nx, nw, nb, nu, ng, nv, npref = need
    N = x.shape[0]
    P = pref.shape[0]
    L = N // P if P else 0  # rows per sample (0 for an empty batch: then dM is all zeros)
    # unneeded gradients are distinct 0-element tensors (custom-op outputs must not alias)
    dx, dw, db, du, dG, dv = (dy.new_empty(0) for _ in range(6))
    dpref = dy.new_empty(0, dtype=pref.dtype)
    w = s = None
    if nx or nv or ng or npref:
        w, s = _shrink(dy, U, G, pref, max(L, 1))  # w = dy U, s = w M_b
    if nx:
        dx = _gemm(dy, weight.t(), x.dtype, t=s, u=V, base=_BASE_GEMM)
    dev = dy.device
    if nw:
        dw = _gemm(dy.t(), x.t(), weight.dtype, split_k=_split_k(*weight.shape, N, dev))
    if nb:
        db = dy.sum(0, dtype=torch.float32).to(dy.dtype)  # fp32 accumulation without an (N, out) fp32 copy
    if nu:
        du = _gemm(dy.t(), t.t(), U.dtype, split_k=_split_k(*U.shape, N, dev))
    if nv:
        dv = _gemm(x.t(), s.t(), V.dtype, split_k=_split_k(*V.shape, N, dev))
    if ng or npref:
        dM = _core_grad(w, z, P, L)  # (P, r, r) fp32; the K-sized contractions below are tiny
        if ng:
            dG = torch.einsum("bij,bk->ijk", dM, pref.float()).to(G.dtype)
        if npref:
            dpref = torch.einsum("bij,ijk->bk", dM, G.float()).to(pref.dtype)
    return dx, dw, db, du, dG, dv, dpref


# --------------------------------------------------------------------------------------------
# torch.library ops
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("pmkernels::pareto_linear_fwd", mutates_args=())
def _fwd_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], U: torch.Tensor,
            G: torch.Tensor, V: torch.Tensor, pref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (N, in), pref (P, K) fp32 or fp64 with N % P == 0 -> (y (N, out), z = xV (N, r) fp32, t = z M_bᵀ (N, r)
    fp32). Two launches: the shrink (γ contracted in-kernel, shared or per sample) and the GEMM. The forward
    autograd uses (z and t are saved for the backward)."""
    # Autocast off: the launchers' host-side torch pieces (the hybrid's torch.mm) keep the inputs' dtypes.
    with torch.autocast(x.device.type, enabled=False):
        return _forward(x, weight, bias, U, G, V, pref)


@_fwd_op.register_fake
def _(x, weight, bias, U, G, V, pref):
    N, r = x.shape[0], U.shape[1]
    return (x.new_empty((N, weight.shape[0])), x.new_empty((N, r), dtype=torch.float32),
            x.new_empty((N, r), dtype=torch.float32))


@torch.library.custom_op("pmkernels::pareto_linear_infer", mutates_args=())
def _infer_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], U: torch.Tensor,
              G: torch.Tensor, V: torch.Tensor, pref: torch.Tensor) -> torch.Tensor:
    """The forward when no gradient is needed: y (N, out) only, in one launch where ``one_launch_forward``
    says so (small r; decode, or out small enough for the GPU), else the two-launch forward's y. No autograd
    rule: ``triton_pareto_linear`` calls it only when nothing needs a gradient."""
    with torch.autocast(x.device.type, enabled=False):
        cap = cuda_capability(x.device) if x.device.type == "cuda" else 0
        if one_launch_forward(pad_rank(U.shape[1]), False, x.shape[0], weight.shape[0], pref.shape[0] > 1, cap,
                              _BASE_GEMM):
            return _forward_one_launch(x, weight, bias, U, G, V, pref)
        return _forward(x, weight, bias, U, G, V, pref)[0]


@_infer_op.register_fake
def _(x, weight, bias, U, G, V, pref):
    return x.new_empty((x.shape[0], weight.shape[0]))


@torch.library.custom_op("pmkernels::pareto_linear_bwd", mutates_args=())
def _bwd_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, U: torch.Tensor, G: torch.Tensor,
            V: torch.Tensor, pref: torch.Tensor, z: torch.Tensor, t: torch.Tensor,
            need_x: bool, need_weight: bool, need_bias: bool, need_U: bool, need_G: bool, need_V: bool,
            need_pref: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                      torch.Tensor, torch.Tensor]:
    """Gradients (dx, dweight, dbias, dU, dG, dV, dpref); an unneeded one is an empty tensor."""
    need = (need_x, need_weight, need_bias, need_U, need_G, need_V, need_pref)
    with torch.autocast(x.device.type, enabled=False):
        return _backward(dy, x, weight, U, G, V, pref, z, t, need)


@_bwd_op.register_fake
def _(dy, x, weight, U, G, V, pref, z, t, need_x, need_weight, need_bias, need_U, need_G, need_V, need_pref):
    def maybe(flag, like, dtype=None):
        return like.new_empty(like.shape if flag else (0,), dtype=dtype or dy.dtype)

    return (maybe(need_x, x), maybe(need_weight, weight), maybe(need_bias, weight[:, 0]), maybe(need_U, U),
            maybe(need_G, G), maybe(need_V, V), maybe(need_pref, pref, pref.dtype))


def _setup_context(ctx, inputs, output):
    x, weight, bias, U, G, V, pref = inputs
    _, z, t = output
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight, U, G, V, pref, z, t)
    ctx.mark_non_differentiable(z, t)


def _autograd_backward(ctx, dy, _dz, _dt):
    x, weight, U, G, V, pref, z, t = ctx.saved_tensors
    n = ctx.needs_input_grad
    need = (n[0], n[1], ctx.has_bias and n[2], n[3], n[4], n[5], n[6])
    grads = _bwd_op(dy, x, weight, U, G, V, pref, z, t, *need)
    return tuple(gr if flag else None for gr, flag in zip(grads, need))


_fwd_op.register_autograd(_autograd_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------


def triton_pareto_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    U: torch.Tensor,
    G: torch.Tensor,
    V: torch.Tensor,
    pref: torch.Tensor,
) -> torch.Tensor:
    """y = x Wᵀ + b + ((x V) M(γ)ᵀ) Uᵀ with fused Triton kernels; inputs validated by the caller.

    x (..., in); weight (out, in); bias (out,) or None; U (out, r); G (r, r, K); V (in, r);
    pref (K,) shared or (B, K) per element of x's leading dim. Returns (..., out) in x's
    dtype (the autocast dtype when autocast is on for x's device).
    """
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        x, weight, U, G, V = (a.to(dt) for a in (x, weight, U, G, V))
        bias = None if bias is None else bias.to(dt)
    check_triton_dtype("x", x)  # before any launch: fp64 fails in the kernels, bf16 is garbage when interpreted
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    # The kernels read γ in fp32 or fp64 as it is (no cast launch for the modules' fp64 preferences);
    # half-precision γ is widened (the interpreter cannot read bf16).
    p2 = pref if pref.dtype in (torch.float32, torch.float64) else pref.float()
    p2 = p2.reshape(-1, pref.shape[-1])
    need_grad = torch.is_grad_enabled() and any(a is not None and a.requires_grad
                                                for a in (x2, weight, bias, U, G, V, p2))
    if need_grad:  # two launches, z and t kept for the backward
        y, _, _ = _fwd_op(x2, weight, bias, U, G, V, p2)
    else:  # one launch where one_launch_forward says so
        y = _infer_op(x2, weight, bias, U, G, V, p2)
    return y.reshape(*lead, weight.shape[0])
