"""Objectives of Pareto Merging: data-free distances, entropies, scalarisation, regulariser."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import paretomerge as pm
from paretomerge.methods.pareto_merging.objectives import (
    DataFreeObjective,
    Normalizer,
    entropy_objectives,
    factor_regularizer,
    linear_scalarization,
    per_sample_entropy,
    scalarize,
    stch,
)

from helpers import Tiny  # noqa: E402

K = 3



def _randomize_factors(model):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in pm.pareto_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _finetuned(base: nn.Module, n: int):
    out = []
    for k in range(n):
        sd = {key: v + 0.1 * (k + 1) * torch.randn_like(v) for key, v in base.state_dict().items()}
        out.append(sd)
    return out


def test_datafree_matches_naive_merged_weights():
    base = Tiny()
    fts = _finetuned(base, K)
    model = Tiny()
    model.load_state_dict(base.state_dict())
    pm.convert(model, K, 3, include="attention+mlp")
    _randomize_factors(model)
    obj = DataFreeObjective(model, fts)
    assert len(obj.layer_names) == 4  # in_proj, out_proj, two MLP linears
    pref = torch.tensor([0.5, 0.3, 0.2])
    got = obj(pref)
    # Naive: bake W(γ) explicitly with export, compare to W_k over the converted weights.
    plain = pm.export(model, pref).state_dict()
    ref = torch.zeros(K, dtype=torch.float64)
    for key in obj.layer_names:
        for k in range(K):
            ref[k] += (plain[key].double() - fts[k][key].double()).pow(2).sum()
    assert torch.allclose(got.double(), ref, rtol=1e-4), (got, ref)


def test_datafree_at_init_is_delta_norm_and_differentiable():
    base = Tiny()
    fts = _finetuned(base, K)
    model = Tiny()
    model.load_state_dict(base.state_dict())
    pm.convert(model, K, 2)
    obj = DataFreeObjective(model, fts)
    f = obj(torch.full((K,), 1 / K))
    assert torch.allclose(f, obj.delta_norms(), rtol=1e-5)
    f.sum().backward()
    assert all(p.grad is not None for p in pm.pareto_parameters(model))


def test_datafree_errors_name_the_key():
    base = Tiny()
    model = Tiny()
    pm.convert(model, K, 2, include="attention")
    fts = _finetuned(base, K)
    del fts[1]["attn.in_proj_weight"]
    with pytest.raises(KeyError, match="attn.in_proj_weight"):
        DataFreeObjective(model, fts)
    with pytest.raises(ValueError, match="K = 3"):
        DataFreeObjective(model, _finetuned(base, 2))


def test_stch_hand_computation():
    f = torch.tensor([1.0, 2.0, 0.5])
    g = torch.tensor([0.2, 0.3, 0.5])
    z = torch.tensor([0.1, 0.0, 0.2])
    mu = 0.7
    hand = mu * math.log(sum(math.exp(gk * (fk - zk) / mu) for fk, gk, zk in zip(f.tolist(), g.tolist(), z.tolist())))
    assert stch(f, g, mu, z).item() == pytest.approx(hand, rel=1e-6)
    assert scalarize(f, g, "stch", mu=mu, ideal=z).item() == pytest.approx(hand, rel=1e-6)
    assert linear_scalarization(f, g).item() == pytest.approx(0.2 + 0.6 + 0.25)
    with pytest.raises(ValueError, match="scalarization"):
        scalarize(f, g, "nope")


def test_stch_small_mu_is_max():
    f = torch.tensor([[1.0, 2.0, 0.5], [0.3, 0.1, 0.9]])
    g = torch.tensor([[0.2, 0.3, 0.5], [0.6, 0.2, 0.2]])
    mx = (g * f).max(-1).values
    for mu in (1e-2, 1e-3, 1e-4):
        s = stch(f, g, mu)
        assert torch.all(s >= mx - 1e-6)
        assert torch.all(s - mx <= mu * math.log(3) + 1e-6)
    assert torch.allclose(stch(f, g, 1e-4), mx, atol=1e-3)


def test_normalizer():
    n = Normalizer(3, "init")
    with pytest.raises(RuntimeError):
        n(torch.ones(3))
    n.fit(torch.tensor([2.0, 4.0, 0.5]))
    assert torch.allclose(n(torch.tensor([2.0, 4.0, 0.5])), torch.ones(3))
    m = Normalizer(3, "none")
    assert torch.equal(m(torch.tensor([2.0, 4.0, 0.5])), torch.tensor([2.0, 4.0, 0.5]))


def test_entropy_objectives_shared_and_per_sample():
    from paretomerge.methods import entropy

    torch.manual_seed(0)
    model = Tiny()
    pm.convert(model, K, 2, include="attention")
    _randomize_factors(model)
    heads = [nn.Linear(12, 5) for _ in range(K)]

    def logits_fn(m, k, x):
        return heads[k](m(x).mean(1))

    batches = [torch.randn(4, 6, 12) for _ in range(K)]
    pref = torch.tensor([0.6, 0.3, 0.1])
    f = entropy_objectives(model, logits_fn, batches, pref)
    assert f.shape == (K,)
    with pm.use_preference(pref):
        assert f[1].item() == pytest.approx(entropy(logits_fn(model, 1, batches[1])).item(), rel=1e-6)
    # per-sample with every row equal to pref reproduces the shared values
    fs = entropy_objectives(model, logits_fn, batches, pref.expand(4, K).contiguous())
    assert fs.shape == (4, K)
    assert torch.allclose(fs.mean(0), f, rtol=1e-5)
    # and a row's values depend only on its own preference
    prefs = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [0.6, 0.3, 0.1]])
    fp = entropy_objectives(model, logits_fn, batches, prefs)
    with pm.use_preference(pref):
        row = torch.stack([per_sample_entropy(logits_fn(model, k, batches[k]))[3] for k in range(K)])
    assert torch.allclose(fp[3], row, rtol=1e-5)


def test_per_sample_entropy_mean_is_merging_entropy():
    from paretomerge.methods import entropy

    logits = torch.randn(7, 5)
    assert per_sample_entropy(logits).mean().item() == pytest.approx(entropy(logits).item(), rel=1e-5)


def test_regularizer():
    model = Tiny()
    pm.convert(model, K, 2, include="attention")
    assert factor_regularizer(model, 0.0, 0.0).item() == 0.0
    _randomize_factors(model)
    fro = sum(p.pow(2).sum() for p in pm.pareto_parameters(model))
    assert factor_regularizer(model, 0.5, 0.0).item() == pytest.approx(0.5 * fro.item(), rel=1e-5)
    r = factor_regularizer(model, 0.0, 1.0)
    assert r.item() > 0
    r.backward()


def test_datafree_objective_checks_pref_once():
    model = Tiny()
    fts = [{k: v + 0.1 for k, v in model.state_dict().items()} for _ in range(K)]
    pm.convert(model, K, 2, include="attention+mlp")
    obj = DataFreeObjective(model, fts)
    with pytest.raises(ValueError, match="pref"):
        obj(torch.tensor([0.5, 0.6, 0.1]))
    with pytest.raises(ValueError, match="pref"):
        obj(torch.tensor([0.5, float("nan"), 0.5]))
