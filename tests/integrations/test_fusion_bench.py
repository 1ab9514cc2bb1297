"""paretomerge.integrations.fusion_bench: ParetoMergingAlgorithm on FusionBench pools, its CLI configs,
and every public entry point taking Hydra's ListConfig/DictConfig. Offline, CPU, tiny models."""
from __future__ import annotations

import copy
import sys

import pytest
import torch
import torch.nn as nn

from helpers import EXAMPLES, run_offline
from helpers import Tiny

fusion_bench = pytest.importorskip("fusion_bench", reason="fusion-bench is not installed: pip install "
                                                          "'pmkernels[fusionbench]' (fusion-bench==0.2.33)")
from fusion_bench.method import TaskArithmeticAlgorithm, TiesMergingAlgorithm  # noqa: E402
from fusion_bench.modelpool import BaseModelPool, CausalLMPool  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

import paretomerge as pm  # noqa: E402
from paretomerge.integrations.fusion_bench import (  # noqa: E402
    MappingSource,
    ParetoMergingAlgorithm,
    pool_from_fusion_bench,
)

FAST = {"progress": False, "impl": "torch", "objective_impl": "torch"}


def _states(models: dict) -> dict:
    return {n: {k: v.detach().clone() for k, v in m.state_dict().items()} for n, m in models.items()}


def _same_states(a: dict, b: dict) -> bool:
    return all(a[n].keys() == b[n].keys() and all(torch.equal(a[n][k], b[n][k]) for k in a[n]) for n in a)


def _in_code_models() -> dict:
    torch.manual_seed(0)
    pre = Tiny().eval()
    models = {"_pretrained_": pre}
    for i, name in enumerate(("a", "b", "c")):
        m = copy.deepcopy(pre)
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        models[name] = m
    return models


def test_task_arithmetic_and_ties_equal_fusion_bench_on_an_in_code_pool(no_network):
    models = _in_code_models()
    before = _states(models)
    fb_pool = BaseModelPool(models)
    pool = pool_from_fusion_bench(fb_pool)
    assert pool.task_names == ["a", "b", "c"]
    fb = TaskArithmeticAlgorithm(scaling_factor=0.3, inplace=False).run(fb_pool).state_dict()
    ours = pm.task_arithmetic(pool, lam=0.3).state_dict()
    assert all(torch.equal(ours[k], fb[k]) for k in fb), "task arithmetic differs from FusionBench's"
    assert _same_states(before, _states(models)), "the pool's models were modified"
    # FusionBench's TIES writes into the pool's pretrained model: give it a copy. Its trim keeps int(k·d) + 1
    # entries per task vector (kthvalue at d − int(k·d), kept with >=), ours int(k·d): at most one entry per
    # task vector can differ; everything else is equal.
    fb_ties = TiesMergingAlgorithm(scaling_factor=1.0, threshold=20, remove_keys=[],
                                   merge_func="mean").run(BaseModelPool(copy.deepcopy(models))).state_dict()
    ours_ties = pm.ties_merging(pool, k=0.2, lam=1.0, scope="model").state_dict()
    differ = sum(int((ours_ties[k] != fb_ties[k]).sum()) for k in fb_ties)
    assert differ <= len(pool), f"TIES (scope model) differs from FusionBench's in {differ} entries"


def test_algorithm_on_an_in_code_pool_keeps_the_pool_and_trains(no_network):
    models = _in_code_models()
    before = _states(models)
    fb_ta = TaskArithmeticAlgorithm(scaling_factor=0.3, inplace=False).run(BaseModelPool(models)).state_dict()
    algo = ParetoMergingAlgorithm(base_options={"lam": 0.3}, rank=2, include="attention", steps=3,
                                  returns="pareto", trainer_options=FAST)
    pareto = algo.run(models)  # a plain mapping is wrapped in a BaseModelPool, as FusionBench's methods do
    assert algo.task_names == ["a", "b", "c"] and len(algo.history) == 3
    assert isinstance(pareto.attn, pm.ParetoMultiheadAttention)
    # the base weights are FusionBench's task arithmetic, bit for bit; only the factors were trained
    sd = pareto.state_dict()
    assert all(torch.equal(sd[k], fb_ta[k]) for k in fb_ta)
    plain = pm.export(pareto, [0.6, 0.3, 0.1]).state_dict()
    assert plain.keys() == fb_ta.keys()
    assert not torch.equal(plain["attn.in_proj_weight"], fb_ta["attn.in_proj_weight"])
    assert torch.equal(plain["mlp.0.weight"], fb_ta["mlp.0.weight"])
    assert _same_states(before, _states(models)), "the pool's models were modified"
    assert not any(isinstance(m, pm.ParetoMultiheadAttention) for mod in models.values() for m in mod.modules())
    exported = ParetoMergingAlgorithm(base_options={"lam": 0.3}, rank=2, steps=3, preference=[0.6, 0.3, 0.1],
                                      trainer_options=FAST).run(BaseModelPool(models))
    assert isinstance(exported.attn, nn.MultiheadAttention)
    assert all(torch.equal(exported.state_dict()[k], plain[k]) for k in plain)  # same seed, same result


