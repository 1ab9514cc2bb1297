"""paretomerge.integrations.mergekit: MergeKit's task_arithmetic / ties (tensor scope) equal ours, and
merge_method: pareto_merging equals paretomerge.export. Offline, CPU, tiny sharded Llama directories."""
from __future__ import annotations

import sys

import pytest
import torch

from helpers import EXAMPLES, run_offline

pytest.importorskip("transformers")
pytest.importorskip("mergekit", reason="mergekit is not installed: pip install 'pmkernels[mergekit]' (mergekit==0.1.5)")
from mergekit.scripts.run_yaml import main as mergekit_yaml  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import paretomerge as pm  # noqa: E402
from paretomerge.integrations.factors import ParetoFactors  # noqa: E402
from paretomerge.integrations.mergekit import main as paretomerge_mergekit  # noqa: E402
from paretomerge.integrations.mergekit import parse_preference, save_factors  # noqa: E402

FAST = {"progress": False, "impl": "torch", "objective_impl": "torch"}
QUIET = ["--no-copy-tokenizer", "--quiet"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    from tiny_llama import make_tiny_llama_dirs

    d = make_tiny_llama_dirs(tmp_path_factory.mktemp("llama"), tasks=("math", "code", "chat"))
    assert all(len(list(p.glob("model-*.safetensors"))) > 1 for p in d.values())  # sharded
    return d


@pytest.fixture(scope="module")
def pool(dirs):
    return pm.ModelPool.from_hf_dirs(dirs["pretrained"], {t: dirs[t] for t in ("math", "code", "chat")})


def _yaml(tmp_path, method: str, dirs, params: dict, model_params: dict | None = None) -> str:
    import yaml

    models = [{"model": str(dirs[t]), **({"parameters": model_params} if model_params else {})}
              for t in ("math", "code", "chat")]
    cfg = {"merge_method": method, "base_model": str(dirs["pretrained"]), "models": models,
           "parameters": params, "dtype": "float32"}
    path = tmp_path / f"{method}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _mergekit(cfg: str, out) -> dict:
    mergekit_yaml.main(args=[cfg, str(out), *QUIET], standalone_mode=False)
    return load_file(out / "model.safetensors")


def test_task_arithmetic_and_ties_equal_mergekit(dirs, pool, tmp_path, no_network):
    ta = _mergekit(_yaml(tmp_path, "task_arithmetic", dirs, {"lambda": 0.3}, {"weight": 1.0}), tmp_path / "ta")
    ours = pm.task_arithmetic(pool, lam=0.3).state_dict()
    assert ta.keys() == ours.keys()
    assert all(torch.equal(ta[k], ours[k]) for k in ta), "task arithmetic differs from MergeKit's"
    ties = _mergekit(_yaml(tmp_path, "ties", dirs, {"lambda": 0.7}, {"weight": 1.0, "density": 0.2}),
                     tmp_path / "ties")
    tensor_scope = pm.ties_merging(pool, k=0.2, lam=0.7, scope="tensor").state_dict()
    assert all(torch.equal(ties[k], tensor_scope[k]) for k in ties), "ties (scope tensor) differs from MergeKit's"
    model_scope = pm.ties_merging(pool, k=0.2, lam=0.7).state_dict()  # the default: the paper's TIES
    assert any(not torch.equal(ties[k], model_scope[k]) for k in ties)


@pytest.fixture(scope="module")
def trained(pool):
    model = pm.ties_merging(pool, k=0.3, lam=0.8, scope="tensor")
    pm.train_pareto_merging(model, pool, pm.TrainerConfig(rank=3, steps=4, include="attention+mlp", **FAST))
    return model


def test_pareto_merging_equals_export_at_two_preferences(dirs, pool, trained, tmp_path, no_network):
    factors = tmp_path / "factors.safetensors"
    keys = save_factors(trained, factors, base={"method": "ties", "k": 0.3, "lam": 0.8, "scope": "tensor"},
                        task_names=pool.task_names)
    pf = ParetoFactors(factors)
    assert pf.keys == sorted(keys) and pf.task_names == ["math", "code", "chat"] and pf.base.scope == "tensor"
    assert any(k.endswith("q_proj.weight") for k in keys) and any(k.endswith("down_proj.weight") for k in keys)
    outs = []
    for i, pref in enumerate(([0.6, 0.3, 0.1], [0.1, 0.1, 0.8])):
        cfg = _yaml(tmp_path, "pareto_merging", dirs, {"factors": str(factors), "preference": str(pref)})
        out = tmp_path / f"pm{i}"
        if i == 0:  # the console script's module, in a process without network
            run_offline([sys.executable, "-m", "paretomerge.integrations.mergekit", cfg, str(out), *QUIET],
                        cwd=tmp_path)
            baked = load_file(out / "model.safetensors")
        else:
            paretomerge_mergekit([cfg, str(out), *QUIET])
            baked = load_file(out / "model.safetensors")
        ref = pm.export(trained, pref).state_dict()
        assert baked.keys() == ref.keys()
        assert all(torch.equal(baked[k], ref[k]) for k in ref), f"pareto_merging differs from export at {pref}"
        outs.append(baked)
    assert not torch.equal(outs[0][keys[0]], outs[1][keys[0]])  # the preference matters


def test_pareto_merging_errors_are_clear(dirs, pool, trained, tmp_path, no_network, capsys):
    factors = tmp_path / "f.safetensors"
    save_factors(trained, factors, base={"method": "ties", "k": 0.3, "lam": 0.8, "scope": "tensor"})

    def run(params, name="x"):
        paretomerge_mergekit([_yaml(tmp_path, "pareto_merging", dirs, params), str(tmp_path / name), *QUIET])

    with pytest.raises(ValueError, match="preference has 2 entries but the factors have K = 3"):
        run({"factors": str(factors), "preference": "0.5, 0.5"})
    with pytest.raises(ValueError, match="preference must be K numbers"):
        run({"factors": str(factors), "preference": "half, half"})
    with pytest.raises(SystemExit) as e:  # checked before MergeKit starts: one line, exit 2
        run({"factors": str(tmp_path / "nope.safetensors"), "preference": "0.2,0.3,0.5"})
    assert e.value.code == 2 and "parameter 'factors': no such file" in capsys.readouterr().err
    wrong_base = tmp_path / "wrong_base.safetensors"  # the factors say task arithmetic: the rebuilt base differs
    save_factors(trained, wrong_base, base={"method": "task_arithmetic", "lam": 0.3})
    with pytest.raises(ValueError, match="not the one the Pareto factors were trained on"):
        run({"factors": str(wrong_base), "preference": "0.2,0.3,0.5"})
    model_scope = tmp_path / "model_scope.safetensors"
    save_factors(trained, model_scope, base={"method": "ties", "k": 0.3})
    with pytest.raises(ValueError, match="scope 'model'"):
        run({"factors": str(model_scope), "preference": "0.2,0.3,0.5"})
    typo = tmp_path / "typo.yaml"
    typo.write_text(f"merge_method: pareto_merging\nbase_model: {dirs['pretrained']}x\nmodels: [{{model: ./nope}}]\n"
                    f"parameters: {{factors: {factors}, preference: '1'}}\n")
    with pytest.raises(SystemExit, match="does not exist"):
        paretomerge_mergekit([str(typo), str(tmp_path / "t"), *QUIET])
    with pytest.raises(ValueError, match="no Pareto layers"):
        save_factors(pool.pretrained, tmp_path / "none.safetensors", base={"method": "pretrained"})
    with pytest.raises(pm.ConfigError, match="base.method"):
        save_factors(trained, tmp_path / "bad.safetensors", base={"method": "slerp"})
    assert parse_preference("[0.25, 0.75]").tolist() == [0.25, 0.75]


def test_example_runs(tmp_path, no_network):
    sys.path.insert(0, str(EXAMPLES))
    import mergekit_pareto

    assert mergekit_pareto.main(tmp_path, steps=3) == 0.0
