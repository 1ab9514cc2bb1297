"""Pareto Merging (Chen & Kwok, ICML 2025): objectives, scalarisations and the trainer."""
from .objectives import DataFreeObjective, Normalizer, entropy_objectives, factor_regularizer, scalarize, stch
from .trainer import (NonFiniteTrainingError, ParetoMergingTrainer, RunMismatchError, load_checkpoint, reconvert,
                      train_pareto_merging)

__all__ = ["DataFreeObjective", "NonFiniteTrainingError", "Normalizer", "RunMismatchError", "ParetoMergingTrainer", "entropy_objectives", "factor_regularizer",
           "load_checkpoint", "reconvert", "scalarize", "stch", "train_pareto_merging"]
