"""One data-free Pareto Merging step: Σ_layers weight_distances → STCH → backward.

The layers are those of a ViT-B/32 image tower (12 blocks, width 768:
in_proj 2304×768 and out_proj 768×768; with MLP also 3072×768 and 768×3072),
K = 8 task vectors each, r = 16. Small size (CPU default): 4 blocks of width
192. The work is dominated by streaming the K deltas, so each case records the
bytes it must move (every delta read once: the floor) and that floor's time at
the bandwidth measured in the same run (a large `sum`, one read), and the
measured time as a multiple of that floor.
"""
from __future__ import annotations

import time

import pytest
import torch

from pmbench_util import DEVICE, HAS_CUDA, peak_memory, rel_err, run_pedantic, skip_if_oom, sync, timed

import pmkernels
from pmkernels.weight_distances import cpp_available

K, R, MU = 8, 16, 0.1
WIDTH = {"small": (4, 192), "full": (12, 768)}
IMPLS = ["naive", "torch"] + (["triton"] if HAS_CUDA and pmkernels.triton_available() else ["cpp"])


def layer_shapes(size: str, conversion: str) -> list[tuple[int, int]]:
    blocks, w = WIDTH[size]
    per_block = [(3 * w, w), (w, w)]
    if conversion == "attn+mlp":
        per_block += [(4 * w, w), (w, 4 * w)]
    return per_block * blocks


def measured_bandwidth(nbytes: int = 1 << 28) -> float:
    """Bytes/s of one streaming read (a float32 sum over ``nbytes``), best of 5."""
    x = torch.ones(nbytes // 4, device=DEVICE)
    best = float("inf")
    for _ in range(5):
        sync()
        t0 = time.perf_counter()
        x.sum()
        sync()
        best = min(best, time.perf_counter() - t0)
    return nbytes / best


_BANDWIDTH: dict[str, float] = {}


@pytest.fixture(scope="module")
def bandwidth():
    if "bw" not in _BANDWIDTH:
        _BANDWIDTH["bw"] = measured_bandwidth()
    return _BANDWIDTH["bw"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("conversion", ["attn", "attn+mlp"])
def test_datafree_step(benchmark, size, conversion, impl, bandwidth):
    if impl == "cpp" and not cpp_available():
        pytest.skip("the C++ extension could not be built here")
    benchmark.group = f"datafree-step {conversion} | fp32 deltas | {size}"
    g = torch.Generator().manual_seed(0)
    with skip_if_oom():
        layers = []
        for out_f, in_f in layer_shapes(size, conversion):
            U = (torch.randn(out_f, R, generator=g) * 0.02).to(DEVICE).requires_grad_(True)
            G = torch.randn(R, R, K, generator=g).to(DEVICE).requires_grad_(True)
            V = (torch.randn(in_f, R, generator=g) / in_f**0.5).to(DEVICE).requires_grad_(True)
            deltas = torch.randn(K, out_f, in_f, generator=g).mul_(1e-3).to(DEVICE)
            layers.append((U, G, V, deltas))
        params = [p for U, G, V, _ in layers for p in (U, G, V)]
        pref = torch.distributions.Dirichlet(torch.ones(K)).sample().to(DEVICE).requires_grad_(True)

        def objectives(which: str) -> torch.Tensor:
            return sum(pmkernels.weight_distances(U, G, V, pref, d, impl=which) for U, G, V, d in layers)

        def step(which: str = impl):
            f = objectives(which)
            loss = MU * torch.logsumexp(pref.detach() * f / f.detach().mean() / MU, 0)
            return (f.detach(),) + torch.autograd.grad(loss, params)

        if impl != "torch":  # guard: objectives and every gradient against the factored torch path
            ref, got = step("torch"), step()
            for i, (a, b) in enumerate(zip(got, ref)):
                assert rel_err(a, b) < 1e-4, f"guard: {impl} {'objectives' if i == 0 else f'grad #{i}'}"
        sync()
        mem = peak_memory(step)
        median = run_pedantic(benchmark, timed(step), rounds=5 if not HAS_CUDA else 20, calibrate=False)
    floor_bytes = sum(d.numel() * d.element_size() for *_, d in layers)
    benchmark.extra_info.update(
        impl=impl, conversion=conversion, size=size, K=K, r=R, layers=len(layers),
        peak_mem_bytes=mem, floor_bytes=floor_bytes, bandwidth_GBps=bandwidth / 1e9,
        floor_s=floor_bytes / bandwidth,
        x_floor=None if median is None else median / (floor_bytes / bandwidth),
    )
