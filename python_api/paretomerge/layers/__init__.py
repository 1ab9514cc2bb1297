"""Pareto layers (drop-in modules with W(γ) = W + U M(γ) Vᵀ), conversion and export, the preference context."""
from .attention import ParetoMultiheadAttention
from .conv1x1 import ParetoConv1x1, is_pointwise_conv
from .convert import (
    ATTENTION,
    ATTENTION_MLP,
    LLM_ATTENTION,
    LLM_MLP,
    MLP,
    PRESETS,
    convert,
    export,
    factored_weights,
    pareto_layers,
    pareto_parameters,
    set_impl,
    transposed_keys,
)
from .conv1d import ParetoConv1D
from .fixed import fixed_preference, is_fixed
from .linear import ParetoLinear
from .preference import (
    NoPreferenceError,
    PrefLike,
    as_preference,
    get_preference,
    set_preference,
    single_preference,
    use_preference,
)

__all__ = [
    "ATTENTION", "ATTENTION_MLP", "MLP", "PRESETS", "NoPreferenceError", "ParetoLinear", "ParetoMultiheadAttention",
    "PrefLike", "as_preference", "convert", "export", "factored_weights", "get_preference", "pareto_layers",
    "pareto_parameters", "set_impl", "set_preference", "single_preference", "use_preference",
    "LLM_ATTENTION", "LLM_MLP", "ParetoConv1D", "transposed_keys",
    "ParetoConv1x1", "is_pointwise_conv",
    "fixed_preference", "is_fixed",
]
