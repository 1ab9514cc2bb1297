"""Pool formats (pools/formats.py): the registry matches the config's choices; the ``compressed`` format reads
what ``pool.compress.save`` writes, through ``paretomerge merge`` and ``paretomerge plan``."""
from __future__ import annotations

import typing

import torch

from _pool_files import TASKS, write_config, write_pool
from paretomerge.cli import main
from paretomerge.config import POOL_FORMATS, PoolConfig, load_config
from paretomerge.plan import safetensors_bytes
from paretomerge.pools.formats import POOL_LOADERS
from paretomerge.program import load_pool


def test_registry_is_the_config_choices():
    assert tuple(POOL_LOADERS) == POOL_FORMATS
    assert typing.get_args(PoolConfig.model_fields["format"].annotation) == POOL_FORMATS


def _compressed_config(root, cfg: dict) -> dict:
    """``cfg`` (format files) turned into format compressed over root/tv.safetensors."""
    pool = dict(cfg["pool"], format="compressed", finetuned={t: "tv.safetensors" for t in TASKS})
    return {**cfg, "pool": pool, "output": {"dir": "out_compressed"}}


def test_compressed_format_merge_and_plan(tmp_path, capsys):
    cfg = write_pool(tmp_path)
    cfg["pool"]["compress"] = {"rank": 2, "save": "tv.safetensors"}
    assert main(["merge", "--config", str(write_config(tmp_path, cfg))]) == 0
    assert (tmp_path / "tv.safetensors").is_file()
    dense = load_pool(load_config(tmp_path / "c.yaml"))  # compressed in memory, as the first run trained on

    ccfg = _compressed_config(tmp_path, {k: v for k, v in cfg.items()})
    ccfg["pool"] = {k: v for k, v in ccfg["pool"].items() if k != "compress"}
    path = write_config(tmp_path, ccfg, "cc.yaml")
    pool = load_pool(load_config(path))
    assert list(pool.task_names) == list(TASKS)
    for k in range(len(TASKS)):  # the same task vectors as the pool the file was saved from
        a, b = pool.task_vector(k), dense.task_vector(k)
        assert a.keys() == b.keys()
        for n in a:
            torch.testing.assert_close(a[n], b[n], rtol=1e-5, atol=1e-6)
    assert pool.heads is not None and set(pool.heads) == set(TASKS)

    capsys.readouterr()
    assert main(["plan", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"| deltas_lowrank | {safetensors_bytes(tmp_path / 'tv.safetensors')} |" in out  # the file's factors
    assert main(["merge", "--config", str(path)]) == 0
    assert (tmp_path / "out_compressed" / "pareto_merged.pt").is_file()


def test_compressed_format_bad_configs_are_one_line_errors(tmp_path, capsys):
    cfg = write_pool(tmp_path)
    cfg["pool"]["compress"] = {"rank": 2, "save": "tv.safetensors"}
    write_config(tmp_path, cfg)
    assert main(["merge", "--config", str(tmp_path / "c.yaml")]) == 0
    ccfg = _compressed_config(tmp_path, cfg)
    ccfg["pool"].pop("compress")
    two = {**ccfg, "pool": {**ccfg["pool"], "finetuned": {**ccfg["pool"]["finetuned"], "a": "a.safetensors"}}}
    capsys.readouterr()
    assert main(["merge", "--config", str(write_config(tmp_path, two, "two.yaml"))]) == 2
    assert "pool.finetuned: format 'compressed': every task names the same compressed file" in capsys.readouterr().err
    fewer = {**ccfg, "pool": {**ccfg["pool"], "finetuned": {"a": "tv.safetensors", "b": "tv.safetensors"},
                              "heads": {"a": "ha.safetensors", "b": "hb.safetensors"}}}
    assert main(["merge", "--config", str(write_config(tmp_path, fewer, "fewer.yaml"))]) == 2
    assert "pool.finetuned: must name the tasks of" in capsys.readouterr().err


def test_compressed_format_over_a_hugging_face_directory(tmp_path, capsys, no_network):
    """Without ``pool.architecture`` the pretrained model is a local Hugging Face directory; checkpoints record it."""
    import yaml

    import helpers  # noqa: F401 - puts examples/ (tiny_llama) on sys.path
    from paretomerge.program import checkpoint_architecture
    from tiny_llama import make_tiny_llama_dirs

    d = make_tiny_llama_dirs(tmp_path, tasks=("a", "b"))
    hf = {"pool": {"format": "hf", "pretrained": str(d["pretrained"]), "finetuned": {t: str(d[t]) for t in "ab"},
                   "compress": {"rank": 2, "save": "tv.safetensors"}}}
    (tmp_path / "hf.yaml").write_text(yaml.safe_dump(hf))
    dense = load_pool(load_config(tmp_path / "hf.yaml"))  # compresses, saves tv.safetensors
    cc = {"pool": {"format": "compressed", "pretrained": str(d["pretrained"]),
                   "finetuned": {t: "tv.safetensors" for t in "ab"}}}
    (tmp_path / "cc.yaml").write_text(yaml.safe_dump(cc))
    cfg = load_config(tmp_path / "cc.yaml")
    pool = load_pool(cfg)
    for k in range(2):
        a, b = pool.task_vector(k), dense.task_vector(k)
        for n in a:
            torch.testing.assert_close(a[n], b[n], rtol=1e-5, atol=1e-6)
    assert checkpoint_architecture(cfg) == {"kind": "hf", "dir": str(d["pretrained"].resolve()),
                                            "auto_class": "LlamaForCausalLM"}
    capsys.readouterr()
    assert main(["plan", str(tmp_path / "cc.yaml")]) == 0
    assert f"| deltas_lowrank | {safetensors_bytes(tmp_path / 'tv.safetensors')} |" in capsys.readouterr().out
