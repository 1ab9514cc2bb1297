"""Low-rank task vectors: factored deltas, truncated-SVD compression, and their file format.

A weight matrix's task vector τ = W_k − W_0 (out, in) is held as
``LowRankDelta(A, B)`` with τ ≈ A Bᵀ, A (out, R), B (in, R): a LoRA adapter
(A = scaling · lora_B, B = lora_Aᵀ, exact) or a truncated SVD of a dense task
vector (TSV-Merge, LoRE-Merging: task vectors are close to low rank). Memory
per matrix drops from out·in to (out + in)·R, and the data-free objective
runs on the factors (``pmkernels.low_rank_distances``) without ever building
an (out, in) tensor per task.

``truncated_svd`` compresses one matrix at a fixed rank R or at the smallest
rank keeping a fraction ``keep`` of the spectrum's energy Σσ². A
``CompressedTaskVectors`` holds the factors of K tasks (plus the uncompressed
task vectors of the remaining tensors, e.g. biases), the per-layer errors,
and saves / loads them as one safetensors file.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence

import torch

from ..io import PathLike, atomic_write

__all__ = ["COMPRESSED_FORMAT", "CompressedTaskVectors", "LowRankDelta", "check_rank_or_keep", "truncated_svd"]

COMPRESSED_FORMAT = "paretomerge-compressed-task-vectors-v1"


@dataclass(frozen=True)
class LowRankDelta:
    """τ ≈ A Bᵀ with A (out, R) and B (in, R)."""

    A: torch.Tensor
    B: torch.Tensor

    def __post_init__(self) -> None:
        if self.A.dim() != 2 or self.B.dim() != 2 or self.A.shape[1] != self.B.shape[1]:
            raise ValueError(f"LowRankDelta needs A (out, R) and B (in, R) with the same R, got "
                             f"{tuple(self.A.shape)} and {tuple(self.B.shape)}")

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in): the shape of the dense delta."""
        return (self.A.shape[0], self.B.shape[0])

    @property
    def rank(self) -> int:
        return self.A.shape[1]

    def dense(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """A Bᵀ (out, in), computed in fp32 or wider, returned in ``dtype`` (default: the computing dtype)."""
        acc = torch.promote_types(self.A.dtype, torch.float32)
        d = self.A.to(acc) @ self.B.to(acc).t()
        return d if dtype is None else d.to(dtype)

    def sq_norm(self) -> float:
        """‖A Bᵀ‖²_F = ⟨AᵀA, BᵀB⟩ without the (out, in) product."""
        a, b = self.A.double(), self.B.double()
        return float(((a.t() @ a) * (b.t() @ b)).sum())

    def to(self, *args, **kwargs) -> "LowRankDelta":
        return LowRankDelta(self.A.to(*args, **kwargs), self.B.to(*args, **kwargs))

    @staticmethod
    def combine(deltas: Sequence["LowRankDelta"], coefs: Sequence[float]) -> "LowRankDelta":
        """Σ_j coefs[j] · A_j B_jᵀ as one factored delta of rank Σ_j R_j (concatenated factors, exact)."""
        if len(deltas) != len(coefs) or not deltas:
            raise ValueError(f"combine needs as many coefficients as deltas (>= 1), got {len(coefs)} and {len(deltas)}")
        acc = torch.promote_types(deltas[0].A.dtype, torch.float32)
        return LowRankDelta(torch.cat([float(c) * d.A.to(acc) for d, c in zip(deltas, coefs)], 1),
                            torch.cat([d.B.to(acc) for d in deltas], 1))


def check_rank_or_keep(rank: Optional[int], keep: Optional[float]) -> None:
    """Exactly one of ``rank`` (an int >= 1) and ``keep`` (a fraction of the energy in (0, 1])."""
    if (rank is None) == (keep is None):
        raise ValueError(f"give exactly one of rank (a fixed R) and keep (a fraction of the spectrum's energy), "
                         f"got rank={rank!r}, keep={keep!r}")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rank must be an int >= 1, got {rank!r}")
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, (int, float))
                             or not 0.0 < float(keep) <= 1.0):
        raise ValueError(f"keep must be a fraction of the spectrum's energy in (0, 1], got {keep!r}")


