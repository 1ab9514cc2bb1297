"""ModelPool.from_hf_dirs: the saved architecture (config.json's class), sharded files read lazily."""
from __future__ import annotations

import pytest

import helpers  # noqa: F401 - puts examples/ (tiny_llama) on sys.path
import paretomerge as pm


def test_from_hf_dirs_builds_the_saved_architecture_and_reads_lazily(tmp_path, no_network):
    transformers = pytest.importorskip("transformers")
    from paretomerge.pools.sources import SafetensorsSource
    from tiny_llama import make_tiny_llama_dirs

    d = make_tiny_llama_dirs(tmp_path, tasks=("a",))
    pool = pm.ModelPool.from_hf_dirs(d["pretrained"], {"a": d["a"]})
    # config.json says LlamaForCausalLM: the head is kept and the keys match the (sharded) files
    assert isinstance(pool.pretrained, transformers.LlamaForCausalLM)
    assert isinstance(pool._sources[0], SafetensorsSource) and len(pool._sources[0].paths) > 1
    assert "lm_head.weight" in pool.task_vector("a")
    bare = pm.ModelPool.from_hf_dirs(d["pretrained"], {"a": d["a"]}, auto_class=transformers.AutoModel)
    assert isinstance(bare.pretrained, transformers.LlamaModel)  # an explicit class still wins
