"""A model pool over a frozen trunk: only the tail (the layers after the trunk) is fine-tuned and merged, so the
trunk's outputs are computed once and cached; each task gets a frozen prototype head.

    feats = trunk_features(trunk, inputs, cache="feats.pt")          # (N, ...) once, then read from disk
    head = prototype_head(tail(feats_train), labels, num_classes)    # nearest-centroid head, frozen
    pool = trunk_pool(tail, {"a": tail_a, "b": tail_b}, heads)       # a ModelPool of the tails

Caching the trunk is exact only while no merge touches it: merge the tail, and everything the trunk holds
stays the pretrained model's (e.g. BERT's embeddings when all encoder layers are the tail).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping, Optional, Union

import torch
import torch.nn as nn

from ..io import atomic_write
from .pool import ModelPool

__all__ = ["prototype_head", "trunk_features", "trunk_pool"]


@torch.no_grad()
def prototype_head(features: torch.Tensor, labels: torch.Tensor, num_classes: int, *, shots: Optional[int] = 4,
                   scale: float = 10.0) -> nn.Linear:
    """A frozen nearest-centroid head over pooled features (N, D) with labels (N,) in [0, num_classes).

    Row c of its weight is τ·(m_c − m)/‖m_c − m‖ (m_c the mean of class c's first ``shots`` examples, None = all;
    m the mean of all features), bias −W m, τ = ``scale`` / mean ‖z − m‖: logits are scaled cosines to centred
    class prototypes. It plays the part of CLIP's zero-shot head in task arithmetic: fixed, so it stays valid
    for merged models, and built from few examples, so fine-tuning the tail has work to do."""
    if not isinstance(features, torch.Tensor) or features.dim() != 2:
        raise ValueError(f"features must be a (N, D) tensor, got {getattr(features, 'shape', type(features))}")
    if not isinstance(labels, torch.Tensor) or labels.shape != features.shape[:1]:
        raise ValueError(f"labels must be a ({features.shape[0]},) tensor, got {getattr(labels, 'shape', labels)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    z = features.float()
    m = z.mean(0)
    protos = []
    for c in range(num_classes):
        idx = torch.nonzero(labels == c).flatten()
        if idx.numel() == 0:
            raise ValueError(f"labels: class {c} has no example")
        protos.append(z[idx[:shots] if shots is not None else idx].mean(0) - m)
    P = torch.stack(protos)
    tau = scale / (z - m).norm(dim=1).mean().clamp_min(1e-12)
    head = nn.Linear(z.shape[1], num_classes)
    head.weight.copy_(tau * P / P.norm(dim=1, keepdim=True).clamp_min(1e-12))
    head.bias.copy_(-head.weight @ m)
    return head.requires_grad_(False).eval()


def trunk_features(trunk: Callable[[object], torch.Tensor], inputs, cache: Union[None, str, Path] = None
                   ) -> torch.Tensor:
    """``trunk(inputs)`` under no_grad, cached at ``cache`` (a .pt file written atomically; read back when it
    exists — the caller keys the file name by whatever changes the features)."""
    if cache is not None and Path(cache).exists():
        return torch.load(cache, weights_only=True)
    with torch.no_grad():
        out = trunk(inputs)
    if cache is not None:
        atomic_write(cache, lambda tmp: torch.save(out, tmp))
    return out


def trunk_pool(tail: nn.Module, finetuned_tails: Mapping[str, nn.Module],
               heads: Optional[Mapping[str, nn.Module]] = None) -> ModelPool:
    """``ModelPool.from_modules`` over the tails (pretrained tail + K fine-tuned copies), with the heads."""
    if not finetuned_tails:
        raise ValueError("finetuned_tails must name at least one fine-tuned tail")
    return ModelPool.from_modules(tail, dict(finetuned_tails), heads=None if heads is None else dict(heads))
