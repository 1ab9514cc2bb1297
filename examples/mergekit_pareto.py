"""Pareto factors baked by MergeKit, offline on CPU (needs ``pip install 'pmkernels[mergekit]'``).

    python examples/mergekit_pareto.py [WORKDIR]

Builds tiny sharded Llama directories, trains Pareto Merging (data-free, task-arithmetic base) with
paretomerge, saves the factors (``save_factors``), and bakes the model for γ = (0.7, 0.3) with MergeKit
through ``paretomerge-mergekit`` (= ``mergekit-yaml`` with the ``pareto_merging`` method registered)
from the YAML below; checks the result equals ``paretomerge.export``.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

YAML = """\
merge_method: pareto_merging
base_model: {pretrained}
models:
  - model: {math}
  - model: {code}
parameters:
  factors: {factors}
  preference: "0.7, 0.3"      # γ in the factors' task order (math, code)
dtype: float32
"""


def main(workdir=None, steps: int = 20) -> float:
    from safetensors.torch import load_file

    import paretomerge as pm
    from paretomerge.integrations.mergekit import main as paretomerge_mergekit
    from paretomerge.integrations.mergekit import save_factors
    from tiny_llama import make_tiny_llama_dirs

    workdir = Path(workdir or tempfile.mkdtemp(prefix="pm_mergekit_"))
    dirs = make_tiny_llama_dirs(workdir / "models")
    pool = pm.ModelPool.from_hf_dirs(dirs["pretrained"], {"math": dirs["math"], "code": dirs["code"]})
    model = pm.task_arithmetic(pool, lam=0.3)
    pm.train_pareto_merging(model, pool, pm.TrainerConfig(rank=4, steps=steps, progress=False, impl="torch",
                                                          objective_impl="torch"))
    factors = workdir / "pareto_factors.safetensors"
    save_factors(model, factors, base={"method": "task_arithmetic", "lam": 0.3}, task_names=pool.task_names)
    cfg = workdir / "pareto_merging.yaml"
    cfg.write_text(YAML.format(pretrained=dirs["pretrained"], math=dirs["math"], code=dirs["code"],
                               factors=factors))
    out = workdir / "merged"
    print(f"paretomerge-mergekit {cfg} {out} --no-copy-tokenizer")
    paretomerge_mergekit([str(cfg), str(out), "--no-copy-tokenizer", "--quiet"])
    baked = load_file(out / "model.safetensors")
    ref = pm.export(model, [0.7, 0.3]).state_dict()
    diff = max(float((baked[k] - ref[k]).abs().max()) for k in baked)
    print(f"MergeKit's pareto_merging vs paretomerge.export: max |diff| = {diff:.3g} over {len(baked)} tensors")
    return diff


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
