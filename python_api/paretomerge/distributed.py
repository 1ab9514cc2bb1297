"""Pareto Merging across processes with ``torch.distributed`` (gloo on CPU, nccl on GPU; launched by torchrun).

Two ways to split the work (see docs/distributed.md):

* **data-free, layers sharded** (:func:`shard_layers`): the objective f_k = Σ_layers ‖W_l(γ) − W_{k,l}‖² is a
  sum over layers, so each rank owns a disjoint set of converted layers (balanced by weight size, the
  cost of a layer's term), holds only those layers' task-vector deltas, and computes its partial f.
  :func:`sum_across_ranks` adds the partial f's (one all-reduce of K floats, plus one for the
  regulariser) and is differentiable with an *identity* backward: the loss s(f) is formed from the same
  f and γ on every rank, so ∂L/∂f is already equal everywhere and each rank's backward reaches only its
  own layers' parameters. (``torch.distributed.nn.functional.all_reduce`` would all-reduce that gradient
  again in the backward, a second collective that returns world_size × ∂L/∂f.)
* **unlabeled data, DDP-style**: every rank holds the whole model and a 1/world_size slice of each step's
  batch; :func:`mean_across_ranks` averages the per-shard batch statistics (mean entropies and mean
  predictions: one all-reduce, identity backward, or a second all-reduce in the backward with per-sample γ,
  where each rank's loss is over its own samples) and :func:`average_gradients` averages the Pareto
  parameters' gradients (one all-reduce of their total size), which makes a step equal to the
  single-process step on the concatenated batch.

:class:`DistContext` is what the trainer and the program get; ``None`` means one process.
"""
from __future__ import annotations

import datetime
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

import torch
import torch.distributed as dist

__all__ = ["DistContext", "DistributedSetupError", "RankLostError", "average_gradients", "init_from_env",
           "mean_across_ranks", "shard_layers", "sum_across_ranks", "DEFAULT_TIMEOUT_S"]

DEFAULT_TIMEOUT_S = 600.0  # a collective waiting longer than this on a dead or stuck rank raises


class DistributedSetupError(RuntimeError):
    """The process group cannot be set up or the ranks disagree (config, pool, output directory, checkpoint)."""


class RankLostError(DistributedSetupError):
    """A collective failed: another process died (or was killed), or did not answer within the timeout."""


@contextmanager
def _collective(what: str) -> Iterator[None]:
    """Raise a collective's failure (gloo: a RuntimeError naming the socket; nccl/store: ``dist.DistError``)
    as a one-line :class:`RankLostError` naming this rank and the collective."""
    try:
        yield
    except RuntimeError as e:
        raise RankLostError(f"lost the other processes in {what}: another process died or did not answer within "
                            f"the timeout (--dist-timeout) ({_first_sentence(e)})") from e


def _first_sentence(e: BaseException) -> str:
    """'Type: the first line of the message', without gloo's advice after it."""
    first = (str(e).splitlines() or [""])[0].split(" This is typically")[0]
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


@dataclass(frozen=True)
class DistContext:
    """This process's place in an initialised default process group."""

    rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        with _collective("barrier"):
            dist.barrier()

    def all_objects(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        out: list[Any] = [None] * self.world_size
        with _collective("all_gather_object"):
            dist.all_gather_object(out, obj)
        return out

    def gather_to_main(self, obj: Any) -> Optional[list[Any]]:
        """Every rank's ``obj`` on rank 0 (in rank order); None elsewhere."""
        out: Optional[list[Any]] = [None] * self.world_size if self.is_main else None
        with _collective("gather_object"):
            dist.gather_object(obj, out, dst=0)
        return out

    def raise_if_any(self, error: Optional[BaseException]) -> None:
        """Collective: re-raise (on every rank) the first rank's error, so no rank goes on alone."""
        msgs = self.all_objects(None if error is None else (type(error).__name__, str(error)))
        for r, m in enumerate(msgs):
            if m is not None:
                if error is not None:
                    raise error
                raise DistributedSetupError(f"rank {r} failed: {m[0]}: {m[1]}")

    def any_flag(self, flag: bool) -> bool:
        """Collective: True when ``flag`` is True on some rank."""
        t = torch.tensor([1.0 if flag else 0.0])
        with _collective("all_reduce"):
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)


