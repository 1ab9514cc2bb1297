"""Build a model from an architecture description (a config's ``pool.architecture``, a checkpoint's meta).

Kinds: ``open_clip_vision`` (a vision tower from a ``CLIPVisionCfg``), ``open_clip`` (a model's visual
tower by name, random init) and ``hf`` (``AutoModel…from_config`` of a LOCAL directory's config.json).
Nothing is downloaded: a Hugging Face directory that does not exist is an error.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch.nn as nn

from ..config import ConfigError, PoolConfig, plain_data

__all__ = ["build_architecture"]


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
    auto = getattr(transformers, spec.auto_class, None)
    if auto is None or not hasattr(auto, "from_config"):
        raise ConfigError("architecture.auto_class", f"{spec.auto_class!r} is not a transformers auto class")
    return auto.from_config(transformers.AutoConfig.from_pretrained(str(d), local_files_only=True))