def test_algorithm_errors_are_clear():
    with pytest.raises(ValueError, match="returns"):
        ParetoMergingAlgorithm(returns="both")
    with pytest.raises(pm.ConfigError, match="trainer.rank"):
        ParetoMergingAlgorithm(rank=0)
    with pytest.raises(ValueError, match="trainer_options.steps"):
        ParetoMergingAlgorithm(trainer_options={"steps": 3})
    models = _in_code_models()
    with pytest.raises(ValueError, match="_pretrained_"):
        ParetoMergingAlgorithm(steps=1).run({k: v for k, v in models.items() if k != "_pretrained_"})
    with pytest.raises(ValueError, match="preference has 2 entries but the pool has K = 3"):
        ParetoMergingAlgorithm(steps=1, preference=[0.5, 0.5], trainer_options=FAST).run(models)
    with pytest.raises(ValueError, match="mode 'unlabeled' needs"):
        ParetoMergingAlgorithm(steps=1, mode="unlabeled", trainer_options=FAST).run(models)


@pytest.fixture(scope="module")
def llama_dirs(tmp_path_factory):
    pytest.importorskip("transformers")
    from tiny_llama import make_tiny_llama_dirs

    root = tmp_path_factory.mktemp("llama")
    return {"untied": make_tiny_llama_dirs(root / "untied"),
            "tied": make_tiny_llama_dirs(root / "tied", tie=True, shard=False, seed=1)}


def _causal_pool(dirs, lazy: bool) -> CausalLMPool:
    return CausalLMPool(models={"_pretrained_": str(dirs["pretrained"]), "math": str(dirs["math"]),
                                "code": str(dirs["code"])},
                        tokenizer=None, enable_lazy_loading=lazy, model_kwargs={"torch_dtype": "float32"})


@pytest.mark.parametrize("lazy", [False, True])
@pytest.mark.parametrize("kind", ["untied", "tied"])
def test_causal_lm_pool_eager_and_lazy(llama_dirs, kind, lazy, no_network):
    import transformers
    from paretomerge.pools.sources import LoaderSource, SafetensorsSource

    dirs = llama_dirs[kind]
    fb_pool = _causal_pool(dirs, lazy)
    pool = pool_from_fusion_bench(fb_pool)
    assert isinstance(pool.pretrained, transformers.LlamaForCausalLM)
    # untied: the directories' safetensors are read directly; tied (lm_head not in the files): through the
    # lazy state dict with the tied alias, or (eager) one loaded model at a time
    want = SafetensorsSource if kind == "untied" else (MappingSource if lazy else LoaderSource)
    assert all(isinstance(s, want) for s in pool._sources), [type(s).__name__ for s in pool._sources]
    ours = pm.task_arithmetic(pool, lam=0.3).state_dict()
    fb = TaskArithmeticAlgorithm(scaling_factor=0.3, inplace=False).run(_causal_pool(dirs, False)).state_dict()
    assert ours.keys() == fb.keys()
    assert all(torch.equal(ours[k], fb[k]) for k in fb), "task arithmetic differs from FusionBench's"
    if kind == "tied":
        assert ours["lm_head.weight"].data_ptr() == ours["model.embed_tokens.weight"].data_ptr()


