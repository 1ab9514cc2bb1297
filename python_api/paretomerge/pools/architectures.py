"""Build a model from an architecture description (a config's ``pool.architecture``, a checkpoint's meta).

Kinds: ``open_clip_vision`` (a vision tower from a ``CLIPVisionCfg``), ``open_clip`` (a model's visual
tower by name, random init) and ``hf`` (``AutoModel…from_config`` of a LOCAL directory's config.json).
Nothing is downloaded: a Hugging Face directory that does not exist is an error.

``hf_model_class`` is the one rule for which transformers class builds a Hugging Face pool's model
(``merge``, ``plan`` and ``ModelPool.from_hf_dirs`` all use it); ``check_hf_configs`` refuses directories of
different architectures before anything is built.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch.nn as nn

from ..config import ConfigError, PoolConfig, plain_data

__all__ = ["build_architecture", "check_hf_configs", "hf_model_class"]


def _hf_config(d: Path) -> dict:
    import json

    f = Path(d) / "config.json"
    try:
        cfg = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{str(f)!r} is not a readable JSON config ({type(e).__name__}: {e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{str(f)!r} does not hold a JSON object")
    return cfg


def hf_model_class(model_dir, auto_class=None, *, field: str = "pool.auto_class"):
    """The transformers class whose ``from_pretrained`` builds the model of the local directory ``model_dir``.

    ``auto_class``: a transformers class or the name of one (e.g. "AutoModelForCausalLM"; an unknown name is a
    ``ConfigError`` naming ``field``). Default: the class config.json's ``architectures`` names (the one the
    model was saved from, e.g. ``LlamaForCausalLM``, so a causal LM keeps its ``lm_head``); an
    ``architectures`` entry transformers does not have is a ValueError (a silent ``AutoModel`` would drop the
    head); ``transformers.AutoModel`` only when config.json names no architecture.
    """
    import transformers

    if auto_class is not None and not isinstance(auto_class, str):
        if not hasattr(auto_class, "from_pretrained"):
            raise TypeError(f"auto_class must be a transformers class with from_pretrained, got {auto_class!r}")
        return auto_class
    if auto_class is not None:
        cls = getattr(transformers, auto_class, None)
        if cls is None or not hasattr(cls, "from_pretrained"):
            raise ConfigError(field, f"{auto_class!r} is not a transformers auto class")
        return cls
    names = _hf_config(Path(model_dir)).get("architectures") or []
    if not names:
        return transformers.AutoModel
    name = names[0]
    cls = getattr(transformers, name, None) if isinstance(name, str) else None
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise ValueError(f"{str(Path(model_dir) / 'config.json')!r}: architectures names {name!r}, which this "
                         f"transformers {transformers.__version__} does not have; name the class to build with "
                         f"auto_class (e.g. 'AutoModelForCausalLM')")
    return cls


def check_hf_configs(dirs) -> None:
    """Refuse Hugging Face directories ({what: dir}, the first the pretrained one) whose config.json differ in
    ``model_type`` or ``architectures``: ``ArchitectureMismatchError`` naming both, before any model is built
    (building one directory's class from another's config makes a default-size model, e.g. a 7B Llama)."""
    from .pool import ArchitectureMismatchError

    (ref_what, ref_dir), *others = list(dirs.items())
    ref = _hf_config(Path(ref_dir))
    for what, d in others:
        cfg = _hf_config(Path(d))
        for key in ("model_type", "architectures"):
            if key == "architectures" and not (cfg.get(key) and ref.get(key)):
                continue  # an older config without it: model_type decides
            if cfg.get(key) != ref.get(key):
                raise ArchitectureMismatchError(
                    f"{what}: {str(d)!r} is a different architecture from {ref_what} {str(ref_dir)!r} "
                    f"(config.json {key} {cfg.get(key)!r} vs {ref.get(key)!r}); a pool merges fine-tuned copies "
                    f"of one model")


def build_architecture(arch: Mapping[str, Any]) -> nn.Module:
    """A freshly initialised model of the architecture ``arch`` describes (no weights loaded)."""
    from pydantic import ValidationError, TypeAdapter

    try:
        spec = TypeAdapter(PoolConfig.model_fields["architecture"].annotation).validate_python(
            plain_data(arch))
    except ValidationError as e:
        from ..config import _config_error
        raise _config_error(e, "architecture") from None
    except ConfigError as e:
        raise ConfigError(f"architecture.{e.field}", str(e).split(": ", 1)[1]) from None
    if spec is None:
        raise ConfigError("architecture", "required (a mapping with a 'kind')")
    if spec.kind == "open_clip_vision":
        from open_clip.model import CLIPVisionCfg, _build_vision_tower

        return _build_vision_tower(int(spec.embed_dim), CLIPVisionCfg(**dict(spec.vision_cfg)))
    if spec.kind == "open_clip":
        import open_clip

        return open_clip.create_model(spec.model_name, pretrained=None).visual
    import transformers

    d = Path(spec.dir)
    if not (d / "config.json").is_file():
        raise ConfigError("architecture.dir", f"{str(d)!r} is not a local Hugging Face model directory with a "
                                              f"config.json (nothing is downloaded)")
    cls = hf_model_class(d, spec.auto_class, field="architecture.auto_class")
    config = transformers.AutoConfig.from_pretrained(str(d), local_files_only=True)
    # an auto class dispatches on the config; a concrete class (what hf_model_class picked) is built directly
    return cls.from_config(config) if hasattr(cls, "from_config") else cls(config)
