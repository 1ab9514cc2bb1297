"""Ahead-of-time compile of the pmkernels Triton kernels for sm90 and sm80, no GPU needed.

Run by tests/test_triton_pareto_linear.py::test_aot_compile_sm90_sm80 in a subprocess without
TRITON_INTERPRET. Exit 0 and print "ALL OK" on success; exit 77 when no GPU compiler is available.
"""
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import pmkernels.triton_pareto_linear as tpl  # noqa: E402


def aot(fn, types, consts, arch, div16=(), num_warps=4, num_stages=3):
    sig = {n: ("constexpr" if n in consts else types.get(n, "i32")) for n in fn.arg_names}
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in div16}
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


# Forward GEMM as launched on contiguous tensors of real shapes: unit strides are specialised to 1,
# sizes/pointers/other strides known divisible by 16.
FWD_UNIT = dict(stride_ak=1, stride_bk=1, stride_cn=1, stride_tr=1, stride_ur=1)
FWD_DIV = ["a_ptr", "b_ptr", "c_ptr", "t_ptr", "u_ptr", "bias_ptr", "M", "N", "K", "K_PER_SPLIT",
           "stride_am", "stride_bn", "stride_cm", "stride_tm", "stride_un"]


def main():
    try:
        aot(tpl._core_grad_kernel, dict(w_ptr="*fp32", z_ptr="*fp32", out_ptr="*fp32"),
            dict(BLOCK_L=32, BLOCK_R=16), 90)
    except (FileNotFoundError, ImportError) as e:
        print(f"no Triton GPU compiler here: {e}")
        sys.exit(77)
    for arch, dt, (bm, bn, bk, stages, warps) in [(90, "fp16", (128, 256, 64, 3, 8)),
                                                   (80, "bf16", (128, 128, 32, 4, 4)),
                                                   (90, "fp32", (64, 64, 64, 5, 4))]:
        P = "*" + dt
        consts = dict(HAS_LORA=True, HAS_BIAS=True, ADD_C=False, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=16,
                      GROUP_M=8, PRECISION="tf32", **FWD_UNIT)
        k = aot(tpl._gemm_kernel, dict(a_ptr=P, b_ptr=P, c_ptr=P, t_ptr="*fp32", u_ptr=P, bias_ptr=P), consts,
                arch, FWD_DIV, warps, stages)
        assert "async_copy_global_to_local" in k.asm["ttgir"], f"sm{arch} {dt}: GEMM main loop not pipelined"
        print(f"sm{arch} gemm fwd {dt} {bm}x{bn}x{bk}: ok, smem {k.metadata.shared}", flush=True)
    for arch in (90, 80):
        # dW = dyᵀ x / dU with an fp32 B operand cast to bf16; nothing specialised (odd shapes).
        consts = dict(HAS_LORA=False, HAS_BIAS=False, ADD_C=True, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, BLOCK_R=16,
                      GROUP_M=8, PRECISION="tf32")
        aot(tpl._gemm_kernel, dict(a_ptr="*bf16", b_ptr="*fp32", c_ptr="*bf16", t_ptr="*fp32", u_ptr="*bf16",
                                   bias_ptr="*bf16"), consts, arch, num_warps=4, num_stages=4)
        print(f"sm{arch} gemm unspecialised bf16/fp32: ok", flush=True)
    for arch, dt, R in [(90, "bf16", 16), (80, "fp16", 32)]:
        P = "*" + dt
        aot(tpl._shrink_kernel, dict(a_ptr=P, p_ptr=P, h_ptr=P, g_ptr="*fp32", z_ptr="*fp32", t_ptr="*fp32"),
            dict(BLOCK_N=16, BLOCK_D=128, BLOCK_R=R, PRECISION="tf32"), arch, num_warps=4, num_stages=4)
        aot(tpl._core_grad_kernel, dict(w_ptr="*fp32", z_ptr="*fp32", out_ptr="*fp32"), dict(BLOCK_L=32, BLOCK_R=R),
            arch)
        print(f"sm{arch} shrink {dt} R={R} + core_grad: ok", flush=True)
    print("ALL OK")


if __name__ == "__main__":
    main()
