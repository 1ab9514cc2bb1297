"""Accuracy of a (converted or plain) model under a preference: said once, used by the demo and the CLI."""
from __future__ import annotations

from contextlib import nullcontext
from typing import Mapping, Optional

import torch
import torch.nn as nn

from ..layers import PrefLike, use_preference

__all__ = ["accuracy", "evaluate_tasks"]


@torch.no_grad()
def accuracy(model: nn.Module, head: nn.Module, inputs: torch.Tensor, labels: torch.Tensor,
             pref: Optional[PrefLike] = None) -> float:
    """Top-1 accuracy of ``head(model(inputs))`` against ``labels`` (N,), under ``pref`` if given.

    The model is put in eval mode (a converted model's Pareto layers need a preference: pass it here,
    or have one active).
    """
    model.eval()
    with use_preference(pref) if pref is not None else nullcontext():
        logits = head(model(inputs))
    return float((logits.argmax(-1) == labels).float().mean())


def evaluate_tasks(model: nn.Module, heads: Mapping[str, nn.Module],
                   data: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                   pref: Optional[PrefLike] = None) -> dict[str, float]:
    """{task: accuracy} over ``data[task] = (inputs, labels)`` with each task's head, under ``pref``."""
    return {t: accuracy(model, heads[t], x, y, pref=pref) for t, (x, y) in data.items()}
