"""Architectures from a config (pools/architectures.py): a Hugging Face architecture needs a local directory and
reads local files only."""
from __future__ import annotations

import pytest
import torch.nn as nn

from paretomerge.config import ConfigError
from paretomerge.pools.architectures import build_architecture


def test_hf_architecture_needs_a_local_directory(tmp_path, monkeypatch):
    import transformers

    def no_network(*a, **k):
        raise AssertionError("from_pretrained must not be reached for a missing directory")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", no_network)
    with pytest.raises(ConfigError, match="architecture.dir"):
        build_architecture({"kind": "hf", "dir": "bert-base-uncased"})  # a hub id, not a local dir


def test_hf_architecture_loads_local_files_only(tmp_path, monkeypatch):
    import transformers

    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32)
    cfg.save_pretrained(tmp_path)
    seen = {}
    real = transformers.AutoConfig.from_pretrained

    def spy(*a, **k):
        seen.update(k)
        return real(*a, **k)

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", spy)
    m = build_architecture({"kind": "hf", "dir": str(tmp_path)})
    assert isinstance(m, nn.Module) and seen.get("local_files_only") is True
