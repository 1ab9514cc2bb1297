"""Triton kernel of ``weight_distances``: one pass over each delta D_k.

Each program owns BLOCK_M rows of D_k and sweeps its columns in BLOCK_N
chunks; every element of D_k is loaded once and feeds

* ‖D_k‖² (a partial per program, summed on the host),
* Y_k = D_k V  (out, r): accumulated in registers, stored once per row block,
* Z_k = D_kᵀ U (in, r): a (BLOCK_N, r) partial per chunk, ``atomic_add``-ed
  into Z_k (so the temporaries stay O((out + in)·r·K), never (out, in)).

A list of deltas is handled with one launch per delta (no stacking copy, and
no pointer-of-pointer loads, which the Triton interpreter cannot do).
Tiles (BLOCK_M, BLOCK_N) depend on the rank (``wd_configs``): the IEEE-fp32
dots run on CUDA cores and hold their contraction extent per thread in
registers, so 64×64 tiles spill at r >= 64; the tiles chosen compile
spill-free on sm_80/sm_90 (bench/scripts/aot_sweep.py, bench/RESULTS.md).
Accumulation is fp32; deltas fp32, bf16 or fp16 (each loaded tile is
converted to fp32 at once, so bf16 works under the interpreter too); fp64
deltas are converted to fp32 first, and fp64 factors U, V are used in fp32
(the result keeps their dtype: use impl="cpp" or "torch" for fp64 accuracy).
U and V are made contiguous fp32 copies (rank-sized); the deltas are read
through their strides.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._dispatch import cuda_capability, interpreting, pad_rank
from .triton_configs import wd_configs


@triton.jit
def _wd_pass_kernel(
    D, stride_dm, stride_dn,
    U, V, Y, Z, SQ,
    OUT, IN, R,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    rm = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = tl.arange(0, BLOCK_R)
    mask_m = rm < OUT
    mask_r = rr < R
    u = tl.load(U + rm[:, None] * R + rr[None, :], mask=mask_m[:, None] & mask_r[None, :], other=0.0)
    acc_y = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    acc_sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(0, IN, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        mask_n = rn < IN
        d = tl.load(D + rm[:, None] * stride_dm + rn[None, :] * stride_dn,
                    mask=mask_m[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
        v = tl.load(V + rn[:, None] * R + rr[None, :], mask=mask_n[:, None] & mask_r[None, :], other=0.0)
        acc_sq += tl.sum(d * d, axis=1)
        acc_y += tl.dot(d, v, input_precision=PRECISION)
        z = tl.dot(tl.trans(d), u, input_precision=PRECISION)
        tl.atomic_add(Z + rn[:, None] * R + rr[None, :], z, mask=mask_n[:, None] & mask_r[None, :])
    tl.store(Y + rm[:, None] * R + rr[None, :], acc_y, mask=mask_m[:, None] & mask_r[None, :])
    tl.store(SQ + pid, tl.sum(acc_sq, axis=0))


def triton_pass(deltas: list[torch.Tensor], U: torch.Tensor, V: torch.Tensor):
    """(‖D_k‖² (K,), Y (out, K, r), Z (in, K, r)), Y[:, k] = D_k V, Z[:, k] = D_kᵀ U; float32.

    PMKERNELS_WD_PRECISION selects tl.dot's input precision on GPU ("ieee", the
    default, or "tf32"/"tf32x3" for speed).
    """
    out, r = U.shape
    in_ = V.shape[0]
    K = len(deltas)
    dev = U.device
    Uf = U.detach().to(torch.float32).contiguous()
    Vf = V.detach().to(torch.float32).contiguous()
    BLOCK_R = pad_rank(r)
    if interpreting():
        launch = {"BLOCK_M": 32, "BLOCK_N": 32}
    else:
        cfg = wd_configs(deltas[0].dtype if deltas else torch.float32, BLOCK_R, cuda_capability(dev))[0]
        launch = dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    BLOCK_M = launch["BLOCK_M"]
    nblocks = triton.cdiv(out, BLOCK_M)
    Y = torch.empty(K, out, r, device=dev, dtype=torch.float32)
    Z = torch.zeros(K, in_, r, device=dev, dtype=torch.float32)
    sq_part = torch.empty(K, nblocks, device=dev, dtype=torch.float32)
    prec = os.environ.get("PMKERNELS_WD_PRECISION", "ieee")
    for k, d in enumerate(deltas):
        if d.dtype == torch.float64:
            d = d.float()
        _wd_pass_kernel[(nblocks,)](
            d, d.stride(0), d.stride(1),
            Uf, Vf, Y[k], Z[k], sq_part[k],
            out, in_, r,
            BLOCK_R=BLOCK_R, PRECISION=prec, **launch,
        )
    # the pass contract: Y (out, K, r), Z (in, K, r)
    return sq_part.sum(1), Y.permute(1, 0, 2).contiguous(), Z.permute(1, 0, 2).contiguous()
