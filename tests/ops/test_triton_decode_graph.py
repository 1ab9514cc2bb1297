"""The Triton path does no host work per call: no device->host sync, no value-dependent allocation,
no host-side torch op on γ, so a decode step can be captured in a CUDA graph (docs/design.md §5).

On CPU (Triton interpreter) the host code around the kernels is checked: every torch call and aten op it
makes outside the kernel launches (one without gradients, two with) is recorded, and none may read a
tensor's values on the host.
The ``cuda`` tests (skipped without a GPU) check the same on the device with
``torch.cuda.set_sync_debug_mode("error")`` and capture one decode forward in a CUDA graph.
"""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import paretomerge
import pmkernels
from helpers import HAS_CUDA, make_problem, random_pref, rel_err

tpl = pytest.importorskip("pmkernels.triton_pareto_linear", reason="triton is not importable here")

DEV = "cuda" if HAS_CUDA else "cpu"

# Python-level calls that read a tensor's values on the host (a device->host sync on CUDA).
_HOST_READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__int__,
               torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.cpu, torch.Tensor.numpy,
               torch.Tensor.nonzero, torch.nonzero, torch.Tensor.unique, torch.unique, torch.Tensor.any,
               torch.Tensor.all, torch.any, torch.all}
# aten ops that need values on the host (item/bool/int -> _local_scalar_dense; value-sized outputs).
_HOST_ATEN = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "repeat_interleave")


class _Recorder(TorchFunctionMode):
    """Records host-reading torch calls made outside the Triton kernel launches (``paused`` inside them:
    the interpreter itself turns tensors into numpy arrays to run a kernel on the CPU)."""

    def __init__(self):
        super().__init__()
        self.paused = False
        self.host_reads: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if not self.paused and func in _HOST_READS:
            self.host_reads.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


class _AtenRecorder(TorchDispatchMode):
    def __init__(self, fn_mode: _Recorder):
        super().__init__()
        self.fn_mode = fn_mode
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.fn_mode.paused:
            self.ops.append(func._schema.name.split("::")[-1] + "." + func._overloadname)
        return func(*args, **(kwargs or {}))


class _Launches:
    """Wraps a kernel launcher (``kernel[grid](...)``): counts launches and pauses the recorder inside.
    Logs a shrink launch as its SHARED_PREF flag, a GEMM launch as "gemm" ("gemm+shrink" when fused)."""

    def __init__(self, launcher, rec: _Recorder, log: list, name: str):
        self.launcher, self.rec, self.log, self.name = launcher, rec, log, name

    def __getitem__(self, grid):
        run = self.launcher[grid]

        def launch(*args, **kwargs):
            if self.name == "shrink":
                self.log.append(kwargs["SHARED_PREF"])
            else:
                self.log.append("gemm+shrink" if kwargs["FUSE_SHRINK"] else "gemm")
            self.rec.paused = True
            try:
                return run(*args, **kwargs)
            finally:
                self.rec.paused = False

        return launch


@contextlib.contextmanager
def _watch(monkeypatch):
    """Yields (function-level recorder, aten recorder, launch log) for the code run inside."""
    rec = _Recorder()
    aten = _AtenRecorder(rec)
    log: list = []
    monkeypatch.setattr(tpl, "_shrink_launch", _Launches(tpl._shrink_launch, rec, log, "shrink"))
    monkeypatch.setattr(tpl, "_gemm_launch", _Launches(tpl._gemm_launch, rec, log, "gemm"))
    with rec, aten:
        yield rec, aten, log


def _decode_problem(per_sample, pref_dtype=torch.float32):
    x, weight, bias, U, G, V, pref = make_problem(N=(5, 1), per_sample=per_sample, dtype=torch.float32, device=DEV)
    return x, weight, bias, U, G, V, pref.to(pref_dtype)


