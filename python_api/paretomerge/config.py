"""Configuration of ``paretomerge merge`` / ``eval``: dataclasses, a validator, loaders.

A YAML file (see ``examples/merge_demo.yaml``)::

    pool:
      format: files            # files | open_clip | hf
      architecture: {kind: open_clip_vision, embed_dim: 32, vision_cfg: {layers: 2, width: 64, ...}}
      pretrained: pool/pretrained.safetensors
      finetuned: {digits: pool/digits.safetensors, ...}
      heads: {digits: pool/head_digits.safetensors, ...}      # optional; needed for mode unlabeled / eval
    base: {method: task_arithmetic, lam: 0.3}                   # task_arithmetic | ties | pretrained
    mode: datafree                                              # datafree | unlabeled
    unlabeled: {digits: data/digits_unlabeled.safetensors, ...} # mode unlabeled: tensor "inputs"
    eval_data: {digits: data/digits_test.safetensors, ...}      # tensors "inputs", "labels"
    trainer: {steps: 200, rank: 8, ...}                         # any TrainerConfig field
    output: {dir: merged}

Relative paths are resolved against the directory of the config file.
Unknown keys anywhere are errors; every error names the offending field
(``pool.format``, ``trainer.rank`` …). ``validate`` checks structure and
values only; missing files are reported (naming the field) when loading.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
import torch.nn as nn

from .trainer import TrainerConfig

POOL_FORMATS = ("files", "open_clip", "hf")
BASE_METHODS = ("task_arithmetic", "ties", "pretrained")
ARCH_KINDS = ("open_clip_vision", "open_clip", "hf")


class ConfigError(ValueError):
    """A bad config value; the message starts with the dotted field name."""

    def __init__(self, fieldname: str, msg: str) -> None:
        super().__init__(f"{fieldname}: {msg}")
        self.field = fieldname


@dataclass
class PoolConfig:
    format: str = "files"
    architecture: Optional[dict] = None
    pretrained: Optional[str] = None
    finetuned: dict = field(default_factory=dict)
    heads: Optional[dict] = None
    trusted: bool = False


@dataclass
class BaseConfig:
    method: str = "task_arithmetic"
    lam: Optional[float] = None   # task arithmetic's λ (default 0.3) / TIES' λ (default 1.0)
    k: float = 0.2                # TIES: fraction of each task vector kept


@dataclass
class OutputConfig:
    dir: str = "paretomerge_out"


@dataclass
class MergeConfig:
    pool: PoolConfig
    base: BaseConfig = field(default_factory=BaseConfig)
    mode: str = "datafree"
    unlabeled: Optional[dict] = None
    eval_data: Optional[dict] = None
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    root: str = "."  # directory relative paths are resolved against (the config file's)

    def path(self, p: str) -> Path:
        q = Path(p).expanduser()
        return q if q.is_absolute() else Path(self.root) / q


def _from_mapping(cls, data: Any, prefix: str, skip: tuple = ()):
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(prefix, f"must be a mapping, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)} - set(skip)
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{prefix}.{unknown[0]}", f"unknown key (known keys: {sorted(names)})")
    return cls(**dict(data))


def _check_str_map(value: Any, fieldname: str, *, required: bool = True) -> None:
    if value is None and not required:
        return
    if not isinstance(value, Mapping) or not value:
        raise ConfigError(fieldname, f"must be a non-empty mapping of task name -> path, got {value!r}")
    for k, v in value.items():
        if not isinstance(v, str) or not v:
            raise ConfigError(f"{fieldname}.{k}", f"must be a path string, got {v!r}")


def _check_architecture(arch: Any, fieldname: str) -> None:
    if not isinstance(arch, Mapping):
        raise ConfigError(fieldname, f"must be a mapping with a 'kind' ({ARCH_KINDS}), got {arch!r}")
    kind = arch.get("kind")
    if kind not in ARCH_KINDS:
        raise ConfigError(f"{fieldname}.kind", f"must be one of {ARCH_KINDS}, got {kind!r}")
    allowed = {"open_clip_vision": {"kind", "embed_dim", "vision_cfg"}, "open_clip": {"kind", "model_name"},
               "hf": {"kind", "dir", "auto_class"}}[kind]
    unknown = sorted(set(arch) - allowed)
    if unknown:
        raise ConfigError(f"{fieldname}.{unknown[0]}", f"unknown key for kind {kind!r} (known: {sorted(allowed)})")
    if kind == "open_clip_vision":
        if not isinstance(arch.get("embed_dim"), int) or arch["embed_dim"] < 1:
            raise ConfigError(f"{fieldname}.embed_dim", f"must be a positive int, got {arch.get('embed_dim')!r}")
        if not isinstance(arch.get("vision_cfg"), Mapping):
            raise ConfigError(f"{fieldname}.vision_cfg", "must be a mapping of open_clip CLIPVisionCfg fields")
        from open_clip.model import CLIPVisionCfg
        known = {f.name for f in dataclasses.fields(CLIPVisionCfg)}
        bad = sorted(set(arch["vision_cfg"]) - known)
        if bad:
            raise ConfigError(f"{fieldname}.vision_cfg.{bad[0]}", "unknown CLIPVisionCfg field")
    elif kind == "open_clip" and not isinstance(arch.get("model_name"), str):
        raise ConfigError(f"{fieldname}.model_name", "must be an open_clip model name")
    elif kind == "hf" and not isinstance(arch.get("dir"), str):
        raise ConfigError(f"{fieldname}.dir", "must be a Hugging Face model directory")


def validate(cfg: MergeConfig) -> MergeConfig:
    """Check every field's type and value; raise ``ConfigError`` naming the first bad field."""
    p = cfg.pool
    if p.format not in POOL_FORMATS:
        raise ConfigError("pool.format", f"must be one of {POOL_FORMATS}, got {p.format!r}")
    if not isinstance(p.pretrained, str) or not p.pretrained:
        raise ConfigError("pool.pretrained", f"must be a path (file, or directory for format hf), got {p.pretrained!r}")
    _check_str_map(p.finetuned, "pool.finetuned")
    _check_str_map(p.heads, "pool.heads", required=False)
    if p.heads is not None and set(p.heads) != set(p.finetuned):
        raise ConfigError("pool.heads", f"must name the same tasks as pool.finetuned ({sorted(p.finetuned)}), "
                                        f"got {sorted(p.heads)}")
    if p.format == "files":
        if p.architecture is None:
            raise ConfigError("pool.architecture", "required for format 'files' (how to build the model)")
        _check_architecture(p.architecture, "pool.architecture")
    elif p.architecture is not None:
        raise ConfigError("pool.architecture", f"only used with format 'files', not {p.format!r}")
    if not isinstance(p.trusted, bool):
        raise ConfigError("pool.trusted", f"must be true or false, got {p.trusted!r}")
    b = cfg.base
    if b.method not in BASE_METHODS:
        raise ConfigError("base.method", f"must be one of {BASE_METHODS}, got {b.method!r}")
    if b.lam is not None and (not isinstance(b.lam, (int, float)) or isinstance(b.lam, bool)):
        raise ConfigError("base.lam", f"must be a number, got {b.lam!r}")
    if not isinstance(b.k, (int, float)) or not 0 < b.k <= 1:
        raise ConfigError("base.k", f"must be a fraction in (0, 1], got {b.k!r}")
    if cfg.mode not in ("datafree", "unlabeled"):
        raise ConfigError("mode", f"must be 'datafree' or 'unlabeled', got {cfg.mode!r}")
    if cfg.mode == "unlabeled":
        _check_str_map(cfg.unlabeled, "unlabeled")
        if set(cfg.unlabeled) != set(p.finetuned):
            raise ConfigError("unlabeled", f"must name every task of pool.finetuned ({sorted(p.finetuned)})")
        if p.heads is None and p.format != "open_clip":
            raise ConfigError("pool.heads", "required for mode 'unlabeled' (the entropy of each task's head)")
    else:
        _check_str_map(cfg.unlabeled, "unlabeled", required=False)
    _check_str_map(cfg.eval_data, "eval_data", required=False)
    if cfg.trainer.mode != cfg.mode:
        raise ConfigError("trainer.mode", f"set the mode at the top level ('mode: {cfg.trainer.mode}')")
    try:
        cfg.trainer.validate()
    except ValueError as e:
        raise ConfigError(str(e).split(":")[0], str(e).split(":", 1)[1].strip()) from None
    if not isinstance(cfg.output.dir, str) or not cfg.output.dir:
        raise ConfigError("output.dir", f"must be a directory path, got {cfg.output.dir!r}")
    return cfg


