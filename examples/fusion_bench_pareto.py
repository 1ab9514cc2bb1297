"""Pareto Merging as a FusionBench method, offline on CPU (needs ``pip install 'pmkernels[fusionbench]'``).

    python examples/fusion_bench_pareto.py [WORKDIR]

Builds tiny local Llama directories (pretrained + "math" + "code"), reads them through FusionBench's
lazy ``CausalLMPool``, trains the Pareto tensors (data-free) with ``ParetoMergingAlgorithm`` and exports
the model for γ = (0.7, 0.3). Then prints the equivalent ``fusion_bench`` command, which uses the
Hydra configs shipped in ``paretomerge/integrations/fusion_bench_config``.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(workdir=None, steps: int = 20) -> "torch.nn.Module":  # noqa: F821
    from fusion_bench.modelpool import CausalLMPool

    from paretomerge.integrations.fusion_bench import ParetoMergingAlgorithm
    from tiny_llama import make_tiny_llama_dirs

    workdir = Path(workdir or tempfile.mkdtemp(prefix="pm_fusion_bench_"))
    dirs = make_tiny_llama_dirs(workdir / "models")
    pool = CausalLMPool(models={"_pretrained_": str(dirs["pretrained"]), "math": str(dirs["math"]),
                                "code": str(dirs["code"])},
                        tokenizer=None, enable_lazy_loading=True, model_kwargs={"torch_dtype": "float32"})
    algo = ParetoMergingAlgorithm(base_method="task_arithmetic", base_options={"lam": 0.3}, rank=4,
                                  include="attention", steps=steps, preference=[0.7, 0.3],
                                  trainer_options={"progress": False, "impl": "torch", "objective_impl": "torch"})
    merged = algo.run(pool)
    first, last = algo.history[0], algo.history[-1]
    print(f"trained {len(algo.history)} steps: loss {first['loss']:.4f} -> {last['loss']:.4f}; "
          f"exported {type(merged).__name__} for preference (0.7, 0.3) over {algo.task_names}")
    print("the same from the fusion_bench CLI (run it outside any directory with a config/ folder):\n"
          "  fusion_bench 'hydra.searchpath=[pkg://paretomerge.integrations.fusion_bench_config]' "
          "method=pareto_merging modelpool=pareto_merging_example taskpool=dummy \\\n"
          f"    modelpool.models._pretrained_={dirs['pretrained']} modelpool.models.task_a={dirs['math']} "
          f"modelpool.models.task_b={dirs['code']} \\\n"
          f"    method.steps={steps} method.rank=4 'method.preference=[0.7,0.3]' merged_model_save_path={workdir / 'merged'}")
    return merged


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
