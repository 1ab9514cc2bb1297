"""CLI and config: validation errors name the field, shipped configs validate, export round-trips."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import paretomerge as pm
from paretomerge.cli import build_parser, main
from paretomerge.config import ConfigError, TrainerConfig, from_dict, load_config
from paretomerge.pools.architectures import build_architecture

from helpers import ARCH, good_config as _good, mutate as _mutate
from paretomerge.methods.pareto_merging import ParetoMergingTrainer

ROOT = Path(__file__).resolve().parents[2]  # tests/api/ -> the repository


def test_shipped_configs_validate():
    files = sorted((ROOT / "examples").glob("*.yaml"))
    assert files, "no shipped configs found"
    for f in files:
        cfg = load_config(f)
        assert cfg.pool.finetuned


def test_good_config_builds():
    cfg = from_dict(_good(), root="/tmp")
    assert cfg.trainer.mode == "unlabeled" and cfg.trainer.rank == 2
    assert cfg.path("x") == Path("/tmp/x")


@pytest.mark.parametrize("path,value,field", [
    ("pool.format", "zip", "pool.format"),
    ("pool.bogus", 1, "pool.bogus"),
    ("pool.pretrained", None, "pool.pretrained"),
    ("pool.finetuned", {}, "pool.finetuned"),
    ("pool.finetuned.a", 3, "pool.finetuned.a"),
    ("pool.heads", {"a": "x"}, "pool.heads"),
    ("pool.architecture", KeyError, "pool.architecture"),
    ("pool.architecture.kind", "tf", "pool.architecture.kind"),
    ("pool.architecture.vision_cfg", {"layerz": 2}, "pool.architecture.vision_cfg.layerz"),
    ("base.method", "magic", "base.method"),
    ("base.k", 2.0, "base.k"),
    ("mode", "supervised", "mode"),
    ("unlabeled", {"a": "ua"}, "unlabeled"),
    ("trainer.rank", 0, "trainer.rank"),
    ("trainer.lr", -1, "trainer.lr"),
    ("trainer.ranks", 4, "trainer.ranks"),
    ("trainer.mode", "datafree", "trainer.mode"),
    ("output.dir", "", "output.dir"),
    ("extra", 1, "extra"),
])
def test_config_errors_name_the_field(path, value, field):
    with pytest.raises(ConfigError) as ei:
        from_dict(_mutate(path, value))
    assert str(ei.value).startswith(field + ":"), str(ei.value)
    assert ei.value.field == field


def test_missing_file_named_on_load(tmp_path):
    import yaml
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(_good()))
    cfg = load_config(tmp_path / "c.yaml")
    from paretomerge.program import load_pool
    with pytest.raises(ConfigError, match="pool.pretrained"):
        load_pool(cfg)
    assert main(["merge", "--config", str(tmp_path / "c.yaml")]) == 2


def test_help_mentions_every_command(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    for cmd in ("demo", "merge", "export", "eval", "validate"):
        assert cmd in out
    with pytest.raises(SystemExit):
        build_parser().parse_args(["export", "--checkpoint", "x", "--pref", "0.5,0.6", "--out", "y"])


def test_export_writes_loadable_safetensors(capsys, tmp_path):
    torch.manual_seed(0)
    base = build_architecture(ARCH)
    fts = [{k: v + 0.05 * torch.randn_like(v) for k, v in base.state_dict().items()} for _ in range(3)]
    model = copy.deepcopy(base)
    cfg = TrainerConfig(steps=3, rank=2, include="attention+mlp", progress=False,
                        checkpoint_dir=str(tmp_path / "ck"))
    tr = ParetoMergingTrainer(model, None, cfg, finetuned=fts, meta={"architecture": ARCH})
    tr.train()
    ckpt = tmp_path / "ck" / "last.pt"
    out = tmp_path / "model.safetensors"
    assert main(["export", "--checkpoint", str(ckpt), "--pref", "0.5,0.3,0.2", "--out", str(out)]) == 0
    from safetensors.torch import load_file
    sd = load_file(str(out))
    fresh = build_architecture(ARCH)
    assert set(sd) == set(fresh.state_dict())
    fresh.load_state_dict(sd)  # plain, strict
    fresh.eval(), model.eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad(), pm.use_preference([0.5, 0.3, 0.2]):
        ref = model(x)
    assert torch.allclose(fresh(x), ref, atol=1e-5)
    assert not list(tmp_path.glob("*.tmp"))
    assert main(["export", "--checkpoint", str(ckpt), "--pref", "0.5,0.5", "--out", str(out)]) == 2
    assert "K = 3" in capsys.readouterr().err
