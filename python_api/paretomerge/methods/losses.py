"""Entropy losses on logits (AdaMerging's surrogate and its anti-collapse companion), said once."""
from __future__ import annotations

import math

import torch

__all__ = ["entropy", "marginal_entropy_gap", "masked_entropy", "mean_prediction", "mean_prediction_gap",
           "per_sample_entropy"]


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean Shannon entropy (nats) of softmax(logits) over the last dim, averaged over all other dims."""
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise TypeError(f"logits must be a floating Tensor, got {type(logits).__name__}"
                        + (f" of dtype {logits.dtype}" if isinstance(logits, torch.Tensor) else ""))
    if logits.dim() == 0 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have shape (..., C) with C >= 1, got {tuple(logits.shape)}")
    return per_sample_entropy(logits).mean()


def per_sample_entropy(logits: torch.Tensor) -> torch.Tensor:
    """(...) Shannon entropy (nats) of softmax(logits) per row, in fp32 or wider (its mean is ``entropy``)."""
    logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def masked_entropy(logits: torch.Tensor, mask: torch.Tensor, per_sample: bool = False) -> torch.Tensor:
    """Mean entropy of softmax(logits) (B, L, C) over the positions where mask (B, L) is true (a causal LM's
    next-token entropy, padding left out): a scalar, or (B,) per sample (its own positions' mean;
    a row with no position gives 0)."""
    if mask.shape != logits.shape[:-1]:
        raise ValueError(f"mask must have shape {tuple(logits.shape[:-1])} (logits without the class dim), got "
                         f"{tuple(mask.shape)}")
    h = per_sample_entropy(logits)
    w = mask.to(h.dtype)
    dims = tuple(range(1, h.dim()))
    if per_sample:
        return (h * w).sum(dims) / w.sum(dims).clamp_min(1)
    return (h * w).sum() / w.sum().clamp_min(1)


def mean_prediction(logits: torch.Tensor) -> torch.Tensor:
    """mean_i softmax(logits_i) over the batch dim 0, in fp32: logits (B, C) -> (C,)."""
    return torch.softmax(logits.float(), dim=-1).mean(0)


def mean_prediction_gap(p: torch.Tensor) -> torch.Tensor:
    """log C − H(p) of a mean prediction p (..., C) (``mean_prediction``; summed over any leading dims)."""
    return math.log(p.shape[-1]) + (p * torch.log(p.clamp_min(1e-12))).sum()


def marginal_entropy_gap(logits: torch.Tensor) -> torch.Tensor:
    """log C − H(mean_i softmax(logits_i)): 0 when the batch's predictions cover the classes evenly,
    log C when every sample predicts the same class (the collapse entropy minimisation drifts to)."""
    return mean_prediction_gap(mean_prediction(logits))
