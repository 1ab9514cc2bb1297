"""Structure variants of the preference-conditioned update (tensor / lora_sum / diag) and scalarisations."""
from __future__ import annotations

import copy
import math

import pytest
import torch

import pmkernels
from paretomerge import TrainerConfig
from paretomerge.layers import factored_weights
from paretomerge.methods.pareto_merging import (ParetoMergingTrainer, apply_structure, closed_form_delta, scalarize,
                                                trainable_count)
from paretomerge.methods.pareto_merging.structures import constraint_for

from helpers import Tiny  # noqa: E402

K = 3


def _trainer(structure: str, rank: int = 6, weight_decay: float = 0.0, steps: int = 8) -> ParetoMergingTrainer:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    base = Tiny()
    fts = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.state_dict().items()} for _ in range(K)]
    cfg = TrainerConfig(steps=steps, lr=0.05, rank=rank, include="attention+mlp", structure=structure,
                        weight_decay=weight_decay, progress=False)
    return ParetoMergingTrainer(copy.deepcopy(base), None, cfg, finetuned=fts)


@pytest.mark.parametrize("structure", ["lora_sum", "diag"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_constrained_entries_stay_fixed_and_free_ones_train(structure, weight_decay):
    t = _trainer(structure, weight_decay=weight_decay)
    before = [G.detach().clone() for _, _, G, _, _ in factored_weights(t.model)]
    t.train()
    for (key, U, G, V, W), g0 in zip(factored_weights(t.model), before):
        c = constraint_for(structure, G.shape[0], K)
        G = G.detach()
        assert torch.equal(G[~c.free], c.value[~c.free]), key          # fixed entries exactly as constrained
        assert not torch.equal(G[c.free], g0[c.free]), key              # the free ones were trained
        if c.tied is not None:                                          # diag: σ shared by every k
            shared = G[c.tied]
            assert torch.equal(shared, shared[:, :1].expand_as(shared)), key


@pytest.mark.parametrize("structure", ["tensor", "lora_sum", "diag"])
def test_trained_update_equals_closed_form(structure):
    t = _trainer(structure)
    t.train()
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        pref = torch._sample_dirichlet(torch.ones(K, dtype=torch.float64), generator=gen).float()
        for key, U, G, V, W in factored_weights(t.model):
            with torch.no_grad():
                got = pmkernels.merged_weight(W, U, G, V, pref).double() - W.double()
                want = closed_form_delta(structure, U.double(), G.double(), V.double(), pref.double())
            scale = (U.double().abs() @ G.double().abs().sum(-1) @ V.double().abs().T).max() + 1e-30
            assert (got - want).abs().max() <= 1e-5 * scale, key


def test_lora_sum_at_identity_blocks_is_the_block_diagonal_form():
    """With B_k = I, Σ_k γ_k U_k V_kᵀ = U blockdiag(γ_1 I, …, γ_K I) Vᵀ (docs/baselines.md)."""
    g = torch.Generator().manual_seed(0)
    r, b = 6, 2
    U, V = torch.randn(5, r, generator=g, dtype=torch.float64), torch.randn(4, r, generator=g, dtype=torch.float64)
    G = torch.zeros(r, r, K, dtype=torch.float64)
    for k in range(K):
        G[k * b:(k + 1) * b, k * b:(k + 1) * b, k] = torch.eye(b)
    pref = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    want = sum(pref[k] * U[:, k * b:(k + 1) * b] @ V[:, k * b:(k + 1) * b].T for k in range(K))
    got = U @ torch.block_diag(*[pref[k] * torch.eye(b, dtype=torch.float64) for k in range(K)]) @ V.T
    assert torch.allclose(closed_form_delta("lora_sum", U, G, V, pref), want, rtol=1e-12, atol=1e-12)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)


def test_trainable_counts():
    t = {s: _trainer(s, steps=1) for s in ("tensor", "lora_sum", "diag")}
    n_uv = sum(U.numel() + V.numel() for _, U, _, V, _ in factored_weights(t["tensor"].model))
    layers = len(factored_weights(t["tensor"].model))
    r = 6
    assert trainable_count(t["tensor"].model, "tensor") == n_uv + layers * r * r * K
    assert trainable_count(t["lora_sum"].model, "lora_sum") == n_uv + layers * r * r // K
    assert trainable_count(t["diag"].model, "diag") == n_uv + layers * (r - K)


def test_bad_structure_input_names_the_field():
    with pytest.raises(ValueError, match="trainer.structure"):
        TrainerConfig(structure="bogus")
    with pytest.raises(ValueError, match="trainer.structure.*divisible"):
        _trainer("lora_sum", rank=4)
    with pytest.raises(ValueError, match="trainer.structure.*rank >= K"):
        _trainer("diag", rank=2)
    with pytest.raises(ValueError, match="trainer.structure"):
        apply_structure(Tiny(), "bogus")


# ----------------------------------------------------------------------------- scalarisations
def test_scalarizations_hand_computed():
    f = torch.tensor([0.5, 2.0, 1.0])
    pref = torch.tensor([0.2, 0.3, 0.5])
    z = torch.tensor([0.1, 0.0, 0.5])
    # weighted gaps γ_k (f_k − z_k) = (0.08, 0.6, 0.25)
    assert scalarize(f, pref, "linear", ideal=z).item() == pytest.approx(0.08 + 0.6 + 0.25, abs=1e-6)
    assert scalarize(f, pref, "tch", ideal=z).item() == pytest.approx(0.6, abs=1e-6)
    mu = 0.1
    want = mu * math.log(math.exp(0.8) + math.exp(6.0) + math.exp(2.5))
    assert scalarize(f, pref, "stch", mu=mu, ideal=z).item() == pytest.approx(want, abs=1e-5)
    # batched (B, K) and the hard max's gradient goes to the worst weighted task only
    fb = torch.tensor([[0.5, 2.0, 1.0], [3.0, 0.0, 0.0]], requires_grad=True)
    out = scalarize(fb, pref, "tch")
    assert out.tolist() == pytest.approx([0.6, 0.6], abs=1e-6)
    out.sum().backward()
    assert fb.grad.reshape(-1).tolist() == pytest.approx([0.0, 0.3, 0.0, 0.2, 0.0, 0.0], abs=1e-7)
    with pytest.raises(ValueError, match="scalarization"):
        scalarize(f, pref, "max")


def test_tch_trainer_runs_and_config_accepts_it():
    g = torch.Generator().manual_seed(0)
    base = Tiny()
    fts = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.state_dict().items()} for _ in range(K)]
    t = ParetoMergingTrainer(copy.deepcopy(base), None, TrainerConfig(steps=3, rank=2, scalarization="tch",
                                                                     progress=False), finetuned=fts)
    t.train()
    assert t.step == 3 and all(math.isfinite(h["loss"]) for h in t.history)
