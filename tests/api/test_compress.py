"""Compressed task vectors: truncated SVD (rank | keep), errors, save → load round trip, factored objective."""
from __future__ import annotations

import math

import pytest
import torch

from paretomerge.layers import convert
from paretomerge.methods import task_arithmetic
from paretomerge.methods.pareto_merging.objectives import DataFreeObjective
from paretomerge.pools import ModelPool
from paretomerge.pools.compress import CompressedTaskVectors, truncated_svd

from test_pools_lazy import finetuned_copies, tiny_llama

K = 3


@pytest.fixture
def dense_pool():
    base = tiny_llama()
    return ModelPool.from_modules(base, {f"t{i}": m for i, m in enumerate(finetuned_copies(base, K))})


def test_truncated_svd_rank_keep_and_error():
    torch.manual_seed(1)
    D = torch.randn(23, 9, dtype=torch.float64) @ torch.diag(torch.logspace(0, -3, 9, dtype=torch.float64)) \
        @ torch.linalg.qr(torch.randn(9, 9, dtype=torch.float64))[0]
    s = torch.linalg.svdvals(D)
    lr, err = truncated_svd(D, rank=4)
    assert lr.rank == 4 and lr.A.shape == (23, 4) and lr.B.shape == (9, 4)
    expected = math.sqrt(float(s[4:].pow(2).sum() / s.pow(2).sum()))
    assert abs(err - expected) < 1e-12
    assert abs(float((D - lr.dense()).norm() / D.norm()) - expected) < 1e-12
    lr, err = truncated_svd(D, keep=0.9)
    energy = torch.cumsum(s.pow(2), 0) / s.pow(2).sum()
    assert energy[lr.rank - 1] >= 0.9 and (lr.rank == 1 or energy[lr.rank - 2] < 0.9)
    full, err = truncated_svd(D, rank=9)
    assert err < 1e-14
    lr, err = truncated_svd(D.float(), rank=3, method="lowrank", seed=0)
    lr2, err2 = truncated_svd(D.float(), rank=3, method="lowrank", seed=0)
    assert torch.equal(lr.A, lr2.A) and err == err2  # seeded
    with pytest.raises(ValueError, match=r"layer\.w: rank 10 is larger than the matrix allows \(shape \(23, 9\)"):
        truncated_svd(D, rank=10, name="layer.w")
    with pytest.raises(ValueError, match="exactly one of rank"):
        truncated_svd(D, rank=2, keep=0.5)
    with pytest.raises(ValueError, match=r"keep must be a fraction"):
        truncated_svd(D, keep=1.5)


def test_compress_save_load_round_trip(dense_pool, tmp_path):
    pool = dense_pool
    ctv = pool.compress(rank=4)
    keys = pool.factored_keys()
    assert keys and all(k.endswith("_proj.weight") or k == "lm_head.weight" for k in keys)
    errs, total = ctv.layer_errors(), ctv.total_errors()
    assert all(0 < e < 1 for t in errs.values() for e in t.values()) and all(0 < e < 1 for e in total.values())
    # task vectors of the compressed pool are the factors' products; other tensors are exact
    tv = pool.task_vector(1)
    for k in keys:
        torch.testing.assert_close(tv[k], ctv.factors["t1"][k].dense(), rtol=1e-5, atol=1e-7)
    path = ctv.save(tmp_path / "tv.safetensors")
    loaded = CompressedTaskVectors.load(path)
    assert loaded.tasks == ctv.tasks and loaded.total_errors() == pytest.approx(total)
    pool2 = ModelPool.from_compressed(pool.pretrained, path)
    for t in pool.task_names:
        a, b = pool.finetuned_state(t), pool2.finetuned_state(t)
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_compress_rank_too_large_names_tensor(dense_pool):
    with pytest.raises(ValueError, match=r"rank 20 is larger than tensor 'model.layers.0.self_attn.q_proj.weight'"):
        dense_pool.compress(rank=20)
    assert dense_pool.factored_keys() == []  # nothing replaced


def test_keep_selects_ranks_per_matrix(dense_pool):
    ctv = dense_pool.compress(keep=0.5)
    ranks = {d.rank for f in ctv.factors.values() for d in f.values()}
    assert min(ranks) >= 1 and max(ranks) < 16


def test_bad_compressed_files(dense_pool, tmp_path):
    from safetensors.torch import save_file

    ctv = dense_pool.compress(rank=2)
    path = ctv.save(tmp_path / "tv.safetensors")
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match="cut.safetensors: unreadable"):
        CompressedTaskVectors.load(tmp_path / "cut.safetensors")
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="other.safetensors: not a compressed task vectors file"):
        CompressedTaskVectors.load(tmp_path / "other.safetensors")
    other = tiny_llama(hidden=24)
    with pytest.raises(ValueError, match=r"tv.safetensors: task 't0': tensor '.*' has shape"):
        ModelPool.from_compressed(other, path)


def test_factored_objective_full_rank_equals_dense_and_truncated_error(dense_pool):
    """Full-rank compression: the factored data-free objective equals the dense one (TA base, exact offset)."""
    keys = [k for k in dense_pool.float_keys() if "self_attn" in k and k.endswith("weight")]
    dense = dense_pool
    model = task_arithmetic(dense, lam=0.3)
    convert(model, K, 2, include="attention")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".U"):
                p.normal_()
    pref = torch.tensor([0.3, 0.3, 0.4])
    f_dense = DataFreeObjective.from_pool(model, dense)(pref)
    base = dense.pretrained
    full = ModelPool.from_modules(base, {t: dense.finetuned_model(t) for t in dense.task_names})
    full.compress(rank=16, keys=keys)
    obj = DataFreeObjective.from_pool(model, full)
    assert all(t.deltas is None for t in obj.terms)
    torch.testing.assert_close(obj(pref), f_dense, rtol=1e-4, atol=0)
    low = ModelPool.from_modules(base, {t: dense.finetuned_model(t) for t in dense.task_names})
    low.compress(rank=4, keys=keys)
    f_low = DataFreeObjective.from_pool(model, low)(pref)
    rel = float(((f_low - f_dense).abs() / f_dense).max().detach())
    assert 0 < rel < 1