def init_from_env(timeout_s: float = DEFAULT_TIMEOUT_S) -> Optional[DistContext]:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1); None for a single process.

    Backend nccl when CUDA is available, else gloo. ``timeout_s`` bounds every collective, so a dead
    rank makes the others fail instead of hanging. A missing ``MASTER_ADDR``/``MASTER_PORT``/``RANK``
    is a ``DistributedSetupError`` naming the variable.
    """
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return None
    if dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size())
    for var in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(var):
            raise DistributedSetupError(f"WORLD_SIZE={world} but {var} is not set: launch with "
                                        f"`torchrun --nproc-per-node N -m paretomerge ...` or "
                                        f"`paretomerge merge --nproc N ...`")
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    except dist.DistError as e:  # e.g. a peer that never joined: the store times out
        raise RankLostError(f"rank {os.environ['RANK']} of {world} could not join the process group at "
                            f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} ({_first_sentence(e)})") from e
    return DistContext(dist.get_rank(), dist.get_world_size())


def shard_layers(sizes: Sequence[int], world_size: int) -> list[int]:
    """The owning rank of each layer: greedy longest-first onto the least-loaded rank (ties: lower index).

    sizes[i]: the cost of layer i (its weight's element count, which is what the data-free term of a
    layer reads K times). Deterministic from (sizes, world_size); every rank gets at least one layer.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if world_size > len(sizes):
        raise ValueError(f"world size {world_size} is larger than the number of converted weights "
                         f"({len(sizes)}): every rank needs at least one layer; use at most {len(sizes)} processes")
    load = [0] * world_size
    owner = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-int(sizes[i]), i)):
        r = min(range(world_size), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += int(sizes[i])
    return owner


class _SumIdentityBackward(torch.autograd.Function):
    """Forward: all-reduce (sum) over ranks. Backward: identity (the upstream gradient is equal everywhere)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, scale: float) -> torch.Tensor:
        return _all_reduce_sum(t, scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class _SumSumBackward(torch.autograd.Function):
    """Forward: all-reduce (sum) over ranks. Backward: all-reduce (sum) of the upstream gradients (as
    ``torch.distributed.nn.functional.all_reduce``, with this module's one-line error on a lost rank)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return _all_reduce_sum(t, scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _all_reduce_sum(grad, ctx.scale), None


def _all_reduce_sum(t: torch.Tensor, scale: float) -> torch.Tensor:
    out = t.detach().clone(memory_format=torch.contiguous_format)
    with _collective("all_reduce"):
        dist.all_reduce(out)
    return out * scale if scale != 1.0 else out


def sum_across_ranks(t: torch.Tensor) -> torch.Tensor:
    """Σ_ranks t, differentiable; the gradient reaching ``t`` is the (rank-independent) upstream gradient."""
    return _SumIdentityBackward.apply(t, 1.0)


def mean_across_ranks(t: torch.Tensor, world_size: int, *, same_loss: bool = True) -> torch.Tensor:
    """(1/N) Σ_ranks t, differentiable.

    ``same_loss``: the loss formed from the result is the same on every rank (so is its gradient ∂L/∂t̄): the
    backward is the identity, and with gradients then *averaged* over ranks (:func:`average_gradients`) a
    parameter's gradient is (1/N) Σ_r ∂L/∂t̄ · ∂t_r/∂θ = ∂L/∂θ. Otherwise (each rank's loss L_r is over its
    own samples, the whole loss their mean) the backward is a second all-reduce, the mean over ranks of ∂L_r/∂t̄
    (as ``torch.distributed.nn.functional.all_reduce``), which is ∂L/∂t̄ of the whole loss.
    """
    return (_SumIdentityBackward if same_loss else _SumSumBackward).apply(t, 1.0 / world_size)


def average_gradients(params: Sequence[torch.Tensor], world_size: int) -> None:
    """Average ``p.grad`` over ranks in one all-reduce of a flat buffer (missing grads count as 0)."""
    if not params:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    with _collective("all_reduce"):
        dist.all_reduce(flat)
    flat /= world_size
    i = 0
    for p in params:
        n = p.numel()
        g = flat[i:i + n].view_as(p)
        if p.grad is None:
            p.grad = g.clone()
        else:
            p.grad.copy_(g)
        i += n
