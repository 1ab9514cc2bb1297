"""``ParetoConv1D``: GPT-2's ``transformers.pytorch_utils.Conv1D`` (y = x W + b, W stored (in, out))
with the preference-conditioned low-rank update of ``ParetoLinear``.

The wrapped Conv1D's ``weight`` Parameter is reused as is (no copy): same
state-dict key, same (in, out) orientation, so ``state_dict()`` /
``load_state_dict()`` / ``save_pretrained`` of the host model are unchanged
apart from the added factors (U, G, V). The factors use the (out, in)
orientation of every other Pareto layer, W(γ)ᵀ = weightᵀ + U M(γ) Vᵀ: the op
gets ``weight.t()``, a strided view (the torch path hands it to ``F.linear``,
the Triton kernels take arbitrary strides), and ``factored_weights`` yields that
view with ``stored_transposed = True`` so the data-free objective transposes the
fine-tuned (in, out) tensors the same way.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .linear import ParetoLinear, init_factors


def is_conv1d(module: nn.Module) -> bool:
    """True for GPT-2-style ``Conv1D`` (Hugging Face's, or any module of that name with ``nf``/``nx`` and an
    (nx, nf) weight); duck-typed so that transformers is imported only when such a model is converted."""
    w = getattr(module, "weight", None)
    return (type(module).__name__ == "Conv1D" and isinstance(w, torch.Tensor) and w.dim() == 2
            and tuple(w.shape) == (getattr(module, "nx", None), getattr(module, "nf", None)))


class ParetoConv1D(ParetoLinear):
    """GPT-2 ``Conv1D`` whose weight depends on a preference γ.

    y = x (weight + V M(γ)ᵀ Uᵀ) + b: weight (in, out) as Conv1D stores it, bias (out,),
    U (out, r), G (r, r, K), V (in, r). ``forward(x, pref=None)``: x (..., in) -> (..., out);
    pref as for ``ParetoLinear`` ((K,), (B, K) per sample along ``batch_dim``, or the active one).
    """

    stored_transposed = True

    def __init__(self, in_features: int, out_features: int, num_objectives: int, rank: int, bias: bool = True,
                 device=None, dtype=None, *, impl: str = "auto", batch_dim: int = 0) -> None:
        super().__init__(in_features, out_features, num_objectives, rank, bias, device, dtype,
                         impl=impl, batch_dim=batch_dim)
        # Conv1D's storage: (in, out).
        self.weight = nn.Parameter(torch.empty(in_features, out_features, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight.shape != (self.in_features, self.out_features):
            return  # called by ParetoLinear.__init__ before the (in, out) weight exists
        nn.init.normal_(self.weight, std=0.02)  # what Conv1D does
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        init_factors(self.U, self.G, self.V)

    @classmethod
    def from_conv1d(cls, conv: nn.Module, num_objectives: int, rank: int, *, impl: str = "auto",
                    batch_dim: int = 0) -> "ParetoConv1D":
        """Wrap a GPT-2 ``Conv1D``: its weight (in, out) and bias Parameters are reused (not copied)."""
        if not is_conv1d(conv):
            raise TypeError(f"conv must be a GPT-2 Conv1D (weight (nx, nf)), got {type(conv).__name__}")
        w = conv.weight
        nx, nf = w.shape
        m = cls(nx, nf, num_objectives, rank, bias=False, device="meta", impl=impl, batch_dim=batch_dim)
        m.weight, m.bias = conv.weight, conv.bias
        m._plain_cls = type(conv)
        r, K = rank, num_objectives
        m.U = nn.Parameter(torch.empty(nf, r, device=w.device, dtype=w.dtype))
        m.G = nn.Parameter(torch.empty(r, r, K, device=w.device, dtype=w.dtype))
        m.V = nn.Parameter(torch.empty(nx, r, device=w.device, dtype=w.dtype))
        init_factors(m.U, m.G, m.V)
        return m

    def _weight_out_in(self) -> torch.Tensor:
        return self.weight.t()

    def _plain_forward(self, x: torch.Tensor) -> torch.Tensor:
        """GPT-2 ``Conv1D``'s forward (transformers.pytorch_utils): x (..., in) -> (..., out)."""
        size_out = x.shape[:-1] + (self.out_features,)
        x2 = x.reshape(-1, x.shape[-1])
        y = torch.addmm(self.bias, x2, self.weight) if self.bias is not None else x2 @ self.weight
        return y.view(size_out)

    def _to_plain(self, p: torch.Tensor) -> nn.Module:
        cls = getattr(self, "_plain_cls", None)
        if cls is None:
            from transformers.pytorch_utils import Conv1D as cls
        w = self.weight
        plain = cls(self.out_features, self.in_features)  # Conv1D(nf, nx)
        plain.to(device=w.device, dtype=w.dtype)
        with torch.no_grad():
            plain.weight.copy_(self._merged_weight(p).t())
            if self.bias is not None:
                plain.bias.copy_(self.bias)
            else:
                plain.bias.zero_()
        return plain

    def extra_repr(self) -> str:
        return "conv1d (weight stored (in, out)), " + super().extra_repr()
