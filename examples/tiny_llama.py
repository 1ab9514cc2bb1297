"""Tiny local Llama directories for the integration examples and tests (random weights, no download).

``make_tiny_llama_dirs(root)`` writes a pretrained ``LlamaForCausalLM`` and fine-tuned copies (the
pretrained weights plus small random task updates), each a Hugging Face directory, sharded by default.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch


def make_tiny_llama_dirs(root, tasks: Sequence[str] = ("math", "code"), *, tie: bool = False,
                         shard: bool = True, seed: int = 0) -> dict[str, Path]:
    """{"pretrained": dir, task: dir, ...}: hidden 32, 2 layers, vocab 64 (≈20 K parameters)."""
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=1, intermediate_size=48, max_position_embeddings=32,
                                   tie_word_embeddings=tie)
    torch.manual_seed(seed)
    pre = transformers.LlamaForCausalLM(cfg)
    root = Path(root)
    dirs = {}
    for i, name in enumerate(("pretrained", *tasks)):
        m = transformers.LlamaForCausalLM(cfg)
        m.load_state_dict(pre.state_dict())
        if i:
            g = torch.Generator().manual_seed(seed * 1000 + i)
            with torch.no_grad():
                for p in m.parameters():
                    p.add_(0.02 * torch.randn(p.shape, generator=g))
        dirs[name] = root / name
        m.save_pretrained(dirs[name], max_shard_size="40KB" if shard else "1GB")
    return dirs