def truncated_svd(D: torch.Tensor, rank: Optional[int] = None, keep: Optional[float] = None, *, name: str = "delta",
                  method: str = "svd", seed: int = 0) -> tuple[LowRankDelta, float]:
    """D (out, in) ≈ A Bᵀ at rank R; returns (factors, relative Frobenius error ‖D − A Bᵀ‖ / ‖D‖).

    ``rank``: a fixed R (at most min(out, in), else ValueError naming ``name``); ``keep``: the smallest R
    with Σ_{i<R} σ_i² >= keep · Σ σ_i² (needs the full spectrum: method "svd"). ``method``: "svd"
    (``torch.linalg.svd``, exact) or "lowrank" (``torch.svd_lowrank``, randomised, seeded with ``seed``,
    q = R + 8 and 2 power iterations: much faster for R ≪ min(out, in)). A = U_R Σ_R (out, R) and B = V_R
    (in, R), fp32 (fp64 for fp64 input). A zero D gives R = 1 zero factors and error 0.
    """
    check_rank_or_keep(rank, keep)
    if D.dim() != 2:
        raise ValueError(f"{name}: only 2-D weight matrices can be compressed, got shape {tuple(D.shape)}")
    if method not in ("svd", "lowrank"):
        raise ValueError(f"method must be 'svd' or 'lowrank', got {method!r}")
    full = min(D.shape)
    if rank is not None and rank > full:
        raise ValueError(f"{name}: rank {rank} is larger than the matrix allows (shape {tuple(D.shape)}, "
                         f"at most min(out, in) = {full})")
    acc = torch.promote_types(D.dtype, torch.float32)
    Df = D.detach().to(acc)
    total = float(Df.double().pow(2).sum())
    if total == 0.0:
        z = Df.new_zeros
        return LowRankDelta(z(D.shape[0], 1), z(D.shape[1], 1)), 0.0
    if not math.isfinite(total):
        raise ValueError(f"{name}: the task vector has non-finite values")
    if method == "lowrank" and rank is not None and rank + 8 < full:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            u, s, v = torch.svd_lowrank(Df, q=rank + 8, niter=2)
        R = rank
        A, B = u[:, :R] * s[:R], v[:, :R]
    else:
        u, s, vh = torch.linalg.svd(Df, full_matrices=False)
        if rank is None:
            energy = torch.cumsum(s.double().pow(2), 0) / s.double().pow(2).sum()
            R = int(torch.searchsorted(energy, torch.tensor(float(keep) - 1e-12, dtype=torch.float64))) + 1
            R = min(max(R, 1), full)
        else:
            R = rank
        A, B = u[:, :R] * s[:R], vh[:R].t()
    lr = LowRankDelta(A.contiguous(), B.contiguous())
    # ‖D − A Bᵀ‖² = ‖D‖² − ‖A Bᵀ‖² for the SVD's orthogonal truncation; computed directly to stay honest
    # for the randomised method (one (out, in) temporary, the same size as D).
    err = float((Df - lr.dense()).double().pow(2).sum())
    return lr, math.sqrt(max(err, 0.0) / total)


