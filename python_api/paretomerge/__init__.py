"""paretomerge: preference-aware (Pareto) model merging on top of pmkernels.

    import paretomerge as pm
    names = pm.convert(model, num_objectives=4, rank=16, include="attention")
    with pm.use_preference([0.4, 0.2, 0.2, 0.2]):
        y = model(x)
    plain = pm.export(model, [0.4, 0.2, 0.2, 0.2])
"""
from .convert import (
    ATTENTION,
    ATTENTION_MLP,
    MLP,
    convert,
    export,
    pareto_layers,
    pareto_parameters,
    set_impl,
)
from .config import ConfigError, MergeConfig, load_config
from .evaluation import Report, hypervolume, non_dominated, preference_set, simplex_grid
from .io import load_state_dict, save_model, save_state_dict
from .merging import adamerging, entropy, task_arithmetic, ties_merging
from .modules import ParetoLinear, ParetoMultiheadAttention
from .objectives import DataFreeObjective, scalarize, stch
from .pool import ArchitectureMismatchError, ModelPool
from .preference import NoPreferenceError, as_preference, get_preference, set_preference, use_preference
from .trainer import ParetoMergingTrainer, TrainerConfig, train_pareto_merging

# plots (matplotlib) and demo (open_clip, scikit-learn) are imported on use:
#   from paretomerge.plots import plot_tradeoff;  from paretomerge.demo import run_demo

__all__ = [
    "ATTENTION", "ATTENTION_MLP", "MLP",
    "ArchitectureMismatchError", "ConfigError", "DataFreeObjective", "MergeConfig", "ModelPool",
    "NoPreferenceError", "ParetoLinear", "ParetoMergingTrainer", "ParetoMultiheadAttention", "Report",
    "TrainerConfig",
    "adamerging", "as_preference", "convert", "entropy", "export", "get_preference", "hypervolume",
    "load_config", "load_state_dict", "non_dominated", "pareto_layers", "pareto_parameters",
    "preference_set", "save_model", "save_state_dict", "scalarize", "set_impl", "set_preference",
    "simplex_grid", "stch", "task_arithmetic", "ties_merging", "train_pareto_merging", "use_preference",
]
