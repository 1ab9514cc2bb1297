"""Rounding error of ``fixed_preference(model, γ, exact=False)`` (PEFT-style merge then unmerge) vs exact=True.

    PYTHONPATH=.:python_api python bench/scripts/fixed_pref_unmerge_error.py

One ParetoLinear 768→768 (W ~ N(0, 1/in), r = 16, K = 8), factors scaled so ‖U M(γ) Vᵀ‖_F / ‖W‖_F = ρ;
after c enter/exit cycles (one γ each, fresh per cycle) the restored W' is compared with the original W:
share of entries changed, ‖W' − W‖_F / ‖W‖_F, and the largest change in units of eps · max|W| (the dtype's spacing at W's largest entry).
exact=True restores W bit for bit (copy written back), so its row is all zeros by construction; it is
measured anyway.
"""
from __future__ import annotations

import torch

import paretomerge as pm

D, R, K = 768, 16, 8


def layer(dtype: torch.dtype, rho: float) -> pm.ParetoLinear:
    torch.manual_seed(0)
    m = pm.ParetoLinear(D, D, K, R, bias=False)
    with torch.no_grad():
        m.weight.normal_(0, D**-0.5)
        m.U.normal_()
        m.V.normal_()
        m.G.normal_()
        p = torch.full((K,), 1.0 / K)
        delta = (m.merged_weight(p) - m.weight).norm()
        m.U.mul_(rho * m.weight.norm() / delta)
    return m.to(dtype).requires_grad_(False)


def main() -> None:
    print("| dtype | ρ = ‖ΔW‖/‖W‖ | exact | cycles | entries changed | ‖W'−W‖/‖W‖ | max change / (eps · max|W|) |")
    print("|---|---|---|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        for rho in (0.01, 0.1):
            for exact in (True, False):
                for cycles in (1, 100):
                    m = layer(dtype, rho)
                    w0 = m.weight.detach().clone()
                    for _ in range(cycles):
                        pref = torch.distributions.Dirichlet(torch.ones(K)).sample()
                        with pm.fixed_preference(m, pref, exact=exact):
                            pass
                    w, w0d = m.weight.double(), w0.double()
                    unit = torch.finfo(dtype).eps * w0d.abs().max()
                    changed = (m.weight != w0).double().mean().item()
                    rel = ((w - w0d).norm() / w0d.norm()).item()
                    max_eps = ((w - w0d).abs().max() / unit).item()
                    print(f"| {str(dtype)[6:]} | {rho} | {exact} | {cycles} | {changed:.1%} | {rel:.2e} | {max_eps:.2f} |",
                          flush=True)


if __name__ == "__main__":
    main()
