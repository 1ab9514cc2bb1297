"""pmkernels: fused ops for preference-aware (Pareto) model merging.

Public ops:
    pareto_linear(x, weight, bias, U, G, V, pref, *, impl="auto") -> (..., out)
    merged_weight(weight, U, G, V, pref) -> (out, in)
    weight_distances(U, G, V, pref, deltas, *, impl="auto") -> (K,)
    low_rank_distances(U, G, V, pref, A, B, *, delta_sq=None, impl="auto") -> (K,)

Implementations: each op module names its own ``IMPLS`` and ``resolve_impl(impl, device)`` (rules:
``pmkernels._dispatch``); the package exports them per op as ``PARETO_LINEAR_IMPLS``,
``WEIGHT_DISTANCES_IMPLS`` and ``LOW_RANK_DISTANCES_IMPLS``. ``IMPLS`` and ``resolve_impl`` are
``pareto_linear``'s (the names the package first exported, kept).
"""
from .pareto_linear import IMPLS, merged_weight, pareto_linear, resolve_impl, triton_available
from .pareto_linear import IMPLS as PARETO_LINEAR_IMPLS
from ._validation import check_finite, check_pref_values
from .low_rank_distances import IMPLS as LOW_RANK_DISTANCES_IMPLS
from .low_rank_distances import low_rank_delta_sq, low_rank_distances
from .reference import (core_matrix, reference_low_rank_distances, reference_pareto_linear,
                        reference_weight_distances)
from .weight_distances import IMPLS as WEIGHT_DISTANCES_IMPLS
from .weight_distances import cpp_available, weight_distances

__all__ = [
    "IMPLS",
    "LOW_RANK_DISTANCES_IMPLS",
    "PARETO_LINEAR_IMPLS",
    "WEIGHT_DISTANCES_IMPLS",
    "check_finite",
    "check_pref_values",
    "cpp_available",
    "core_matrix",
    "low_rank_delta_sq",
    "low_rank_distances",
    "merged_weight",
    "pareto_linear",
    "reference_low_rank_distances",
    "reference_pareto_linear",
    "reference_weight_distances",
    "resolve_impl",
    "triton_available",
    "weight_distances",
]
__version__ = "0.1.0"
