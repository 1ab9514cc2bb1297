"""Base merges: task arithmetic, TIES and AdaMerging on tiny hand-computed models, against their reference
implementations (PEFT's magnitude prune, AdaMerging's clamp), TIES' per-tensor scope; entropy."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import paretomerge as pm
from helpers import good_config as _good, tiny_pool
from paretomerge.config import from_dict
from paretomerge.methods import adamerging, entropy, task_arithmetic, ties_merging
from paretomerge.methods.ties import _trim_threshold, ties_tensor
from paretomerge.pools import ModelPool

D = torch.float64


class Tiny(nn.Module):
    def __init__(self, w, b, steps=7):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w, dtype=D))
        self.b = nn.Parameter(torch.tensor(b, dtype=D))
        self.register_buffer("steps", torch.tensor(steps))

    def forward(self, x):
        return x * self.w + self.b


def pool_of(pre, *fts):
    return ModelPool.from_modules(pre, {f"t{i}": m for i, m in enumerate(fts)})


def snapshot(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def assert_state_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_task_arithmetic_hand_computed():
    pre = Tiny([1.0, 2.0, 3.0], [0.5])
    before = snapshot(pre)
    pool = pool_of(pre, Tiny([2.0, 2.0, 1.0], [1.5], steps=9), Tiny([1.0, 4.0, 3.0], [0.0], steps=11))
    # tau_0 = ([1, 0, -2], [1]), tau_1 = ([0, 2, 0], [-0.5])
    m = task_arithmetic(pool, lam=0.5)
    torch.testing.assert_close(m.w, torch.tensor([1.5, 3.0, 2.0], dtype=D), rtol=0, atol=1e-15)
    torch.testing.assert_close(m.b, torch.tensor([0.75], dtype=D), rtol=0, atol=1e-15)
    assert int(m.steps) == 7  # integer buffer copied from the pretrained model
    assert m is not pre
    assert_state_equal(snapshot(pre), before)
    # lam = 0 gives the pretrained weights back
    m0 = task_arithmetic(pool, lam=0.0)
    assert_state_equal(snapshot(m0), before)


def _ties_pool():
    pre = Tiny([1.0, 2.0, 3.0, 4.0], [0.5])
    t1 = Tiny([1 + 3.0, 2 - 1.0, 3 + 0.5, 4 + 2.0], [0.5 - 4.0], steps=3)
    t2 = Tiny([1 - 1.0, 2 + 2.0, 3 - 3.0, 4 + 0.1], [0.5 + 1.5], steps=3)
    t3 = Tiny([1 - 2.0, 2 + 0.5, 3 + 1.0, 4 - 0.2], [0.5 + 2.5], steps=3)
    return pre, pool_of(pre, t1, t2, t3)


def test_ties_hand_computed_sign_conflict_and_trim():
    # Flattened task vectors (w0..w3, b), d = 5; k = 0.6 keeps 3 entries per task:
    #  tau1 = [ 3,  -1,  .5,  2 | -4 ]  threshold 2   -> [ 3, 0,  0, 2 | -4 ]
    #  tau2 = [-1,   2,  -3, .1 | 1.5]  threshold 1.5 -> [ 0, 2, -3, 0 | 1.5]
    #  tau3 = [-2,  .5,   1,-.2 | 2.5]  threshold 1   -> [-2, 0,  1, 0 | 2.5]
    # summed: [1, 2, -2, 2 | 0] -> elected signs [+, +, -, +, 0 -> majority +]
    # disjoint mean: w0: 3 (tau3's -2 conflicts), w1: 2, w2: -3 (tau3's +1 conflicts), w3: 2, b: (1.5+2.5)/2 = 2
    pre, pool = _ties_pool()
    before = snapshot(pre)
    m = ties_merging(pool, k=0.6, lam=1.0)
    torch.testing.assert_close(m.w, torch.tensor([4.0, 4.0, 0.0, 6.0], dtype=D), rtol=0, atol=1e-12)
    torch.testing.assert_close(m.b, torch.tensor([2.5], dtype=D), rtol=0, atol=1e-12)
    assert int(m.steps) == 7
    assert_state_equal(snapshot(pre), before)
    # lam scales the merged vector
    m2 = ties_merging(pool, k=0.6, lam=0.5)
    torch.testing.assert_close(m2.w, torch.tensor([2.5, 3.0, 1.5, 5.0], dtype=D), rtol=0, atol=1e-12)


def test_ties_trim_threshold_keeps_only_top_fraction():
    # k = 0.2 of d = 5 keeps 1 entry per task: tau1 -> b = -4, tau2 -> w2 = -3, tau3 -> b = 2.5
    # summed: w2 = -3, b = -1.5 -> signs (-, -); the rest 0 -> majority sign (-), nothing agrees there
    # b: only tau1's -4 agrees (tau3's +2.5 conflicts)
    pre, pool = _ties_pool()
    m = ties_merging(pool, k=0.2)
    torch.testing.assert_close(m.w, torch.tensor([1.0, 2.0, 0.0, 4.0], dtype=D), rtol=0, atol=1e-12)
    torch.testing.assert_close(m.b, torch.tensor([0.5 - 4.0], dtype=D), rtol=0, atol=1e-12)


def test_ties_keep_all_without_conflict_is_mean():
    pre = Tiny([0.0, 0.0], [0.0])
    pool = pool_of(pre, Tiny([1.0, 2.0], [3.0]), Tiny([3.0, 4.0], [1.0]))
    m = ties_merging(pool, k=1.0, lam=1.0)
    torch.testing.assert_close(m.w, torch.tensor([2.0, 3.0], dtype=D))
    torch.testing.assert_close(m.b, torch.tensor([2.0], dtype=D))


@pytest.mark.parametrize("kw", [{"k": 0.0}, {"k": 1.5}, {"k": float("nan")}])
def test_ties_bad_k(kw):
    _, pool = _ties_pool()
    with pytest.raises(ValueError, match="k"):
        ties_merging(pool, **kw)


def test_bad_pool_type():
    with pytest.raises(TypeError, match="ModelPool"):
        task_arithmetic(nn.Linear(2, 2))


def test_entropy_values():
    C = 5
    assert math.isclose(float(entropy(torch.zeros(3, C, dtype=D))), math.log(C), rel_tol=1e-12)
    big = torch.tensor([[100.0, 0.0, 0.0]], dtype=D)
    assert float(entropy(big)) < 1e-30
    # two samples: p = (1/2, 1/2) and one-hot -> mean (log 2 + 0) / 2
    logits = torch.tensor([[0.0, 0.0], [200.0, 0.0]], dtype=D)
    assert math.isclose(float(entropy(logits)), math.log(2) / 2, rel_tol=1e-12)
    with pytest.raises(TypeError):
        entropy(torch.zeros(2, 3, dtype=torch.long))


# -------- AdaMerging on a toy problem --------
class Clf(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 3)
        self.register_buffer("count", torch.tensor(0))

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def _toy_pool(K=2):
    g = torch.Generator().manual_seed(1)
    pre = Clf()
    with torch.no_grad():
        for p in pre.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    fts = {}
    for k in range(K):
        m = Clf()
        m.load_state_dict(pre.state_dict())
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 2.0)
        fts[f"task{k}"] = m
    data = [[torch.randn(16, 4, generator=g) for _ in range(3)] for _ in range(K)]
    return ModelPool.from_modules(pre, fts), data


def _total_entropy(model, data):
    with torch.no_grad():
        return sum(float(entropy(model(torch.cat(b)))) for b in data)


def test_adamerging_reduces_entropy_and_is_deterministic():
    pool, data = _toy_pool()
    before = snapshot(pool.pretrained)
    fn = lambda model, k, batch: model(batch)  # noqa: E731
    m1, lam1 = adamerging(pool, fn, data, steps=30, lr=0.05, init_lam=0.3, seed=3, return_coefficients=True)
    m2, lam2 = adamerging(pool, fn, data, steps=30, lr=0.05, init_lam=0.3, seed=3, return_coefficients=True)
    assert lam1.shape == (4, 2)  # fc1.weight, fc1.bias, fc2.weight, fc2.bias x K
    assert torch.equal(lam1, lam2)
    assert_state_equal(snapshot(m1), snapshot(m2))
    assert bool(((lam1 >= 0) & (lam1 <= 1)).all())
    init = task_arithmetic(pool, lam=0.3)  # AdaMerging's starting point
    assert _total_entropy(m1, data) < _total_entropy(init, data) - 1e-3
    assert_state_equal(snapshot(pool.pretrained), before)
    # the returned model carries the returned coefficients: theta0 + sum_k lam[l, k] tau_k
    taus = [pool.task_vector(k) for k in range(2)]
    exp = pool.pretrained.fc2.bias + lam1[3, 0] * taus[0]["fc2.bias"] + lam1[3, 1] * taus[1]["fc2.bias"]
    torch.testing.assert_close(m1.fc2.bias, exp)
    # zero steps: the task-arithmetic merge at init_lam
    m0 = adamerging(pool, fn, data, steps=0, init_lam=0.3)
    for k, v in snapshot(init).items():
        torch.testing.assert_close(snapshot(m0)[k], v)


def test_adamerging_bad_input():
    pool, data = _toy_pool()
    fn = lambda model, k, batch: model(batch)  # noqa: E731
    with pytest.raises(ValueError, match="unlabeled"):
        adamerging(pool, fn, data[:1], steps=1)
    with pytest.raises(ValueError, match="unlabeled\\[1\\]"):
        adamerging(pool, fn, [data[0], []], steps=1)
    with pytest.raises(TypeError, match="logits_fn"):
        adamerging(pool, None, data, steps=1)


# -------- TIES against a flattened reference implementation (as in the TIES paper's code) --------
def _ties_reference(pre: nn.Module, fts: list[nn.Module], k: float, lam: float) -> dict:
    keys = [n for n, v in pre.state_dict().items() if v.is_floating_point()]
    flat = lambda m: torch.cat([m.state_dict()[n].reshape(-1).double() for n in keys])  # noqa: E731
    tv = torch.stack([flat(m) for m in fts]) - flat(pre)  # (K, d)
    d = tv.shape[1]
    n_keep = max(1, int(k * d + 1e-9))
    kth = tv.abs().kthvalue(d - n_keep + 1, dim=1, keepdim=True).values
    trimmed = tv * (tv.abs() >= kth)
    sign = torch.sign(trimmed.sum(0))
    sign[sign == 0] = torch.sign(sign.sum()) or 1.0
    agree = torch.where(sign > 0, trimmed > 0, trimmed < 0)
    merged = (trimmed * agree).sum(0) / agree.sum(0).clamp_min(1)
    out, i = {}, 0
    base = pre.state_dict()
    for n in keys:
        size = base[n].numel()
        out[n] = base[n].double() + lam * merged[i:i + size].reshape(base[n].shape)
        i += size
    return out


@pytest.mark.parametrize("k,lam", [(0.1, 1.0), (0.35, 0.7), (1.0, 0.5)])
def test_ties_matches_flattened_reference(k, lam):
    g = torch.Generator().manual_seed(7)

    def net():
        m = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.Linear(7, 3)).double()
        with torch.no_grad():
            for v in m.state_dict().values():
                if v.is_floating_point():
                    v.copy_(torch.randn(v.shape, generator=g, dtype=D))
        return m

    pre, fts = net(), [net() for _ in range(3)]
    got = ties_merging(ModelPool.from_modules(pre, {f"t{i}": m for i, m in enumerate(fts)}), k=k, lam=lam)
    exp = _ties_reference(pre, fts, k, lam)
    for n, v in exp.items():
        torch.testing.assert_close(got.state_dict()[n], v, rtol=1e-12, atol=1e-12)
    assert int(got.state_dict()["1.num_batches_tracked"]) == int(pre.state_dict()["1.num_batches_tracked"])


def test_adamerging_float_buffers_merged_with_init_lam():
    g = torch.Generator().manual_seed(2)
    pre = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    fts = {}
    for t in ("a", "b"):
        m = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
        m.load_state_dict(pre.state_dict())
        with torch.no_grad():
            for v in m.state_dict().values():
                if v.is_floating_point():
                    v.add_(torch.randn(v.shape, generator=g))
        fts[t] = m
    pool = ModelPool.from_modules(pre, fts)
    data = [[torch.randn(6, 3, generator=g)] for _ in range(2)]
    m, lam = adamerging(pool, lambda mod, k, x: mod(x), data, steps=3, lr=0.1, init_lam=0.4,
                        return_coefficients=True)
    assert lam.shape == (6, 2)  # 2 Linear x (weight, bias) + BN (weight, bias)
    ta = task_arithmetic(pool, lam=0.4)
    torch.testing.assert_close(m[1].running_mean, ta[1].running_mean)
    torch.testing.assert_close(m[1].running_var, ta[1].running_var)
    assert m.training == pre.training


# ----------------------------------------------------------------------------- against the reference algorithms
class _Lin(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
        with torch.no_grad():
            self.lin.weight.copy_(w)

    def forward(self, x):
        return self.lin(x)


def _lin_pool(K=3, shape=(6, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    pre = _Lin(torch.randn(*shape, generator=g))
    fts = {f"t{k}": _Lin(pre.lin.weight.detach() + torch.randn(*shape, generator=g)) for k in range(K)}
    return ModelPool.from_modules(pre, fts)


def test_ties_keeps_what_peft_magnitude_prune_keeps():
    # PEFT's magnitude_prune keeps int(density * numel) entries: 28 of 100 at density 0.29
    t = torch.arange(1, 101, dtype=torch.float32)
    th = _trim_threshold([t], 0.29)
    assert int((t.abs() >= th).sum()) == 28 == int(0.29 * 100)
    peft_utils = pytest.importorskip("peft.utils.merge_utils")
    tv = torch.randn(10, 10, generator=torch.Generator().manual_seed(1))
    ours = torch.where(tv.abs() >= _trim_threshold([tv], 0.29), tv, torch.zeros_like(tv))
    assert torch.equal(ours, peft_utils.magnitude_based_pruning(tv, 0.29))
    pool = _lin_pool()
    assert isinstance(ties_merging(pool, k=0.001), nn.Module)  # keeps nothing: the pretrained model


def test_task_arithmetic_accepts_one_lambda_per_task():
    pool = _lin_pool()
    lam = [0.5, 0.25, 0.25]
    m = task_arithmetic(pool, lam=lam)
    want = pool.pretrained.lin.weight + sum(l * pool.task_vector(k)["lin.weight"] for k, l in enumerate(lam))
    assert torch.allclose(m.lin.weight, want, atol=1e-6)
    assert torch.allclose(task_arithmetic(pool, lam=[0.3] * 3).lin.weight, task_arithmetic(pool, lam=0.3).lin.weight,
                          atol=1e-6)
    with pytest.raises(TypeError, match="K = 3"):
        task_arithmetic(pool, lam=[0.5, 0.5])
    cfg = _good()
    cfg["base"]["lam"] = [0.5, 0.5]
    assert from_dict(cfg).base.lam == [0.5, 0.5]


def test_adamerging_clamps_in_the_merge_and_keeps_raw_lambda():
    """As the reference implementation: the merge uses clamp(λ_raw, 0, 1); λ_raw itself is not clipped,
    so a coefficient pushed past 1 stays past it (no gradient there) instead of being reset to 1."""
    pool = _lin_pool(K=2, shape=(3, 4))
    x = [[torch.randn(8, 4, generator=torch.Generator().manual_seed(i))] for i in range(2)]
    logits_fn = lambda model, k, b: model(b) * 50.0  # noqa: E731  sharp logits: large entropy gradients
    m, coef = adamerging(pool, logits_fn, x, steps=40, lr=0.2, init_lam=0.9, return_coefficients=True)
    assert float(coef.min()) >= 0.0 and float(coef.max()) <= 1.0
    from paretomerge.methods import LayerwiseMerge

    merge = LayerwiseMerge.from_pool(pool, ["lin.weight"])
    raw = torch.tensor([[1.7, -0.4]])
    assert torch.equal(merge.coefficients(raw), torch.tensor([[1.0, 0.0]]))
    assert torch.allclose(merge.merged(raw)["lin.weight"],
                          pool.pretrained.lin.weight + pool.task_vector(0)["lin.weight"])
    # same model as merging with the returned (clamped) coefficients
    assert torch.allclose(m.lin.weight, merge.merged(coef)["lin.weight"])




def test_ties_scope_tensor_is_ties_per_tensor():
    pool = tiny_pool()
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
