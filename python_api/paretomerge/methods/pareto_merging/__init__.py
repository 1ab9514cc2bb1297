"""Pareto Merging (Chen & Kwok, ICML 2025): objectives, scalarisations and the trainer."""
from .objectives import DataFreeObjective, Normalizer, entropy_objectives, factor_regularizer, scalarize, stch, tch
from .structures import STRUCTURES, apply_structure, closed_form_delta, trainable_count
from .trainer import ParetoMergingTrainer, load_checkpoint, reconvert, train_pareto_merging

__all__ = ["DataFreeObjective", "Normalizer", "ParetoMergingTrainer", "entropy_objectives", "factor_regularizer",
           "load_checkpoint", "reconvert", "scalarize", "stch", "train_pareto_merging",
           "STRUCTURES", "apply_structure", "closed_form_delta", "tch", "trainable_count"]
