"""Regression tests for the contract gaps found by probing (issue 11): strict configs, CLI errors,
network-free architectures, reference-algorithm agreement, the paper's presets, compile with pref=."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn

import paretomerge as pm
from paretomerge.cli import main
from paretomerge.config import ConfigError, TrainerConfig, from_dict
from paretomerge.methods import adamerging, task_arithmetic, ties_merging
from paretomerge.methods.ties import _trim_threshold
from paretomerge.pools import ModelPool
from paretomerge.pools.architectures import build_architecture

from helpers import good_config as _good, mutate as _mutate


# ----------------------------------------------------------------------------- config strictness
@pytest.mark.parametrize("path,value,field", [
    ("trainer", [1, 2], "trainer"),
    ("trainer.per_sample", "yes", "trainer.per_sample"),
    ("trainer.progress", "no", "trainer.progress"),
    ("base.k", True, "base.k"),
    ("trainer.weight_decay", math.inf, "trainer.weight_decay"),
    ("trainer.reg_frobenius", math.nan, "trainer.reg_frobenius"),
    ("trainer.ideal", [math.nan, 0.0], "trainer.ideal.0"),
    ("trainer.lr", "1e-3", "trainer.lr"),
    ("base.lam", [0.1, 0.2], "base.lam"),  # two tasks but method ties below
])
def test_strict_types_and_finite_floats(path, value, field):
    d = _mutate(path, value)
    if path == "base.lam":
        d["base"]["method"] = "ties"
    with pytest.raises(ConfigError) as ei:
        from_dict(d)
    assert ei.value.field == field, str(ei.value)


def test_trainer_config_accepts_any_sequence_for_ideal():
    assert TrainerConfig(ideal=(0.0, 0.1)).ideal == [0.0, 0.1]
    assert TrainerConfig(ideal=torch.tensor([0.0, 0.5]).tolist()).ideal == [0.0, 0.5]


def test_schema_is_available():
    schema = pm.MergeConfig.model_json_schema()
    assert "pool" in schema["properties"] and "trainer" in schema["properties"]


# ----------------------------------------------------------------------------- CLI: one line, exit 2
def test_cli_pref_must_be_finite(capsys):
    with pytest.raises(SystemExit) as ei:
        main(["export", "--checkpoint", "x.pt", "--pref", "nan,0,0,1", "--out", "m.safetensors"])
    assert ei.value.code == 2
    assert "finite" in capsys.readouterr().err


def test_cli_export_out_must_be_a_file(tmp_path, capsys):
    assert main(["export", "--checkpoint", "x.pt", "--pref", "0.5,0.5", "--out", str(tmp_path) + "/"]) == 2
    assert "directory" in capsys.readouterr().err


def test_cli_eval_out_that_is_a_file(tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(SystemExit) as ei:
        main(["eval", "--checkpoint", "c.pt", "--config", "c.yaml", "--out", str(f)])
    assert ei.value.code == 2 and "existing file" in capsys.readouterr().err


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"PK\x03\x04garbage"])
def test_cli_bad_checkpoint_is_one_line(tmp_path, capsys, content):
    ck = tmp_path / "bad.pt"
    ck.write_bytes(content)
    rc = main(["export", "--checkpoint", str(ck), "--pref", "0.5,0.5", "--out", str(tmp_path / "m.safetensors")])
    err = capsys.readouterr().err
    assert rc == 2 and str(ck) in err and len(err.strip().splitlines()) == 1, err


def test_cli_corrupt_safetensors_in_pool_is_one_line(tmp_path, capsys):
    import yaml

    d = _good()
    d["mode"] = "datafree"
    del d["unlabeled"]
    for name in ("p", "a", "b", "ha", "hb"):
        (tmp_path / f"{name}.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{broken json")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(d))
    rc = main(["merge", "--config", str(tmp_path / "c.yaml")])
    err = capsys.readouterr().err
    assert rc == 2 and "safetensors" in err and len(err.strip().splitlines()) == 1, err


# ----------------------------------------------------------------------------- no network
def test_hf_architecture_needs_a_local_directory(tmp_path, monkeypatch):
    import transformers

    def no_network(*a, **k):
        raise AssertionError("from_pretrained must not be reached for a missing directory")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", no_network)
    with pytest.raises(ConfigError, match="architecture.dir"):
        build_architecture({"kind": "hf", "dir": "bert-base-uncased"})  # a hub id, not a local dir


def test_hf_architecture_loads_local_files_only(tmp_path, monkeypatch):
    import transformers

    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32)
    cfg.save_pretrained(tmp_path)
    seen = {}
    real = transformers.AutoConfig.from_pretrained

    def spy(*a, **k):
        seen.update(k)
        return real(*a, **k)

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", spy)
    m = build_architecture({"kind": "hf", "dir": str(tmp_path)})
    assert isinstance(m, nn.Module) and seen.get("local_files_only") is True


# ----------------------------------------------------------------------------- reference algorithms
class _Lin(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
        with torch.no_grad():
            self.lin.weight.copy_(w)

    def forward(self, x):
        return self.lin(x)


def _pool(K=3, shape=(6, 5), seed=0):
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
    pool = _pool()
    assert isinstance(ties_merging(pool, k=0.001), nn.Module)  # keeps nothing: the pretrained model


def test_task_arithmetic_accepts_one_lambda_per_task():
    pool = _pool()
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
    pool = _pool(K=2, shape=(3, 4))
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


# ----------------------------------------------------------------------------- the paper's presets and defaults
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


# ----------------------------------------------------------------------------- torch.compile with pref=
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
