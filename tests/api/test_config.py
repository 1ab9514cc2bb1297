"""config.py: strict types and finite floats (errors name the dotted field), and the choice lists, written once,
each naming what the code it configures has."""
from __future__ import annotations

import math
import typing

import pmkernels
import pytest
import torch

import paretomerge as pm
from helpers import mutate as _mutate
from paretomerge import config
from paretomerge.config import (BASE_METHODS, COMPRESS_METHODS, INCLUDES, MODES, NORMALIZATIONS, POOL_FORMATS,
                                SCALARIZATIONS, STRUCTURES, TIES_SCOPES, BaseConfig, CompressConfig, ConfigError,
                                MergeConfig, PoolConfig, TrainerConfig, from_dict)
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


@pytest.mark.parametrize("path,value,field", [
    ("trainer", [1, 2], "trainer"),
    ("trainer.per_sample", "yes", "trainer.per_sample"),
    ("trainer.progress", "no", "trainer.progress"),
    ("base.k", True, "base.k"),
    ("trainer.weight_decay", math.inf, "trainer.weight_decay"),
    ("trainer.reg_frobenius", math.nan, "trainer.reg_frobenius"),
    ("trainer.ideal", [math.nan, 0.0], "trainer.ideal.0"),
    ("trainer.lr", "1e-3", "trainer.lr"),
    ("base.lam", [0.1, 0.2], "base.lam"),  # two tasks but method ties below
])
def test_strict_types_and_finite_floats(path, value, field):
    d = _mutate(path, value)
    if path == "base.lam":
        d["base"]["method"] = "ties"
    with pytest.raises(ConfigError) as ei:
        from_dict(d)
    assert ei.value.field == field, str(ei.value)


def test_trainer_config_accepts_any_sequence_for_ideal():
    assert TrainerConfig(ideal=(0.0, 0.1)).ideal == [0.0, 0.1]
    assert TrainerConfig(ideal=torch.tensor([0.0, 0.5]).tolist()).ideal == [0.0, 0.5]


def test_schema_is_available():
    schema = pm.MergeConfig.model_json_schema()
    assert "pool" in schema["properties"] and "trainer" in schema["properties"]
