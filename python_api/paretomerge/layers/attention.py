"""``ParetoMultiheadAttention``: ``nn.MultiheadAttention`` whose packed input
projection and output projection carry the preference-conditioned update.

Keeps the wrapped module's keys (``in_proj_weight``/``in_proj_bias``/
``out_proj.*``) and adds ``in_proj_U/G/V`` and ``out_proj.U/G/V``. With
``adapt_out_proj=False`` only the packed q/k/v projection is adapted and
``out_proj`` stays the plain linear layer (the paper's attention-only variant:
0.61 M parameters for ViT-B/32 at K = 8, r = 16).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import pmkernels

from .fixed import check_fixed_call, check_not_fixed
from .linear import ParetoLinear, check_batch, check_rank_objectives, init_factors
from .preference import PrefLike, resolve_preference, single_preference


class ParetoMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` whose packed input and output projections are Pareto layers.

    Keeps the wrapped module's keys (``in_proj_weight``, ``in_proj_bias``,
    ``out_proj.weight``, ``out_proj.bias``); adds ``in_proj_U`` (3E, r),
    ``in_proj_G`` (r, r, K), ``in_proj_V`` (E, r) and ``out_proj.{U,G,V}``.
    Supports what open_clip and most code use: kdim = vdim = embed_dim,
    batch_first either way, key_padding_mask, attn_mask (bool or float),
    need_weights, is_causal, dropout. Per-sample pref rows map to the batch
    dim (dim 1 when batch_first=False).
    """

    _fixed_levels = ()  # the open fixed_preference blocks (paretomerge.layers.fixed); none by default

    def __init__(self, embed_dim: int, num_heads: int, num_objectives: int, rank: int, *, dropout: float = 0.0,
                 bias: bool = True, batch_first: bool = False, impl: str = "auto", adapt_out_proj: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__()
        check_rank_objectives(num_objectives, rank)
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        kw = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.dropout, self.batch_first = dropout, batch_first
        self.num_objectives, self.rank, self._impl = num_objectives, rank, impl
        E, r, K = embed_dim, rank, num_objectives
        self.in_proj_weight = nn.Parameter(torch.empty(3 * E, E, **kw))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * E, **kw)) if bias else None
        self.in_proj_U = nn.Parameter(torch.empty(3 * E, r, **kw))
        self.in_proj_G = nn.Parameter(torch.empty(r, r, K, **kw))
        self.in_proj_V = nn.Parameter(torch.empty(E, r, **kw))
        self.out_proj = (ParetoLinear(E, E, K, r, bias=bias, impl=impl, **kw) if adapt_out_proj
                         else nn.Linear(E, E, bias=bias, **kw))
        nn.init.xavier_uniform_(self.in_proj_weight)
        if bias:
            nn.init.zeros_(self.out_proj.bias)
        init_factors(self.in_proj_U, self.in_proj_G, self.in_proj_V)

    @property
    def impl(self) -> str:
        """The ``pmkernels.pareto_linear`` impl (a property, unlike the other Pareto layers' attribute ``impl``,
        because setting it also sets the adapted ``out_proj``'s)."""
        return self._impl

    @impl.setter
    def impl(self, value: str) -> None:
        self._impl = value
        if isinstance(self.out_proj, ParetoLinear):
            self.out_proj.impl = value

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention, num_objectives: int, rank: int, *,
                 impl: str = "auto", adapt_out_proj: bool = True) -> "ParetoMultiheadAttention":
        """Wrap ``mha``: its projection Parameters are reused (not copied); ``adapt_out_proj=False``
        keeps ``mha.out_proj`` itself (q/k/v only)."""
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"mha must be an nn.MultiheadAttention, got {type(mha).__name__}")
        if not mha._qkv_same_embed_dim:
            raise ValueError("mha with kdim/vdim != embed_dim (separate q/k/v weights) is not supported")
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("mha with add_bias_kv=True or add_zero_attn=True is not supported")
        w = mha.in_proj_weight
        m = cls(mha.embed_dim, mha.num_heads, num_objectives, rank, dropout=mha.dropout,
                bias=mha.in_proj_bias is not None, batch_first=mha.batch_first, impl=impl,
                adapt_out_proj=adapt_out_proj, device="meta")
        m.in_proj_weight, m.in_proj_bias = mha.in_proj_weight, mha.in_proj_bias
        E, r, K = mha.embed_dim, rank, num_objectives
        m.in_proj_U = nn.Parameter(torch.empty(3 * E, r, device=w.device, dtype=w.dtype))
        m.in_proj_G = nn.Parameter(torch.empty(r, r, K, device=w.device, dtype=w.dtype))
        m.in_proj_V = nn.Parameter(torch.empty(E, r, device=w.device, dtype=w.dtype))
        init_factors(m.in_proj_U, m.in_proj_G, m.in_proj_V)
        m.out_proj = (ParetoLinear.from_linear(mha.out_proj, num_objectives, rank, impl=impl) if adapt_out_proj
                      else mha.out_proj)
        return m

    def _project(self, x: torch.Tensor, part: slice, pref: torch.Tensor) -> torch.Tensor:
        b = None if self.in_proj_bias is None else self.in_proj_bias[part]
        return pmkernels.pareto_linear(x, self.in_proj_weight[part], b, self.in_proj_U[part], self.in_proj_G,
                                       self.in_proj_V, pref, impl=self._impl, check_values=False)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: Optional[torch.Tensor] = None,
        need_weights: bool = True,
        attn_mask: Optional[torch.Tensor] = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
        pref: Optional[PrefLike] = None,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        if self._fixed_levels:  # inside fixed_preference: the weights hold W(γ); nn.MultiheadAttention's forward
            check_fixed_call(self, pref, self._baked_parameters())
            return self._plain_mha()(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                     attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                                     is_causal=is_causal)
        p = resolve_preference(pref, query.device)
        unbatched = query.dim() == 2
        if unbatched:
            if p.dim() == 2:
                raise ValueError("ParetoMultiheadAttention: a per-sample pref needs batched inputs, got (L, E)")
            query, key, value = (t.unsqueeze(0) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:  # (L, B, E) -> (B, L, E): per-sample rows then follow dim 0
            check_batch(query, p, 1, "ParetoMultiheadAttention (batch_first=False)")
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        check_batch(query, p, 0, "ParetoMultiheadAttention")
        B, L, E = query.shape
        S = key.shape[1]
        if query is key and key is value:  # self-attention: one packed projection
            q, k, v = self._project(query, slice(None), p).chunk(3, dim=-1)
        else:
            q = self._project(query, slice(0, E), p)
            k = self._project(key, slice(E, 2 * E), p)
            v = self._project(value, slice(2 * E, 3 * E), p)
        H, d = self.num_heads, self.head_dim
        q, k, v = (t.reshape(B, -1, H, d).transpose(1, 2) for t in (q, k, v))
        mask = self._additive_mask(attn_mask, key_padding_mask, B, L, S, q.dtype)
        dropout_p = self.dropout if self.training else 0.0
        if need_weights:
            scores = (q @ k.transpose(-1, -2)) / math.sqrt(d)
            if mask is not None:
                scores = scores + mask
            elif is_causal:
                scores = scores.masked_fill(torch.ones(L, S, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
            weights = scores.softmax(-1)
            out = F.dropout(weights, dropout_p, training=self.training) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                                 is_causal=is_causal and mask is None)
            weights = None
        out = out.transpose(1, 2).reshape(B, L, E)
        out = self.out_proj._forward_resolved(out, p) if isinstance(self.out_proj, ParetoLinear) else self.out_proj(out)
        if unbatched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        if weights is not None:
            weights = weights.mean(1) if average_attn_weights else weights
            if unbatched:
                weights = weights.squeeze(0)
        return out, weights

    def _fixed_slots(self):
        """(U, G, V, base weight) of the packed in_proj (a Pareto ``out_proj`` bakes its own)."""
        return [(self.in_proj_U, self.in_proj_G, self.in_proj_V, self.in_proj_weight)]

    def _baked_parameters(self) -> tuple[torch.Tensor, ...]:
        ps = (self.in_proj_weight, self.in_proj_U, self.in_proj_G, self.in_proj_V)
        if isinstance(self.out_proj, ParetoLinear):
            ps += (self.out_proj.weight, self.out_proj.U, self.out_proj.G, self.out_proj.V)
        return ps

    def _plain_mha(self) -> nn.MultiheadAttention:
        """An ``nn.MultiheadAttention`` sharing this layer's weight Parameters (not copies), made once per
        ``fixed_preference`` block and kept out of the module tree (not a submodule, not in state_dict)."""
        mha = self.__dict__.get("_fixed_plain")
        if mha is None:
            mha = nn.MultiheadAttention(self.embed_dim, self.num_heads, dropout=self.dropout,
                                        bias=self.in_proj_bias is not None, batch_first=self.batch_first,
                                        device="meta")
            mha.in_proj_weight, mha.in_proj_bias = self.in_proj_weight, self.in_proj_bias
            mha.out_proj.weight, mha.out_proj.bias = self.out_proj.weight, self.out_proj.bias
            self.__dict__["_fixed_plain"] = mha
        mha.training = self.training
        return mha

    def _additive_mask(self, attn_mask, key_padding_mask, B, L, S, dtype) -> Optional[torch.Tensor]:
        """attn_mask (L, S) or (B·H, L, S) and key_padding_mask (B, S), bool (True = masked) or
        float (added), merged into one float mask broadcastable to (B, H, L, S)."""
        def as_float(m: torch.Tensor) -> torch.Tensor:
            if m.dtype == torch.bool:
                return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(m, float("-inf"))
            return m.to(dtype)

        mask = None
        if attn_mask is not None:
            mask = as_float(attn_mask)
            if mask.dim() == 3:
                mask = mask.reshape(B, self.num_heads, L, S)
        if key_padding_mask is not None:
            kpm = as_float(key_padding_mask).reshape(B, 1, 1, S)
            mask = kpm if mask is None else mask + kpm
        return mask

    @torch.no_grad()
    def to_mha(self, pref: PrefLike) -> nn.MultiheadAttention:
        """A plain ``nn.MultiheadAttention`` with W(γ) baked into both projections."""
        return self._to_plain(single_preference(pref))

    def _to_plain(self, p: torch.Tensor) -> nn.MultiheadAttention:
        check_not_fixed(self, "export")
        w = self.in_proj_weight
        p = p.to(w.device)
        mha = nn.MultiheadAttention(self.embed_dim, self.num_heads, dropout=self.dropout,
                                    bias=self.in_proj_bias is not None, batch_first=self.batch_first,
                                    device=w.device, dtype=w.dtype)
        mha.in_proj_weight.copy_(pmkernels.merged_weight(w, self.in_proj_U, self.in_proj_G, self.in_proj_V, p,
                                                          check_values=False))
        if self.in_proj_bias is not None:
            mha.in_proj_bias.copy_(self.in_proj_bias)
        op = self.out_proj
        mha.out_proj.weight.copy_(op._merged_weight(p) if isinstance(op, ParetoLinear) else op.weight)
        if self.out_proj.bias is not None:
            mha.out_proj.bias.copy_(self.out_proj.bias)
        return mha

    def factored_weights(self, prefix: str = ""):
        """(state-dict key, U, G, V, base weight) of the packed in_proj and of out_proj."""
        yield prefix + "in_proj_weight", self.in_proj_U, self.in_proj_G, self.in_proj_V, self.in_proj_weight
        if isinstance(self.out_proj, ParetoLinear):
            yield from self.out_proj.factored_weights(prefix + "out_proj.")

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_objectives={self.num_objectives}, "
                f"rank={self.rank}, batch_first={self.batch_first}, impl={self._impl!r}")
