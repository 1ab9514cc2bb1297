"""Public pieces of issue 22: the "cpu" recipe, priority_control / paired_bootstrap, HV with a reference point."""
from __future__ import annotations

import numpy as np
import pytest

import paretomerge as pm
from paretomerge.config import RECIPES
from paretomerge.evaluation import Report


def test_cpu_recipe_fills_unset_fields_and_explicit_fields_win():
    c = pm.TrainerConfig.preset("cpu", mode="unlabeled")
    want = {**RECIPES["cpu"]["all"], **RECIPES["cpu"]["unlabeled"]}
    assert {k: getattr(c, k) for k in want} == want
    assert c.adamerging == "auto"  # AdaMerging + PM where a pool is given
    d = pm.TrainerConfig(recipe="cpu", steps=7)
    assert d.steps == 7 and d.lr == RECIPES["cpu"]["datafree"]["lr"] and d.rank == 8
    assert d.validate().steps == 7  # re-validation keeps the explicit value
    assert pm.TrainerConfig().steps == 2000 and pm.TrainerConfig().recipe == "paper"  # the paper's defaults
    with pytest.raises(ValueError, match="recipe"):
        pm.TrainerConfig.preset("gpu")
    with pytest.raises(ValueError, match="trainer.recipe"):
        pm.TrainerConfig(recipe="gpu")


def _report():
    r = Report(["a", "b"])
    r.add("pretrained", None, None, {"a": 0.5, "b": 0.5})
    r.add("pm", "equal", [0.5, 0.5], {"a": 0.7, "b": 0.7})
    r.add("pm", "priority:a", [0.75, 0.25], {"a": 0.8, "b": 0.6})
    r.add("pm", "priority:b", [0.25, 0.75], {"a": 0.6, "b": 0.65})
    return r


def test_priority_control_reads_priority_against_equal():
    ctl = pm.priority_control(_report())
    assert set(ctl) == {"pm"}  # methods with an 'equal' row
    assert ctl["pm"]["a"] == {"equal": 0.7, "priority": 0.8, "ok": True}
    assert ctl["pm"]["b"]["ok"] is False
    with pytest.raises(ValueError, match="'pretrained' has no 'equal' row"):
        pm.priority_control(_report(), methods=["pretrained"])
    from paretomerge.demo import preference_control
    assert preference_control(_report(), ["a", "b"], ["pm"]) == ctl  # the old name still answers


def test_hypervolume_with_the_pretrained_models_accuracies_as_reference():
    r = _report()
    hv0, hvp = r.hypervolumes(), r.hypervolumes(ref_point={"a": 0.5, "b": 0.5})
    # pm's points above (0.5, 0.5), shifted to the origin
    pts = np.array([[0.2, 0.2], [0.3, 0.1], [0.1, 0.15]])
    assert hvp["pm"] == pytest.approx(pm.hypervolume(pts))
    assert hvp["pretrained"] == 0.0 and hv0["pretrained"] == pytest.approx(0.25)
    assert r.hypervolumes(ref_point=[0.5, 0.5]) == hvp
    with pytest.raises(ValueError, match="ref_point"):
        r.hypervolumes(ref_point=[0.5])
    with pytest.raises(ValueError, match="'b'"):
        r.hypervolumes(ref_point={"a": 0.5})


def test_paired_bootstrap_ci_covers_the_difference_and_pools_seeds():
    rng = np.random.default_rng(0)
    a = (rng.random(400) < 0.8).astype(int)
    b = np.where(rng.random(400) < 0.9, a, 1 - a)  # b agrees with a on ~90 %
    ci = pm.paired_bootstrap(a, b, seed=1)
    assert ci["low"] <= ci["diff"] <= ci["high"] and ci["diff"] == pytest.approx((a - b).mean())
    same = pm.paired_bootstrap(a, a)
    assert same == {"diff": 0.0, "low": 0.0, "high": 0.0}
    two = pm.paired_bootstrap([a, a], [b, b], seed=1)  # two seeds with the same data: same mean, tighter CI
    assert two["diff"] == pytest.approx(ci["diff"]) and two["high"] - two["low"] < ci["high"] - ci["low"]
    with pytest.raises(ValueError, match="equally long"):
        pm.paired_bootstrap(a, b[:10])


def test_merge_config_takes_the_recipe_and_adamerging_for_the_top_level_mode():
    from paretomerge.config import MergeConfig

    c = MergeConfig(pool={"format": "hf", "pretrained": "p", "finetuned": {"x": "a", "y": "b"},
                          "heads": {"x": "h", "y": "h"}},
                    mode="unlabeled", unlabeled={"x": "u", "y": "u"}, trainer={"recipe": "cpu", "adamerging": "joint"})
    assert (c.trainer.steps, c.trainer.lr, c.trainer.adamerging) == (60, 5e-3, "joint")


def test_frozen_trunk_pool_helpers(tmp_path):
    import torch
    import torch.nn as nn

    from paretomerge.pools import prototype_head, trunk_features, trunk_pool

    g = torch.Generator().manual_seed(0)
    centers = 5 * torch.randn(3, 6, generator=g)
    y = torch.arange(3).repeat(10)
    z = centers[y] + 0.1 * torch.randn(30, 6, generator=g)
    head = prototype_head(z, y, 3, shots=2, scale=10.0)
    assert not head.weight.requires_grad and (head(z).argmax(-1) == y).all()  # nearest centroid separates them
    assert torch.allclose(head.weight.norm(dim=1), head.weight.norm(dim=1)[0].expand(3))  # equal-norm rows
    with pytest.raises(ValueError, match="class 2 has no example"):
        prototype_head(z[y < 2], y[y < 2], 3)
    calls = []
    trunk = lambda x: (calls.append(1), 2 * x)[1]  # noqa: E731
    a = trunk_features(trunk, torch.ones(4, 2), cache=tmp_path / "f.pt")
    b = trunk_features(trunk, torch.ones(4, 2), cache=tmp_path / "f.pt")
    assert torch.equal(a, b) and len(calls) == 1  # the second call read the cache
    tail = nn.Linear(6, 6)
    ft = {t: nn.Linear(6, 6) for t in "ab"}
    pool = trunk_pool(tail, ft, {"a": head, "b": head})
    assert list(pool.task_names) == ["a", "b"] and len(pool) == 2
