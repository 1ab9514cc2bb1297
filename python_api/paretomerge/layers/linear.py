"""``ParetoLinear``: ``nn.Linear`` with a preference-conditioned low-rank update
W(γ) = W + U (Σ_k γ_k G_k) Vᵀ, and the factor helpers every Pareto layer shares.

Pareto layers keep the wrapped module's state-dict keys (``weight``/``bias``)
and add the tensor factors beside them (``U``, ``G``, ``V``). At construction
U = 0, so ΔW = 0 and a converted model computes what the original did.
The maths runs in ``pmkernels.pareto_linear``; nothing here knows of Triton.

Preferences are checked once per call path: the public methods taking a
``pref`` check it (``as_preference``) and hand the checked tensor to the
private ``_…`` methods, which never check again.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import pmkernels

from .fixed import check_fixed_call, check_not_fixed
from .preference import PrefLike, resolve_preference, single_preference


def init_factors(U: torch.Tensor, G: torch.Tensor, V: torch.Tensor) -> None:
    """U = 0 (so ΔW = 0, as LoRA zeroes one factor); G, V small random."""
    with torch.no_grad():
        nn.init.zeros_(U)
        nn.init.normal_(G, std=1.0 / math.sqrt(G.shape[0]))
        nn.init.kaiming_uniform_(V.T, a=math.sqrt(5))  # what LoRA uses for its input-side factor


def check_batch(x: torch.Tensor, pref: torch.Tensor, batch_dim: int, layer: str) -> None:
    if pref.dim() == 2 and (x.dim() <= batch_dim or x.shape[batch_dim] != pref.shape[0]):
        raise ValueError(
            f"{layer}: per-sample pref has B = {pref.shape[0]} rows but the input's batch dim "
            f"(dim {batch_dim}) of shape {tuple(x.shape)} does not match; expected one row per sample"
        )


def check_rank_objectives(num_objectives: int, rank: int) -> None:
    if not isinstance(num_objectives, int) or num_objectives < 1:
        raise ValueError(f"num_objectives must be a positive int, got {num_objectives!r}")
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive int, got {rank!r}")


class ParetoLinear(nn.Module):
    """``nn.Linear`` whose weight depends on a preference γ ∈ Δ^{K-1}.

    y = x W(γ)ᵀ + b, W(γ) = weight + U M(γ) Vᵀ, M(γ) = Σ_k γ_k G[:, :, k].
    Parameters: weight (out, in), bias (out,), U (out, r), G (r, r, K), V (in, r).

    ``forward(x, pref=None)``: x (..., in). pref (K,) for the whole call or
    (B, K) per sample along ``batch_dim`` (0 unless the host model puts its
    batch elsewhere); None uses the active preference (``use_preference``).
    """

    stored_transposed = False  # the state-dict tensor is weight (out, in) as the factors use it
    _fixed_levels = ()  # the open fixed_preference blocks (paretomerge.layers.fixed); none by default

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_objectives: int,
        rank: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        impl: str = "auto",
        batch_dim: int = 0,
    ) -> None:
        super().__init__()
        check_rank_objectives(num_objectives, rank)
        kw = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        self.num_objectives, self.rank = num_objectives, rank
        self.impl, self.batch_dim = impl, batch_dim
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **kw))
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None
        self.U = nn.Parameter(torch.empty(out_features, rank, **kw))
        self.G = nn.Parameter(torch.empty(rank, rank, num_objectives, **kw))
        self.V = nn.Parameter(torch.empty(in_features, rank, **kw))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # weight and bias as nn.Linear initialises them.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)
        init_factors(self.U, self.G, self.V)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, num_objectives: int, rank: int, *, impl: str = "auto", batch_dim: int = 0
    ) -> "ParetoLinear":
        """Wrap ``linear``: its weight and bias Parameters are reused (not copied)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        w = linear.weight
        m = cls(linear.in_features, linear.out_features, num_objectives, rank, bias=False,
                device="meta", impl=impl, batch_dim=batch_dim)
        m.weight, m.bias = linear.weight, linear.bias
        r, K = rank, num_objectives
        m.U = nn.Parameter(torch.empty(linear.out_features, r, device=w.device, dtype=w.dtype))
        m.G = nn.Parameter(torch.empty(r, r, K, device=w.device, dtype=w.dtype))
        m.V = nn.Parameter(torch.empty(linear.in_features, r, device=w.device, dtype=w.dtype))
        init_factors(m.U, m.G, m.V)
        return m

    def forward(self, x: torch.Tensor, pref: Optional[PrefLike] = None) -> torch.Tensor:
        if self._fixed_levels:  # inside fixed_preference: the weight holds W(γ)
            check_fixed_call(self, pref, (self.weight, self.U, self.G, self.V))
            return self._plain_forward(x)
        return self._forward_resolved(x, resolve_preference(pref, x.device))

    def _plain_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The wrapped ``nn.Linear``'s forward (what ``to_linear`` returns computes)."""
        return F.linear(x, self.weight, self.bias)

    def _fixed_slots(self):
        """(U, G, V, base weight as a writable (out, in) view) of each weight ``fixed_preference`` bakes."""
        return [(self.U, self.G, self.V, self._weight_out_in())]

    def _forward_resolved(self, x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """forward with a preference already checked and on x's device."""
        check_batch(x, p, self.batch_dim, "ParetoLinear")
        if p.dim() == 2 and self.batch_dim != 0:
            x = x.movedim(self.batch_dim, 0)
        y = pmkernels.pareto_linear(x, self._weight_out_in(), self.bias, self.U, self.G, self.V, p,
                                    impl=self.impl, check_values=False)
        if p.dim() == 2 and self.batch_dim != 0:
            y = y.movedim(0, self.batch_dim)
        return y

    @torch.no_grad()
    def merged_weight(self, pref: PrefLike) -> torch.Tensor:
        """W(γ) (out, in) for one preference (K,), in the weight's dtype."""
        return self._merged_weight(single_preference(pref))

    def _merged_weight(self, p: torch.Tensor) -> torch.Tensor:
        check_not_fixed(self, "merged_weight / export")
        return pmkernels.merged_weight(self._weight_out_in(), self.U, self.G, self.V, p.to(self.weight.device),
                                       check_values=False)

    @torch.no_grad()
    def to_linear(self, pref: PrefLike) -> nn.Linear:
        """A plain ``nn.Linear`` with W(γ) baked in."""
        return self._to_plain(single_preference(pref))

    def _to_plain(self, p: torch.Tensor) -> nn.Linear:
        w = self.weight
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=w.device, dtype=w.dtype)
        lin.weight.copy_(self._merged_weight(p))
        if self.bias is not None:
            lin.bias.copy_(self.bias)
        return lin

    def factored_weights(self, prefix: str = ""):
        """(state-dict key, U, G, V, base weight (out, in)) of each weight this layer factors: one here.

        The base weight is given in the factors' (out, in) orientation; a layer that stores it
        transposed (``ParetoConv1D``) yields a view and sets ``stored_transposed``.
        """
        yield prefix + "weight", self.U, self.G, self.V, self._weight_out_in()

    def _weight_out_in(self) -> torch.Tensor:
        """The base weight in the (out, in) orientation the factors use (a view, never a copy)."""
        return self.weight

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"num_objectives={self.num_objectives}, rank={self.rank}, bias={self.bias is not None}, "
                f"impl={self.impl!r}, batch_dim={self.batch_dim}")
