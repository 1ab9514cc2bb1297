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
from .modules import ParetoLinear, ParetoMultiheadAttention
from .preference import NoPreferenceError, as_preference, get_preference, set_preference, use_preference

__all__ = [
    "ATTENTION",
    "ATTENTION_MLP",
    "MLP",
    "NoPreferenceError",
    "ParetoLinear",
    "ParetoMultiheadAttention",
    "as_preference",
    "convert",
    "export",
    "get_preference",
    "pareto_layers",
    "pareto_parameters",
    "set_impl",
    "set_preference",
    "use_preference",
]
