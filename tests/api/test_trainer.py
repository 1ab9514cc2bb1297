"""ParetoMergingTrainer: determinism, checkpoint/resume bit-for-bit, per-sample mode, config checks."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import paretomerge as pm
from paretomerge import TrainerConfig
from paretomerge.methods.pareto_merging import ParetoMergingTrainer, load_checkpoint

from helpers import Tiny  # noqa: E402

K = 3




def _setup(seed=0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    base = Tiny()
    fts = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.state_dict().items()} for _ in range(K)]
    heads = [nn.Linear(12, 5) for _ in range(K)]
    data = [torch.randn(40, 6, 12, generator=g) for _ in range(K)]
    return base, fts, heads, data


def _trainer(mode="datafree", steps=6, ckpt_dir=None, every=0, per_sample=False, include="attention+mlp"):
    base, fts, heads, data = _setup()
    model = copy.deepcopy(base)
    cfg = TrainerConfig(mode=mode, steps=steps, lr=0.05, batch_size=4, rank=2, rank_mlp=3, include=include,
                        checkpoint_dir=ckpt_dir, checkpoint_every=every, progress=False, per_sample=per_sample,
                        reg_frobenius=1e-4)

    def logits_fn(m, k, x):
        return heads[k](m(x).mean(1))

    return ParetoMergingTrainer(model, None, cfg, finetuned=fts, logits_fn=logits_fn, unlabeled=data,
                                task_names=["a", "b", "c"])


def _params(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("mode", ["datafree", "unlabeled"])
def test_training_reduces_objective_and_is_deterministic(mode):
    t1 = _trainer(mode, steps=8)
    t1.train()
    t2 = _trainer(mode, steps=8)
    t2.train()
    p1, p2 = _params(t1.model), _params(t2.model)
    assert p1.keys() == p2.keys()
    assert all(torch.equal(p1[k], p2[k]) for k in p1)
    assert len(t1.history) == 8 and "f_a" in t1.history[0]
    # the factors moved (U left zero)
    assert any(float(p.detach().abs().sum()) > 0 for n, p in t1.model.named_parameters() if n.endswith("U"))
    # base weights are frozen
    base = _setup()[0].state_dict()
    assert torch.equal(p1["attn.in_proj_weight"], base["attn.in_proj_weight"])


def test_ranks_per_layer_type():
    t = _trainer(steps=1)
    assert t.layers == {"attn": 2, "mlp.0": 3, "mlp.2": 3}


@pytest.mark.parametrize("mode", ["datafree", "unlabeled"])
def test_checkpoint_resume_bit_for_bit(tmp_path, mode):
    straight = _trainer(mode, steps=6)
    straight.train()
    d = tmp_path / "ck"
    first = _trainer(mode, steps=6, ckpt_dir=str(d), every=3)
    first.train(steps=3)
    assert (d / "step000003.pt").exists() and (d / "last.pt").exists()
    assert (d / "last.pt").read_bytes() == (d / "step000003.pt").read_bytes()
    assert not list(d.glob("*.tmp")) and not list(d.glob(".*"))
    ck = load_checkpoint(d / "step000003.pt")
    assert ck["step"] == 3 and set(ck) >= {"model", "optimizer", "rng", "config", "layers"}
    torch.manual_seed(123)  # disturb the global RNG: resume must restore it
    resumed = _trainer(mode, steps=6)
    resumed.train(resume=d / "step000003.pt")
    assert resumed.step == 6
    a, b = _params(straight.model), _params(resumed.model)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [h["loss"] for h in straight.history[3:]] == [h["loss"] for h in resumed.history]


@pytest.mark.parametrize("mode", ["datafree", "unlabeled"])
def test_per_sample_mode_runs(mode):
    t = _trainer(mode, steps=3, per_sample=True)
    t.train()
    assert t.step == 3 and all(torch.isfinite(torch.tensor(h["loss"])) for h in t.history)
    with pm.use_preference(torch.tensor([[1.0, 0, 0], [0, 0.5, 0.5]])):
        y = t.model(torch.randn(2, 6, 12))
    assert y.shape == (2, 6, 12)


def test_linear_scalarization_and_no_normalization_run():
    base, fts, _, _ = _setup()
    cfg = TrainerConfig(steps=2, rank=2, scalarization="linear", normalize="none", progress=False,
                        reg_orthogonal=0.1)
    t = ParetoMergingTrainer(copy.deepcopy(base), None, cfg, finetuned=fts)
    t.train()
    assert t.step == 2


@pytest.mark.parametrize("field,value", [("mode", "bogus"), ("rank", 0), ("mu", -1.0), ("include", "x"),
                                         ("scalarization", "max"), ("normalize", "z"), ("steps", 1.5),
                                         ("reg_frobenius", -1.0)])
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"trainer.{field}"):
        TrainerConfig(**{field: value}).validate()


def test_missing_inputs_are_errors():
    base, fts, _, _ = _setup()
    with pytest.raises(ValueError, match="unlabeled"):
        ParetoMergingTrainer(copy.deepcopy(base), None, TrainerConfig(mode="unlabeled", progress=False),
                             finetuned=fts)
    with pytest.raises(ValueError, match="ideal"):
        ParetoMergingTrainer(copy.deepcopy(base), None, TrainerConfig(ideal=[0.0], progress=False), finetuned=fts)


def _joint_trainer(steps, ckpt_dir=None, every=0, adamerging=True, **kw):
    from paretomerge.methods import task_arithmetic
    from paretomerge.pools import ModelPool

    base, fts, heads, data = _setup()
    mods = {}
    for i, sd in enumerate(fts):
        m = copy.deepcopy(base)
        m.load_state_dict(sd)
        mods[f"t{i}"] = m
    pool = ModelPool.from_modules(base, mods)
    model = task_arithmetic(pool, lam=0.3)
    cfg = TrainerConfig(mode="unlabeled", steps=steps, lr=0.05, batch_size=4, rank=2, adamerging=adamerging,
                        adamerging_lr=0.05, progress=False, checkpoint_dir=ckpt_dir, checkpoint_every=every, **kw)

    def logits_fn(m, k, x):
        return heads[k](m(x).mean(1))

    return ParetoMergingTrainer(model, pool, cfg, logits_fn=logits_fn, unlabeled=data)


def test_joint_adamerging_coefficients(tmp_path):
    t = _joint_trainer(4)
    w0 = t.model.attn.in_proj_weight.detach().clone()
    t.train()
    assert t.lam is not None and not torch.allclose(t.lam, torch.full_like(t.lam, 0.3))
    assert float(t.lam.detach().min()) >= 0 and float(t.lam.detach().max()) <= 1
    assert not torch.equal(w0, t.model.attn.in_proj_weight)  # the learned base was baked in
    # resume is bit-for-bit here too
    first = _joint_trainer(4, ckpt_dir=str(tmp_path), every=2)
    first.train(steps=2)
    resumed = _joint_trainer(4)
    resumed.train(resume=tmp_path / "step000002.pt")
    a, b = _params(t.model), _params(resumed.model)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(t.lam, resumed.lam)
    with pytest.raises(ValueError, match="trainer.adamerging"):
        TrainerConfig(adamerging=True).validate()


def test_adamerging_before_fits_lambda_first_then_freezes_it(tmp_path):
    """AdaMerging + PM ("before", the unlabeled mode's default with a pool): λ is AdaMerging's own (plain entropy,
    ``adamerging_steps`` steps, tensor at 0), then frozen and baked while the tensor trains; resume is exact."""
    t = _joint_trainer(4, adamerging="before", adamerging_steps=3)
    assert t.adamerging == "before" and t.cfg.adamerging == "before"
    w0 = t.model.attn.in_proj_weight.detach().clone()
    t.train(steps=1)
    lam1 = t.lam.detach().clone()
    assert not torch.allclose(lam1, torch.full_like(lam1, 0.3)) and not t.lam.requires_grad
    assert not torch.equal(w0, t.model.attn.in_proj_weight)  # the AdaMerging base was baked in
    t.train()
    assert torch.equal(t.lam, lam1)  # frozen while the tensor trains
    first = _joint_trainer(4, ckpt_dir=str(tmp_path), every=2, adamerging="before", adamerging_steps=3)
    first.train(steps=2)
    resumed = _joint_trainer(4, adamerging="before", adamerging_steps=3)
    resumed.train(resume=tmp_path / "step000002.pt")
    a, b = _params(t.model), _params(resumed.model)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # "auto" is "before" in mode unlabeled with a pool; bools keep their old meaning
    assert _joint_trainer(1, adamerging="auto").adamerging == "before"
    assert TrainerConfig(mode="unlabeled", adamerging=False).adamerging == "off"
    assert TrainerConfig(mode="unlabeled", adamerging=True).adamerging == "joint"
    with pytest.raises(ValueError, match="trainer.adamerging"):
        TrainerConfig(adamerging="before").validate()


def test_pool_is_read_only_for_converted_weights():
    """The data-free objective asks the pool for the converted layers' weights alone (never K full models)."""
    from paretomerge.pools import ModelPool

    base, fts, _, _ = _setup()
    mods = {}
    for name, sd in zip("abc", fts):
        m = copy.deepcopy(base)
        m.load_state_dict(sd)
        mods[name] = m
    pool = ModelPool.from_modules(base, mods)
    asked = []
    real = pool.finetuned_state

    def recording(k, names=None):
        asked.append(None if names is None else sorted(names))
        return real(k, names)

    pool.finetuned_state = recording
    cfg = TrainerConfig(mode="datafree", steps=1, rank=2, include="attention", progress=False)
    model = copy.deepcopy(base)
    trainer = ParetoMergingTrainer(model, pool, cfg)
    # one converted weight of one task per call (the pool is read layer by layer)
    assert sorted(map(tuple, asked)) == sorted([("attn.in_proj_weight",), ("attn.out_proj.weight",)] * K)
    full = ParetoMergingTrainer(copy.deepcopy(base), None, cfg, finetuned=fts)
    full.model.load_state_dict(trainer.model.state_dict())
    pref = torch.tensor([0.2, 0.3, 0.5])
    assert torch.allclose(trainer.datafree(pref), full.datafree(pref))


def test_unlabeled_normaliser_is_taken_at_the_training_batch_size():
    """f̃_k = f_k / f_k(init) with f_k(init) the mean over batches of the training size (the first inputs, in
    order): the diversity term log C − H(p̄) is a batch statistic that stays > 0 on a few samples, so a scale
    taken on one large batch would start every task above 1, by how many classes it has."""
    from paretomerge.methods.pareto_merging.objectives import entropy_objectives

    t = _trainer("unlabeled", steps=1)
    t.cfg.diversity = 1.0
    t._fit_normalizer()
    bs = t.cfg.batch_size
    uniform = torch.full((K,), 1.0 / K)
    with torch.no_grad():
        chunks = [entropy_objectives(t.model, t.logits_fn, [x[j * bs:(j + 1) * bs] for x in t.unlabeled], uniform,
                                     diversity=1.0) for j in range(40 // bs)]
        whole = entropy_objectives(t.model, t.logits_fn, [x[:256] for x in t.unlabeled], uniform, diversity=1.0)
    assert torch.allclose(t.normalizer.scale, torch.stack(chunks).mean(0), rtol=1e-6)
    assert torch.all(t.normalizer.scale > whole)  # small batches' p̄ is lumpier: the floor the scale now includes


def test_entropy_zero_trains_the_tensor_on_the_anchor_alone():
    """``entropy=0``: the unlabeled inputs only choose AdaMerging's λ; the tensor then trains on the anchor alone
    (no forward pass after the λ phase). Around the model's own base (adamerging "off") with anchor 1 that is the
    data-free mode's objective, so the two train bit for bit alike."""
    base, fts, heads, data = _setup()
    calls = []

    def logits_fn(m, k, x):
        calls.append(k)
        return heads[k](m(x).mean(1))

    def run(mode, **kw):
        cfg = TrainerConfig(mode=mode, steps=6, lr=0.05, batch_size=4, rank=2, include="attention", progress=False,
                            **kw)
        t = ParetoMergingTrainer(copy.deepcopy(base), None, cfg, finetuned=fts, logits_fn=logits_fn,
                                 unlabeled=data)
        t.train()
        return t

    calls.clear()
    anchored = run("unlabeled", entropy=0.0, anchor=1.0)
    assert anchored.adamerging == "off" and calls == []  # no forward pass at all
    datafree = run("datafree")
    a, b = _params(anchored.model), _params(datafree.model)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # on an AdaMerging base: λ by entropy (adamerging_steps × K forward passes), then the anchor alone
    t = _joint_trainer(6, adamerging="before", adamerging_steps=2, entropy=0.0)
    counted = []
    inner = t.logits_fn
    t.logits_fn = lambda m, k, x: counted.append(k) or inner(m, k, x)
    t.train()
    assert len(counted) == 2 * K
    assert t.history[-1]["loss"] < t.history[0]["loss"]  # the anchor's scalarised objective went down
    # auto (None) is 0 only with an anchor to train the tensor; with anchor 0 it keeps entropy
    assert _joint_trainer(1, adamerging="before", anchor=0.0, diversity=1.0).entropy == 1.0
    assert _joint_trainer(1, adamerging="before").entropy == 0.0
    with pytest.raises(ValueError, match="trainer.entropy.*nothing would train"):
        TrainerConfig(mode="unlabeled", entropy=0.0, anchor=0.0)
    with pytest.raises(ValueError, match="trainer.entropy.*joint"):
        TrainerConfig(mode="unlabeled", entropy=0.0, adamerging="joint")
