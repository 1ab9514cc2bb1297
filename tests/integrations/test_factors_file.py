"""The Pareto factors file (integrations/factors.py) that paretomerge-mergekit reads: round trip and errors."""
from __future__ import annotations


import pytest
import torch

import paretomerge as pm
from helpers import tiny_pool
from paretomerge.integrations.factors import ParetoFactors, save_factors, weight_stats




def test_factors_file_round_trip(tmp_path):
    pool = tiny_pool(2)
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
