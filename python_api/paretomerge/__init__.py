"""paretomerge: preference-aware (Pareto) model merging on top of pmkernels.

    import paretomerge as pm
    names = pm.convert(model, num_objectives=4, rank=16, include="attention")
    with pm.use_preference([0.4, 0.2, 0.2, 0.2]):
        y = model(x)
    plain = pm.export(model, [0.4, 0.2, 0.2, 0.2])
    with torch.no_grad(), pm.fixed_preference(model, [0.4, 0.2, 0.2, 0.2]):
        y = model(x)   # W(γ) baked in place: the original model's cost; restored on exit

Subpackages: ``layers`` (Pareto modules, convert/export, preference), ``pools`` (model pools and
their sources), ``methods`` (task arithmetic, TIES, AdaMerging, Pareto Merging; ``MERGE_METHODS``),
``evaluation`` (fronts, hypervolume, reports, plots); ``config`` (pydantic models), ``program``
(merge / eval / export / generate runs), ``llm`` (causal LMs: per-request generate, export to Hugging
Face and PEFT), ``cli``, ``demo``. Every name below is importable from the top level.
"""
from .config import ConfigError, MergeConfig, TrainerConfig, load_config
from .evaluation import (Report, accuracy, evaluate_tasks, hypervolume, non_dominated, paired_bootstrap,
                         preference_set, priority_control, simplex_grid)
from .io import atomic_write, load_state_dict, save_model, save_state_dict
from .layers import (
    ATTENTION,
    ATTENTION_MLP,
    MLP,
    NoPreferenceError,
    ParetoConv1D,
    ParetoLinear,
    ParetoMultiheadAttention,
    as_preference,
    convert,
    export,
    fixed_preference,
    get_preference,
    pareto_layers,
    pareto_parameters,
    set_impl,
    set_preference,
    use_preference,
)
from .methods import MERGE_METHODS, adamerging, entropy, merge, task_arithmetic, ties_merging
from .methods.pareto_merging import DataFreeObjective, ParetoMergingTrainer, scalarize, stch, train_pareto_merging
from .pools import ArchitectureMismatchError, ModelPool
from .pools.compress import CompressedTaskVectors, LowRankDelta
from .plan import memory_plan
from .layers import ParetoConv1x1

# plots (matplotlib) and demo (open_clip, scikit-learn) are imported on use:
#   from paretomerge.evaluation.plots import plot_tradeoff;  from paretomerge.demo import run_demo

__all__ = [
    "ATTENTION", "ATTENTION_MLP", "MERGE_METHODS", "MLP",
    "ArchitectureMismatchError", "ConfigError", "DataFreeObjective", "MergeConfig", "ModelPool",
    "NoPreferenceError", "ParetoLinear", "ParetoMergingTrainer", "ParetoMultiheadAttention", "Report",
    "TrainerConfig",
    "accuracy", "adamerging", "as_preference", "atomic_write", "convert", "entropy", "evaluate_tasks", "export",
    "get_preference", "hypervolume", "load_config", "load_state_dict", "merge", "non_dominated", "pareto_layers",
    "pareto_parameters", "preference_set", "save_model", "save_state_dict", "scalarize", "set_impl",
    "set_preference", "simplex_grid", "stch", "task_arithmetic", "ties_merging", "train_pareto_merging",
    "use_preference",
    "ParetoConv1D",
    "CompressedTaskVectors", "LowRankDelta", "memory_plan",
    "ParetoConv1x1",
    "fixed_preference",
]

# the paper's baselines (MAP, TA / AdaMerging with preference) and the structure variants
from .methods import MAP, adamerging_preference, ta_preference  # noqa: E402
from .methods.pareto_merging import STRUCTURES, apply_structure  # noqa: E402

__all__ += ["MAP", "STRUCTURES", "adamerging_preference", "apply_structure", "ta_preference"]
__all__ += ["paired_bootstrap", "priority_control"]
