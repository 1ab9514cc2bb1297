"""``ParetoConv1x1``: a pointwise (1×1, groups = 1) ``nn.Conv2d`` with a preference-conditioned
low-rank update, the same op as ``ParetoLinear`` on the (N·H·W, C) view of its input.

A 1×1 convolution with stride 1 and no padding is a linear map over channels at every pixel:
y[n, :, h, w] = W x[n, :, h, w] + b with W the (out, in) view of the (out, in, 1, 1) weight. So
W(γ) = W + U M(γ) Vᵀ acts exactly as in ``ParetoLinear``; the layer moves channels last, runs
``pmkernels.pareto_linear`` and moves them back. The weight keeps its conv shape and state-dict
key (``weight`` (out, in, 1, 1), ``bias`` (out,)); U, G, V sit beside it.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import pmkernels

from .fixed import check_fixed_call, check_not_fixed
from .linear import check_batch, check_rank_objectives, init_factors
from .preference import PrefLike, resolve_preference, single_preference


def is_pointwise_conv(module: nn.Module) -> bool:
    """True for an ``nn.Conv2d`` (or subclass) that is a per-pixel linear map: 1×1 kernel, stride 1,
    no padding, groups = 1. Subclasses with TensorFlow-style "same" padding (EfficientNet's) qualify:
    a 1×1 kernel at stride 1 pads nothing."""
    return (isinstance(module, nn.Conv2d) and tuple(module.kernel_size) == (1, 1) and tuple(module.stride) == (1, 1)
            and (isinstance(module.padding, str) or tuple(module.padding) == (0, 0)) and module.groups == 1)


class ParetoConv1x1(nn.Module):
    """A pointwise ``nn.Conv2d`` whose weight depends on a preference γ ∈ Δ^{K-1}.

    y = conv1x1(x, W(γ)) + b with W(γ) = weight.view(out, in) + U M(γ) Vᵀ, M(γ) = Σ_k γ_k G[:, :, k].
    Parameters: weight (out, in, 1, 1), bias (out,) or None, U (out, r), G (r, r, K), V (in, r).

    ``forward(x, pref=None)``: x (N, in, H, W) → (N, out, H, W). pref (K,) for the whole call or
    (N, K) per sample; None uses the active preference (``use_preference``).
    """

    _fixed_levels = ()  # the open fixed_preference blocks (paretomerge.layers.fixed); none by default

    def __init__(self, conv: nn.Conv2d, num_objectives: int, rank: int, *, impl: str = "auto") -> None:
        super().__init__()
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
        if not is_pointwise_conv(conv):
            raise ValueError(f"conv must be a pointwise conv (kernel 1×1, stride 1, no padding, groups 1), got "
                             f"kernel_size={conv.kernel_size}, stride={conv.stride}, padding={conv.padding}, "
                             f"groups={conv.groups}")
        check_rank_objectives(num_objectives, rank)
        w = conv.weight
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.num_objectives, self.rank, self.impl = num_objectives, rank, impl
        self.weight, self.bias = conv.weight, conv.bias  # reused, not copied
        self.U = nn.Parameter(torch.empty(self.out_channels, rank, device=w.device, dtype=w.dtype))
        self.G = nn.Parameter(torch.empty(rank, rank, num_objectives, device=w.device, dtype=w.dtype))
        self.V = nn.Parameter(torch.empty(self.in_channels, rank, device=w.device, dtype=w.dtype))
        init_factors(self.U, self.G, self.V)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, num_objectives: int, rank: int, *, impl: str = "auto") -> "ParetoConv1x1":
        """Wrap ``conv``: its weight and bias Parameters are reused (not copied)."""
        return cls(conv, num_objectives, rank, impl=impl)

    def _weight_2d(self) -> torch.Tensor:
        """The (out, in) view of the (out, in, 1, 1) weight (shares storage and autograd)."""
        return self.weight.view(self.out_channels, self.in_channels)

    def forward(self, x: torch.Tensor, pref: Optional[PrefLike] = None) -> torch.Tensor:
        if self._fixed_levels:  # inside fixed_preference: the weight holds W(γ); nn.Conv2d's 1×1 forward
            check_fixed_call(self, pref, (self.weight, self.U, self.G, self.V))
            return F.conv2d(x, self.weight, self.bias)
        return self._forward_resolved(x, resolve_preference(pref, x.device))

    def _fixed_slots(self):
        """(U, G, V, base weight as a writable (out, in) view) of the weight ``fixed_preference`` bakes."""
        return [(self.U, self.G, self.V, self._weight_2d())]

    def _forward_resolved(self, x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """forward with a preference already checked and on x's device."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"ParetoConv1x1: x must have shape (N, {self.in_channels}, H, W), got {tuple(x.shape)}")
        check_batch(x, p, 0, "ParetoConv1x1")
        y = pmkernels.pareto_linear(x.permute(0, 2, 3, 1), self._weight_2d(), self.bias, self.U, self.G, self.V, p,
                                    impl=self.impl, check_values=False)
        return y.permute(0, 3, 1, 2)

    @torch.no_grad()
    def merged_weight(self, pref: PrefLike) -> torch.Tensor:
        """W(γ) (out, in, 1, 1) for one preference (K,), in the weight's dtype."""
        return self._merged_weight(single_preference(pref)).view_as(self.weight)

    def _merged_weight(self, p: torch.Tensor) -> torch.Tensor:
        check_not_fixed(self, "merged_weight / export")
        return pmkernels.merged_weight(self._weight_2d(), self.U, self.G, self.V, p.to(self.weight.device),
                                       check_values=False)

    def _to_plain(self, p: torch.Tensor) -> nn.Conv2d:
        w = self.weight
        conv = nn.Conv2d(self.in_channels, self.out_channels, 1, bias=self.bias is not None, device=w.device,
                         dtype=w.dtype)
        conv.weight.copy_(self._merged_weight(p).view_as(w))
        if self.bias is not None:
            conv.bias.copy_(self.bias)
        return conv

    def factored_weights(self, prefix: str = ""):
        """(state-dict key, U, G, V, base weight as (out, in)) of the one weight this layer factors."""
        yield prefix + "weight", self.U, self.G, self.V, self._weight_2d()

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, out_channels={self.out_channels}, "
                f"num_objectives={self.num_objectives}, rank={self.rank}, bias={self.bias is not None}, "
                f"impl={self.impl!r}")
