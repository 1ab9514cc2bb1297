"""Evaluating merged models: preference sets, fronts, hypervolume, reports, accuracy under γ, plots.

``plots`` (matplotlib) is imported on use: ``from paretomerge.evaluation.plots import plot_tradeoff``.
"""
from .control import paired_bootstrap, priority_control
from .evaluate import accuracy, evaluate_tasks
from .front import hypervolume, hypervolume_exact, hypervolume_pymoo, non_dominated, preference_set, simplex_grid
from .report import Report

__all__ = ["Report", "accuracy", "evaluate_tasks", "hypervolume", "hypervolume_exact", "hypervolume_pymoo",
           "non_dominated", "paired_bootstrap", "preference_set", "priority_control", "simplex_grid"]
