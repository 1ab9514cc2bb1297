"""A tiny file-backed model pool and merge config on disk (for the run-safety and distributed tests)."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Optional

import torch
import yaml

from paretomerge.io import save_state_dict
from paretomerge.pools.architectures import build_architecture

ARCH = {"kind": "open_clip_vision", "embed_dim": 8,
        "vision_cfg": {"layers": 2, "width": 16, "head_width": 8, "patch_size": 4, "image_size": 8}}
TASKS = ("a", "b", "c")


def write_pool(root: Path, nan_in: Optional[str] = None, seed: int = 0) -> dict:
    """Pretrained + one fine-tuned file per task (+ heads and unlabeled inputs) under ``root``; the config dict.

    ``nan_in``: a task whose fine-tuned weights get a NaN (to make training non-finite).
    """
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    base = build_architecture(copy.deepcopy(ARCH))
    sd = base.state_dict()
    root.mkdir(parents=True, exist_ok=True)
    save_state_dict(sd, root / "pre.safetensors")
    for t in TASKS:
        ft = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in sd.items()}
        if t == nan_in:
            key = next(k for k in ft if k.endswith("attn.in_proj_weight"))
            ft[key][0, 0] = float("nan")
        save_state_dict(ft, root / f"{t}.safetensors")
        save_state_dict({"weight": torch.randn(5, 8, generator=g), "bias": torch.zeros(5)}, root / f"h{t}.safetensors")
        save_state_dict({"inputs": torch.randn(24, 3, 8, 8, generator=g)}, root / f"u{t}.safetensors")
    return {
        "pool": {"format": "files", "architecture": copy.deepcopy(ARCH), "pretrained": "pre.safetensors",
                 "finetuned": {t: f"{t}.safetensors" for t in TASKS},
                 "heads": {t: f"h{t}.safetensors" for t in TASKS}},
        "base": {"method": "task_arithmetic", "lam": 0.3},
        "mode": "datafree",
        "trainer": {"steps": 2, "rank": 2, "include": "attention+mlp", "lr": 0.05, "progress": False,
                    "checkpoint_every": 1},
        "output": {"dir": "out"},
    }


def write_config(root: Path, cfg: dict, name: str = "c.yaml") -> Path:
    path = root / name
    path.write_text(yaml.safe_dump(cfg))
    return path
