"""Task-vectors (Ilharco et al.) checkpoints: whole pickled open_clip ``ImageEncoder`` s and heads.

Unpickling runs code from the file, so these load only for ``trusted=True``
pools. Renamed classes (``src.modeling``/``modeling`` ImageEncoder and
ClassificationHead, old ``open_clip.model`` transformer classes) map to
local stand-ins or current classes; old open_clip modules get the attributes
the current ``forward`` reads.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Callable, Mapping, Optional

import torch
import torch.nn as nn

from ..io import PathLike

__all__ = ["ClassificationHead", "ImageClassifier", "ImageEncoder", "load_pickled_module", "pickled_state_loader"]


class ImageEncoder(nn.Module):
    """Stand-in for task-vectors' ``src.modeling.ImageEncoder``: an open_clip model in ``self.model``.

    Unpickling restores the saved attributes (``model``, preprocess transforms, ``cache_dir``).
    """

    def __init__(self, model: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        m = self.model
        if m is None:
            raise RuntimeError("ImageEncoder has no model")
        return m.encode_image(images) if hasattr(m, "encode_image") else m(images)


class ClassificationHead(nn.Linear):
    """Stand-in for task-vectors' ``ClassificationHead``: ``nn.Linear`` with optional input L2 normalisation."""

    def __init__(self, normalize: bool, weights: torch.Tensor, biases: Optional[torch.Tensor] = None) -> None:
        out_f, in_f = weights.shape
        super().__init__(in_f, out_f)
        self.normalize = normalize
        with torch.no_grad():
            self.weight.copy_(weights)
            if biases is not None:
                self.bias.copy_(biases)
            else:
                self.bias.zero_()

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if getattr(self, "normalize", False):
            inputs = inputs / inputs.norm(dim=-1, keepdim=True)
        return super().forward(inputs)


class ImageClassifier(nn.Module):
    """Stand-in for task-vectors' ``ImageClassifier`` (encoder + head)."""

    def __init__(self, image_encoder: nn.Module, classification_head: nn.Module) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.classification_head = classification_head

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.classification_head(self.image_encoder(inputs))


class _Opaque:
    """Placeholder for pickled objects of unavailable non-model classes (e.g. torchvision transforms)."""

    def __init__(self, *args, **kwargs) -> None:
        self._args = args

    def __setstate__(self, state) -> None:
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self._state = state

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"{type(self).__name__}: a placeholder for a class that was not importable when "
                           f"the checkpoint was loaded")


_LOCAL = {"ImageEncoder": ImageEncoder, "ClassificationHead": ClassificationHead, "ImageClassifier": ImageClassifier}
_TASK_VECTOR_MODULES = ("src.modeling", "modeling", "src.heads", "heads", "task_vectors.src.modeling")
# open_clip classes that moved from open_clip.model to open_clip.transformer (renamed in some versions).
_OPEN_CLIP_RENAMES = {
    ("open_clip.model", "VisualTransformer"): ("open_clip.transformer", "VisionTransformer"),
    ("open_clip.model", "VisionTransformer"): ("open_clip.transformer", "VisionTransformer"),
    ("open_clip.model", "Transformer"): ("open_clip.transformer", "Transformer"),
    ("open_clip.model", "ResidualAttentionBlock"): ("open_clip.transformer", "ResidualAttentionBlock"),
    ("open_clip.model", "LayerNorm"): ("open_clip.transformer", "LayerNorm"),
    ("open_clip.model", "LayerNormFp32"): ("open_clip.transformer", "LayerNormFp32"),
    ("open_clip.model", "QuickGELU"): ("open_clip.transformer", "QuickGELU"),
    ("open_clip.model", "Attention"): ("open_clip.transformer", "Attention"),
    ("open_clip.model", "AttentionalPooler"): ("open_clip.transformer", "AttentionalPooler"),
    ("open_clip.model", "LayerScale"): ("open_clip.transformer", "LayerScale"),
    ("open_clip.model", "PatchDropout"): ("open_clip.transformer", "PatchDropout"),
    ("open_clip.model", "TextTransformer"): ("open_clip.transformer", "TextTransformer"),
    ("open_clip.transformer", "VisualTransformer"): ("open_clip.transformer", "VisionTransformer"),
}
_OPAQUE_PREFIXES = ("torchvision.", "PIL.", "src.", "args", "argparse")