def from_dict(data: Any, root: Union[str, Path] = ".") -> MergeConfig:
    """Build and validate a ``MergeConfig`` from plain data (as parsed from YAML)."""
    if not isinstance(data, Mapping):
        raise ConfigError("<root>", f"the config must be a mapping, got {type(data).__name__}")
    known = {"pool", "base", "mode", "unlabeled", "eval_data", "trainer", "output"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(unknown[0], f"unknown key (known keys: {sorted(known)})")
    if "pool" not in data:
        raise ConfigError("pool", "required")
    mode = data.get("mode", "datafree")
    tr = dict(data.get("trainer") or {})
    if not isinstance(data.get("trainer") or {}, Mapping):
        raise ConfigError("trainer", "must be a mapping")
    if "mode" in tr:
        raise ConfigError("trainer.mode", "set the mode at the top level (mode: datafree|unlabeled)")
    tr["mode"] = mode
    cfg = MergeConfig(
        pool=_from_mapping(PoolConfig, data["pool"], "pool"),
        base=_from_mapping(BaseConfig, data.get("base"), "base"),
        mode=mode,
        unlabeled=data.get("unlabeled"),
        eval_data=data.get("eval_data"),
        trainer=_from_mapping(TrainerConfig, tr, "trainer"),
        output=_from_mapping(OutputConfig, data.get("output"), "output"),
        root=str(root),
    )
    return validate(cfg)


def load_config(path: Union[str, Path]) -> MergeConfig:
    """Read, build and validate a YAML config; relative paths resolve against its directory."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such config file: {str(path)!r}")
    with open(path) as fh:
        try:
            data = yaml.safe_load(fh)
        except yaml.YAMLError as e:
            raise ConfigError("<yaml>", f"{path} is not valid YAML: {e}") from None
    return from_dict(data, root=path.resolve().parent)


# ----------------------------------------------------------------------------- building things
def build_architecture(arch: Mapping[str, Any]) -> nn.Module:
    """A freshly initialised model of the architecture ``arch`` describes (no weights loaded)."""
    _check_architecture(arch, "architecture")
    kind = arch["kind"]
    if kind == "open_clip_vision":
        from open_clip.model import CLIPVisionCfg, _build_vision_tower

        return _build_vision_tower(int(arch["embed_dim"]), CLIPVisionCfg(**dict(arch["vision_cfg"])))
    if kind == "open_clip":
        import open_clip

        return open_clip.create_model(arch["model_name"], pretrained=None).visual
    import transformers

    auto = getattr(transformers, arch.get("auto_class", "AutoModel"))
    return auto.from_config(transformers.AutoConfig.from_pretrained(arch["dir"]))


def _need_file(cfg: MergeConfig, p: str, fieldname: str) -> Path:
    q = cfg.path(p)
    if not q.exists():
        raise ConfigError(fieldname, f"no such file or directory: {str(q)!r}")
    return q


def _head_from_state(sd: Mapping[str, torch.Tensor]) -> nn.Module:
    w = sd["weight"]
    head = nn.Linear(w.shape[1], w.shape[0], bias="bias" in sd)
    head.load_state_dict(dict(sd))
    return head


def load_pool(cfg: MergeConfig):
    """The ``ModelPool`` the config describes (files are checked, naming the field)."""
    from .io import load_state_dict
    from .pool import ModelPool

    p = cfg.pool
    pre = _need_file(cfg, p.pretrained, "pool.pretrained")
    fts = {t: _need_file(cfg, f, f"pool.finetuned.{t}") for t, f in p.finetuned.items()}
    heads_paths = {t: _need_file(cfg, f, f"pool.heads.{t}") for t, f in (p.heads or {}).items()}
    if p.format == "files":
        model = build_architecture(p.architecture)
        model.load_state_dict(load_state_dict(pre))
        heads = {t: _head_from_state(load_state_dict(f)) for t, f in heads_paths.items()} or None
        return ModelPool.from_state_dict_files(model, fts, heads=heads)
    if p.format == "open_clip":
        return ModelPool.from_open_clip_checkpoints(pre, fts, heads_paths or None, trusted=p.trusted)
    heads = {t: _head_from_state(load_state_dict(f)) for t, f in heads_paths.items()} or None
    pool = ModelPool.from_hf_dirs(pre, fts)
    if heads:
        pool.heads = heads
    return pool


def load_tensors(cfg: MergeConfig, mapping: Mapping[str, str], fieldname: str, keys=("inputs",)) -> dict:
    """{task: {key: tensor}} from safetensors/torch files holding the named tensors."""
    from .io import load_state_dict

    out = {}
    for t, f in mapping.items():
        sd = load_state_dict(_need_file(cfg, f, f"{fieldname}.{t}"))
        for k in keys:
            if k not in sd:
                raise ConfigError(f"{fieldname}.{t}", f"file has no tensor {k!r} (has {sorted(sd)})")
        out[t] = {k: sd[k] for k in keys}
    return out
