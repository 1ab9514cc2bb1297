"""ParetoConv1x1: a pointwise conv with W(γ) = W + U M(γ) Vᵀ, against a float64 conv reference; convert/export,
the data-free objective on conv weights, bad input."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import paretomerge as pm
from paretomerge.layers import ParetoConv1x1, factored_weights, is_pointwise_conv
from paretomerge.methods.pareto_merging import DataFreeObjective

from helpers import assert_pool_objective_matches_dense, rel_err


def _layer(cin=7, cout=5, r=3, K=4, bias=True) -> ParetoConv1x1:
    layer = ParetoConv1x1.from_conv(nn.Conv2d(cin, cout, 1, bias=bias), K, r, impl="torch")
    with torch.no_grad():  # non-zero factors (U starts at 0)
        for p in (layer.U, layer.G, layer.V):
            p.normal_()
    return layer


def _reference(layer: ParetoConv1x1, x: torch.Tensor, pref: torch.Tensor) -> torch.Tensor:
    """float64 conv2d with W(γ) built densely, one sample at a time for per-sample γ."""
    d = torch.float64
    W, U, G, V = (t.detach().to(d) for t in (layer.weight, layer.U, layer.G, layer.V))
    b = None if layer.bias is None else layer.bias.detach().to(d)
    prefs = pref.to(d).expand(x.shape[0], -1) if pref.dim() == 1 else pref.to(d)
    outs = []
    for n in range(x.shape[0]):
        M = (G * prefs[n]).sum(-1)
        Wn = W + (U @ M @ V.T).view_as(W)
        outs.append(F.conv2d(x[n:n + 1].to(d), Wn, b))
    return torch.cat(outs)


@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("impl", ["torch", "naive"])
def test_forward_matches_float64_reference(per_sample, bias, impl):
    layer = _layer(bias=bias)
    layer.impl = impl
    x = torch.randn(3, 7, 5, 6)
    pref = torch.distributions.Dirichlet(torch.ones(4)).sample((3,) if per_sample else ())
    out = layer(x, pref)
    ref = _reference(layer, x, pref)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert rel_err(out, ref) < 1e-5


def test_gradients_match_float64_reference():
    layer = _layer()
    x = torch.randn(2, 7, 3, 4, requires_grad=True)
    pref = torch.tensor([0.1, 0.2, 0.3, 0.4])
    layer(x, pref).square().sum().backward()
    grads = [t.grad.clone() for t in (x, layer.U, layer.G, layer.V, layer.weight)]
    ref_layer = _layer()
    ref_layer.load_state_dict(layer.state_dict())
    ref_layer.double()
    x64 = x.detach().double().requires_grad_(True)
    F.conv2d(x64, ref_layer.weight + (ref_layer.U @ (ref_layer.G * pref.double()).sum(-1) @ ref_layer.V.T
                                      ).view_as(ref_layer.weight), ref_layer.bias).square().sum().backward()
    for g, r in zip(grads, (x64.grad, ref_layer.U.grad, ref_layer.G.grad, ref_layer.V.grad, ref_layer.weight.grad)):
        assert rel_err(g, r) < 1e-5


def test_starts_as_the_wrapped_conv_and_keeps_keys():
    conv = nn.Conv2d(6, 4, 1)
    x = torch.randn(2, 6, 3, 3)
    layer = ParetoConv1x1.from_conv(conv, 3, 2)
    assert layer.weight is conv.weight and layer.bias is conv.bias
    assert set(layer.state_dict()) == {"weight", "bias", "U", "G", "V"}
    torch.testing.assert_close(layer(x, [0.2, 0.3, 0.5]), conv(x))


def test_convert_is_opt_in_and_export_round_trips():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 6, 1), nn.ReLU(), nn.Conv2d(6, 6, 1, groups=2),
                          nn.Flatten(), nn.Linear(6 * 4 * 4, 5))
    with pytest.raises(ValueError, match="no nn.Linear"):
        pm.convert(nn.Sequential(nn.Conv2d(3, 3, 1)), 2, 2)  # include=None never converts convs
    names = pm.convert(model, 2, 2, include=["*"])
    assert names == ["1", "5"]  # the 3×3 conv and the grouped 1×1 conv are not pointwise
    assert isinstance(model[1], ParetoConv1x1) and isinstance(model[5], pm.ParetoLinear)
    with torch.no_grad():
        model[1].U.normal_()
    x, pref = torch.randn(2, 3, 4, 4), torch.tensor([0.7, 0.3])
    plain = pm.export(model, pref)
    assert type(plain[1]) is nn.Conv2d and plain[1].weight.shape == (6, 8, 1, 1)
    with pm.use_preference(pref):
        torch.testing.assert_close(plain(x), model(x), rtol=1e-5, atol=1e-5)
    assert [k for k, *_ in factored_weights(model)] == ["1.weight", "5.weight"]


def test_datafree_objective_on_conv_weights():
    base = nn.Sequential(nn.Conv2d(4, 5, 1))
    fts = [{"0.weight": base[0].weight.detach() + torch.randn(5, 4, 1, 1)} for _ in range(2)]
    pm.convert(base, 2, 2, include="all")
    obj = DataFreeObjective(base, fts, impl="torch")
    f = obj(torch.tensor([0.5, 0.5]))
    expected = torch.stack([(ft["0.weight"] - base[0].weight).pow(2).sum() for ft in fts])  # U = 0 at init
    torch.testing.assert_close(f, expected.detach())


def test_bad_input():
    with pytest.raises(ValueError, match="pointwise"):
        ParetoConv1x1.from_conv(nn.Conv2d(3, 3, 1, stride=2), 2, 2)
    with pytest.raises(TypeError, match="nn.Conv2d"):
        ParetoConv1x1.from_conv(nn.Linear(3, 3), 2, 2)
    layer = _layer()
    with pytest.raises(ValueError, match=r"\(N, 7, H, W\)"):
        layer(torch.randn(2, 6, 3, 3), [0.25] * 4)
    with pytest.raises(ValueError, match="per-sample pref"):
        layer(torch.randn(2, 7, 3, 3), torch.full((3, 4), 0.25))
    assert not is_pointwise_conv(nn.Conv2d(3, 3, 1, padding=1))


def test_data_free_objective_from_a_pool_reads_pointwise_conv_weights():
    """The trainer builds its objective with DataFreeObjective.from_pool: (out, in, 1, 1) weights read as (out, in)."""
    base = nn.Sequential(nn.Conv2d(5, 7, 1), nn.ReLU(), nn.Conv2d(7, 3, 1))
    assert_pool_objective_matches_dense(base, {"rank": 2, "include": ["0", "2"]}, 0.1, [0.5, 0.5])
