"""LoRA-adapter pools: PEFT adapters made here (random LoRA weights), kept factored; TA vs PEFT's own merge."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from paretomerge.layers import convert
from paretomerge.methods import task_arithmetic
from paretomerge.methods.pareto_merging.objectives import DataFreeObjective
from paretomerge.methods.task_arithmetic import task_arithmetic_factors
from paretomerge.pools import ModelPool
from paretomerge.pools.compress import LowRankDelta

from test_pools_lazy import tiny_llama

peft = pytest.importorskip("peft")

ADAPTERS = {  # task -> LoraConfig options (different r, alpha, rslora, an alpha_pattern)
    "a": dict(r=4, lora_alpha=8),
    "b": dict(r=2, lora_alpha=3, use_rslora=True),
    "c": dict(r=3, lora_alpha=6, alpha_pattern={"v_proj": 12}),
}
TARGETS = ["q_proj", "v_proj"]


def make_adapter(base, directory, seed, targets=TARGETS, **options):
    torch.manual_seed(seed)
    cfg = peft.LoraConfig(target_modules=list(targets), init_lora_weights=False, **options)  # random A and B
    model = peft.get_peft_model(copy.deepcopy(base), cfg)
    model.save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="module")
def adapter_pool(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("peft")
    base = tiny_llama()
    dirs = {t: make_adapter(base, tmp / t, seed=i + 1, **o) for i, (t, o) in enumerate(ADAPTERS.items())}
    return base, dirs


def _peft_model(base, dirs):
    names = list(dirs)
    model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(dirs[names[0]]), adapter_name=names[0])
    for t in names[1:]:
        model.load_adapter(str(dirs[t]), adapter_name=t)
    return model


def _merged_state(peft_model, adapter):
    peft_model.set_adapter(adapter)
    return {k: v.detach().clone() for k, v in peft_model.merge_and_unload().state_dict().items()}


def test_adapters_are_kept_factored_and_match_peft_deltas(adapter_pool):
    base, dirs = adapter_pool
    pool = ModelPool.from_peft_adapters(base, dirs)
    keys = pool.factored_keys()
    assert len(keys) == 2 * len(TARGETS) and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in keys)
    for t, d in dirs.items():
        f = pool.task_factors(t)
        assert all(isinstance(v, LowRankDelta) and v.rank == ADAPTERS[t]["r"] for v in f.values())
        # PEFT's own merge of this adapter is W_0 + τ: the dense fine-tuned model of the pool
        expected = _merged_state(_peft_model(base, {t: d}), t)
        got = pool.finetuned_state(t)
        for k, v in expected.items():
            torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6)


def test_task_arithmetic_equals_peft_cat(adapter_pool):
    base, dirs = adapter_pool
    lam = 0.4
    pm = _peft_model(base, dirs)
    pm.add_weighted_adapter(list(dirs), [lam] * len(dirs), "ta", combination_type="cat")
    expected = _merged_state(pm, "ta")
    pool = ModelPool.from_peft_adapters(base, dirs)
    merged = task_arithmetic(pool, lam=lam).state_dict()
    for k, v in expected.items():
        torch.testing.assert_close(merged[k], v, rtol=1e-5, atol=1e-6)
    # and the factored form stays factored: rank Σ r_k
    f = task_arithmetic_factors(pool, lam)
    assert all(d.rank == sum(o["r"] for o in ADAPTERS.values()) for d in f.values())


def test_task_arithmetic_equals_peft_linear_single_adapter(adapter_pool):
    base, dirs = adapter_pool
    one = {"a": dirs["a"]}
    pm = _peft_model(base, one)
    pm.add_weighted_adapter(["a"], [0.7], "lin", combination_type="linear")
    expected = _merged_state(pm, "lin")
    merged = task_arithmetic(ModelPool.from_peft_adapters(base, one), lam=0.7).state_dict()
    for k, v in expected.items():
        torch.testing.assert_close(merged[k], v, rtol=1e-5, atol=1e-6)


def test_factored_objective_equals_dense(adapter_pool):
    """TA base of the adapters: D_k = τ_k − λΣτ_j is exactly low-rank; the factored objective equals the dense."""
    base, dirs = adapter_pool
    pool = ModelPool.from_peft_adapters(base, dirs)
    dense_pool = ModelPool.from_modules(base, {t: pool.finetuned_model(t) for t in dirs})
    assert dense_pool.factored_keys() == []
    model = task_arithmetic(pool, lam=0.3)
    convert(model, len(dirs), 3, include=["*q_proj", "*v_proj"])
    torch.manual_seed(5)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".U"):
                p.normal_()  # U = 0 at init would hide the cross term
    fac = DataFreeObjective.from_pool(model, pool)
    dense = DataFreeObjective.from_pool(model, dense_pool)
    assert all(t.deltas is None for t in fac.terms) and all(t.deltas is not None for t in dense.terms)
    assert max(fac.base_errors.values()) < 1e-5
    pref = torch.tensor([0.5, 0.2, 0.3])
    f_fac, f_dense = fac(pref), dense(pref)
    torch.testing.assert_close(f_fac, f_dense, rtol=1e-4, atol=0)
    torch.testing.assert_close(fac.delta_norms(), dense.delta_norms(), rtol=1e-4, atol=0)
    g_fac = torch.autograd.grad(f_fac.sum(), [t.U for t in fac.terms])
    g_dense = torch.autograd.grad(f_dense.sum(), [t.U for t in dense.terms])
    for a, b in zip(g_fac, g_dense):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3 * float(b.abs().max()))


def test_different_target_modules(adapter_pool, tmp_path):
    base, dirs = adapter_pool
    other = make_adapter(base, tmp_path / "o", seed=9, targets=["q_proj", "k_proj"], r=2, lora_alpha=2)
    with pytest.raises(ValueError, match=r"target different modules, e.g. '.*(k|v)_proj.weight'"):
        ModelPool.from_peft_adapters(base, {"a": dirs["a"], "o": other})


def test_different_base_model(adapter_pool, tmp_path):
    import shutil

    base, dirs = adapter_pool
    named = {}
    for t, name in (("a", "me/base-model"), ("c", "someone/other-model")):
        d = shutil.copytree(dirs[t], tmp_path / t)
        cfg = json.loads((d / "adapter_config.json").read_text())
        cfg["base_model_name_or_path"] = name
        (d / "adapter_config.json").write_text(json.dumps(cfg))
        named[t] = d
    with pytest.raises(ValueError, match="different base models: 'me/base-model'.*'someone/other-model'"):
        ModelPool.from_peft_adapters(base, named)


def test_adapter_for_another_shape(tmp_path):
    base = tiny_llama()
    wide = make_adapter(tiny_llama(hidden=24), tmp_path / "w", seed=3, r=2, lora_alpha=2)
    with pytest.raises(ValueError, match=r"adapter_model.safetensors: module '.*q_proj'.*has shape \(24, 24\)"):
        ModelPool.from_peft_adapters(base, {"w": wide})


def test_corrupt_adapter_file(adapter_pool, tmp_path):
    base, dirs = adapter_pool
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((dirs["a"] / "adapter_config.json").read_text())
    data = (dirs["a"] / "adapter_model.safetensors").read_bytes()
    (bad / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"bad/adapter_model.safetensors: unreadable adapter weights"):
        ModelPool.from_peft_adapters(base, {"bad": bad})
    (bad / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no adapter_model.safetensors"):
        ModelPool.from_peft_adapters(base, {"bad": bad})
    (bad / "adapter_config.json").write_text("{not json")
    with pytest.raises((ValueError, FileNotFoundError), match="adapter"):
        ModelPool.from_peft_adapters(base, {"bad": bad})


def test_merge_program_on_a_peft_pool_config(adapter_pool, tmp_path):
    """`paretomerge merge` on a LoRA pool (format peft), compressed at rank 2: a factored objective trains."""
    import yaml

    from paretomerge.config import load_config
    from paretomerge.program import load_pool, run_merge

    base, dirs = adapter_pool
    base.save_pretrained(tmp_path / "base")
    cfg = {"pool": {"format": "peft", "auto_class": "AutoModelForCausalLM", "pretrained": str(tmp_path / "base"),
                    "finetuned": {t: str(d) for t, d in dirs.items()},
                    "compress": {"rank": 2, "save": "tv.safetensors"}},
           "trainer": {"include": "attention", "rank": 2, "steps": 2, "progress": False},
           "output": {"dir": "out"}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    config = load_config(tmp_path / "c.yaml")
    pool = load_pool(config)
    assert set(pool.factored_keys()) >= {k for k in pool.task_factors("a")}
    ckpt = run_merge(config)
    assert ckpt.is_file() and (tmp_path / "tv.safetensors").is_file()
    # the checkpoint records the pretrained directory's architecture, as for format hf (export, generate)
    from paretomerge.methods.pareto_merging import load_checkpoint

    arch = load_checkpoint(ckpt)["meta"]["architecture"]
    assert arch == {"kind": "hf", "dir": str((tmp_path / "base").resolve()), "auto_class": "AutoModelForCausalLM"}
