"""The paper's baselines: MAP (toy problems with a known quadratic truth), TA / AdaMerging with
preference, the merge registry and the Report's cost table."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from paretomerge.evaluation import Report, hypervolume, non_dominated
from paretomerge.evaluation.report import COST_FIELDS
from paretomerge.methods import (MAP, MERGE_METHODS, adamerging, adamerging_preference, merge, ta_preference,
                                 task_arithmetic, weighted_merge)
from paretomerge.methods.map import (amortized_front, fit_quadratic, nsga3_front, num_quadratic_coefficients,
                                     quadratic_features)
from paretomerge.pools import ModelPool


# ----------------------------------------------------------------------------- MAP on toy problems
def _truth(c: np.ndarray) -> np.ndarray:
    """A known concave quadratic metric per task (K = 2): each task prefers its own coefficient."""
    c = np.atleast_2d(c)
    m1 = 1.0 - (c[:, 0] - 0.8) ** 2 - 0.5 * c[:, 1] ** 2 + 0.1 * c[:, 0] * c[:, 1]
    m2 = 1.0 - (c[:, 1] - 0.7) ** 2 - 0.3 * c[:, 0] ** 2
    return np.stack([m1, m2], axis=1)


def test_map_recovers_the_true_front_of_a_quadratic_problem():
    front = amortized_front(lambda c: _truth(c)[0], 2, budget=16, seed=0, n_gen=150)
    assert all(r is not None and r > 0.99 for r in front.r2_holdout)
    assert front.evaluations == 16 and front.samples.shape == (16, 2)
    true_at_solutions = _truth(front.solutions)
    assert np.allclose(front.predicted, true_at_solutions, atol=1e-8)  # the surrogate is the truth here
    # brute force on a grid of c (2-D front by a sort: O(n log n) for the 201² grid points)
    g = np.linspace(0.0, 1.0, 201)
    grid = np.stack(np.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    F = _truth(grid)
    order, best, keep = np.lexsort((-F[:, 1], -F[:, 0])), -np.inf, []
    for i in order:
        if F[i, 1] > best:
            keep.append(i)
            best = F[i, 1]
    bf = F[keep]
    # every MAP solution is (up to the grid's resolution) non-dominated by the brute-force front ...
    eps = 2e-3
    for p in true_at_solutions:
        assert not np.any(np.all(bf > p + eps, axis=1)), p
    # ... lies on it (within the grid step) ...
    d_back = np.sqrt(((true_at_solutions[:, None, :] - bf[None, :, :]) ** 2).sum(-1)).min(1)
    assert d_back.max() < 0.01
    # ... and spans it: its hypervolume is that of the brute-force front (ref point 0) within 1%
    assert hypervolume(true_at_solutions) >= 0.99 * hypervolume(bf)
    assert np.allclose(true_at_solutions.max(0), bf.max(0), atol=5e-3)  # both ends reached


def test_nsga3_returns_only_non_dominated_points():
    rng = np.random.default_rng(0)
    K = 3
    P = num_quadratic_coefficients(K)
    surrogates = []
    for _ in range(K):  # random (indefinite) quadratics: fronts with dominated regions to drop
        w = rng.normal(size=P)
        surrogates.append(lambda c, w=w: quadratic_features(c) @ w)
    X, F = nsga3_front(surrogates, K, 0.0, 1.0, n_gen=30, seed=1)
    assert X.shape[1] == K and F.shape == (len(X), K) and len(X) >= 1
    assert non_dominated(F).all()
    assert np.allclose(F, np.stack([s(X) for s in surrogates], 1))
    assert (X >= 0).all() and (X <= 1).all()


def test_quadratic_fit_and_selection_rule():
    rng = np.random.default_rng(1)
    c = rng.uniform(size=(40, 3))
    w = rng.normal(size=num_quadratic_coefficients(3))
    s = fit_quadratic(c, quadratic_features(c) @ w)
    assert np.allclose(s.weights, w, atol=1e-8) and s.r2_holdout > 0.999
    front = amortized_front(lambda x: _truth(x)[0], 2, budget=12, n_gen=40)
    # γ = e_k picks the front's best predicted solution on task k
    for k in range(2):
        e = [0.0, 0.0]
        e[k] = 1.0
        assert np.array_equal(front.select(e), front.solutions[np.argmax(front.predicted[:, k])])


def test_map_bad_input_names_the_field():
    with pytest.raises(ValueError, match="map.budget.*P = 1 \\+ K \\+ K\\(K\\+1\\)/2 = 6"):
        amortized_front(lambda c: _truth(c)[0], 2, budget=5)
    with pytest.raises(ValueError, match="map.sampler"):
        amortized_front(lambda c: _truth(c)[0], 2, budget=8, sampler="grid")
    pool, val = _pool()
    with pytest.raises(ValueError, match="map.val"):
        MAP(pool, None)
    with pytest.raises(ValueError, match="map.val.*t1"):
        MAP(pool, {"t0": val["t0"]})
    with pytest.raises(ValueError, match="map.budget"):
        MAP(pool, val, budget=5)  # K = 2: P = 6


# ----------------------------------------------------------------------------- pools of tiny models
class Clf(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 3)
        self.register_buffer("scale", torch.ones(3))

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x))) * self.scale


def _pool(K: int = 2):
    g = torch.Generator().manual_seed(1)
    pre = Clf()
    fts = {}
    for k in range(K):
        m = Clf()
        m.load_state_dict(pre.state_dict())
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn(p.shape, generator=g))
            m.scale.add_(0.1 * (k + 1))
        fts[f"t{k}"] = m
    val = {f"t{k}": (torch.randn(20, 4, generator=g), torch.randint(0, 3, (20,), generator=g)) for k in range(K)}
    return ModelPool.from_modules(pre, fts), val


def _state(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def test_ta_preference_at_onehot_is_task_arithmetic_of_that_task_alone():
    pool, _ = _pool(3)
    lam = 0.3
    for k in range(3):
        e = [0.0] * 3
        e[k] = 1.0
        got = _state(ta_preference(pool, e, lam=lam))
        alone = ModelPool.from_modules(pool.pretrained, {f"t{k}": pool.finetuned_model(k)})
        want = _state(task_arithmetic(alone, lam=lam * 3))
        assert got.keys() == want.keys()
        for n in got:
            assert torch.allclose(got[n], want[n], rtol=1e-6, atol=1e-7), n
    eq = _state(ta_preference(pool, [1 / 3] * 3, lam=lam))
    ta = _state(task_arithmetic(pool, lam=lam))
    assert all(torch.allclose(eq[n], ta[n], rtol=1e-6, atol=1e-7) for n in eq)
    with pytest.raises(ValueError, match="pref"):
        ta_preference(pool, [0.5, 0.6, 0.0])


def test_adamerging_preference_weights_the_entropies():
    pool, _ = _pool(2)
    g = torch.Generator().manual_seed(2)
    data = [[torch.randn(8, 4, generator=g) for _ in range(2)] for _ in range(2)]

    def logits_fn(model, k, x):
        return model(x)

    kw = dict(steps=3, lr=1e-2, seed=0)
    plain = _state(adamerging(pool, logits_fn, data, **kw))
    equal = _state(adamerging_preference(pool, [0.5, 0.5], logits_fn, data, **kw))
    assert all(torch.equal(plain[n], equal[n]) for n in plain)  # uniform γ is AdaMerging
    only0 = _state(adamerging_preference(pool, [1.0, 0.0], logits_fn, data, **kw))
    ref = _state(adamerging(pool, logits_fn, data, task_weights=[2.0, 0.0], **kw))
    assert all(torch.equal(only0[n], ref[n]) for n in only0)
    assert any(not torch.equal(only0[n], plain[n]) for n in plain)
    with pytest.raises(ValueError, match="task_weights"):
        adamerging(pool, logits_fn, data, task_weights=[0.0, 0.0], **kw)


def test_map_on_a_pool_merges_the_selected_coefficients():
    pool, val = _pool(2)
    m = MAP(pool, val, logits_fn=lambda model, k, x: model(x), budget=10, n_gen=20)
    front = m.fit()
    assert front.evaluations == 10 and front.metrics.shape == (10, 2)
    assert ((front.metrics >= 0) & (front.metrics <= 1)).all()
    pref = [0.3, 0.7]
    got = _state(m.model(pref))
    want = _state(weighted_merge(pool, m.coefficients(pref).tolist()))
    assert all(torch.allclose(got[n], want[n], rtol=1e-6, atol=1e-7) for n in got)
    via_registry = _state(merge("map", pool, pref=pref, val=val, logits_fn=lambda model, k, x: model(x),
                                budget=10, n_gen=20))
    assert all(torch.equal(via_registry[n], got[n]) for n in got)  # seeded: the same front


def test_registry_has_every_method():
    assert {"task_arithmetic", "ties", "adamerging", "pretrained", "ta_preference", "adamerging_preference",
            "map"} <= set(MERGE_METHODS)


# ----------------------------------------------------------------------------- the cost table
def test_cost_table_round_trip_and_errors(tmp_path):
    r = Report(["a", "b"])
    r.add("m", None, None, {"a": 0.5, "b": 0.25})
    r.add_cost("m", params_stored=10, models_trained=1, train_time_s=1.5)
    r.save(tmp_path / "r.json")
    back = Report.load(tmp_path / "r.json")
    assert back.cost == r.cost and set(back.cost["m"]) == set(COST_FIELDS)
    assert back.cost["m"]["new_pref_time_s"] is None
    md = back.cost_markdown()
    assert "| m | 10 | 1 |" in md and "0.1250" in md  # HV of the single point (0.5, 0.25)
    with pytest.raises(ValueError, match="unknown cost field"):
        r.add_cost("m", flops=1)
    with pytest.raises(ValueError, match="finite"):
        r.add_cost("m", train_time_s=float("nan"))
    # reports without a cost table keep the old schema
    assert "cost" not in Report(["a"]).to_dict()


def test_adamerging_takes_the_trainers_unlabeled_format():
    """One format for unlabeled data: per-task tensors (what ParetoMergingTrainer takes) are cut into batches of
    ``batch_size``; the result equals passing those batches."""
    pool, _ = _pool(2)
    g = torch.Generator().manual_seed(3)
    tensors = [torch.randn(16, 4, generator=g) for _ in range(2)]

    def logits_fn(model, k, x):
        return model(x)

    kw = dict(steps=3, lr=1e-2, seed=0)
    from_tensors = _state(adamerging(pool, logits_fn, tensors, batch_size=8, **kw))
    from_batches = _state(adamerging(pool, logits_fn, [[t[:8], t[8:]] for t in tensors], **kw))
    assert all(torch.equal(from_tensors[n], from_batches[n]) for n in from_tensors)
    with pytest.raises(ValueError, match="batch_size"):
        adamerging(pool, logits_fn, tensors, batch_size=0, **kw)
    with pytest.raises(TypeError, match=r"unlabeled\[1\]"):
        adamerging(pool, logits_fn, [tensors[0], "x"], **kw)
