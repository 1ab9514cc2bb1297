"""Model-level benchmark: an open_clip ViT-B/32-shaped vision tower with K linear task heads.

The tower is built from a config with random weights (no download). Small
config by default on CPU; the true ViT-B/32 dims with ``--pm-size full``.

(a) ``model-train``: one Pareto Merging training step with the unlabeled-data
    objective: per task k, the mean prediction entropy of head k on its own
    slice of the batch; smooth Tchebycheff scalarisation
    μ·log Σ_k exp(γ_k f_k / μ) with γ ~ Dirichlet(1); backward; one Adam step
    on the Pareto tensors only. For attention-only and attention+MLP
    conversion; ``fused`` (impl="auto": Triton on CUDA when available, else the
    factored torch path) vs ``naive`` (materialise W(γ)).
(b) ``model-serve``: 64 requests in one batch, each with its own γ:
    ``fused`` per-sample γ in one forward, ``export`` (bake one plain model
    per request with paretomerge.export, run each on its image), ``naive``
    per-sample γ (B copies of every W(γ)).

Before timing, the fused output is checked against the naive one (and, for
serving, against the exported models) on the same inputs, with non-zero
Pareto factors so the low-rank term is really exercised.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import pmkernels
from pmbench_util import (DEVICE, DTYPE_NAMES, HAS_CUDA, MEM_METHOD, peak_memory, rel_err,
                          run_pedantic, skip_if_oom, sync, timed)

pm = pytest.importorskip("paretomerge", reason="the paretomerge API (python_api/) is needed for the model benchmarks")
open_clip_model = pytest.importorskip("open_clip.model", reason="open_clip_torch is needed for the model benchmarks")

K, RANK, N_CLASSES = 8, 16, 10
MU = 0.1  # smooth Tchebycheff temperature
N_REQUESTS = 64
# Model-level calls are long (and the guard + the memory call already warmed them): few rounds, no calibration.
ROUNDS, WARMUP = (10, 1) if HAS_CUDA else (3, 0)

# (CLIPVisionCfg kwargs, embed_dim, images per task per training step)
CONFIGS = {
    "small": (dict(layers=2, width=64, head_width=16, mlp_ratio=4.0, patch_size=8, image_size=32), 32, 4),
    "full": (dict(layers=12, width=768, head_width=64, mlp_ratio=4.0, patch_size=32, image_size=224), 512, 16),
}
CONVERSIONS = {"attn": "ATTENTION", "attn+mlp": "ATTENTION_MLP"}
# Model-level guard tolerances (relative error after the whole tower; gradients through all of it).
MODEL_TOL = {torch.float32: 1e-3, torch.bfloat16: 5e-2, torch.float16: 2e-2}
MODEL_GRAD_TOL = {torch.float32: 1e-3, torch.bfloat16: 1e-1, torch.float16: 5e-2}


def model_dtype() -> torch.dtype:
    return torch.bfloat16 if HAS_CUDA else torch.float32


def fused_impl() -> str:
    return pmkernels.resolve_impl("auto", DEVICE)


class TowerWithHeads(nn.Module):
    def __init__(self, tower: nn.Module, embed_dim: int):
        super().__init__()
        self.tower = tower
        self.heads = nn.ModuleList(nn.Linear(embed_dim, N_CLASSES) for _ in range(K))


def build(size: str, conversion: str, dtype: torch.dtype) -> tuple[TowerWithHeads, list[str], dict]:
    cfg_kw, embed_dim, per_task = CONFIGS[size]
    cfg = open_clip_model.CLIPVisionCfg(**cfg_kw)
    tower = open_clip_model._build_vision_tower(embed_dim, cfg)
    names = pm.convert(tower, num_objectives=K, rank=RANK, include=getattr(pm, CONVERSIONS[conversion]))
    # Non-zero factors (convert starts at ΔW = 0) so the guards compare real low-rank terms.
    with torch.no_grad():
        for p in pm.pareto_parameters(tower):
            p.normal_(0.0, 0.05 if p.dim() == 2 else 1.0)
    model = TowerWithHeads(tower, embed_dim).to(device=DEVICE, dtype=dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in pm.pareto_parameters(model):
        p.requires_grad_(True)
    info = dict(cfg_kw, embed_dim=embed_dim, per_task=per_task, converted_layers=len(names),
                pareto_params=sum(p.numel() for p in pm.pareto_parameters(model)))
    return model, names, info


def images(n: int, size: str, dtype: torch.dtype) -> torch.Tensor:
    s = CONFIGS[size][0]["image_size"]
    return torch.randn(n, 3, s, s, device=DEVICE, dtype=dtype)


def dirichlet(shape=()) -> torch.Tensor:
    return torch.distributions.Dirichlet(torch.ones(K, device=DEVICE)).sample(shape).float()


def entropy_objectives(model: TowerWithHeads, x: torch.Tensor) -> torch.Tensor:
    """f_k = mean prediction entropy of head k on task k's slice of the batch -> (K,)."""
    feats = model.tower(x)
    fs = []
    for k, chunk in enumerate(feats.chunk(K, dim=0)):
        logp = model.heads[k](chunk).float().log_softmax(-1)
        fs.append(-(logp.exp() * logp).sum(-1).mean())
    return torch.stack(fs)


