"""Merge methods: task arithmetic, TIES, AdaMerging (base merges), the preference-aware baselines
(TA / AdaMerging with preference, MAP) and Pareto Merging.

``MERGE_METHODS`` is the one map from a method's name (as configs, the CLI, the demo and reports
spell it) to its implementation: ``merge(name, pool, **options)`` runs it. Pure tensor helpers live
in ``merge_utils``; the entropy losses in ``losses``.
"""
from __future__ import annotations

import copy
from typing import Any, Callable

import torch.nn as nn

from ..pools import ModelPool
from .adamerging import adamerging
from .losses import entropy
from .merge_utils import LayerwiseMerge, check_pool
from .task_arithmetic import task_arithmetic
from .ties import ties_merging
from .map import MAP, map_merge
from .preference_baselines import TaskVectors, adamerging_preference, ta_preference, weighted_merge


def pretrained(pool: ModelPool) -> nn.Module:
    """No merge: a copy of the pretrained model."""
    check_pool(pool)
    return copy.deepcopy(pool.pretrained)


MERGE_METHODS: dict[str, Callable[..., nn.Module]] = {
    "task_arithmetic": task_arithmetic,
    "ties": ties_merging,
    "adamerging": adamerging,
    "pretrained": pretrained,
    # one model per preference γ (``pref=`` option): see preference_baselines.py and map.py
    "ta_preference": ta_preference,
    "adamerging_preference": adamerging_preference,
    "map": map_merge,
}


def merge_base(base, pool: ModelPool) -> nn.Module:
    """The base merge a ``config.BaseConfig`` names (λ, and TIES' k and scope, where given; else each method's
    defaults): what ``paretomerge merge`` and the FusionBench algorithm start Pareto Merging from."""
    options = {} if base.lam is None or base.method == "pretrained" else {"lam": base.lam}
    if base.method == "ties":
        options.update(k=base.k, scope=base.scope)
    return merge(base.method, pool, **options)


def merge(method: str, pool: ModelPool, **options: Any) -> nn.Module:
    """Run the merge method named ``method`` on ``pool`` (a new module); ``options`` are its keyword arguments."""
    if method not in MERGE_METHODS:
        raise ValueError(f"method must be one of {sorted(MERGE_METHODS)}, got {method!r}")
    return MERGE_METHODS[method](pool, **options)


__all__ = ["LayerwiseMerge", "MERGE_METHODS", "adamerging", "entropy", "merge", "merge_base", "pretrained", "task_arithmetic",
           "ties_merging", "MAP", "TaskVectors", "adamerging_preference", "map_merge", "ta_preference",
           "weighted_merge"]