@dataclass
class CompressedTaskVectors:
    """K tasks' task vectors, low-rank where compressed.

    ``factors[task][key]``: LowRankDelta of a compressed matrix; ``dense[task][key]``: the task vector of
    any other floating tensor that differs from the pretrained one (biases, norms); ``sq_norms`` and
    ``sq_errors`` ([task][key], floats): ‖τ‖² and ‖τ − A Bᵀ‖² of each compressed matrix.
    """

    tasks: list[str]
    factors: dict[str, dict[str, LowRankDelta]]
    dense: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    sq_norms: dict[str, dict[str, float]] = field(default_factory=dict)
    sq_errors: dict[str, dict[str, float]] = field(default_factory=dict)

    # -- errors ------------------------------------------------------------------------------------------------
    def layer_errors(self) -> dict[str, dict[str, float]]:
        """{task: {key: ‖τ − A Bᵀ‖ / ‖τ‖}} per compressed matrix (0 for a zero task vector)."""
        return {t: {k: math.sqrt(e / self.sq_norms[t][k]) if self.sq_norms[t][k] > 0 else 0.0
                    for k, e in self.sq_errors.get(t, {}).items()} for t in self.tasks}

    def total_errors(self) -> dict[str, float]:
        """{task: sqrt(Σ_layers ‖τ − A Bᵀ‖²) / sqrt(Σ_layers ‖τ‖²)} over the compressed matrices."""
        out = {}
        for t in self.tasks:
            n = sum(self.sq_norms.get(t, {}).values())
            out[t] = math.sqrt(sum(self.sq_errors.get(t, {}).values()) / n) if n > 0 else 0.0
        return out

    def nbytes(self) -> int:
        """Bytes of the stored factors and dense task vectors."""
        b = sum(d.A.numel() * d.A.element_size() + d.B.numel() * d.B.element_size()
                for f in self.factors.values() for d in f.values())
        return b + sum(t.numel() * t.element_size() for d in self.dense.values() for t in d.values())

    # -- file format -------------------------------------------------------------------------------------------
    def save(self, path: PathLike) -> Path:
        """One safetensors file (atomic): tensors ``<k>.A.<key>``, ``<k>.B.<key>``, ``<k>.dense.<key>`` (k the
        task's index); metadata: the format, the task names and the per-layer squared norms / errors."""
        from safetensors.torch import save_file

        tensors: dict[str, torch.Tensor] = {}
        for i, t in enumerate(self.tasks):
            for key, d in self.factors[t].items():
                tensors[f"{i}.A.{key}"] = d.A.contiguous()
                tensors[f"{i}.B.{key}"] = d.B.contiguous()
            for key, v in self.dense.get(t, {}).items():
                tensors[f"{i}.dense.{key}"] = v.contiguous()
        meta = {"format": COMPRESSED_FORMAT, "tasks": json.dumps(self.tasks),
                "sq_norms": json.dumps(self.sq_norms), "sq_errors": json.dumps(self.sq_errors)}
        path = Path(path)
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
        return path

    @classmethod
    def load(cls, path: PathLike) -> "CompressedTaskVectors":
        """Read a file written by ``save``; errors name the file and the tensor."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no such compressed task vectors file: {str(path)!r}")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                if meta.get("format") != COMPRESSED_FORMAT:
                    raise ValueError(f"{path}: not a compressed task vectors file (metadata format is "
                                     f"{meta.get('format')!r}, expected {COMPRESSED_FORMAT!r})")
                tasks = json.loads(meta["tasks"])
                sd = {n: f.get_tensor(n) for n in f.keys()}
        except ValueError:
            raise
        except Exception as e:  # a truncated or corrupt file: safetensors' own error, with the path
            raise ValueError(f"{path}: unreadable compressed task vectors file ({e})") from None
        factors: dict[str, dict[str, LowRankDelta]] = {t: {} for t in tasks}
        dense: dict[str, dict[str, torch.Tensor]] = {t: {} for t in tasks}
        halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
        for name, v in sd.items():
            idx, kind, key = (name.split(".", 2) + ["", ""])[:3]
            if not idx.isdigit() or int(idx) >= len(tasks) or kind not in ("A", "B", "dense") or not key:
                raise ValueError(f"{path}: unexpected tensor {name!r} (expected '<task index>.A|B|dense.<key>')")
            if kind == "dense":
                dense[tasks[int(idx)]][key] = v
            else:
                halves.setdefault((int(idx), key), {})[kind] = v
        for (i, key), ab in halves.items():
            if set(ab) != {"A", "B"}:
                missing = "A" if "A" not in ab else "B"
                raise ValueError(f"{path}: tensor '{i}.{missing}.{key}' is missing (its pair is there)")
            try:
                factors[tasks[i]][key] = LowRankDelta(ab["A"], ab["B"])
            except ValueError as e:
                raise ValueError(f"{path}: tensors '{i}.A.{key}' / '{i}.B.{key}': {e}") from None
        return cls(tasks, factors, dense, json.loads(meta.get("sq_norms", "{}")),
                   json.loads(meta.get("sq_errors", "{}")))

    def check_against(self, base_shapes: Mapping[str, tuple[int, ...]], origin: str = "compressed task vectors") -> None:
        """Every key names a pretrained tensor of the same shape and every value is finite (ValueError naming the
        origin, task and key: a NaN factor would make every merge from this pool NaN)."""
        from pmkernels import check_finite

        for t in self.tasks:
            for key, d in self.factors[t].items():
                if key not in base_shapes:
                    raise ValueError(f"{origin}: task {t!r}: tensor {key!r} is not in the pretrained model")
                if tuple(d.shape) != tuple(base_shapes[key]):
                    raise ValueError(f"{origin}: task {t!r}: tensor {key!r} has shape {d.shape} (A Bᵀ) but the "
                                     f"pretrained model's is {tuple(base_shapes[key])}")
                for part, f in (("A", d.A), ("B", d.B)):
                    check_finite(f"{origin}: task {t!r}: factor {part} of {key!r}", f)
            for key, v in self.dense.get(t, {}).items():
                if key not in base_shapes or tuple(v.shape) != tuple(base_shapes[key]):
                    raise ValueError(f"{origin}: task {t!r}: dense tensor {key!r} of shape {tuple(v.shape)} does "
                                     f"not match the pretrained model ({base_shapes.get(key)})")
                if v.is_floating_point():
                    check_finite(f"{origin}: task {t!r}: dense tensor {key!r}", v)
