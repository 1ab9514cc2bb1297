"""ParetoLinear, ParetoMultiheadAttention, use_preference, convert, export."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import paretomerge as pm
from pmkernels import reference_pareto_linear

from helpers import random_pref, rel_err

K, R = 3, 4


def randomise_factors(model: nn.Module) -> None:
    """Give every Pareto layer a non-zero ΔW so tests see the low-rank path."""
    with torch.no_grad():
        for p in pm.pareto_parameters(model):
            p.normal_(std=0.3)


# ---- ParetoLinear ----

def test_from_linear_equals_linear_at_init_and_keeps_keys():
    lin = nn.Linear(19, 23)
    pl = pm.ParetoLinear.from_linear(lin, K, R)
    x = torch.randn(4, 6, 19)
    assert torch.equal(pl(x, pref=[1 / 3] * 3), lin(x))
    assert set(pl.state_dict()) == {"weight", "bias", "U", "G", "V"}
    assert pl.weight is lin.weight  # wrapped, not copied
    assert pl.U.shape == (23, R) and pl.G.shape == (R, R, K) and pl.V.shape == (19, R)
    assert float(pl.U.detach().abs().sum()) == 0 and float(pl.G.detach().abs().sum()) > 0
    assert float(pl.V.detach().abs().sum()) > 0


def test_constructor_matches_reference_and_to_linear_bakes():
    pl = pm.ParetoLinear(19, 23, K, R, dtype=torch.float64)
    randomise_factors(pl)
    x, pref = torch.randn(5, 19, dtype=torch.float64), random_pref(K)
    y = pl(x, pref=pref)
    ref = reference_pareto_linear(x, pl.weight, pl.bias, pl.U, pl.G, pl.V, pref)
    assert rel_err(y, ref) < 1e-12
    assert rel_err(pl.to_linear(pref)(x), ref) < 1e-12


def test_use_preference_and_set_preference():
    pl = pm.ParetoLinear(7, 5, K, R, dtype=torch.float64)
    randomise_factors(pl)
    x = torch.randn(2, 7, dtype=torch.float64)
    a, b = random_pref(K), random_pref(K)
    with pytest.raises(pm.NoPreferenceError):
        pl(x)
    pm.set_preference(a)
    try:
        ya = pl(x)
        with pm.use_preference(b):
            yb = pl(x)
            with pm.use_preference(a):
                assert torch.allclose(pl(x), ya)
            assert torch.allclose(pl(x), yb)
        assert torch.allclose(pl(x), ya)
        assert torch.allclose(pl(x, pref=b), yb)
    finally:
        pm.set_preference(None)
    assert not torch.allclose(ya, yb)
    assert pm.get_preference() is None


@pytest.mark.parametrize("bad,exc", [([0.5, 0.6, 0.1], ValueError), ([0.5, -0.1, 0.6], ValueError),
                                     ("abc", TypeError), ([[0.5, 0.5, float("nan")]], ValueError)])
def test_use_preference_rejects_bad_values(bad, exc):
    with pytest.raises(exc, match="pref"):
        with pm.use_preference(bad):
            pass


@pytest.mark.parametrize("batch_dim", [0, 1])
def test_per_sample_equals_one_at_a_time_when_seq_len_equals_batch(batch_dim):
    B = L = 4  # sequence length == batch size: a wrong batch dim would go unnoticed by shapes alone
    pl = pm.ParetoLinear(6, 5, K, R, dtype=torch.float64, batch_dim=batch_dim)
    randomise_factors(pl)
    x = torch.randn(B, L, 6, dtype=torch.float64)
    if batch_dim == 1:
        x = x.transpose(0, 1)  # (L, B, E)
    prefs = random_pref(K, B=B)
    with pm.use_preference(prefs):
        y = pl(x)
    for i in range(B):
        xi = x.select(batch_dim, i)
        assert torch.allclose(y.select(batch_dim, i), pl(xi, pref=prefs[i]), atol=1e-12)


def test_per_sample_batch_mismatch_is_an_error():
    pl = pm.ParetoLinear(6, 5, K, R, batch_dim=1)
    with pytest.raises(ValueError, match="batch dim"):
        pl(torch.randn(4, 3, 6), pref=random_pref(K, B=4))  # B matches dim 0, but the batch is dim 1


def test_state_dict_round_trip():
    pl = pm.ParetoLinear(6, 5, K, R)
    randomise_factors(pl)
    other = pm.ParetoLinear(6, 5, K, R)
    other.load_state_dict(pl.state_dict())
    x, p = torch.randn(3, 6), random_pref(K).float()
    assert torch.equal(other(x, pref=p), pl(x, pref=p))


@pytest.mark.parametrize("args", [(6, 5, 0, 2), (6, 5, 3, 0), (6, 5, 3, 1.5)])
def test_bad_rank_or_objectives(args):
    with pytest.raises(ValueError, match="num_objectives|rank"):
        pm.ParetoLinear(*args)


# ---- ParetoMultiheadAttention ----

def _mha_inputs(batch_first, B=3, L=5, E=16):
    x = torch.randn(B, L, E) if batch_first else torch.randn(L, B, E)
    return x


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("mask", [None, "bool", "float", "padding"])
def test_mha_equals_wrapped_module_at_init(batch_first, need_weights, mask):
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    pmha = pm.ParetoMultiheadAttention.from_mha(mha, K, R).eval()
    x = _mha_inputs(batch_first)
    L = x.shape[1] if batch_first else x.shape[0]
    B = x.shape[0] if batch_first else x.shape[1]
    kw = {}
    if mask == "bool":
        kw["attn_mask"] = torch.ones(L, L, dtype=torch.bool).triu(1)
    elif mask == "float":
        kw["attn_mask"] = torch.randn(L, L)
    elif mask == "padding":
        kpm = torch.zeros(B, L, dtype=torch.bool)
        kpm[0, -2:] = True
        kw["key_padding_mask"] = kpm
    ref, ref_w = mha(x, x, x, need_weights=need_weights, **kw)
    out, w = pmha(x, x, x, need_weights=need_weights, pref=[1 / 3] * 3, **kw)
    assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()
    if need_weights:
        assert torch.allclose(w, ref_w, atol=1e-6)
    else:
        assert w is None


def test_mha_cross_attention_and_keys():
    mha = nn.MultiheadAttention(16, 2, batch_first=True).eval()
    pmha = pm.ParetoMultiheadAttention.from_mha(mha, K, R).eval()
    q, kv = torch.randn(2, 3, 16), torch.randn(2, 7, 16)
    assert torch.allclose(pmha(q, kv, kv, pref=[1, 0, 0])[0], mha(q, kv, kv)[0], atol=1e-5)
    keys = set(pmha.state_dict())
    assert set(mha.state_dict()) <= keys
    assert {"in_proj_U", "in_proj_G", "in_proj_V", "out_proj.U", "out_proj.G", "out_proj.V"} <= keys


@pytest.mark.parametrize("batch_first", [True, False])
def test_mha_per_sample_and_bake(batch_first):
    B = L = 4
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first, dtype=torch.float64).eval()
    pmha = pm.ParetoMultiheadAttention.from_mha(mha, K, R).eval()
    randomise_factors(pmha)
    x = torch.randn(B, L, 16, dtype=torch.float64)
    prefs = random_pref(K, B=B)
    with pm.use_preference(prefs):
        y = pmha(x, x, x, need_weights=False)[0]
    bdim = 0 if batch_first else 1
    for i in range(B):
        xi = x.select(bdim, i).unsqueeze(bdim)
        yi = pmha(xi, xi, xi, need_weights=False, pref=prefs[i])[0]
        assert torch.allclose(y.select(bdim, i), yi.squeeze(bdim), atol=1e-10)
        baked = pmha.to_mha(prefs[i])
        assert torch.allclose(baked(xi, xi, xi, need_weights=False)[0], yi, atol=1e-10)


def test_mha_per_sample_batch_mismatch_is_an_error():
    pmha = pm.ParetoMultiheadAttention(16, 4, K, R, batch_first=False)
    x = torch.randn(4, 3, 16)  # (L=4, B=3, E)
    with pytest.raises(ValueError, match="batch"):
        pmha(x, x, x, pref=random_pref(K, B=4))


# ---- convert / export on real architectures ----

def tiny_open_clip_vit():
    from open_clip.model import CLIPVisionCfg, _build_vision_tower

    cfg = CLIPVisionCfg(layers=2, width=32, head_width=16, patch_size=8, image_size=16)
    return lambda: _build_vision_tower(embed_dim=24, vision_cfg=cfg).eval()


@pytest.mark.parametrize("include,expected", [
    ("attention", ["transformer.resblocks.0.attn", "transformer.resblocks.1.attn"]),
    ("attention+mlp", ["transformer.resblocks.0.attn", "transformer.resblocks.0.mlp.c_fc",
                       "transformer.resblocks.0.mlp.c_proj", "transformer.resblocks.1.attn",
                       "transformer.resblocks.1.mlp.c_fc", "transformer.resblocks.1.mlp.c_proj"]),
])
def test_convert_open_clip_vit(include, expected):
    build = tiny_open_clip_vit()
    model = build()
    x = torch.randn(3, 3, 16, 16)
    ref = model(x)
    names = pm.convert(model, K, R, include=include)
    assert names == expected
    assert [n for n, _ in pm.pareto_layers(model)] == expected
    with pm.use_preference([0.2, 0.3, 0.5]):
        assert torch.allclose(model(x), ref, atol=1e-6)
    randomise_factors(model)
    prefs = random_pref(K, B=3).float()
    with pm.use_preference(prefs):
        y = model(x)
    assert not torch.allclose(y, ref, atol=1e-3)
    for i in range(3):
        plain = pm.export(model, prefs[i])
        assert not any(isinstance(m, pm.convert.__globals__["PARETO_TYPES"]) for m in plain.modules())
        fresh = build()
        fresh.load_state_dict(plain.state_dict())  # loadable by the original architecture's code
        assert torch.allclose(fresh(x[i:i + 1]), y[i:i + 1], atol=1e-5)


def test_convert_batch_dim_follows_batch_first():
    model = nn.Module()
    model.batch_first = False
    model.fc = nn.Linear(4, 4)
    pm.convert(model, K, R)
    assert model.fc.batch_dim == 1


def test_convert_nothing_matched_is_an_error():
    with pytest.raises(ValueError, match="include"):
        pm.convert(nn.Sequential(nn.Linear(3, 3)), K, R, include="attention")


def test_convert_hf_bert():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=37, vocab_size=50, max_position_embeddings=16)
    model = transformers.BertModel(cfg).eval()
    ids = torch.randint(0, 50, (2, 7))
    ref = model(ids).last_hidden_state
    names = pm.convert(model, K, R, include="attention+mlp")
    assert "encoder.layer.0.attention.self.query" in names and "encoder.layer.0.intermediate.dense" in names
    with pm.use_preference([1, 0, 0]):
        assert torch.allclose(model(ids).last_hidden_state, ref, atol=1e-6)


def test_export_requires_one_preference():
    model = nn.Sequential(nn.Linear(3, 3))
    pm.convert(model, K, R)
    with pytest.raises(ValueError, match="pref"):
        pm.export(model, random_pref(K, B=2))


def test_torch_compile_converted_model():
    build = tiny_open_clip_vit()
    model = build()
    pm.convert(model, K, R, include="attention+mlp")
    randomise_factors(model)
    x = torch.randn(2, 3, 16, 16)
    pref = torch.tensor([0.2, 0.3, 0.5])
    with pm.use_preference(pref):
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
    assert torch.allclose(compiled, eager, atol=1e-6)


@pytest.mark.parametrize("per_sample", [False, True])
def test_converted_model_triton_path_matches_torch(per_sample):
    """The whole converted ViT through the fused kernels (interpreter on CPU) equals the torch path."""
    pytest.importorskip("triton")
    model = tiny_open_clip_vit()()
    pm.convert(model, K, R, include="attention+mlp", impl="torch")
    randomise_factors(model)
    x = torch.randn(2, 3, 16, 16)
    pref = random_pref(K, B=2 if per_sample else None).float()
    grads = {}
    for impl in ("torch", "triton"):
        pm.set_impl(model, impl)
        model.zero_grad()
        with pm.use_preference(pref):
            y = model(x)
        y.square().sum().backward()
        grads[impl] = (y.detach(), [p.grad.clone() for p in pm.pareto_parameters(model)])
    (y_t, g_t), (y_k, g_k) = grads["torch"], grads["triton"]
    assert rel_err(y_k, y_t) < 1e-5
    for a, b in zip(g_k, g_t):
        assert rel_err(a, b) < 1e-4


def test_use_preference_snapshots_and_caches_per_device():
    pref = torch.tensor([0.2, 0.3, 0.5])
    with pm.use_preference(pref) as active:
        pref[0] = 5.0  # the caller's tensor changes after the check: the layers must not see it
        assert torch.equal(pm.get_preference(), torch.tensor([0.2, 0.3, 0.5]))
        state = pm.layers.preference._STATE
        on_meta = state.active_on(torch.device("meta"))
        assert state.active_on(torch.device("meta")) is on_meta  # one copy per device, not per layer call
        assert state.active_on(active.device) is active
        with pm.use_preference([1, 0, 0]):
            assert state.active_on(torch.device("meta")) is not on_meta
    p = torch.tensor([0.2, 0.3, 0.5], requires_grad=True)
    layer = pm.ParetoLinear(4, 3, K, R)
    randomise_factors(layer)
    with pm.use_preference(p):
        layer(torch.randn(2, 4)).sum().backward()
    assert p.grad is not None and p.grad.abs().sum() > 0  # gradients still reach the caller's γ
