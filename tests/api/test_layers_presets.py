"""The paper's presets and defaults on Pareto layers (parameter counts, the "qkv" variant exported and rebuilt),
and torch.compile with an explicit pref=."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import paretomerge as pm
from paretomerge.config import TrainerConfig


def test_paper_parameter_count_vit_b32():
    """Attention-only (q/k/v) at r = 16, K = 8 on ViT-B/32: 0.61 M parameters; with the MLP: 2.1 M."""
    from open_clip.model import CLIPVisionCfg, _build_vision_tower

    def count(include):
        with torch.device("meta"):
            enc = _build_vision_tower(512, CLIPVisionCfg(layers=12, width=768, patch_size=32, image_size=224))
        pm.convert(enc, 8, 16, include=include)
        return sum(p.numel() for p in pm.pareto_parameters(enc))

    assert round(count("qkv") / 1e6, 2) == 0.61
    assert round(count("qkv+mlp") / 1e6, 1) == 2.1
    assert round(count("attention") / 1e6, 2) == 0.93
    d = TrainerConfig()
    assert (d.include, d.rank, d.steps) == ("qkv", 16, 2000)


def test_qkv_model_exports_and_rebuilds():
    from paretomerge.methods.pareto_merging import reconvert

    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    host = nn.Sequential()
    host.add_module("attn", mha)
    ref = copy.deepcopy(host)
    pm.convert(host, 2, 3, include="qkv")
    assert isinstance(host.attn.out_proj, nn.Linear) and not isinstance(host.attn.out_proj, pm.ParetoLinear)
    keys = [k for k, *_ in pm.layers.factored_weights(host)]
    assert keys == ["attn.in_proj_weight"]
    with torch.no_grad():
        host.attn.in_proj_U.normal_()
    x = torch.randn(2, 5, 8)
    p = [0.3, 0.7]
    with torch.no_grad(), pm.use_preference(p):
        y = host.attn(x, x, x, need_weights=False)[0]
    plain = pm.export(host, p)
    assert isinstance(plain.attn, nn.MultiheadAttention)
    assert torch.allclose(plain.attn(x, x, x, need_weights=False)[0], y, atol=1e-5)
    assert set(plain.state_dict()) == set(ref.state_dict())
    rebuilt = copy.deepcopy(ref)
    reconvert(rebuilt, 2, {"attn": 3}, attention_out_proj=False)
    rebuilt.load_state_dict(host.state_dict())


def test_compile_fullgraph_with_explicit_pref():
    torch._dynamo.reset()
    layer = pm.ParetoLinear(6, 5, num_objectives=3, rank=2, impl="torch")
    with torch.no_grad():
        layer.U.normal_()
    x = torch.randn(4, 6)
    p = torch.tensor([0.2, 0.3, 0.5])
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    assert torch.allclose(compiled(x, pref=p), layer(x, pref=p), atol=1e-6)
    with pytest.raises(ValueError, match="sum"):  # eager calls still check the values
        layer(x, pref=torch.tensor([0.5, 0.5, 0.5]))
