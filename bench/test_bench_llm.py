"""Model-level benchmark: batched decoding of a Llama-shaped causal LM, one γ per request.

The model is built from a config with random weights (no download): a small
Llama-shaped one by default on CPU, a SmolLM2-135M-shaped one with
``--pm-size full``; every q/k/v/o and gate/up/down projection converted
(``include="llm-all"``, K = 8, r = 16). N requests (16 or 64), each with its own
γ, a prompt of PROMPT tokens and NEW generated tokens (greedy, KV cache):

* ``fused``: one batch, per-sample γ through ``paretomerge.llm.generate``
  (impl "auto": Triton on CUDA, the factored torch path on CPU);
* ``export``: one plain model per request (``paretomerge.export``), served one
  after another: what serving many preferences costs without this library;
* ``naive``: one batch, per-sample γ, W(γ) materialised per sample per layer;
* ``plain``: the exported model for one γ serving the whole batch: the floor
  for throughput and the reference for memory.

Tokens/s = N · NEW / median. Peak memory: the weights the path holds plus
what the call allocates above them (``extra_info``: ``weights_bytes``,
``peak_mem_bytes``, ``total_vs_plain``). Before timing, the logits of one
forward of every path are checked against the naive per-sample ones.
"""
from __future__ import annotations

import pytest
import torch

from pmbench_util import DEVICE, DTYPE_NAMES, HAS_CUDA, MEM_METHOD, peak_memory, rel_err, run_pedantic, skip_if_oom, timed

pm = pytest.importorskip("paretomerge", reason="the paretomerge API (python_api/) is needed for the LLM benchmark")
transformers = pytest.importorskip("transformers", reason="transformers is needed for the LLM benchmark")
from paretomerge import llm  # noqa: E402

K, RANK = 8, 16
PROMPT, NEW = 8, 16
ROUNDS, WARMUP = (5, 1) if HAS_CUDA else (3, 0)
CONFIGS = {
    "small": dict(vocab_size=2048, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=4),
    # SmolLM2-135M's shape
    "full": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                 num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True),
}
TOL = {torch.float32: 1e-3, torch.bfloat16: 5e-2}


def model_dtype() -> torch.dtype:
    return torch.bfloat16 if HAS_CUDA else torch.float32


def build(size: str, dtype: torch.dtype):
    cfg = transformers.LlamaConfig(**CONFIGS[size], max_position_embeddings=PROMPT + NEW + 8,
                                   bos_token_id=0, eos_token_id=None, pad_token_id=0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    names = pm.convert(model, K, RANK, include="llm-all")
    with torch.no_grad():  # non-zero factors so the low-rank term is exercised
        for p in pm.pareto_parameters(model):
            p.normal_(0.0, 0.05 if p.dim() == 2 else 1.0)
    return model.to(device=DEVICE, dtype=dtype), names


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())


@pytest.mark.parametrize("impl", ["fused", "export", "naive", "plain"])
@pytest.mark.parametrize("n_requests", [16, 64])
def test_decode(benchmark, size, n_requests, impl):
    dtype = model_dtype()
    benchmark.group = f"llm-decode {n_requests} req | {DTYPE_NAMES[dtype]} | {size}"
    with skip_if_oom():
        model, names = build(size, dtype)
        vocab = model.config.vocab_size
        ids = torch.randint(1, vocab, (n_requests, PROMPT), device=DEVICE)
        mask = torch.ones_like(ids)
        for i in range(n_requests):  # left padding: prompts of different lengths
            mask[i, : i % 4] = 0
        ids[mask == 0] = 0
        prefs = torch.distributions.Dirichlet(torch.ones(K)).sample((n_requests,)).to(DEVICE)
        gen = {"max_new_tokens": NEW, "min_new_tokens": NEW, "do_sample": False, "pad_token_id": 0}
        plain = pm.export(model, prefs[0]) if impl == "plain" else None

        def batched(which: str):
            def run():
                pm.set_impl(model, which)
                return llm.generate(model, ids, prefs, attention_mask=mask, **gen)
            return run

        def export_per_request():
            outs = []
            with torch.no_grad():
                for i in range(n_requests):
                    one = pm.export(model, prefs[i])
                    real = ids[i : i + 1, mask[i].bool()]
                    outs.append(one.generate(real, **gen)[0, real.shape[1]:])
                    del one
            return outs

        def plain_batch():
            with torch.no_grad():
                return plain.generate(ids, attention_mask=mask, **gen)

        fn = {"fused": batched("auto"), "naive": batched("naive"), "export": export_per_request,
              "plain": plain_batch}[impl]

        # Guard: one forward's logits of this path against the naive per-sample path.
        with torch.no_grad():
            pm.set_impl(model, "naive")
            with pm.use_preference(prefs):
                ref = model(ids, attention_mask=mask).logits[:, -1]
            if impl in ("fused", "naive"):
                pm.set_impl(model, "auto" if impl == "fused" else "naive")
                with pm.use_preference(prefs):
                    got = model(ids, attention_mask=mask).logits[:, -1]
            elif impl == "export":
                got = torch.cat([pm.export(model, prefs[i])(ids[i : i + 1], attention_mask=mask[i : i + 1]).logits[:, -1]
                                 for i in range(2)])
                ref = ref[:2]
            else:
                got = plain(ids[:1], attention_mask=mask[:1]).logits[:, -1]
                ref = ref[:1]
            err = rel_err(got, ref)
            assert err < TOL[dtype], f"guard: {impl} logits rel err {err:.3g} against naive per-sample"
        del ref, got

        mem = peak_memory(fn)
        median = run_pedantic(benchmark, timed(fn), rounds=ROUNDS, warmup_rounds=WARMUP, calibrate=False)
        held = weight_bytes(plain if impl == "plain" else model)
    plain_weights = weight_bytes(model) - sum(p.numel() * p.element_size() for p in pm.pareto_parameters(model))
    benchmark.extra_info.update(
        impl=impl, layer_impl={"fused": pmkernels_impl(), "naive": "naive", "export": "plain (exported per request)",
                               "plain": "plain (one γ)"}[impl],
        requests=n_requests, prompt_tokens=PROMPT, new_tokens=NEW, tokens=n_requests * NEW,
        tokens_per_s=(n_requests * NEW / median) if median else None,
        weights_bytes=held, plain_weights_bytes=plain_weights, peak_mem_bytes=mem, peak_mem_method=MEM_METHOD,
        total_vs_plain_weights=((held + (mem or 0)) / plain_weights),
        converted_layers=len(names), dtype=DTYPE_NAMES[dtype], size=size, device=str(DEVICE),
        threads=torch.get_num_threads(),
    )


def pmkernels_impl() -> str:
    import pmkernels

    return pmkernels.resolve_impl("auto", DEVICE)