def stch(f: torch.Tensor, gamma: torch.Tensor, mu: float = MU) -> torch.Tensor:
    return mu * torch.logsumexp(gamma * f / mu, dim=0)


def _record(benchmark, median, n_images, mem, extra):
    benchmark.extra_info.update(extra)
    benchmark.extra_info.update(
        images=n_images,
        images_per_s=(n_images / median) if median else None,
        peak_mem_bytes=mem,
        peak_mem_method=MEM_METHOD,
        device=str(DEVICE),
        threads=torch.get_num_threads(),
    )


# --------------------------------------------------------------------------
# (a) one training step
# --------------------------------------------------------------------------
TRAIN_IMPLS = ["fused", "naive"] + (["torch"] if fused_impl() != "torch" else [])


@pytest.mark.parametrize("impl", TRAIN_IMPLS)
@pytest.mark.parametrize("conversion", list(CONVERSIONS))
def test_train_step(benchmark, size, conversion, impl):
    dtype = model_dtype()
    benchmark.group = f"model-train {conversion} | {DTYPE_NAMES[dtype]} | {size}"
    with skip_if_oom():
        model, names, info = build(size, conversion, dtype)
        n = K * info["per_task"]
        x = images(n, size, dtype)
        layer_impl = "auto" if impl == "fused" else impl

        # Guard: objectives and gradients of this impl against impl="naive" on the same inputs and γ.
        gamma = dirichlet()
        params = list(pm.pareto_parameters(model))

        def loss_and_grads(which: str):
            pm.set_impl(model, which)
            with pm.use_preference(gamma):
                f = entropy_objectives(model, x)
                loss = stch(f, gamma)
            return (f.detach(),) + torch.autograd.grad(loss, params)

        if impl != "naive":
            ref = loss_and_grads("naive")
            got = loss_and_grads(layer_impl)
            for i, (g, r) in enumerate(zip(got, ref)):
                tol = MODEL_TOL[dtype] if i == 0 else MODEL_GRAD_TOL[dtype]
                err = rel_err(g, r)
                assert err < tol, f"guard: {impl} {'objectives' if i == 0 else f'grad #{i}'} rel err {err:.3g} >= {tol}"
        pm.set_impl(model, layer_impl)
        opt = torch.optim.Adam(params, lr=1e-3)

        def step():
            g = dirichlet()
            with pm.use_preference(g):
                loss = stch(entropy_objectives(model, x), g)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss.detach()

        step()
        sync()
        mem = peak_memory(step)
        median = run_pedantic(benchmark, timed(step), rounds=ROUNDS, warmup_rounds=WARMUP, calibrate=False)
    _record(benchmark, median, n, mem, dict(
        impl=impl, scenario="train", conversion=conversion, layer_impl=fused_impl() if impl == "fused" else impl,
        dtype=DTYPE_NAMES[dtype], size=size, **info))


# --------------------------------------------------------------------------
# (b) serving 64 requests, each with its own γ
# --------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["fused", "export", "naive"])
@pytest.mark.parametrize("conversion", list(CONVERSIONS))
def test_serve(benchmark, size, conversion, impl):
    dtype = model_dtype()
    benchmark.group = f"model-serve {N_REQUESTS} req {conversion} | {DTYPE_NAMES[dtype]} | {size}"
    with skip_if_oom():
        model, names, info = build(size, conversion, dtype)
        model.eval()
        tower = model.tower
        x = images(N_REQUESTS, size, dtype)
        prefs = dirichlet((N_REQUESTS,))

        def per_sample(which: str):
            def run():
                pm.set_impl(tower, which)
                with torch.no_grad(), pm.use_preference(prefs):
                    return tower(x)
            return run

        def exported():
            outs = []
            with torch.no_grad():
                for i in range(N_REQUESTS):
                    plain = pm.export(tower, prefs[i])
                    outs.append(plain(x[i:i + 1]))
                    del plain
            return torch.cat(outs)

        fn = {"fused": per_sample("auto"), "naive": per_sample("naive"), "export": exported}[impl]
        # Guard: every serving path must agree with the naive per-sample one.
        ref = per_sample("naive")()
        out = fn()
        err = rel_err(out, ref)
        tol = MODEL_TOL[dtype]
        assert err < tol, f"guard: serve {impl} rel err {err:.3g} >= {tol} against naive per-sample"
        if impl == "export":  # and the per-sample path must not be answering one γ for all
            with torch.no_grad(), pm.use_preference(prefs[0]):
                pm.set_impl(tower, "naive")
                one = tower(x)
            effect = rel_err(one, ref)
            assert effect > 5 * max(err, 1e-6), (
                f"guard: per-sample preferences change the output by {effect:.3g}, not clearly above the "
                f"numerical noise {err:.3g}")
        del ref, out
        sync()
        mem = peak_memory(fn)
        median = run_pedantic(benchmark, timed(fn), rounds=ROUNDS, warmup_rounds=WARMUP, calibrate=False)
    _record(benchmark, median, N_REQUESTS, mem, dict(
        impl=impl, scenario="serve", conversion=conversion,
        layer_impl={"fused": fused_impl(), "naive": "naive", "export": "plain nn.Linear/MHA"}[impl],
        dtype=DTYPE_NAMES[dtype], size=size, **info))
