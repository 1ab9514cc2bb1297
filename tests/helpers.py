"""Helpers shared by the test modules (import them with ``from helpers import ...``).

The op-level error measures and the output poisoning live in ``pmkernels.testing`` (the benchmarks use
them too) and are re-exported here.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn as nn

from pmkernels.testing import poisoned, rel_err  # noqa: F401  (re-exported)

HAS_CUDA = torch.cuda.is_available()


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op threads set to ``n`` for the block, then restored (conftest pins 1 per test; a
    real-weights benchmark fixture takes 2)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"  # the integration examples import as modules from here
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))

# A tiny open_clip vision tower (1 block, width 16): the architecture of the CLI/config tests.
ARCH = {"kind": "open_clip_vision", "embed_dim": 8,
        "vision_cfg": {"layers": 1, "width": 16, "head_width": 8, "patch_size": 4, "image_size": 8}}


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(12, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(12, 20), nn.GELU(), nn.Linear(20, 12))

    def forward(self, x):
        h = x + self.attn(x, x, x, need_weights=False)[0]
        return h + self.mlp(h)


def tiny_pool(K: int = 3, noise: float = 0.05):
    """A ModelPool of a seeded ``Tiny`` and K copies with Gaussian noise (std ``noise``) on every weight."""
    import paretomerge as pm

    torch.manual_seed(0)
    pre = Tiny()
    fts = {}
    for i in range(K):
        m = copy.deepcopy(pre)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(noise * torch.randn_like(p))
        fts[f"t{i}"] = m
    return pm.ModelPool.from_modules(pre, fts)


def random_pref(K: int, B: int | None = None, generator=None) -> torch.Tensor:
    """Random point(s) of the simplex, strictly inside it."""
    shape = (K,) if B is None else (B, K)
    p = torch.rand(shape, generator=generator, dtype=torch.float64) + 0.05
    return p / p.sum(-1, keepdim=True)


def make_problem(N=(3, 5), d_in=19, d_out=23, r=3, K=4, per_sample=False, bias=True, dtype=torch.float64,
                 device="cpu"):
    """Fresh random inputs of pareto_linear at odd shapes; all factors non-zero."""
    x = torch.randn(*N, d_in, dtype=dtype, device=device)
    weight = torch.randn(d_out, d_in, dtype=dtype, device=device) / d_in**0.5
    b = torch.randn(d_out, dtype=dtype, device=device) if bias else None
    U = torch.randn(d_out, r, dtype=dtype, device=device) / r**0.5
    G = torch.randn(r, r, K, dtype=dtype, device=device)
    V = torch.randn(d_in, r, dtype=dtype, device=device) / d_in**0.5
    pref = random_pref(K, N[0] if per_sample else None).to(device)
    return x, weight, b, U, G, V, pref


def good_config() -> dict:
    """A valid merge config (as parsed YAML) over the tiny ARCH: files named, not written."""
    return {
        "pool": {"format": "files", "architecture": copy.deepcopy(ARCH), "pretrained": "p.safetensors",
                 "finetuned": {"a": "a.safetensors", "b": "b.safetensors"},
                 "heads": {"a": "ha.safetensors", "b": "hb.safetensors"}},
        "base": {"method": "task_arithmetic", "lam": 0.3},
        "mode": "unlabeled",
        "unlabeled": {"a": "ua.safetensors", "b": "ub.safetensors"},
        "trainer": {"steps": 3, "rank": 2},
        "output": {"dir": "out"},
    }


def mutate(path: str, value):
    d = good_config()
    keys = path.split(".")
    node = d
    for k in keys[:-1]:
        node = node[k]
    if value is KeyError:
        del node[keys[-1]]
    else:
        node[keys[-1]] = value
    return d


def assert_pool_objective_matches_dense(base: nn.Module, convert_kwargs: dict, noise: float, pref) -> None:
    """DataFreeObjective.from_pool (what the trainer uses) equals the objective built from whole state dicts,
    on a pool of two noisy copies of ``base`` converted with ``pm.convert(model, 2, **convert_kwargs)``."""
    import paretomerge as pm
    from paretomerge.methods.pareto_merging import DataFreeObjective
    from paretomerge.pools import ModelPool

    fts = {}
    for k in range(2):
        m = copy.deepcopy(base)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(noise * torch.randn_like(p))
        fts[f"t{k}"] = m
    pool = ModelPool.from_modules(base, fts)
    model = copy.deepcopy(base)
    pm.convert(model, 2, **convert_kwargs)
    with torch.no_grad():  # U = 0 at init: make the low-rank term count
        for _, U, *_ in pm.layers.factored_weights(model):
            U.normal_()
    keys = [k for k, *_ in pm.layers.factored_weights(model)]
    dense = DataFreeObjective(model, [pool.finetuned_state(k, keys) for k in range(2)], impl="torch")
    lazy = DataFreeObjective.from_pool(model, pool, impl="torch")
    p = torch.as_tensor(pref, dtype=torch.float32)
    assert torch.allclose(lazy(p), dense(p), rtol=1e-6)


# ----------------------------------------------------------------------------- offline subprocesses
@functools.lru_cache(maxsize=None)
def unshare_works() -> bool:
    """Whether ``unshare --net`` can make a network namespace here (checked once, on first use)."""
    exe = shutil.which("unshare")
    if exe is None:
        return False
    try:
        return subprocess.run([exe, "--net", "true"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False



def run_offline(cmd: list[str], cwd, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``cmd`` with the network unavailable: in a new network namespace (``unshare --net``) where
    possible, always with HF_HUB_OFFLINE=1; PYTHONPATH puts this checkout first."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HYDRA_FULL_ERROR="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "python_api"), os.environ.get("PYTHONPATH", "")]))
    full = (["unshare", "--net"] if unshare_works() else []) + cmd
    res = subprocess.run(full, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{' '.join(full)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res
