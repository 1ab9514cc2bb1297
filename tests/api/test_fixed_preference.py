"""paretomerge.fixed_preference: W(γ) baked into every Pareto layer for inference, restored on exit."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import paretomerge as pm
import pmkernels
from helpers import random_pref
from paretomerge.layers import is_fixed

K, R = 3, 2


class Mixed(nn.Module):
    """Every Pareto layer kind: attention (packed in_proj + out_proj), Linear, GPT-2 Conv1D, pointwise conv."""

    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.attn = nn.MultiheadAttention(12, 2, batch_first=True)
        self.fc = nn.Linear(12, 20)
        self.c1d = Conv1D(12, 20)  # nf = 12, nx = 20
        self.conv = nn.Conv2d(12, 6, 1)

    def forward(self, x):
        h = x + self.attn(x, x, x, need_weights=False)[0]
        h = self.c1d(F.gelu(self.fc(h)))
        return self.conv(h.transpose(1, 2).unsqueeze(-1))


def make_model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    model = Mixed()
    pm.convert(model, K, R, include=["attn", "fc", "c1d", "conv"])
    with torch.no_grad():
        for p in pm.pareto_parameters(model):  # convert starts at ΔW = 0: make the low-rank term count
            p.normal_(0.0, 0.3)
    return model.to(dtype).eval()


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), k


def kinds(model):
    return {type(layer).__name__ for _, layer in pm.pareto_layers(model)}


def x_for(dtype=torch.float32):
    return torch.randn(4, 5, 12, dtype=dtype)


@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inside_equals_export_and_exit_restores(exact, dtype):
    model, x, pref = make_model(dtype), x_for(dtype), random_pref(K)
    assert kinds(model) == {"ParetoMultiheadAttention", "ParetoLinear", "ParetoConv1D", "ParetoConv1x1"}
    state = snapshot(model)
    with torch.no_grad():
        with pm.use_preference(pref):
            factored = model(x)
        exported = pm.export(model, pref)(x)
        with pm.fixed_preference(model, pref, exact=exact) as m:
            assert m is model and all(is_fixed(layer) for _, layer in pm.pareto_layers(model))
            inside = model(x)
        after = pm.export(model, pref)(x)
    assert torch.equal(inside, exported)  # the same arithmetic as export (pmkernels.merged_weight), bit for bit
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    assert (inside - factored).norm() <= tol * factored.norm()
    assert not any(is_fixed(layer) for _, layer in pm.pareto_layers(model))
    if exact:
        assert_same_state(model, state)
        assert torch.equal(after, exported)
    else:  # PEFT-style unmerge: back up to the rounding of the two additions
        for k, v in state.items():
            assert (model.state_dict()[k].double() - v.double()).abs().max() <= 4 * torch.finfo(dtype).eps * (
                v.double().abs().max() + 1), k


def test_forward_takes_the_plain_path(monkeypatch):
    model, x, pref = make_model(), x_for(), random_pref(K)

    def factored(*a, **k):
        raise AssertionError("the factored op ran inside fixed_preference")

    monkeypatch.setattr(pmkernels, "pareto_linear", factored)
    with torch.no_grad(), pm.fixed_preference(model, pref):
        model(x)
    with pytest.raises(AssertionError, match="factored"), torch.no_grad(), pm.use_preference(pref):
        model(x)


def test_state_dict_keys_unchanged_and_no_submodule_added():
    model, x, pref = make_model(), x_for(), random_pref(K)
    keys, modules = list(model.state_dict()), [n for n, _ in model.named_modules()]
    with torch.no_grad(), pm.fixed_preference(model, pref):
        model(x)
        assert list(model.state_dict()) == keys and [n for n, _ in model.named_modules()] == modules


def test_grad_enabled_with_trainable_factors_is_an_error():
    model, x, pref = make_model(), x_for(), random_pref(K)
    state = snapshot(model)
    with pm.fixed_preference(model, pref):
        with pytest.raises(RuntimeError, match="no_grad"):
            model(x)
        with torch.inference_mode():
            model(x)
    assert_same_state(model, state)


def test_frozen_model_gives_input_gradients():
    # grads w.r.t. the input only (saliency, attacks) are fine: dx through W(γ) is what the plain layer computes
    model, pref = make_model(), random_pref(K)
    for p in model.parameters():
        p.requires_grad_(False)
    x = x_for().requires_grad_(True)
    with pm.fixed_preference(model, pref):
        model(x).sum().backward()
    dx = x.grad.clone()
    x.grad = None
    with pm.use_preference(pref):
        model(x).sum().backward()
    assert (dx - x.grad).norm() <= 1e-5 * x.grad.norm()


def test_entered_under_inference_mode():
    model, x, pref = make_model(), x_for(), random_pref(K)
    state = snapshot(model)
    with torch.inference_mode():
        with pm.fixed_preference(model, pref):
            inside = model(x)
    with torch.inference_mode():
        assert torch.equal(inside, pm.export(model, pref)(x))
    assert_same_state(model, state)


@pytest.mark.parametrize("pref,exc,match", [
    (random_pref(K, B=2), ValueError, "per-sample"),
    (random_pref(K + 1), ValueError, "K = 4"),
    (torch.tensor([0.5, 0.6, -0.1], dtype=torch.float64), ValueError, "pref"),
    ("abc", TypeError, "pref"),
])
def test_bad_pref(pref, exc, match):
    model = make_model()
    state = snapshot(model)
    with pytest.raises(exc, match=match):
        with pm.fixed_preference(model, pref):
            pass
    assert_same_state(model, state)
    assert not any(is_fixed(layer) for _, layer in pm.pareto_layers(model))


def test_one_row_pref_and_bad_args():
    model, x, pref = make_model(), x_for(), random_pref(K)
    with torch.no_grad(), pm.fixed_preference(model, pref[None]):
        one_row = model(x)
    with torch.no_grad():
        assert torch.equal(one_row, pm.export(model, pref)(x))
    with pytest.raises(TypeError, match="exact"), pm.fixed_preference(model, pref, exact=1):
        pass
    with pytest.raises(ValueError, match="no Pareto layers"), pm.fixed_preference(nn.Linear(3, 3), pref):
        pass


def test_pref_argument_export_inside_block_are_errors():
    model, x, pref = make_model(), x_for(), random_pref(K)
    with torch.no_grad(), pm.fixed_preference(model, pref):
        with pytest.raises(ValueError, match="pref"):
            model.fc(torch.randn(3, 12), pref=pref)
        with pytest.raises(RuntimeError, match="fixed_preference"):
            pm.export(model, pref)
        with pytest.raises(RuntimeError, match="fixed_preference"):
            model.fc.merged_weight(pref)
        with pm.use_preference(random_pref(K)):  # the active preference is not the baked one: ignored
            inside = model(x)
    with torch.no_grad():
        assert torch.equal(inside, pm.export(model, pref)(x))


@pytest.mark.parametrize("outer_exact,inner_exact", [(True, True), (True, False), (False, True), (False, False)])
def test_nesting(outer_exact, inner_exact):
    model, x = make_model(), x_for()
    p1, p2 = random_pref(K), random_pref(K)
    state = snapshot(model)
    with torch.no_grad():
        e1, e2 = pm.export(model, p1)(x), pm.export(model, p2)(x)
        with pm.fixed_preference(model, p1, exact=outer_exact):
            a = model(x)
            with pm.fixed_preference(model, p2, exact=inner_exact):
                b = model(x)
            c = model(x)
    exact_inner = outer_exact  # the inner γ is baked from the outermost block's copy of W when it kept one
    assert torch.equal(a, e1)
    assert torch.equal(b, e2) if exact_inner else (b - e2).norm() <= 1e-5 * e2.norm()
    assert torch.equal(c, e1) if (inner_exact or outer_exact) else (c - e1).norm() <= 1e-5 * e1.norm()
    if outer_exact:
        assert_same_state(model, state)


@pytest.mark.parametrize("exact", [True, False])
def test_exception_inside_block_restores(exact):
    model, x, pref = make_model(), x_for(), random_pref(K)
    state = snapshot(model)
    with pytest.raises(KeyError, match="boom"), torch.no_grad(), pm.fixed_preference(model, pref, exact=exact):
        raise KeyError("boom")
    assert not any(is_fixed(layer) for _, layer in pm.pareto_layers(model))
    if exact:
        assert_same_state(model, state)
    with torch.no_grad(), pm.use_preference(pref):
        assert (model(x) - pm.export(model, pref)(x)).norm() <= 1e-5 * pm.export(model, pref)(x).norm()


def test_failure_while_entering_restores_the_layers_already_baked(monkeypatch):
    model, pref = make_model(), random_pref(K)
    state = snapshot(model)
    real, calls = pmkernels.merged_weight, []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise MemoryError("out of memory")
        return real(*a, **k)

    monkeypatch.setattr(pmkernels, "merged_weight", flaky)
    with pytest.raises(MemoryError), pm.fixed_preference(model, pref):
        pass
    assert_same_state(model, state)
    assert not any(is_fixed(layer) for _, layer in pm.pareto_layers(model))


def test_exact_false_keeps_no_copy():
    model, pref = make_model(), random_pref(K)
    with pm.fixed_preference(model, pref, exact=False):
        assert all(level.saved is None for _, layer in pm.pareto_layers(model) for level in layer._fixed_levels)
    with pm.fixed_preference(model, pref):
        assert all(len(level.saved) == 1 for _, layer in pm.pareto_layers(model) for level in layer._fixed_levels)


def test_unmerge_rounding_accumulates_only_without_exact():
    # many enter/exit cycles (serving one γ after another): exact stays bit-identical, merge/unmerge drifts
    model, pref = make_model(torch.bfloat16), random_pref(K)
    state = snapshot(model)
    for _ in range(5):
        with pm.fixed_preference(model, pref):
            pass
    assert_same_state(model, state)
    for _ in range(5):
        with pm.fixed_preference(model, pref, exact=False):
            pass
    changed = any(not torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert changed  # bf16 merge/unmerge is not exact: why exact=True is the default