@pytest.mark.skipif(HAS_CUDA, reason="interpreter-only: checks the host code around the interpreted kernels")
@pytest.mark.parametrize("pref_dtype", [torch.float32, torch.float64], ids=["fp32_pref", "fp64_pref"])
@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per_sample"])
def test_forward_is_two_launches_and_no_host_work(monkeypatch, per_sample, pref_dtype):
    args = _decode_problem(per_sample, pref_dtype)
    with torch.no_grad():
        expected = pmkernels.pareto_linear(*args, impl="torch")
        with _watch(monkeypatch) as (rec, aten, log):
            x, weight, bias, U, G, V, pref = args
            y = tpl._forward(x.reshape(-1, x.shape[-1]), weight, bias, U, G, V, pref.reshape(-1, pref.shape[-1]))[0]
    # shrink (γ contracted in-kernel; its shared variant for one γ row) + GEMM with the expand epilogue
    assert log == [not per_sample, "gemm"]
    assert rec.host_reads == []
    # besides the two launches only output allocations and views (no kernels): no torch op touches γ
    # (no fold, no cast), none reads values
    assert {op.split(".")[0] for op in aten.ops} <= {"empty", "view", "transpose", "t"}, aten.ops
    assert [op for op in aten.ops if op.startswith("empty")] == ["empty.memory_format"] * 3  # z, t, y
    assert rel_err(y.reshape(expected.shape), expected) < 1e-5


@pytest.mark.skipif(HAS_CUDA, reason="interpreter-only: checks the host code around the interpreted kernels")
@pytest.mark.parametrize("pref_dtype", [torch.float32, torch.float64], ids=["fp32_pref", "fp64_pref"])
@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per_sample"])
def test_no_grad_forward_is_one_launch_and_no_host_work(monkeypatch, per_sample, pref_dtype):
    # what a decode step runs (no gradient, small r): the GEMM alone, shrink fused in, y its only allocation
    args = _decode_problem(per_sample, pref_dtype)
    x, weight, bias, U, G, V, pref = args
    with torch.no_grad():
        expected = pmkernels.pareto_linear(*args, impl="torch")
        with _watch(monkeypatch) as (_, _, log):  # the public path picks it (the op is one aten call here)
            pmkernels.pareto_linear(*args, impl="triton", check_values=False)
        assert log == ["gemm+shrink"]
        with _watch(monkeypatch) as (rec, aten, log):  # the op's host code
            y = tpl._forward_one_launch(x.reshape(-1, x.shape[-1]), weight, bias, U, G, V,
                                        pref.reshape(-1, pref.shape[-1]))
    assert log == ["gemm+shrink"]
    assert rec.host_reads == []
    assert {op.split(".")[0] for op in aten.ops} <= {"empty", "view", "transpose", "t"}, aten.ops
    assert [op for op in aten.ops if op.startswith("empty")] == ["empty.memory_format"]  # y only
    assert rel_err(y.reshape(expected.shape), expected) < 1e-5


@pytest.mark.skipif(HAS_CUDA, reason="interpreter-only: checks the host code around the interpreted kernels")
@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per_sample"])
def test_public_forward_reads_no_values_when_checked_once(monkeypatch, per_sample):
    args = _decode_problem(per_sample)
    with torch.no_grad():
        with _watch(monkeypatch) as (rec, aten, _):
            pmkernels.pareto_linear(*args, impl="triton", check_values=False)
        assert rec.host_reads == [] and not [op for op in aten.ops if op.startswith(_HOST_ATEN)], aten.ops
        # the detector works: the per-call value check (check_values=True) does read γ on the host
        with _watch(monkeypatch) as (rec, aten, _):
            pmkernels.pareto_linear(*args, impl="triton")
        assert rec.host_reads and [op for op in aten.ops if op.startswith("_local_scalar_dense")]


