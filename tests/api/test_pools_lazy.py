"""Lazy Hugging Face pools: a sharded tiny Llama written here, read tensor by tensor; bad shards named."""
from __future__ import annotations

import copy
import os
import json
import weakref

import pytest
import torch

from paretomerge.layers import convert, factored_weights
from paretomerge.methods import task_arithmetic
from paretomerge.methods.pareto_merging.objectives import DataFreeObjective
from paretomerge.pools import ArchitectureMismatchError, ModelPool
from paretomerge.pools import sources as sources_mod

transformers = pytest.importorskip("transformers")

K = 3


def tiny_llama(seed: int = 0, hidden: int = 16):
    """A randomly initialised 2-layer Llama (untied embeddings: the files hold exactly the state dict)."""
    cfg = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=24, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2, vocab_size=32,
                                   max_position_embeddings=32, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


def finetuned_copies(base, n: int = K, scale: float = 0.02):
    """n copies of ``base`` with every floating tensor perturbed (fresh random task vectors)."""
    out = []
    for _ in range(n):
        m = copy.deepcopy(base)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(scale * torch.randn_like(p))
        out.append(m)
    return out


@pytest.fixture
def sharded_pool_dirs(tmp_path):
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    dirs = {}
    for i, m in enumerate(finetuned_copies(base)):
        d = tmp_path / f"ft{i}"
        m.save_pretrained(d, max_shard_size="8KB")  # several shards + model.safetensors.index.json
        dirs[f"task{i}"] = d
    assert (dirs["task0"] / "model.safetensors.index.json").is_file()
    return tmp_path / "base", dirs


def _load(base_dir, dirs):
    return ModelPool.from_hf_dirs(base_dir, dirs, auto_class=transformers.LlamaForCausalLM)


class ReadCounter:
    """Counts tensors read by the lazy sources and the most of them alive at once (weak references)."""

    def __init__(self, monkeypatch):
        self.reads, self.alive, self.max_alive = 0, 0, 0
        real = sources_mod.read_tensor

        def counting(f, name):
            t = real(f, name)
            self.reads += 1
            self.alive += 1
            self.max_alive = max(self.max_alive, self.alive)
            weakref.finalize(t, self._freed)
            return t

        monkeypatch.setattr(sources_mod, "read_tensor", counting)

    def _freed(self):
        self.alive -= 1


def test_sharded_pool_is_read_lazily_and_layer_by_layer(sharded_pool_dirs, monkeypatch):
    base_dir, dirs = sharded_pool_dirs
    counter = ReadCounter(monkeypatch)
    pool = _load(base_dir, dirs)
    assert counter.reads == 0  # opening reads headers only
    n_keys = len(pool.pretrained_state())
    merged = task_arithmetic(pool, lam=0.3)
    assert counter.reads == K * n_keys and counter.max_alive <= n_keys  # one task's tensors at a time
    convert(merged, K, 2, include="attention")
    keys = [k for k, *_ in factored_weights(merged)]
    counter.reads = counter.max_alive = 0
    obj = DataFreeObjective.from_pool(merged, pool)
    assert counter.reads == K * len(keys)  # only the converted weights
    assert counter.max_alive <= 2          # one tensor at a time (the previous one is being dropped)
    # equal to the objective built from whole in-memory state dicts
    ref = DataFreeObjective(merged, [m.state_dict() for m in _reference_models(dirs)])
    pref = torch.tensor([0.2, 0.3, 0.5])
    torch.testing.assert_close(obj(pref), ref(pref), rtol=1e-6, atol=0)


def _reference_models(dirs):
    return [transformers.LlamaForCausalLM.from_pretrained(str(d), local_files_only=True) for d in dirs.values()]


def test_missing_shard_names_index_and_shard(sharded_pool_dirs):
    base_dir, dirs = sharded_pool_dirs
    index = json.loads((dirs["task1"] / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (dirs["task1"] / shard).unlink()
    with pytest.raises(FileNotFoundError, match=rf"shard '{shard}' is missing.*holds \d+ tensor"):
        _load(base_dir, dirs)


def test_index_mapping_a_tensor_to_the_wrong_shard(sharded_pool_dirs):
    base_dir, dirs = sharded_pool_dirs
    p = dirs["task0"] / "model.safetensors.index.json"
    index = json.loads(p.read_text())
    files = sorted(set(index["weight_map"].values()))
    key = next(k for k, v in index["weight_map"].items() if v == files[0])
    index["weight_map"][key] = files[1]
    p.write_text(json.dumps(index))
    with pytest.raises(ValueError, match=rf"tensor '{key}' is mapped to shard '{files[1]}', which does not hold it"):
        _load(base_dir, dirs)


def test_corrupt_shard_is_named(sharded_pool_dirs):
    base_dir, dirs = sharded_pool_dirs
    index = json.loads((dirs["task2"] / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    (dirs["task2"] / shard).write_bytes(b"\x00" * 20)
    with pytest.raises(ValueError, match="unreadable safetensors"):
        _load(base_dir, dirs)


def test_shape_mismatch_names_task_key_and_file(tmp_path):
    from safetensors.torch import save_file

    base = tiny_llama()
    sd = {k: v.clone() for k, v in base.state_dict().items()}
    sd["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(16, 8)
    f = tmp_path / "bad.safetensors"
    save_file(sd, str(f))
    with pytest.raises(ArchitectureMismatchError,
                       match=r"task 'bad': key 'model.layers.0.self_attn.q_proj.weight' has shape \(16, 8\).*bad.safetensors"):
        ModelPool.from_state_dict_files(base, {"bad": f})


@pytest.mark.parametrize("before", [None, "YES"])
def test_hub_kernels_off_is_scoped(monkeypatch, before):
    # transformers >= 5.25 kernelizes every from_pretrained with hub kernels unless USE_HUB_KERNELS says no:
    # loads run with it off, and the caller's setting comes back afterwards, also after an error.
    from paretomerge.pools.sources import hub_kernels_off

    if before is None:
        monkeypatch.delenv("USE_HUB_KERNELS", raising=False)
    else:
        monkeypatch.setenv("USE_HUB_KERNELS", before)
    with pytest.raises(RuntimeError):
        with hub_kernels_off():
            assert os.environ["USE_HUB_KERNELS"] == "NO"
            raise RuntimeError("load failed")
    assert os.environ.get("USE_HUB_KERNELS") == before
