"""MergeKit merge method ``pareto_merging``: bake W(γ) per tensor from saved Pareto factors.

MergeKit has no plugin entry points: merge methods are registered in-process through
``mergekit.merge_methods.registry``. ``register()`` does that (idempotent); the console script
``paretomerge-mergekit`` (= ``mergekit-yaml`` with ``pareto_merging`` registered) runs a MergeKit YAML::

    merge_method: pareto_merging
    base_model: ./pretrained           # θ0
    models:                            # the K fine-tuned models the factors were trained on
      - model: ./math
      - model: ./code
    parameters:
      factors: pareto_factors.safetensors   # paretomerge.integrations.factors.save_factors
      preference: "0.7, 0.3"                # γ in the factors' task order (one string, see parse_preference)
    dtype: float32

    paretomerge-mergekit merge.yaml ./merged --no-copy-tokenizer

Per output tensor: the base merge the factors were trained on is rebuilt from the inputs (task
arithmetic, ``pretrained``, or TIES with ``scope: tensor``; all symmetric in the fine-tuned models, so
their order does not matter), checked against the fingerprint in the factors file, and for factored
weights W(γ) = W + U M(γ) Vᵀ is baked in with ``pmkernels.merged_weight`` — the arithmetic of
``paretomerge.export``, so the output equals it. ``factors`` is resolved against the working directory
(as MergeKit resolves model paths).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

try:
    import mergekit.merge_methods as _mk_methods
    from mergekit.merge_methods import BasePolicy, InputContract, TensorGroup, merge_method
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("paretomerge.integrations.mergekit needs MergeKit: pip install 'pmkernels[mergekit]' "
                      "(mergekit==0.1.5)") from e

import pmkernels

from ..layers import single_preference
from ..methods.merge_utils import add_delta, sum_task_vectors
from ..methods.ties import ties_tensor
from .factors import FactorsFileError, ParetoFactors, save_factors

__all__ = ["METHOD_NAME", "base_merge_tensor", "main", "parse_preference", "pareto_merging_method", "register",
           "save_factors"]

METHOD_NAME = "pareto_merging"

_OPEN: dict[tuple[str, int], ParetoFactors] = {}


def _factors(path: str) -> ParetoFactors:
    p = Path(path).expanduser().resolve()
    if not p.is_file():
        raise FileNotFoundError(f"pareto_merging: parameter 'factors': no such file {str(p)!r}")
    key = (str(p), p.stat().st_mtime_ns)
    if key not in _OPEN:
        try:
            _OPEN[key] = ParetoFactors(p)
        except FactorsFileError as e:
            raise FactorsFileError(f"pareto_merging: parameter 'factors': {str(e).removeprefix('factors: ')}") from None
    return _OPEN[key]


@torch.no_grad()
def base_merge_tensor(base_cfg, pretrained: torch.Tensor, finetuned: Sequence[torch.Tensor]) -> torch.Tensor:
    """One tensor of the base merge ``base_cfg`` (a ``BaseConfig``) from θ0 and the K fine-tuned tensors,
    with the arithmetic of the pool-level method (so equal to it)."""
    if base_cfg.method == "pretrained" or not (pretrained.is_floating_point() or pretrained.is_complex()):
        return pretrained
    taus = [t.to(dtype=pretrained.dtype) - pretrained for t in finetuned]
    if base_cfg.method == "task_arithmetic":  # the sums of methods.task_arithmetic, in its order
        total: dict[str, torch.Tensor] = {}
        for t in taus:
            sum_task_vectors(total, {"t": t})
        lam = 0.3 if base_cfg.lam is None else base_cfg.lam
        return add_delta(pretrained, lam * total["t"])
    if base_cfg.method == "ties":
        if base_cfg.scope != "tensor":
            raise ValueError("pareto_merging: the factors were trained on TIES with scope 'model' (one trim "
                             "threshold over the whole model), which cannot be rebuilt tensor by tensor; "
                             "train on ties with scope: tensor (or task_arithmetic) to bake in MergeKit")
        return add_delta(pretrained, ties_tensor(taus, k=base_cfg.k, lam=1.0 if base_cfg.lam is None
                                                  else base_cfg.lam))
    raise ValueError(f"pareto_merging: base merge {base_cfg.method!r} is not supported")


@merge_method(name=METHOD_NAME, pretty_name="Pareto Merging",
              reference_url="https://arxiv.org/abs/2408.12105",
              contract=InputContract(base=BasePolicy.REQUIRED), uses_accelerator=False)
def pareto_merging_method(group: TensorGroup, factors: str, preference: str) -> torch.Tensor:
    pf = _factors(factors)
    p = parse_preference(preference)
    if p.shape[0] != pf.num_objectives:
        raise ValueError(f"pareto_merging: preference has {p.shape[0]} entries but the factors have "
                         f"K = {pf.num_objectives} tasks {pf.task_names}")
    fts = [e.tensor for e in group.non_base]
    if len(fts) != pf.num_objectives:
        raise ValueError(f"pareto_merging: {len(fts)} fine-tuned models given but the factors were trained on "
                         f"K = {pf.num_objectives} ({pf.task_names}); list them under models:")
    w = base_merge_tensor(pf.base, group.base.tensor, fts)
    name = group.metadata.name
    if name in pf.keys:
        pf.check_base(name, w)
        U, G, V = (t.to(device=w.device, dtype=w.dtype) for t in pf.factors(name))
        w = pmkernels.merged_weight(w, U, G, V, p.to(w.device), check_values=False)
    return w


def parse_preference(text: str) -> torch.Tensor:
    """γ from MergeKit's ``preference`` string: "0.7,0.3", "0.7 0.3" or "[0.7, 0.3]" (a YAML list would be
    read by MergeKit as a gradient over layers, so γ is one string)."""
    parts = [x for x in str(text).strip().strip("[]()").replace(",", " ").split() if x]
    try:
        values = [float(x) for x in parts]
    except ValueError:
        raise ValueError(f"pareto_merging: preference must be K numbers like \"0.7,0.3\", got {text!r}") from None
    return single_preference(values, name="preference")


def register() -> None:
    """Make ``merge_method: pareto_merging`` available to MergeKit in this process (idempotent)."""
    if any(m is pareto_merging_method for m in _mk_methods.registered_methods()):
        return
    _mk_methods.register(pareto_merging_method)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """``paretomerge-mergekit CONFIG_FILE OUT_PATH [mergekit-yaml options]``: mergekit-yaml with
    ``pareto_merging`` registered. Local model paths must exist (MergeKit would take a missing one for a hub id)."""
    import yaml
    from mergekit.scripts.run_yaml import main as run_yaml

    register()
    args = list(sys.argv[1:] if argv is None else argv)
    if args and not args[0].startswith("-") and Path(args[0]).is_file():
        cfg = yaml.safe_load(Path(args[0]).read_text())
        _check_local_paths(cfg)
        _check_factors(cfg)
    run_yaml.main(args=args, prog_name="paretomerge-mergekit", standalone_mode=argv is None)


def _check_factors(cfg) -> None:
    """Open a ``pareto_merging`` config's factors file before MergeKit starts: a missing or corrupt one is one
    line naming the file and the ``factors`` parameter, not a traceback from inside the merge."""
    params = cfg.get("parameters") if isinstance(cfg, dict) and cfg.get("merge_method") == METHOD_NAME else None
    factors = params.get("factors") if isinstance(params, dict) else None
    if isinstance(factors, str):
        try:
            _factors(factors)
        except (FileNotFoundError, FactorsFileError) as e:
            print(f"paretomerge-mergekit: error: {e}", file=sys.stderr)
            raise SystemExit(2) from None


def _check_local_paths(cfg) -> None:
    """Paths that look local (./x, ../x, /x, ~/x) must exist: MergeKit would try a typo'd one on the hub."""
    refs = []
    if isinstance(cfg, dict):
        refs.append(cfg.get("base_model"))
        for m in cfg.get("models") or []:
            refs.append(m.get("model") if isinstance(m, dict) else m)
    for r in refs:
        if isinstance(r, str) and r.startswith(("./", "../", "/", "~")) and not Path(r).expanduser().exists():
            raise SystemExit(f"paretomerge-mergekit: model path {r!r} does not exist (not downloading it)")


if __name__ == "__main__":
    main()
