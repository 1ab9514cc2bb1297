"""config.py's choice lists: written once, and each names what the code it configures has."""
from __future__ import annotations

import typing

import pmkernels
import pytest
import torch

from paretomerge import config
from paretomerge.config import (BASE_METHODS, COMPRESS_METHODS, INCLUDES, MODES, NORMALIZATIONS, POOL_FORMATS,
                                SCALARIZATIONS, STRUCTURES, TIES_SCOPES, BaseConfig, CompressConfig, MergeConfig,
                                PoolConfig, TrainerConfig)
from paretomerge.layers.convert import PRESETS, QKV_PRESETS
from paretomerge.methods import MERGE_METHODS
from paretomerge.methods.pareto_merging import objectives


def _choices(model, field: str) -> tuple:
    return typing.get_args(model.model_fields[field].annotation)


@pytest.mark.parametrize("model, field, choices", [
    (TrainerConfig, "mode", MODES), (TrainerConfig, "include", INCLUDES),
    (TrainerConfig, "scalarization", SCALARIZATIONS), (TrainerConfig, "structure", STRUCTURES),
    (TrainerConfig, "normalize", NORMALIZATIONS), (TrainerConfig, "impl", pmkernels.IMPLS),
    (TrainerConfig, "objective_impl", pmkernels.WEIGHT_DISTANCES_IMPLS),
    (PoolConfig, "format", POOL_FORMATS), (CompressConfig, "method", COMPRESS_METHODS),
    (BaseConfig, "method", BASE_METHODS), (BaseConfig, "scope", TIES_SCOPES), (MergeConfig, "mode", MODES),
])
def test_field_choices_are_the_named_lists(model, field, choices):
    assert _choices(model, field) == tuple(choices)


def test_choice_lists_name_what_the_code_has():
    assert set(BASE_METHODS) <= set(MERGE_METHODS)
    assert set(INCLUDES) == {k for k in PRESETS if not k.startswith("llm-")}  # the LLM presets: convert() only
    assert set(QKV_PRESETS) <= set(INCLUDES)
    assert objectives.SCALARIZATIONS is config.SCALARIZATIONS
    assert set(config.__all__) >= {"BASE_METHODS", "INCLUDES", "MODES", "POOL_FORMATS", "SCALARIZATIONS"}


def test_impl_lists_one_scheme():
    """Each op module has ``IMPLS`` and ``resolve_impl``; the package exports the lists per op."""
    import importlib

    for name in ("PARETO_LINEAR", "WEIGHT_DISTANCES", "LOW_RANK_DISTANCES"):
        mod = importlib.import_module(f"pmkernels.{name.lower()}")  # the module (the package's name is the op)
        assert getattr(pmkernels, f"{name}_IMPLS") is mod.IMPLS
        assert mod.resolve_impl("auto", torch.device("cpu")) in mod.IMPLS
    assert pmkernels.IMPLS is pmkernels.PARETO_LINEAR_IMPLS and pmkernels.resolve_impl is importlib.import_module(
        "pmkernels.pareto_linear").resolve_impl
