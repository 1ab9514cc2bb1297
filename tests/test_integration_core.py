"""The parts of the integrations that need no third-party merging library: causal-LM HF pools, TIES
scope, the Pareto factors file."""
from __future__ import annotations

import copy

import pytest
import torch

import paretomerge as pm
from helpers import Tiny
from paretomerge.integrations.factors import ParetoFactors, save_factors, weight_stats
from paretomerge.methods.ties import ties_tensor


def _tiny_pool(K=3):
    torch.manual_seed(0)
    pre = Tiny()
    fts = {}
    for i in range(K):
        m = copy.deepcopy(pre)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.05 * torch.randn_like(p))
        fts[f"t{i}"] = m
    return pm.ModelPool.from_modules(pre, fts)


def test_from_hf_dirs_builds_the_saved_architecture_and_reads_lazily(tmp_path, no_network):
    transformers = pytest.importorskip("transformers")
    from paretomerge.pools.sources import SafetensorsSource
    from tiny_llama import make_tiny_llama_dirs

    d = make_tiny_llama_dirs(tmp_path, tasks=("a",))
    pool = pm.ModelPool.from_hf_dirs(d["pretrained"], {"a": d["a"]})
    # config.json says LlamaForCausalLM: the head is kept and the keys match the (sharded) files
    assert isinstance(pool.pretrained, transformers.LlamaForCausalLM)
    assert isinstance(pool._sources[0], SafetensorsSource) and len(pool._sources[0].paths) > 1
    assert "lm_head.weight" in pool.task_vector("a")
    bare = pm.ModelPool.from_hf_dirs(d["pretrained"], {"a": d["a"]}, auto_class=transformers.AutoModel)
    assert isinstance(bare.pretrained, transformers.LlamaModel)  # an explicit class still wins


def test_ties_scope_tensor_is_ties_per_tensor():
    pool = _tiny_pool()
    merged = pm.ties_merging(pool, k=0.3, lam=0.9, scope="tensor").state_dict()
    base = pool.pretrained_state()
    tvs = [pool.task_vector(k) for k in range(len(pool))]
    for n in tvs[0]:
        want = base[n] + ties_tensor([tv[n] for tv in tvs], k=0.3, lam=0.9)
        assert torch.equal(merged[n], want), n
    model_scope = pm.ties_merging(pool, k=0.3, lam=0.9).state_dict()  # default: one threshold per model
    assert any(not torch.equal(merged[n], model_scope[n]) for n in merged)
    with pytest.raises(ValueError, match="scope must be one of"):
        pm.ties_merging(pool, scope="layer")
    with pytest.raises(ValueError, match="task_vectors is empty"):
        ties_tensor([])


def test_factors_file_round_trip(tmp_path):
    pool = _tiny_pool(2)
    model = pm.task_arithmetic(pool, lam=0.5)
    pm.train_pareto_merging(model, pool, pm.TrainerConfig(rank=2, steps=2, include="attention+mlp",
                                                          progress=False, impl="torch", objective_impl="torch"))
    path = tmp_path / "f.safetensors"
    keys = save_factors(model, path, base={"method": "task_arithmetic", "lam": 0.5}, task_names=pool.task_names)
    pf = ParetoFactors(path)
    assert pf.keys == sorted(keys) and pf.num_objectives == 2 and pf.base.lam == 0.5
    for key, U, G, V, W in pm.layers.factored_weights(model):
        u, g, v = pf.factors(key)
        assert torch.equal(u, U) and torch.equal(g, G) and torch.equal(v, V)
        pf.check_base(key, W)
        assert torch.equal(weight_stats(W), weight_stats(W.clone()))
        with pytest.raises(ValueError, match="not the one the Pareto factors were trained on"):
            pf.check_base(key, W * 1.01)
    with pytest.raises(ValueError, match="task_names has 3 entries"):
        save_factors(model, path, base={"method": "pretrained"}, task_names=["a", "b", "c"])
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match="not a Pareto factors file"):
        ParetoFactors(tmp_path / "plain.safetensors")
    with pytest.raises(FileNotFoundError, match="factors"):
        ParetoFactors(tmp_path / "missing.safetensors")