def _map_class(module: str, name: str):
    """Map a pickled (module, name) to a local stand-in class, or to its current (module, name)."""
    if name in _LOCAL and (module in _TASK_VECTOR_MODULES or module.endswith(".modeling")
                           or module.endswith(".heads")):
        return _LOCAL[name]
    return _OPEN_CLIP_RENAMES.get((module, name), (module, name))


class _ShimUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        mapped = _map_class(module, name)
        if not isinstance(mapped, tuple):
            return mapped
        module, name = mapped
        if module.startswith("open_clip"):
            import open_clip  # noqa: F401  (imports its submodules)
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            if module.startswith(_OPAQUE_PREFIXES) or module == "__main__":
                return type(name, (_Opaque,), {"__module__": "paretomerge.pools.legacy._opaque"})
            raise


class _ShimPickleModule:
    """A ``pickle``-like module for ``torch.load(pickle_module=...)`` using the shim unpickler."""

    Unpickler = _ShimUnpickler
    __name__ = "paretomerge_pickle_shim"

    @staticmethod
    def load(f, **kw):
        return _ShimUnpickler(f, **kw).load()

    def __getattr__(self, name):  # anything else (e.g. constants) from the real pickle module
        return getattr(pickle, name)


_SHIM = _ShimPickleModule()


def _upgrade_open_clip(root: nn.Module) -> int:
    """Give open_clip modules unpickled from older versions (e.g. the 2.0.x of the task-vectors
    checkpoints) the attributes the current classes' ``forward`` reads, with the values that
    reproduce the old behaviour. Only missing attributes are set; returns how many were."""
    try:
        from open_clip import transformer as oct
    except ImportError:
        return 0
    defaults: list[tuple[type, dict]] = [
        (oct.VisionTransformer, {"patch_dropout": nn.Identity, "attn_pool": None, "attn_pool_contrastive": None,
                                 "attn_pool_type": "", "final_ln_after_pool": False, "pool_type": "tok",
                                 "output_tokens": False}),
        (oct.Transformer, {"batch_first": False, "grad_checkpointing": False}),  # old ones ran (L, N, D)
        (oct.ResidualAttentionBlock, {"ls_1": nn.Identity, "ls_2": nn.Identity}),
    ]
    n = 0
    for m in root.modules():
        for cls, attrs in defaults:
            if isinstance(m, cls):
                for name, value in attrs.items():
                    if not hasattr(m, name):
                        setattr(m, name, value() if isinstance(value, type) else value)
                        n += 1
    return n


def load_pickled_module(path: PathLike) -> nn.Module:
    """Unpickle a whole ``nn.Module`` saved with ``torch.save`` (TRUSTED files only), mapping renamed
    task-vectors/open_clip classes to current ones."""
    obj = torch.load(str(path), map_location="cpu", weights_only=False, pickle_module=_SHIM)
    if isinstance(obj, Mapping) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{str(path)!r} holds a state dict, not a pickled module; use "
                         f"ModelPool.from_state_dict_files with a pretrained module")
    if not isinstance(obj, nn.Module):
        raise ValueError(f"{str(path)!r} does not hold an nn.Module (got {type(obj).__name__})")
    _upgrade_open_clip(obj)
    obj.eval()
    return obj


def pickled_state_loader(path: Path) -> Callable[[], dict[str, torch.Tensor]]:
    def load():
        m = load_pickled_module(path)
        return {k: v.detach() for k, v in m.state_dict().items()}

    return load

