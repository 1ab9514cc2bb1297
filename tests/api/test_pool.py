"""ModelPool loaders, task vectors, architecture checks, and io (files the tests write themselves)."""
from __future__ import annotations

import os
import sys
import types

import pytest
import torch
import torch.nn as nn

from paretomerge.io import load_state_dict, save_model, save_state_dict
from paretomerge.methods import task_arithmetic
from paretomerge.pools import ArchitectureMismatchError, ModelPool


class Net(nn.Module):
    def __init__(self, hidden=3):
        super().__init__()
        self.fc = nn.Linear(4, hidden)
        self.bn = nn.BatchNorm1d(hidden)  # float running stats + integer num_batches_tracked
        self.out = nn.Linear(hidden, 2)

    def forward(self, x):
        return self.out(self.bn(self.fc(x)))


def perturbed(m: nn.Module, scale=0.5, seed=0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    c = type(m)()
    c.load_state_dict(m.state_dict())
    with torch.no_grad():
        for v in c.state_dict().values():
            if v.is_floating_point():
                v.add_(torch.randn(v.shape, generator=g) * scale)
            else:
                v.add_(5)
    return c


@pytest.fixture
def models():
    pre = Net()
    return pre, {"a": perturbed(pre, seed=1), "b": perturbed(pre, seed=2)}


def expected_tv(pre, ft):
    p, f = pre.state_dict(), ft.state_dict()
    return {k: f[k] - p[k] for k in p if p[k].is_floating_point()}


def assert_tv(tv, exp):
    assert list(tv) == list(exp)
    for k in exp:
        torch.testing.assert_close(tv[k], exp[k], rtol=0, atol=0)


# -------- in-memory modules, task vectors, architecture checks --------
def test_from_modules_task_vectors_skip_integer_buffers(models):
    pre, fts = models
    pool = ModelPool.from_modules(pre, fts)
    assert len(pool) == 2 and pool.task_names == ["a", "b"] and pool.heads is None
    tv = pool.task_vector(0)
    assert "bn.num_batches_tracked" not in tv
    assert "bn.running_mean" in tv  # floating buffers are kept
    assert_tv(tv, expected_tv(pre, fts["a"]))
    assert_tv(pool.task_vector("b"), expected_tv(pre, fts["b"]))
    # names restrict the keys; an integer name among them is skipped
    sub = pool.task_vector(1, ["out.bias", "bn.num_batches_tracked"])
    assert list(sub) == ["out.bias"]
    with pytest.raises(KeyError, match="nope"):
        pool.task_vector(0, ["nope"])
    with pytest.raises(IndexError):
        pool.task_vector(2)
    assert int(pool.finetuned_state(0)["bn.num_batches_tracked"]) == 5
    fm = pool.finetuned_model("b")
    assert fm is not fts["b"] and fm is not pre
    for k, v in fts["b"].state_dict().items():
        assert torch.equal(fm.state_dict()[k], v)


def test_architecture_mismatch_names_the_key(models):
    pre, fts = models
    with pytest.raises(ArchitectureMismatchError, match=r"'fc\.weight' has shape \(5, 4\)"):
        ModelPool.from_modules(pre, {"a": fts["a"], "wide": Net(hidden=5)})

    class Missing(Net):
        def __init__(self):
            super().__init__()
            self.out = nn.Linear(3, 2, bias=False)

    with pytest.raises(ArchitectureMismatchError, match=r"task 'm'.*'out\.bias'.*missing"):
        ModelPool.from_modules(pre, {"m": Missing()})

    class Extra(Net):
        def __init__(self):
            super().__init__()
            self.extra = nn.Linear(1, 1)

    with pytest.raises(ArchitectureMismatchError, match=r"'extra\.weight'.*extra key"):
        ModelPool.from_modules(pre, {"e": Extra()})
    assert issubclass(ArchitectureMismatchError, ValueError)


def test_pool_bad_input(models):
    pre, fts = models
    with pytest.raises(ValueError, match="empty"):
        ModelPool.from_modules(pre, {})
    with pytest.raises(TypeError, match="finetuned\\['a'\\]"):
        ModelPool.from_modules(pre, {"a": pre.state_dict()})
    with pytest.raises(ValueError, match="heads has task 'z'"):
        ModelPool.from_modules(pre, fts, heads={"z": nn.Linear(2, 2)})


# -------- io and state-dict files --------
def test_io_round_trip_shared_and_noncontiguous(tmp_path):
    base = torch.randn(4, 6)
    state = {"w": base, "tied": base, "t": base.t(), "slice": base[:, 1:3], "i": torch.arange(3)}
    path = tmp_path / "w.safetensors"
    save_state_dict(state, path)
    assert os.listdir(tmp_path) == ["w.safetensors"]  # atomic: no temp file left
    out = load_state_dict(path)
    assert out.keys() == state.keys()
    for k in state:
        assert torch.equal(out[k], state[k])
    m = Net()
    save_model(m, tmp_path / "m.safetensors")
    m2 = Net()
    m2.load_state_dict(load_state_dict(tmp_path / "m.safetensors"))
    for k, v in m.state_dict().items():
        assert torch.equal(m2.state_dict()[k], v)
    torch.save(m.state_dict(), tmp_path / "m.pt")
    assert load_state_dict(tmp_path / "m.pt").keys() == m.state_dict().keys()
    torch.save({"state_dict": m.state_dict()}, tmp_path / "wrapped.pt")
    assert load_state_dict(tmp_path / "wrapped.pt").keys() == m.state_dict().keys()
    with pytest.raises(FileNotFoundError):
        load_state_dict(tmp_path / "none.safetensors")
    with pytest.raises(TypeError, match="state\\['x'\\]"):
        save_state_dict({"x": 1.0}, tmp_path / "bad.safetensors")


def test_from_state_dict_files_safetensors_and_pt(models, tmp_path):
    pre, fts = models
    save_model(fts["a"], tmp_path / "a.safetensors")
    torch.save(fts["b"].state_dict(), tmp_path / "b.pt")
    pool = ModelPool.from_state_dict_files(pre, {"a": tmp_path / "a.safetensors", "b": str(tmp_path / "b.pt")})
    from paretomerge.pools.sources import SafetensorsSource as _SafetensorsSource

    assert isinstance(pool._sources[0], _SafetensorsSource)  # file-backed, read tensor by tensor
    assert_tv(pool.task_vector("a"), expected_tv(pre, fts["a"]))
    assert_tv(pool.task_vector("b"), expected_tv(pre, fts["b"]))
    assert list(pool.task_vector("a", ["fc.bias"])) == ["fc.bias"]
    ref = task_arithmetic(ModelPool.from_modules(pre, fts), lam=0.4)
    got = task_arithmetic(pool, lam=0.4)
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(got.state_dict()[k], v, rtol=0, atol=0)
    # legacy (non-zip) torch files cannot be memory-mapped: loaded on demand instead
    torch.save(fts["b"].state_dict(), tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    legacy = ModelPool.from_state_dict_files(pre, {"b": tmp_path / "legacy.pt"})
    assert_tv(legacy.task_vector(0), expected_tv(pre, fts["b"]))
    # a wrong shape in a file is caught at construction, naming the key
    bad = dict(fts["a"].state_dict(), **{"out.weight": torch.zeros(2, 7)})
    save_state_dict(bad, tmp_path / "bad.safetensors")
    with pytest.raises(ArchitectureMismatchError, match="out.weight"):
        ModelPool.from_state_dict_files(pre, {"bad": tmp_path / "bad.safetensors"})
    # a whole pickled module is refused by weights_only loading
    torch.save(fts["a"], tmp_path / "whole.pt")
    with pytest.raises(ValueError, match="trusted=True"):
        ModelPool.from_state_dict_files(pre, {"w": tmp_path / "whole.pt"})
    with pytest.raises(FileNotFoundError):
        ModelPool.from_state_dict_files(pre, {"x": tmp_path / "missing.safetensors"})


# -------- task-vectors-style pickled open_clip encoders --------
def _tower():
    from open_clip.model import CLIPVisionCfg, _build_vision_tower

    cfg = CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=16)
    return _build_vision_tower(8, cfg)


def _write_task_vectors_checkpoints(tmp_path):
    """torch.save whole objects whose classes live in modules that do not exist at load time:
    `src.modeling.ImageEncoder` / `ClassificationHead`, a preprocess object from `src.datasets`,
    and open_clip's VisionTransformer under its old name `open_clip.model.VisualTransformer`."""
    import open_clip.model
    import open_clip.transformer as oct

    fake = types.ModuleType("src.modeling")
    fake_ds = types.ModuleType("src.datasets")

    class ImageEncoder(nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model
            self.train_preprocess = Preprocess()
            self.cache_dir = "/nowhere"

        def forward(self, x):
            return self.model(x)

    class ClassificationHead(nn.Linear):
        def __init__(self, normalize, weights):
            super().__init__(weights.shape[1], weights.shape[0])
            self.normalize = normalize
            with torch.no_grad():
                self.weight.copy_(weights)

    class Preprocess:
        def __init__(self):
            self.size = 16

    for cls, mod in ((ImageEncoder, fake), (ClassificationHead, fake), (Preprocess, fake_ds)):
        cls.__module__, cls.__qualname__ = mod.__name__, cls.__name__
        setattr(mod, cls.__name__, cls)
    VT = oct.VisionTransformer
    old = (VT.__module__, VT.__qualname__)
    sys.modules.update({"src": types.ModuleType("src"), "src.modeling": fake, "src.datasets": fake_ds})
    open_clip.model.VisualTransformer = VT
    VT.__module__, VT.__qualname__ = "open_clip.model", "VisualTransformer"
    try:
        torch.manual_seed(0)
        pre = ImageEncoder(_tower())
        pre.eval()
        x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
        with torch.no_grad():
            pre_out = pre(x)
        # as open_clip 2.0.x pickled them: attributes added since then are absent
        vt = pre.model
        for name in ("patch_dropout", "attn_pool", "final_ln_after_pool", "pool_type", "output_tokens"):
            delattr(vt, name)
        for blk in vt.transformer.resblocks:
            del blk.ls_1, blk.ls_2
        del vt.transformer.grad_checkpointing
        paths = {"pre": tmp_path / "zeroshot.pt"}
        torch.save(pre, paths["pre"])
        fts = {}
        for i, task in enumerate(["MNIST", "SVHN"]):
            ft = ImageEncoder(_tower())
            ft.load_state_dict(pre.state_dict())
            with torch.no_grad():
                for p in ft.parameters():
                    p.add_(0.01 * (i + 1))
            fts[task] = ft.state_dict()
            paths[task] = tmp_path / f"{task}.pt"
            torch.save(ft, paths[task])
            torch.save(ClassificationHead(True, torch.randn(10, 8)), tmp_path / f"head_{task}.pt")
        return pre.state_dict(), fts, paths, (x, pre_out)
    finally:
        VT.__module__, VT.__qualname__ = old
        del open_clip.model.VisualTransformer
        for name in ("src", "src.modeling", "src.datasets"):
            sys.modules.pop(name, None)


def test_open_clip_checkpoints(tmp_path):
    pre_sd, ft_sds, paths, (x0, out0) = _write_task_vectors_checkpoints(tmp_path)
    ft_paths = {t: paths[t] for t in ("MNIST", "SVHN")}
    heads = {t: tmp_path / f"head_{t}.pt" for t in ft_paths}
    with pytest.raises(ValueError, match="pickle|arbitrary code"):
        ModelPool.from_open_clip_checkpoints(paths["pre"], ft_paths, heads)
    pool = ModelPool.from_open_clip_checkpoints(paths["pre"], ft_paths, heads, trusted=True)
    from open_clip.transformer import VisionTransformer

    from paretomerge.pools.legacy import ClassificationHead, ImageEncoder

    assert type(pool.pretrained) is ImageEncoder
    assert type(pool.pretrained.model) is VisionTransformer
    assert pool.pretrained.cache_dir == "/nowhere"
    with torch.no_grad():  # attributes missing from the "old" pickle were filled in: same outputs
        torch.testing.assert_close(pool.pretrained(x0), out0)
    assert set(pool.heads) == {"MNIST", "SVHN"} and all(type(h) is ClassificationHead for h in pool.heads.values())
    x = torch.randn(2, 3, 16, 16)
    feats = pool.pretrained(x)
    assert feats.shape == (2, 8)
    assert pool.heads["MNIST"](feats).shape == (2, 10)
    for t in ft_paths:
        tv = pool.task_vector(t)
        for k, v in tv.items():
            torch.testing.assert_close(v, ft_sds[t][k] - pre_sd[k])
    # only one fine-tuned encoder is cached at a time
    from paretomerge.pools.sources import LoaderSource as _LoaderSource

    assert _LoaderSource._last[0] is pool._sources[1]
    merged = task_arithmetic(pool, lam=0.3)
    assert merged(x).shape == (2, 8)
    with pytest.raises(FileNotFoundError, match="finetuned\\['X'\\]"):
        ModelPool.from_open_clip_checkpoints(paths["pre"], {"X": tmp_path / "nope.pt"}, trusted=True)


# -------- local Hugging Face directories --------
def test_from_hf_dirs(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=37, max_position_embeddings=16)
    torch.manual_seed(0)
    pre = transformers.BertModel(cfg)
    dirs = {}
    sds = {}
    for name, delta in (("pre", 0.0), ("sst2", 0.01), ("qnli", -0.02)):
        m = transformers.BertModel(cfg)
        m.load_state_dict(pre.state_dict())
        with torch.no_grad():
            for p in m.parameters():
                p.add_(delta)
        dirs[name] = tmp_path / name
        m.save_pretrained(dirs[name])
        sds[name] = {k: v.clone() for k, v in m.state_dict().items()}
    pool = ModelPool.from_hf_dirs(dirs["pre"], {"sst2": dirs["sst2"], "qnli": str(dirs["qnli"])})
    assert isinstance(pool.pretrained, transformers.BertModel)
    from paretomerge.pools.sources import LoaderSource as _LoaderSource, SafetensorsSource as _SafetensorsSource

    assert all(isinstance(s, _SafetensorsSource) for s in pool._sources)  # read lazily from the files
    tv = pool.task_vector("sst2")
    assert not any("position_ids" in k for k in tv)  # integer buffers skipped
    for k, v in tv.items():
        torch.testing.assert_close(v, sds["sst2"][k] - sds["pre"][k])
    merged = task_arithmetic(pool, lam=1.0)
    torch.testing.assert_close(merged.pooler.dense.bias, sds["pre"]["pooler.dense.bias"] - 0.01)
    # tied weights (decoder = word embeddings) are not all in the file: loaded through transformers instead
    mlm = {}
    for name, delta in (("pre", 0.0), ("ft", 0.03)):
        torch.manual_seed(1)
        m = transformers.BertForMaskedLM(cfg)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(delta)
        mlm[name] = {k: v.clone() for k, v in m.state_dict().items()}
        m.save_pretrained(tmp_path / f"mlm_{name}")
    pool2 = ModelPool.from_hf_dirs(tmp_path / "mlm_pre", {"ft": tmp_path / "mlm_ft"},
                                   auto_class=transformers.BertForMaskedLM)
    assert isinstance(pool2._sources[0], _LoaderSource)
    for k, v in pool2.task_vector("ft").items():
        torch.testing.assert_close(v, mlm["ft"][k] - mlm["pre"][k])
    with pytest.raises(FileNotFoundError, match="not an existing local directory"):
        ModelPool.from_hf_dirs("bert-base-uncased", {"a": dirs["sst2"]})
    with pytest.raises(FileNotFoundError, match="finetuned_dirs\\['a'\\]"):
        ModelPool.from_hf_dirs(dirs["pre"], {"a": tmp_path / "missing"})


def test_atomic_outputs_have_umask_permissions_and_no_leftovers(tmp_path):
    import os
    import stat

    from paretomerge.io import save_state_dict
    from paretomerge.methods.pareto_merging.trainer import atomic_torch_save

    save_state_dict({"w": torch.ones(2)}, tmp_path / "a.safetensors")
    atomic_torch_save({"w": torch.ones(2)}, tmp_path / "b.pt")
    mask = os.umask(0)
    os.umask(mask)
    for name in ("a.safetensors", "b.pt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~mask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.pt"]