@pytest.mark.skipif(HAS_CUDA, reason="interpreter-only: checks the host code around the interpreted kernels")
@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per_sample"])
def test_layer_decode_step_reads_no_values(monkeypatch, per_sample):
    # γ is checked once when it is set (use_preference); the layer's forward then reads no values per token
    torch.manual_seed(0)
    layer = paretomerge.ParetoLinear(19, 23, num_objectives=4, rank=3, impl="triton").to(DEV)
    torch.nn.init.normal_(layer.U)
    pref = random_pref(4, 5) if per_sample else random_pref(4)
    x = torch.randn(5, 1, 19, device=DEV)
    with torch.no_grad(), paretomerge.use_preference(pref):
        layer(x)  # first call: the preference's copy to x's device is made (and cached) here
        with _watch(monkeypatch) as (rec, aten, log):
            y = layer(x)
        ref = pmkernels.pareto_linear(x, layer.weight, layer.bias, layer.U, layer.G, layer.V, pref.to(DEV),
                                      impl="torch")
    assert log == ["gemm+shrink"]  # no gradient: the one-launch forward
    assert rec.host_reads == [] and not [op for op in aten.ops if op.startswith(_HOST_ATEN)], aten.ops
    assert rel_err(y, ref) < 1e-5


# ----------------------------------------------------------------------------- CUDA

def _cuda_decode_layer(per_sample, dtype):
    torch.manual_seed(0)
    layer = paretomerge.ParetoLinear(4096, 4096, num_objectives=8, rank=16, impl="triton").to("cuda", dtype)
    torch.nn.init.normal_(layer.U, std=0.02)
    pref = random_pref(8, 16) if per_sample else random_pref(8)
    return layer, pref.to("cuda", torch.float32)


@pytest.mark.cuda
@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per_sample"])
def test_cuda_forward_has_no_sync(per_sample):
    layer, pref = _cuda_decode_layer(per_sample, torch.bfloat16)
    x = torch.randn(16, 1, 4096, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad(), paretomerge.use_preference(pref):
        layer(x)  # warm-up: autotuning benchmarks (and syncs) once per shape
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            layer(x)
            pmkernels.pareto_linear(x, layer.weight, layer.bias, layer.U, layer.G, layer.V, pref, impl="triton",
                                    check_values=False)
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.cuda
@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per_sample"])
def test_cuda_graph_decode_step(per_sample):
    # one decode forward captured in a CUDA graph and replayed: new tokens and a new γ written into the
    # static inputs in place give what an eager call gives (γ is read by the kernel, not by Python)
    layer, pref = _cuda_decode_layer(per_sample, torch.bfloat16)
    static_x = torch.randn(16, 1, 4096, device="cuda", dtype=torch.bfloat16)
    static_pref = pref.clone()
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up off the capture stream: autotuning happens here
                pmkernels.pareto_linear(static_x, layer.weight, layer.bias, layer.U, layer.G, layer.V, static_pref,
                                        impl="triton", check_values=False)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = pmkernels.pareto_linear(static_x, layer.weight, layer.bias, layer.U, layer.G, layer.V,
                                               static_pref, impl="triton", check_values=False)
        for _ in range(3):
            new_pref = random_pref(8, 16) if per_sample else random_pref(8)
            static_x.copy_(torch.randn_like(static_x))
            static_pref.copy_(new_pref.to("cuda", torch.float32))
            graph.replay()
            eager = pmkernels.pareto_linear(static_x, layer.weight, layer.bias, layer.U, layer.G, layer.V,
                                            static_pref, impl="triton")
            torch.cuda.synchronize()
            assert torch.equal(static_y, eager)


@pytest.mark.cuda
def test_cuda_graph_layer_under_use_preference():
    # the layer's own forward (γ from use_preference, checked once when set) captures too
    layer, pref = _cuda_decode_layer(False, torch.bfloat16)
    static_x = torch.randn(16, 1, 4096, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad(), paretomerge.use_preference(pref):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                layer(static_x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = layer(static_x)
        static_x.copy_(torch.randn_like(static_x))
        graph.replay()
        eager = layer(static_x)
        torch.cuda.synchronize()
    assert torch.equal(static_y, eager)
