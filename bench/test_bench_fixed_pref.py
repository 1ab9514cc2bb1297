"""Model-level benchmark of ``paretomerge.fixed_preference``: a converted model at one fixed γ against the
original model (target ≤ 1.02×), at ViT-B and MiniLM shapes.

Models (random weights, built from configs, no download):

    vit      open_clip vision tower at ViT-B/32 width (768, 12 heads, patch 32, 224², 50 tokens per image);
             small: 2 blocks, 8 images; full: 12 blocks, 32 images
    minilm   transformers BertModel at all-MiniLM-L6-v2 shapes (384, 12 heads, MLP 1536);
             small: 2 layers, 16 × 128 tokens; full: 6 layers, 32 × 128 tokens

Both converted with ``include=ATTENTION_MLP`` (every attention and MLP linear layer), factors non-zero.

Cases (group ``fixed-pref <model>``), forward under ``torch.no_grad()``:

    original     the model before conversion (a deep copy): the floor
    fixed        the converted model inside ``fixed_preference(model, γ)``
    factored     the converted model under ``use_preference(γ)`` (impl="auto"): what fixed_preference saves
    enter-exit   entering and leaving ``fixed_preference`` (bake W(γ), restore W), exact=True and False;
                 peak memory in extra_info (exact: one copy of every converted weight)

``fixed`` also times ``original`` and itself round-robin (each round runs both once, so load from other
processes hits both alike) and records the ratio of medians in extra_info ``ratio_vs_original`` (clock: the
process's CPU time on CPU, robust to a loaded machine with one torch thread; wall time on CUDA).
Before timing, ``fixed``'s output is checked bit for bit against ``export(model, γ)``.
"""
from __future__ import annotations

import copy
import statistics
import time

import pytest
import torch
import torch.nn as nn

from pmbench_util import DEVICE, HAS_CUDA, MEM_METHOD, peak_memory, run_pedantic, sync, timed

pm = pytest.importorskip("paretomerge", reason="the paretomerge API (python_api/) is needed")

K, RANK = 8, 16
ROUNDS = 20 if HAS_CUDA else 9
ROUND_ROBIN = 30 if HAS_CUDA else 15
MODELS = ("vit", "minilm")
CLOCK = time.perf_counter if HAS_CUDA else time.process_time


def build(name: str, size: str) -> tuple[nn.Module, nn.Module, dict]:
    """(original, converted, forward kwargs): same base weights, the converted one with non-zero factors."""
    torch.manual_seed(0)
    full = size == "full"
    if name == "vit":
        open_clip_model = pytest.importorskip("open_clip.model", reason="open_clip_torch is needed")
        cfg = open_clip_model.CLIPVisionCfg(layers=12 if full else 2, width=768, head_width=64, mlp_ratio=4.0,
                                            patch_size=32, image_size=224)
        model = open_clip_model._build_vision_tower(512, cfg)
        inputs = dict(x=torch.randn(32 if full else 8, 3, 224, 224))
    else:
        transformers = pytest.importorskip("transformers", reason="transformers is needed")
        cfg = transformers.BertConfig(vocab_size=1000, hidden_size=384, num_hidden_layers=6 if full else 2,
                                      num_attention_heads=12, intermediate_size=1536)
        model = transformers.BertModel(cfg, add_pooling_layer=False)
        batch = 32 if full else 16
        inputs = dict(input_ids=torch.randint(0, 1000, (batch, 128)),
                      attention_mask=torch.ones(batch, 128, dtype=torch.long))
    model = model.to(DEVICE).eval()
    original = copy.deepcopy(model)
    pm.convert(model, num_objectives=K, rank=RANK, include=pm.ATTENTION_MLP)
    with torch.no_grad():
        for p in pm.pareto_parameters(model):
            p.normal_(0.0, 0.02 if p.dim() == 2 else 1.0)
    return original, model, {k: v.to(DEVICE) for k, v in inputs.items()}


def output(y):
    return y.last_hidden_state if hasattr(y, "last_hidden_state") else y


def converted_weights_bytes(model: nn.Module) -> int:
    return sum(w.numel() * w.element_size() for *_, w in pm.layers.factored_weights(model))


@pytest.mark.parametrize("case", ["original", "fixed", "factored"])
@pytest.mark.parametrize("name", MODELS)
def test_fixed_pref_forward(benchmark, size, name, case):
    benchmark.group = f"fixed-pref {name} | fp32 | {size}"
    original, model, inputs = build(name, size)
    pref = torch.distributions.Dirichlet(torch.ones(K)).sample().double()
    with torch.no_grad():
        ref = output(pm.export(model, pref)(**inputs))

    def run_original():
        with torch.no_grad():
            return output(original(**inputs))

    def run_fixed():  # the block is entered once, outside the timed call: what serving one γ does
        with torch.no_grad():
            return output(model(**inputs))

    def run_factored():
        with torch.no_grad(), pm.use_preference(pref):
            return output(model(**inputs))

    extra = dict(model=name, case=case, device=str(DEVICE), threads=torch.get_num_threads(),
                 converted_weights_bytes=converted_weights_bytes(model))
    if case == "fixed":
        with pm.fixed_preference(model, pref):
            assert torch.equal(run_fixed(), ref), "guard: fixed_preference output differs from export's"
            times = {"original": [], "fixed": []}
            for fn in (run_original, run_fixed):
                fn()
            for _ in range(ROUND_ROBIN):
                for key, fn in (("original", run_original), ("fixed", run_fixed)):
                    sync()
                    t0 = CLOCK()
                    fn()
                    sync()
                    times[key].append(CLOCK() - t0)
            extra["ratio_vs_original"] = statistics.median(times["fixed"]) / statistics.median(times["original"])
            extra["ratio_vs_original_min"] = min(times["fixed"]) / min(times["original"])
            run_pedantic(benchmark, timed(run_fixed), rounds=ROUNDS, warmup_rounds=1, calibrate=False)
    else:
        fn = run_original if case == "original" else run_factored
        fn()
        run_pedantic(benchmark, timed(fn), rounds=ROUNDS, warmup_rounds=1, calibrate=False)
    benchmark.extra_info.update(extra)


@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize("name", MODELS)
def test_fixed_pref_enter_exit(benchmark, size, name, exact):
    benchmark.group = f"fixed-pref {name} enter-exit | fp32 | {size}"
    _, model, _ = build(name, size)
    pref = torch.distributions.Dirichlet(torch.ones(K)).sample().double()

    def enter_exit():
        with pm.fixed_preference(model, pref, exact=exact):
            pass

    enter_exit()
    mem = peak_memory(enter_exit)
    run_pedantic(benchmark, timed(enter_exit), rounds=ROUNDS, warmup_rounds=1, calibrate=False)
    benchmark.extra_info.update(model=name, exact=exact, peak_mem_bytes=mem, peak_mem_method=MEM_METHOD,
                                converted_weights_bytes=converted_weights_bytes(model), device=str(DEVICE))
