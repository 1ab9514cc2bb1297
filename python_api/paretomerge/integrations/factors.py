"""The Pareto factors file: what a trained Pareto model adds to its base merge, per weight.

A safetensors file holding, for every factored weight (its state-dict key ``key`` in the plain model),
the tensors ``key:U`` (out, r), ``key:G`` (r, r, K), ``key:V`` (in, r) and ``key:W_stats`` (2,) float64:
(Σ W, Σ W²) of the base weight the factors were trained on, a fingerprint that lets a reader check it
rebuilt the same base merge. Metadata (all strings): ``format`` = ``paretomerge-factors-v1``,
``task_names`` (JSON list, the order of γ), ``base`` (JSON: the base merge, e.g.
``{"method": "task_arithmetic", "lam": 0.3}``).

W(γ) = W_base + U (Σ_k γ_k G_k) Vᵀ for these keys; every other tensor is the base merge.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.nn as nn

from ..config import BaseConfig, plain_data
from ..io import PathLike, atomic_write
from ..layers import factored_weights

__all__ = ["FACTORS_FORMAT", "FactorsFileError", "ParetoFactors", "save_factors", "weight_stats"]

FACTORS_FORMAT = "paretomerge-factors-v1"


def weight_stats(w: torch.Tensor) -> torch.Tensor:
    """(Σ w, Σ w²) in float64: the fingerprint of a base weight."""
    w = w.detach().to(torch.float64)
    return torch.stack([w.sum(), (w * w).sum()]).cpu()


@torch.no_grad()
def save_factors(model: nn.Module, path: PathLike, *, base: Mapping[str, Any],
                 task_names: Optional[Sequence[str]] = None) -> list[str]:
    """Write the factors of every Pareto layer of ``model`` to ``path`` (safetensors, atomic); return the keys.

    base: how the base merge the model was trained on was made, as a config's ``base`` section
        (``{"method": "task_arithmetic", "lam": 0.3}``, ``{"method": "ties", "k": 0.2, "lam": 1.0,
        "scope": "tensor"}``, ``{"method": "pretrained"}``); any mapping (Hydra's DictConfig too).
    task_names: the K tasks in γ's order (default task0 … task{K-1}).
    """
    from safetensors.torch import save_file

    base_cfg = BaseConfig(**plain_data(dict(base)))
    slots = factored_weights(model)
    if not slots:
        raise ValueError("save_factors: model has no Pareto layers (convert and train it first)")
    K = slots[0][2].shape[-1]
    names = [f"task{k}" for k in range(K)] if task_names is None else [str(t) for t in task_names]
    if len(names) != K:
        raise ValueError(f"task_names has {len(names)} entries but the model has K = {K} objectives")
    tensors: dict[str, torch.Tensor] = {}
    for key, U, G, V, W in slots:
        for part, t in (("U", U), ("G", G), ("V", V)):
            tensors[f"{key}:{part}"] = t.detach().cpu().contiguous().clone()
        tensors[f"{key}:W_stats"] = weight_stats(W)
    meta = {"format": FACTORS_FORMAT, "task_names": json.dumps(names),
            "base": json.dumps(base_cfg.model_dump(exclude_none=True))}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    return [s[0] for s in slots]


class FactorsFileError(ValueError):
    """A Pareto factors file that cannot be read (corrupt, truncated, not one, bad metadata); names the file."""


class ParetoFactors:
    """A factors file opened for reading: ``keys`` (the factored weights), ``task_names``, ``base``
    (a ``BaseConfig``), ``factors(key)`` -> (U, G, V), ``check_base(key, W)``."""

    def __init__(self, path: PathLike) -> None:
        from safetensors import safe_open

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"factors: no such Pareto factors file {str(path)!r}")
        try:
            with safe_open(str(self.path), framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                names = list(f.keys())
        except Exception as e:  # safetensors' own error on a corrupt / truncated file: name the file
            raise FactorsFileError(f"factors: {str(path)!r} is not a readable safetensors file "
                                   f"({type(e).__name__}: {e})") from None
        if meta.get("format") != FACTORS_FORMAT:
            raise FactorsFileError(f"factors: {str(path)!r} is not a Pareto factors file (metadata format "
                                   f"{meta.get('format')!r}, expected {FACTORS_FORMAT!r}); write one with "
                                   f"paretomerge.integrations.factors.save_factors")
        try:
            self.task_names: list[str] = [str(t) for t in json.loads(meta["task_names"])]
            self.base = BaseConfig(**json.loads(meta["base"]))
        except Exception as e:  # noqa: BLE001 - missing / malformed metadata (KeyError, JSON, pydantic)
            raise FactorsFileError(f"factors: {str(path)!r} has unreadable metadata ({type(e).__name__}: "
                                   f"{str(e).splitlines()[0] if str(e) else ''})") from None
        self.keys = sorted({n.rsplit(":", 1)[0] for n in names})
        parts = {n for n in names}
        broken = [k for k in self.keys if not all(f"{k}:{x}" in parts for x in ("U", "G", "V", "W_stats"))]
        if broken:
            raise FactorsFileError(f"factors: {str(path)!r}: weight {broken[0]!r} lacks some of its tensors "
                                   f"(:U, :G, :V, :W_stats)")

    @property
    def num_objectives(self) -> int:
        return len(self.task_names)

    def factors(self, key: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        from safetensors import safe_open

        with safe_open(str(self.path), framework="pt", device="cpu") as f:
            return f.get_tensor(f"{key}:U"), f.get_tensor(f"{key}:G"), f.get_tensor(f"{key}:V")

    def check_base(self, key: str, w: torch.Tensor, rtol: float = 1e-4) -> None:
        """Raise ValueError when ``w`` is not (up to rounding) the base weight the factors were trained on."""
        from safetensors import safe_open

        with safe_open(str(self.path), framework="pt", device="cpu") as f:
            want = f.get_tensor(f"{key}:W_stats")
        got = weight_stats(w)
        scale = float(want[1].sqrt()) * max(1.0, float(w.numel()) ** 0.5)  # |Σw| ≤ √n ‖w‖
        if abs(float(got[0] - want[0])) > rtol * scale or abs(float(got[1] - want[1])) > rtol * float(want[1]):
            raise ValueError(
                f"{key}: the rebuilt base weight is not the one the Pareto factors were trained on "
                f"(Σw {float(got[0]):.6g} vs {float(want[0]):.6g}, Σw² {float(got[1]):.6g} vs {float(want[1]):.6g}); "
                f"check base_model, the fine-tuned models and the base merge {self.base.model_dump(exclude_none=True)}")
