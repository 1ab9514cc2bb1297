"""Time to serve a new preference γ, per method (the "new γ" column of the paper's Table 1).

One pool: an open_clip vision tower (random weights, no download; the small config of
``test_bench_model`` on CPU, ViT-B/32 dims with ``--pm-size full``), K = 8 fine-tuned copies
(random perturbations) with a linear head each, fp32. For a fixed γ, what each method must run to
hand over the model for it:

* ``pareto_merging``: nothing to train — ``paretomerge.export`` bakes W(γ) into a plain model
  (the Pareto model itself serves γ with no work at all);
* ``ta_preference``: one merge θ0 + Σ_k λKγ_k τ_k (streams the K task vectors);
* ``map``: a lookup on the amortized front (fitted once in setup, not timed) + one merge from the
  stacked task vectors;
* ``adamerging_preference``: one AdaMerging training run (``ADA_STEPS`` steps) on the γ-weighted
  entropy.

Guard before timing: the produced model has the pretrained model's state-dict keys and shapes, and
(for the merges) equals θ0 + Σ c_k τ_k computed independently.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from pmbench_util import DEVICE, HAS_CUDA, run_pedantic, skip_if_oom, timed

pm = pytest.importorskip("paretomerge", reason="the paretomerge API (python_api/) is needed")
open_clip_model = pytest.importorskip("open_clip.model", reason="open_clip_torch is needed")

from test_bench_model import CONFIGS  # noqa: E402  (the same tower sizes)

K, RANK, N_CLASSES = 8, 16, 10
ADA_STEPS = 10
MAP_BUDGET = 48  # ≥ 1 + K + K(K+1)/2 = 45
VAL_PER_TASK = 16
ROUNDS = 5 if HAS_CUDA else 3
METHODS = ("pareto_merging", "ta_preference", "map", "adamerging_preference")


def _build(size: str):
    cfg_kw, embed_dim, per_task = CONFIGS[size]
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    pre = open_clip_model._build_vision_tower(embed_dim, open_clip_model.CLIPVisionCfg(**cfg_kw)).to(DEVICE)
    pre.requires_grad_(False)
    fts = {}
    for k in range(K):
        m = copy.deepcopy(pre)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=g).to(DEVICE))
        fts[f"task{k}"] = m
    heads = {t: nn.Linear(embed_dim, N_CLASSES).to(DEVICE).requires_grad_(False) for t in fts}
    pool = pm.ModelPool.from_modules(pre, fts, heads=heads)
    side = cfg_kw["image_size"]
    x = torch.randn(K, max(per_task, VAL_PER_TASK), 3, side, side, generator=g).to(DEVICE)
    y = torch.randint(0, N_CLASSES, (K, x.shape[1]), generator=g).to(DEVICE)
    return pool, list(fts), heads, x, y


@pytest.mark.parametrize("method", METHODS)
def test_new_preference(benchmark, size, method):
    benchmark.group = f"new-preference K={K} | fp32 | {size}"
    with skip_if_oom():
        pool, tasks, heads, x, y = _build(size)
        gamma = torch._sample_dirichlet(torch.ones(K, dtype=torch.float64),
                                        generator=torch.Generator().manual_seed(1)).tolist()
        s = sum(gamma)
        gamma = [v / s for v in gamma]

        def logits_fn(model, k, batch):
            return heads[tasks[k]](model(batch))

        coefficients = None
        if method == "pareto_merging":
            model = pm.merge("task_arithmetic", pool, lam=0.3)
            pm.convert(model, num_objectives=K, rank=RANK, include=pm.ATTENTION)
            with torch.no_grad():  # non-zero factors: the export really bakes a low-rank term in
                for p in pm.pareto_parameters(model):
                    p.normal_(0.0, 0.05 if p.dim() == 2 else 1.0)
            fn = lambda: pm.export(model, torch.tensor(gamma, device=DEVICE))  # noqa: E731
        elif method == "ta_preference":
            coefficients = [0.3 * K * v for v in gamma]
            fn = lambda: pm.merge("ta_preference", pool, pref=gamma, lam=0.3)  # noqa: E731
        elif method == "map":
            from paretomerge.methods import MAP

            val = {t: (x[k, :VAL_PER_TASK], y[k, :VAL_PER_TASK]) for k, t in enumerate(tasks)}
            mp = MAP(pool, val, logits_fn=logits_fn, budget=MAP_BUDGET, n_gen=30)
            front = mp.fit()
            benchmark.extra_info.update(map_fit_s=front.eval_time_s + front.search_time_s,
                                        map_evaluations=front.evaluations)
            coefficients = mp.coefficients(gamma).tolist()
            fn = lambda: mp.model(gamma)  # noqa: E731
        else:
            batches = [[x[k]] for k in range(K)]
            fn = lambda: pm.merge("adamerging_preference", pool, pref=gamma, logits_fn=logits_fn,  # noqa: E731
                                  unlabeled=batches, steps=ADA_STEPS, seed=0)
            benchmark.extra_info.update(adamerging_steps=ADA_STEPS)

        # Guard: the right architecture; merges equal θ0 + Σ c_k τ_k computed here.
        out = fn()
        ref_sd = pool.pretrained.state_dict()
        out_sd = out.state_dict()
        assert out_sd.keys() == ref_sd.keys() and all(out_sd[n].shape == ref_sd[n].shape for n in ref_sd)
        if coefficients is not None:
            for k, c in enumerate(coefficients):
                for n, t in pool.task_vector(k).items():
                    ref_sd = {**ref_sd, n: ref_sd[n] + c * t}
            err = max(float((out_sd[n] - ref_sd[n]).abs().max() / (ref_sd[n].abs().max() + 1e-12))
                      for n in pool.float_keys())
            assert err < 1e-5, err

        median = run_pedantic(benchmark, timed(fn), rounds=ROUNDS, warmup_rounds=0, calibrate=False)
        benchmark.extra_info.update(method=method, K=K, device=str(DEVICE), threads=torch.get_num_threads(),
                                    new_pref_s=median)
