"""MAP: Model merging with Amortized Pareto fronts (Li et al., ICLR 2025, arXiv 2406.07529).

1. Sample ``budget`` coefficient vectors c ∈ [low, high]^K (scrambled Sobol or Latin hypercube,
   ``scipy.stats.qmc``).
2. Evaluate each merged model θ0 + Σ_k c_k τ_k on a small **labelled** validation split of every
   task: ``budget`` full-model evaluations, each on K splits (the method's main cost).
3. Fit one quadratic surrogate per task, m̂_k(c) = e + bᵀc + Σ_{i≤j} A_ij c_i c_j
   (P = 1 + K + K(K+1)/2 coefficients, least squares), first on all but a held-out fifth of the
   samples to report the held-out R², then on every sample.
4. Run NSGA-III (``pymoo``, Das–Dennis reference directions) on the K surrogates (maximised) over
   the box [low, high]^K and keep every non-dominated solution (the amortized Pareto front).
5. A user's γ picks one solution: MAP leaves the choice to the practitioner ("solutions with
   various trade-offs … based on diverse preferences"); the rule here is weighted (augmented)
   Tchebycheff, the scalarisation Pareto Merging itself trains with: the solution minimising
   max_k γ_k (1 − m̃_k(c)) + ρ Σ_k γ_k (1 − m̃_k(c)), m̃_k the surrogate min–max normalised over the
   front (1 = the front's best on task k, so the ideal point is 1) and ρ = 1e-4 breaking ties toward
   non-dominated points. Unlike a weighted sum, which can only ever pick points on the front's convex
   hull, every point of the front (non-convex parts included) is the choice of some γ; γ = e_k picks the
   front's best predicted solution on task k, and the rule is scale-free. Serving a new γ costs this
   lookup plus one merge — no evaluation, no training.

The surrogates of a bounded metric (accuracy, for ``MAP``) are clipped to its range (``metric_range``):
a quadratic extrapolates past it (e.g. −3.67 or 1.76 "accuracy" at the box's corners), and NSGA-III
would chase those impossible values and the normalisation in step 5 would be stretched by them.

``amortized_front(metric_fn, K, …)`` runs steps 1–4 for any metric function of c (used on toy
problems in the tests); ``MAP(pool, val, …)`` is the method on a model pool.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from ..evaluation.front import non_dominated
from ..pools import ModelPool
from .merge_utils import check_number, check_pool
from .preference_baselines import TaskVectors, _check_pref

__all__ = ["MAP", "MapFront", "QuadraticSurrogate", "amortized_front", "map_merge", "nsga3_front",
           "num_quadratic_coefficients", "sample_coefficients"]

SAMPLERS = ("sobol", "lhs")
TCHEBYCHEFF_RHO = 1e-4  # the augmented term of the γ → solution rule: ties go to non-dominated points
ACCURACY_RANGE = (0.0, 1.0)  # MAP's metric


def num_quadratic_coefficients(K: int) -> int:
    """P = 1 + K + K(K+1)/2: constant, linear and (i ≤ j) quadratic terms in K variables."""
    return 1 + K + K * (K + 1) // 2


def quadratic_features(c: np.ndarray) -> np.ndarray:
    """(n, K) → (n, P): [1, c_1..c_K, c_i c_j for i ≤ j]."""
    c = np.atleast_2d(np.asarray(c, dtype=np.float64))
    n, K = c.shape
    iu, ju = np.triu_indices(K)
    return np.concatenate([np.ones((n, 1)), c, c[:, iu] * c[:, ju]], axis=1)


@dataclass
class QuadraticSurrogate:
    """m̂(c) = features(c) · w for one task, clipped to ``bounds`` (the metric's range) when given;
    ``r2_holdout`` on samples left out of the first fit."""

    weights: np.ndarray              # (P,)
    r2_holdout: Optional[float]      # None when too few samples were left to hold any out
    r2_train: float
    bounds: Optional[tuple[float, float]] = None

    def __call__(self, c: np.ndarray) -> np.ndarray:
        y = quadratic_features(c) @ self.weights
        # a metric cannot leave its range (accuracy is in [0, 1]); the quadratic extrapolates past it
        return y if self.bounds is None else np.clip(y, *self.bounds)


def _r2(y: np.ndarray, yhat: np.ndarray) -> float:
    ss_tot = float(((y - y.mean()) ** 2).sum())
    ss_res = float(((y - yhat) ** 2).sum())
    return 1.0 - ss_res / ss_tot if ss_tot > 0 else (1.0 if ss_res <= 1e-24 else 0.0)


def fit_quadratic(c: np.ndarray, y: np.ndarray, holdout: float = 0.2,
                  bounds: Optional[tuple[float, float]] = None) -> QuadraticSurrogate:
    """Least-squares quadratic of y (n,) on c (n, K); the last ⌈holdout·n⌉ samples are held out for R²
    (when the rest still has P samples), then the surrogate is refit on all of them. ``bounds``: the
    metric's range, which predictions (and so the R²s) are clipped to."""
    X = quadratic_features(c)
    n, P = X.shape
    h = int(np.ceil(holdout * n))
    r2_ho = None
    if h >= 2 and n - h >= P:
        w, *_ = np.linalg.lstsq(X[: n - h], y[: n - h], rcond=None)
        r2_ho = _r2(y[n - h:], QuadraticSurrogate(w, None, 0.0, bounds)(c[n - h:]))
    w, *_ = np.linalg.lstsq(X, y, rcond=None)
    s = QuadraticSurrogate(w, r2_ho, 0.0, bounds)
    s.r2_train = _r2(y, s(c))
    return s


def sample_coefficients(budget: int, K: int, low: float = 0.0, high: float = 1.0, sampler: str = "sobol",
                        seed: int = 0) -> np.ndarray:
    """(budget, K) coefficient vectors in [low, high]^K: scrambled Sobol or Latin hypercube (seeded)."""
    from scipy.stats import qmc

    if sampler == "sobol":
        eng = qmc.Sobol(d=K, scramble=True, seed=seed)
    elif sampler == "lhs":
        eng = qmc.LatinHypercube(d=K, seed=seed)
    else:
        raise ValueError(f"map.sampler must be one of {SAMPLERS}, got {sampler!r}")
    import warnings
    with warnings.catch_warnings():  # Sobol warns when budget is not a power of 2: balance is then approximate
        warnings.simplefilter("ignore", UserWarning)
        u = eng.random(budget)
    return low + (high - low) * u


def nsga3_front(surrogates: Sequence[Callable[[np.ndarray], np.ndarray]], K: int, low: float, high: float, *,
                n_partitions: Optional[int] = None, n_gen: int = 100, seed: int = 0
                ) -> tuple[np.ndarray, np.ndarray]:
    """NSGA-III (pymoo) maximising the surrogates over [low, high]^K; returns the non-dominated
    (X (m, K), predicted metrics (m, n_obj)) — every solution kept, dominated ones removed."""
    from pymoo.algorithms.moo.nsga3 import NSGA3
    from pymoo.core.problem import Problem
    from pymoo.optimize import minimize
    from pymoo.util.ref_dirs import get_reference_directions

    n_obj = len(surrogates)
    if n_obj < 2:
        raise ValueError(f"MAP needs at least 2 objectives (tasks), got {n_obj}")

    class _Surrogates(Problem):
        def __init__(self) -> None:
            super().__init__(n_var=K, n_obj=n_obj, xl=np.full(K, low), xu=np.full(K, high))

        def _evaluate(self, x, out, *args, **kwargs):
            out["F"] = -np.stack([s(x) for s in surrogates], axis=1)  # pymoo minimises

    if n_partitions is None:
        n_partitions = {2: 40, 3: 12, 4: 6, 5: 4}.get(n_obj, 3)
    ref = get_reference_directions("das-dennis", n_obj, n_partitions=n_partitions)
    res = minimize(_Surrogates(), NSGA3(ref_dirs=ref, pop_size=max(len(ref), 4)), ("n_gen", n_gen),
                   seed=seed, verbose=False)
    X = np.atleast_2d(res.X)
    F = -np.atleast_2d(res.F)
    keep = non_dominated(F)
    return X[keep], F[keep]


@dataclass
class MapFront:
    """MAP's result: the sampled c's and their metrics, the surrogates and the amortized front."""

    samples: np.ndarray                 # (budget, K) coefficient vectors evaluated
    metrics: np.ndarray                 # (budget, n_obj) their measured metrics
    surrogates: list[QuadraticSurrogate]
    solutions: np.ndarray               # (m, K) non-dominated coefficient vectors
    predicted: np.ndarray               # (m, n_obj) their surrogate metrics
    evaluations: int                    # full-model evaluations spent (= budget)
    eval_time_s: float                  # wall time of the evaluations
    search_time_s: float                # wall time of the fits + NSGA-III
    info: dict = field(default_factory=dict)

    @property
    def r2_holdout(self) -> list[Optional[float]]:
        return [s.r2_holdout for s in self.surrogates]

    def select(self, pref: Sequence[float]) -> np.ndarray:
        """The coefficient vector of the solution minimising the augmented Tchebycheff distance
        max_k γ_k (1 − m̃_k) + ρ Σ_k γ_k (1 − m̃_k) to the front's ideal point (see the module doc)."""
        g = np.asarray(_check_pref(pref, self.predicted.shape[1]), dtype=np.float64)
        lo, hi = self.predicted.min(0), self.predicted.max(0)
        gap = 1.0 - (self.predicted - lo) / np.where(hi > lo, hi - lo, 1.0)  # 0 at the front's best on task k
        weighted = gap * g
        return self.solutions[int(np.argmin(weighted.max(1) + TCHEBYCHEFF_RHO * weighted.sum(1)))]


def _check_budget(budget, K: int) -> None:
    P = num_quadratic_coefficients(K)
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < P:
        raise ValueError(f"map.budget must be an int >= the quadratic surrogate's number of coefficients "
                         f"P = 1 + K + K(K+1)/2 = {P} for K = {K} (MAP fits each surrogate by least squares), "
                         f"got {budget!r}")


def amortized_front(metric_fn: Callable[[np.ndarray], Sequence[float]], K: int, *, budget: int = 32,
                    low: float = 0.0, high: float = 1.0, sampler: str = "sobol", seed: int = 0,
                    holdout: float = 0.2, n_gen: int = 100, n_partitions: Optional[int] = None,
                    metric_range: Optional[tuple[float, float]] = None) -> MapFront:
    """MAP's steps 1–4 for ``metric_fn(c) -> metrics`` (higher is better) of coefficient vectors c (K,).

    ``metric_range``: (low, high) the metrics cannot leave (e.g. (0, 1) for accuracy); the surrogates'
    predictions are clipped to it (see the module doc). None: unbounded metrics, no clipping."""
    if isinstance(K, bool) or not isinstance(K, int) or K < 1:
        raise ValueError(f"K must be a positive int, got {K!r}")
    _check_budget(budget, K)
    low, high = check_number(low, "map.low"), check_number(high, "map.high")
    if not low < high:
        raise ValueError(f"map.low must be < map.high, got {low} and {high}")
    if not 0.0 <= holdout < 1.0:
        raise ValueError(f"map.holdout must be in [0, 1), got {holdout}")
    if metric_range is not None:
        metric_range = (check_number(metric_range[0], "map.metric_range[0]"),
                        check_number(metric_range[1], "map.metric_range[1]"))
        if not metric_range[0] < metric_range[1]:
            raise ValueError(f"map.metric_range must be (low, high) with low < high, got {metric_range}")
    c = sample_coefficients(budget, K, low, high, sampler, seed)
    t0 = time.perf_counter()
    y = np.asarray([np.asarray(metric_fn(ci), dtype=np.float64).reshape(-1) for ci in c])
    eval_time = time.perf_counter() - t0
    t1 = time.perf_counter()
    surrogates = [fit_quadratic(c, y[:, k], holdout, metric_range) for k in range(y.shape[1])]
    X, F = nsga3_front(surrogates, K, low, high, n_gen=n_gen, seed=seed, n_partitions=n_partitions)
    return MapFront(c, y, surrogates, X, F, budget, eval_time, time.perf_counter() - t1,
                    {"sampler": sampler, "low": low, "high": high, "seed": seed, "metric_range": metric_range})


def _check_val(val, task_names: Sequence[str]) -> dict:
    if val is None:
        raise ValueError("map.val: MAP evaluates every sampled merge on a labelled validation split; give val= "
                         "{task: (inputs, labels)} for every task (none was given)")
    if not isinstance(val, Mapping):
        raise TypeError(f"map.val must be a mapping task -> (inputs, labels), got {type(val).__name__}")
    missing = [t for t in task_names if t not in val]
    if missing:
        raise ValueError(f"map.val: no labelled validation split for task(s) {missing}; MAP needs one per task "
                         f"{list(task_names)}")
    for t in task_names:
        v = val[t]
        if not (isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(a, torch.Tensor) for a in v)):
            raise ValueError(f"map.val[{t!r}] must be (inputs, labels) tensors, got {type(v).__name__}")
    return dict(val)


