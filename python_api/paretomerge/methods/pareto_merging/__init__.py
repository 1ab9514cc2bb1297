"""Pareto Merging (Chen & Kwok, ICML 2025): objectives, scalarisations and the trainer."""
from .objectives import DataFreeObjective, Normalizer, entropy_objectives, factor_regularizer, scalarize, stch, tch
from .structures import STRUCTURES, apply_structure, closed_form_delta, trainable_count
from .trainer import (NonFiniteTrainingError, ParetoMergingTrainer, RunMismatchError, load_checkpoint, reconvert,
                      train_pareto_merging)

__all__ = ["DataFreeObjective", "NonFiniteTrainingError", "Normalizer", "ParetoMergingTrainer", "RunMismatchError",
           "STRUCTURES", "apply_structure", "closed_form_delta", "entropy_objectives", "factor_regularizer",
           "load_checkpoint", "reconvert", "scalarize", "stch", "tch", "train_pareto_merging", "trainable_count"]