def test_fusion_bench_cli_with_the_shipped_configs_equals_code(llama_dirs, tmp_path, no_network):
    dirs = llama_dirs["untied"]
    out = tmp_path / "merged"
    opts = ["method.steps=3", "method.rank=4", "method.include=attention+mlp", "'method.preference=[0.7,0.3]'",
            "+method.trainer_options.impl=torch", "+method.trainer_options.objective_impl=torch"]
    cmd = [sys.executable, "-m", "fusion_bench.scripts.cli",
           "hydra.searchpath=[pkg://paretomerge.integrations.fusion_bench_config]",
           "method=pareto_merging", "modelpool=pareto_merging_example", "taskpool=dummy",
           f"modelpool.models._pretrained_={dirs['pretrained']}", f"modelpool.models.task_a={dirs['math']}",
           f"modelpool.models.task_b={dirs['code']}", f"merged_model_save_path={out}", "print_config=false",
           *[o.strip("'") for o in opts]]
    run_offline(cmd, cwd=tmp_path)  # tmp_path has no config/ folder (FusionBench would prefer it)
    from safetensors.torch import load_file

    cli = load_file(out / "model.safetensors")
    method = OmegaConf.load(EXAMPLES.parent / "python_api/paretomerge/integrations/fusion_bench_config/method/"
                                              "pareto_merging.yaml")
    method.merge_with_dotlist([o.strip("'").lstrip("+").removeprefix("method.") for o in opts])
    kwargs = {k: v for k, v in method.items() if k != "_target_"}
    code = ParetoMergingAlgorithm(**kwargs).run(_causal_pool(
        {"pretrained": dirs["pretrained"], "math": dirs["math"], "code": dirs["code"]}, True)).state_dict()
    assert set(cli) == set(code)
    assert all(torch.equal(cli[k], code[k]) for k in cli), "the CLI's model differs from the in-code run"
    base = pm.task_arithmetic(pm.ModelPool.from_hf_dirs(dirs["pretrained"], {"m": dirs["math"], "c": dirs["code"]}),
                              lam=0.3).state_dict()
    assert not torch.equal(code["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"])


def test_example_runs(tmp_path, no_network):
    sys.path.insert(0, str(EXAMPLES))
    import fusion_bench_pareto

    merged = fusion_bench_pareto.main(tmp_path, steps=3)
    assert type(merged).__name__ == "LlamaForCausalLM"


def test_public_entry_points_accept_omegaconf(tmp_path):
    """Hydra hands over ListConfig/DictConfig: every public entry point takes any sequence/mapping."""
    from paretomerge.config import BaseConfig, PoolConfig, TrainerConfig, from_dict

    L, D = OmegaConf.create, OmegaConf.create
    assert TrainerConfig(ideal=L([0.1, 0.2])).ideal == [0.1, 0.2]
    assert TrainerConfig(**D({"ideal": [0.0, 1.0], "steps": 3})).steps == 3
    assert BaseConfig(**D({"method": "ties", "k": 0.5, "scope": "tensor"})).scope == "tensor"
    assert PoolConfig(**D({"format": "hf", "pretrained": "p", "finetuned": {"a": "x"}})).finetuned == {"a": "x"}
    cfg = from_dict(D({"pool": {"format": "files", "pretrained": "p.safetensors", "finetuned": {"a": "a.st"},
                                "architecture": {"kind": "hf", "dir": "d"}},
                       "trainer": {"ideal": [0.0], "rank": 2}, "base": {"method": "task_arithmetic", "lam": 0.4}}))
    assert cfg.trainer.ideal == [0.0] and cfg.base.lam == 0.4
    model = Tiny()
    names = pm.convert(model, 2, 2, include=L(["*attn*"]))
    assert names == ["attn"]
    assert isinstance(pm.export(model, L([0.5, 0.5])).attn, nn.MultiheadAttention)
    with pm.use_preference(L([0.25, 0.75])):
        model(torch.randn(2, 3, 12))
    grid = pm.preference_set("grid", L(["a", "b"]), resolution=2)
    assert len(grid) == 3
    models = _in_code_models()
    pool = pm.ModelPool.from_modules(models["_pretrained_"], D({}) if False else {k: v for k, v in models.items()
                                                                                 if k != "_pretrained_"})
    assert len(pm.merge("ties", pool, **D({"k": 0.3, "lam": 1.0, "scope": "tensor"})).state_dict()) > 0
    algo = ParetoMergingAlgorithm(base_options=D({"lam": 0.5}), preference=L([0.2, 0.3, 0.5]),
                                  trainer_options=D({"ideal": [0.0, 0.0, 0.0], **FAST}), steps=1, rank=2)
    assert algo.run(BaseModelPool(models)) is not None