class MAP:
    """MAP on a model pool: ``fit()`` builds the amortized front; ``model(pref)`` merges the chosen solution.

    val[task] = (inputs, labels): the labelled validation split of each task (accuracy is the metric);
    ``logits_fn(model, k, x)`` gives task k's logits (default: ``pool.heads[task](model(x))``).
    budget, low, high, sampler, seed, holdout, n_gen: see ``amortized_front``.
    """

    def __init__(self, pool: ModelPool, val: Optional[Mapping[str, tuple]] = None, *,
                 logits_fn: Optional[Callable] = None, budget: int = 32, low: float = 0.0, high: float = 1.0,
                 sampler: str = "sobol", seed: int = 0, holdout: float = 0.2, n_gen: int = 100) -> None:
        check_pool(pool)
        self.pool = pool
        self.tasks = list(pool.task_names)
        self.val = _check_val(val, self.tasks)
        _check_budget(budget, len(pool))
        if sampler not in SAMPLERS:
            raise ValueError(f"map.sampler must be one of {SAMPLERS}, got {sampler!r}")
        if logits_fn is None:
            if pool.heads is None:
                raise ValueError("map.logits_fn: give logits_fn(model, k, x) or a pool with heads")
            heads = pool.heads
            logits_fn = lambda model, k, x: heads[self.tasks[k]](model(x))  # noqa: E731
        self.logits_fn = logits_fn
        self.options = dict(budget=budget, low=low, high=high, sampler=sampler, seed=seed, holdout=holdout,
                            n_gen=n_gen)
        self._tv: Optional[TaskVectors] = None
        self.front: Optional[MapFront] = None

    @property
    def task_vectors(self) -> TaskVectors:
        if self._tv is None:
            self._tv = TaskVectors(self.pool)
        return self._tv

    @torch.no_grad()
    def metrics(self, coefficients: Sequence[float]) -> list[float]:
        """Validation accuracy of every task for θ0 + Σ c_k τ_k (one full-model evaluation)."""
        model = self.task_vectors.merge(coefficients)
        model.eval()
        out = []
        for k, t in enumerate(self.tasks):
            x, y = self.val[t]
            out.append(float((self.logits_fn(model, k, x).argmax(-1) == y).float().mean()))
        return out

    def fit(self) -> MapFront:
        self.front = amortized_front(self.metrics, len(self.tasks), metric_range=ACCURACY_RANGE, **self.options)
        return self.front

    def coefficients(self, pref: Sequence[float]) -> np.ndarray:
        if self.front is None:
            raise RuntimeError("MAP.fit() first")
        return self.front.select(pref)

    def model(self, pref: Sequence[float]) -> nn.Module:
        """The merged model of γ's solution (a new module): a surrogate lookup + one merge."""
        return self.task_vectors.new_model(self.coefficients(pref).tolist())


def map_merge(pool: ModelPool, pref: Sequence[float], val: Optional[Mapping[str, tuple]] = None,
              **options) -> nn.Module:
    """``merge("map", pool, pref=..., val=...)``: fit MAP (``options`` as ``MAP``'s) and return γ's model."""
    m = MAP(pool, val, **options)
    m.fit()
    return m.model(pref)
