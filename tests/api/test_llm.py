"""Causal LMs: GPT-2 Conv1D and Llama-family conversion, one γ per request in generate, export to Hugging Face
and PEFT, the causal-LM entropy objective, the CLI. Tiny random configs built here; nothing downloaded."""
from __future__ import annotations

import json
import os

import pytest

import torch
import torch.nn as nn

transformers = pytest.importorskip("transformers")

import paretomerge as pm  # noqa: E402
from paretomerge import llm  # noqa: E402
from paretomerge.layers import ParetoConv1D, ParetoLinear, transposed_keys  # noqa: E402
import pmkernels  # noqa: E402
from pmkernels import reference_pareto_linear  # noqa: E402

from helpers import assert_pool_objective_matches_dense  # noqa: E402

FAMILIES = ("llama", "qwen2", "mistral", "gpt2")
K, RANK, VOCAB = 3, 4, 96
PAD, EOS = 1, 2


def tiny_lm(family: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    ids = {"bos_token_id": 0, "eos_token_id": EOS, "pad_token_id": PAD}
    if family == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64, **ids)
        return transformers.GPT2LMHeadModel(cfg).eval()
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, **ids)
    cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
           "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM)}[family]
    return cls[1](cls[0](**common)).eval()


def converted(family: str, include: str = "llm-all", std: float = 0.3) -> nn.Module:
    """A tiny LM converted, with random (non-zero) factors so every γ gives a different model."""
    m = tiny_lm(family)
    pm.convert(m, K, RANK, include=include)
    with torch.no_grad():
        for p in pm.pareto_parameters(m):
            p.normal_(std=std)
    return m


def left_padded(batch: int = 3, length: int = 7, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    for i in range(batch):
        mask[i, : (i * 2) % length] = 0  # row i: (2i mod L) pads on the left
    ids[mask == 0] = PAD
    return ids, mask


PREFS = torch.tensor([[1.0, 0.0, 0.0], [0.2, 0.3, 0.5], [0.0, 0.1, 0.9]])


# ----------------------------------------------------------------------------- conversion
@pytest.mark.parametrize("family", FAMILIES)
def test_convert_presets_keep_keys_and_outputs(family):
    m = tiny_lm(family)
    keys = list(m.state_dict())
    ids, mask = left_padded()
    with torch.no_grad():
        before = m(ids, attention_mask=mask).logits
    attn = pm.convert(m, K, RANK, include="llm-attention")
    mlp = pm.convert(m, K, RANK, include="llm-mlp")
    per_block = (2, 2) if family == "gpt2" else (4, 3)
    assert (len(attn), len(mlp)) == (2 * per_block[0], 2 * per_block[1])
    assert not any("lm_head" in n or "emb" in n or "wte" in n for n in attn + mlp)
    # same keys in the same order, the factors added beside each converted weight
    assert [k for k in m.state_dict() if not k.endswith((".U", ".G", ".V"))] == keys
    if family == "gpt2":
        layer = m.transformer.h[0].attn.c_attn
        assert isinstance(layer, ParetoConv1D) and layer.weight.shape == (32, 96)  # (in, out) kept
    with torch.no_grad(), pm.use_preference(PREFS):  # U = 0 at init: the base model, for any γ
        after = m(ids, attention_mask=mask).logits
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_tied_lm_head_never_converted(family):
    m = tiny_lm(family)
    if family == "llama":
        m = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
            tie_word_embeddings=True, pad_token_id=PAD, bos_token_id=0, eos_token_id=EOS))
    assert m.lm_head.weight is m.get_input_embeddings().weight
    names = pm.convert(m, K, RANK, include=None)  # every layer type, but a tied weight is left alone
    assert "lm_head" not in names and isinstance(m.lm_head, nn.Linear)
    assert m.lm_head.weight is m.get_input_embeddings().weight
    with pytest.raises(ValueError, match="tied"):
        pm.convert(tiny_lm(family) if family == "gpt2" else m, K, RANK, include=["lm_head"])


def test_conv1d_wraps_without_copy_and_matches_float64_reference():
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(13, 7)  # nf = 13 out, nx = 7 in
    layer = ParetoConv1D.from_conv1d(conv, K, 3)
    assert layer.weight is conv.weight and layer.bias is conv.bias and layer.weight.shape == (7, 13)
    with torch.no_grad():
        layer.U.normal_()
        layer.bias.normal_()
    x = torch.randn(4, 5, 7, requires_grad=True)
    for pref in (torch.tensor([0.2, 0.5, 0.3]), torch.softmax(torch.randn(4, K), -1)):
        for impl in ("torch", "naive", "triton"):
            layer.impl = impl
            params = [x, layer.weight, layer.bias, layer.U, layer.G, layer.V]
            for p in params:
                p.requires_grad_(True)
                p.grad = None
            y = layer(x, pref)
            dy = torch.randn_like(y)
            y.backward(dy)
            grads = [p.grad.clone() for p in params]
            # float64 ground truth: y = x W(γ)ᵀ + b with W = weightᵀ (out, in)
            p64 = [p.detach().double().requires_grad_(True) for p in params]
            ref = reference_pareto_linear(p64[0], p64[1].t(), p64[2], p64[3], p64[4], p64[5], pref.double())
            ref.backward(dy.double())
            scale = ref.abs().max()
            assert (y.double() - ref).abs().max() <= 1e-5 * scale, impl
            for name, g, r in zip(("x", "weight", "bias", "U", "G", "V"), grads, p64):
                assert g.shape == r.shape, (impl, name)
                assert (g.double() - r.grad).abs().max() <= 1e-4 * r.grad.abs().max().clamp_min(1e-6), (impl, name)
    plain = layer.to_linear([0.2, 0.5, 0.3])
    assert isinstance(plain, Conv1D) and plain.weight.shape == (7, 13)
    layer.impl = "torch"
    torch.testing.assert_close(plain(x.detach()), layer(x.detach(), [0.2, 0.5, 0.3]), rtol=1e-5, atol=1e-5)


def test_datafree_objective_on_gpt2_uses_conv1d_orientation_and_training_reduces_it():
    from paretomerge.methods.pareto_merging import DataFreeObjective

    m = tiny_lm("gpt2")
    fts = [{n: t.clone() for n, t in m.state_dict().items()} for _ in range(K)]
    for n, t in m.state_dict().items():
        if n.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):  # low-rank task vectors sharing a part
            shared = 0.2 * torch.randn(t.shape[0], 1) @ torch.randn(1, t.shape[1])
            for sd in fts:
                sd[n] += shared + 0.05 * torch.randn(t.shape[0], 1) @ torch.randn(1, t.shape[1])
    pm.convert(m, K, RANK, include="llm-all")
    assert all(k.endswith(".weight") for k in transposed_keys(m)) and len(transposed_keys(m)) == 8
    with torch.no_grad():
        for p in pm.pareto_parameters(m):
            p.normal_(std=0.1)
    obj = DataFreeObjective(m, fts, impl="torch")
    pref = torch.tensor([0.5, 0.3, 0.2])
    # f_k = Σ ‖W(γ) − W_k‖² in the stored (in, out) orientation, from the exported plain model
    plain = pm.export(m, pref).state_dict()
    expect = torch.stack([sum((plain[key] - fts[k][key]).double().pow(2).sum() for key in transposed_keys(m))
                          for k in range(K)])
    torch.testing.assert_close(obj(pref).double(), expect, rtol=1e-4, atol=1e-6)
    cfg = pm.TrainerConfig(mode="datafree", steps=40, lr=2e-2, rank=RANK, progress=False, objective_impl="torch")
    trainer = pm.ParetoMergingTrainer(m, finetuned=fts, config=cfg)
    with torch.no_grad():
        for _, U, *_ in pm.layers.factored_weights(m):
            U.zero_()  # start at the base merge
        f0 = obj(pref).sum()
    trainer.train()
    with torch.no_grad():
        assert obj(pref).sum() < 0.5 * f0


# ----------------------------------------------------------------------------- one γ per request
@pytest.mark.parametrize("family", FAMILIES)
def test_generate_one_pref_per_row_equals_single_row_and_export(family):
    m = converted(family)
    ids, mask = left_padded()
    kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": PAD}
    batched = llm.generate(m, ids, PREFS, attention_mask=mask, **kw)
    new = batched[:, ids.shape[1]:]
    for i in range(len(PREFS)):
        real = ids[i : i + 1, mask[i].bool()]
        alone = llm.generate(m, real, PREFS[i], **kw)[:, real.shape[1]:]
        exported = pm.export(m, PREFS[i]).generate(real, **kw)[:, real.shape[1]:]
        assert torch.equal(new[i], alone[0]), (family, i)
        assert torch.equal(new[i], exported[0]), (family, i)
    # the preferences matter: one prompt under the three γ gives different continuations
    same = ids[:1].expand(3, -1)
    outs = llm.generate(m, same, PREFS, **kw)[:, ids.shape[1]:]
    assert len({tuple(r.tolist()) for r in outs}) > 1


def test_generate_sampling_fixed_seed_and_num_return_sequences():
    m = converted("llama")
    ids, mask = left_padded()
    kw = {"max_new_tokens": 5, "do_sample": True, "top_k": 0, "pad_token_id": PAD}
    torch.manual_seed(123)
    a = llm.generate(m, ids, PREFS, attention_mask=mask, **kw)
    torch.manual_seed(123)
    b = llm.generate(m, ids, PREFS, attention_mask=mask, **kw)
    assert torch.equal(a, b)
    # every row under one γ through the per-sample path samples what the exported model samples
    rows = PREFS[1].expand(3, -1)
    torch.manual_seed(7)
    c = llm.generate(m, ids, rows, attention_mask=mask, **kw)
    plain = pm.export(m, PREFS[1])  # (export draws from the RNG: building the plain layers initialises them)
    torch.manual_seed(7)
    d = plain.generate(ids, attention_mask=mask, **kw)
    assert torch.equal(c, d)
    # beam search: each prompt's γ row is repeated for its beams
    beams = {"max_new_tokens": 4, "do_sample": False, "num_beams": 2, "num_return_sequences": 2, "pad_token_id": PAD}
    batched = llm.generate(m, ids, PREFS, attention_mask=mask, **beams)[:, ids.shape[1]:]
    for i in range(len(PREFS)):
        real = ids[i : i + 1, mask[i].bool()]
        alone = llm.generate(m, real, PREFS[i], **beams)[:, real.shape[1]:]
        assert torch.equal(batched[2 * i : 2 * i + 2], alone), i


def test_generate_bad_input():
    m = converted("gpt2")
    ids, mask = left_padded()
    with pytest.raises(ValueError, match="prefs has 2 rows but input_ids holds 3"):
        llm.generate(m, ids, PREFS[:2], attention_mask=mask, max_new_tokens=2)
    with pytest.raises(ValueError, match="attention_mask"):
        llm.generate(m, ids, PREFS, attention_mask=mask[:, 1:], max_new_tokens=2)
    with pytest.raises(ValueError, match="prefs"):
        llm.generate(m, ids, [[0.5, 0.6, 0.1]] * 3, max_new_tokens=2)
    with pytest.raises(ValueError, match="per-sample pref has B = 2"):  # the layers check it too
        with pm.use_preference(PREFS[:2]):
            m(ids)


def test_decode_step_compiles_without_graph_breaks():
    m = converted("llama")
    ids, mask = left_padded()
    with pm.use_preference(PREFS):
        m(ids, attention_mask=mask)  # warm: lazily imported modules
        layer = m.model.layers[0].self_attn.q_proj
        x = torch.randn(3, 1, 32)  # a decode step: one new token per row
        explain = torch._dynamo.explain(layer)(x)
        assert explain.graph_break_count == 0, explain.break_reasons
        # fullgraph: any graph break raises. The eager backend: dynamo's capture is the question, not codegen.
        compiled = torch.compile(layer, fullgraph=True, backend="eager")
        torch.testing.assert_close(compiled(x), layer(x), rtol=1e-5, atol=1e-5)
        whole = torch._dynamo.explain(m)(ids, attention_mask=mask)  # the whole converted LM: one graph
        assert whole.graph_break_count == 0 and whole.graph_count == 1, whole.break_reasons


# ----------------------------------------------------------------------------- export
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_export_hf_and_peft_reload_with_plain_libraries(family, tmp_path):
    peft = pytest.importorskip("peft")
    m = converted(family)
    ids, mask = left_padded()
    prefs = {"math": [0.8, 0.1, 0.1], "code": [0.1, 0.1, 0.8]}
    hf_dir = llm.export_hf(m, prefs["math"], tmp_path / "hf")
    assert json.loads((hf_dir / "config.json").read_text())["model_type"] == m.config.model_type
    assert (hf_dir / "model.safetensors").is_file()
    peft_dir = llm.export_peft(m, prefs, tmp_path / "peft", task_names=["a", "b", "c"])
    meta = json.loads((peft_dir / "preferences.json").read_text())
    assert meta["adapters"]["code"] == prefs["code"] and meta["task_names"] == ["a", "b", "c"]
    acfg = json.loads((peft_dir / "adapters" / "code" / "adapter_config.json").read_text())
    assert acfg["r"] == acfg["lora_alpha"] == RANK and acfg["fan_in_fan_out"] == (family == "gpt2")

    def rel(a, b):
        return float((a - b).abs().max() / b.abs().max())

    with torch.no_grad():
        plain = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True).eval()
        assert not any(isinstance(x, ParetoLinear) for x in plain.modules())
        with pm.use_preference(prefs["math"]):
            want = m(ids, attention_mask=mask).logits
        assert rel(plain(ids, attention_mask=mask).logits, want) <= 1e-4
        for name, p in prefs.items():
            base = transformers.AutoModelForCausalLM.from_pretrained(peft_dir / "base", local_files_only=True).eval()
            adapted = peft.PeftModel.from_pretrained(base, peft_dir / "adapters" / name).eval()
            with pm.use_preference(p):
                want = m(ids, attention_mask=mask).logits
            assert rel(adapted(ids, attention_mask=mask).logits, want) <= 1e-4, name


def test_export_refuses_existing_target_and_writes_nothing_half(tmp_path):
    pytest.importorskip("peft")
    m = converted("llama")
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep").write_text("x")
    with pytest.raises(FileExistsError, match="out_dir"):
        llm.export_hf(m, [0.2, 0.3, 0.5], target)
    with pytest.raises(FileExistsError, match="out_dir"):
        llm.export_peft(m, [[0.2, 0.3, 0.5]], target)
    assert (target / "keep").read_text() == "x"
    with pytest.raises(ValueError, match="prefs"):  # a bad γ after nothing is written: no temp dir left
        llm.export_peft(m, [[0.2, 0.3, 0.5], [0.9, 0.9, 0.9]], tmp_path / "new")
    assert sorted(os.listdir(tmp_path)) == ["out"]
    with pytest.raises(FileExistsError, match="did not write"):  # overwrite replaces only an earlier export
        llm.export_hf(m, [0.2, 0.3, 0.5], target, overwrite=True)
    assert (target / "keep").read_text() == "x"
    llm.export_hf(m, [0.2, 0.3, 0.5], tmp_path / "hf")
    llm.export_hf(m, [0.2, 0.3, 0.5], tmp_path / "hf", overwrite=True)
    assert (tmp_path / "hf" / "config.json").is_file()
    assert sorted(os.listdir(tmp_path)) == ["hf", "out"]


def test_export_peft_rejects_non_linear_pareto_layers(tmp_path):
    pytest.importorskip("peft")
    m = tiny_lm("llama")
    m.extra = nn.MultiheadAttention(32, 2, batch_first=True)  # a Pareto layer LoRA cannot express
    pm.convert(m, K, RANK, include=["*.q_proj", "extra"])
    with pytest.raises(ValueError, match="'extra' is a ParetoMultiheadAttention"):
        llm.export_peft(m, [[0.2, 0.3, 0.5]], tmp_path / "peft")
    assert not (tmp_path / "peft").exists()
    with pytest.raises(TypeError, match="PreTrainedModel"):
        llm.export_hf(nn.Sequential(pm.ParetoLinear(3, 3, K, 2)), [0.2, 0.3, 0.5], tmp_path / "hf")
    with pytest.raises(FileNotFoundError, match="model_dir.*config.json"):
        llm.check_hf_dir(tmp_path)


# ----------------------------------------------------------------------------- unlabeled objective
def test_causal_lm_entropy_masks_padding_and_trains():
    from paretomerge.methods.losses import masked_entropy, per_sample_entropy

    logits = torch.randn(2, 5, 7)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    changed = logits.clone()
    changed[0, 3:] = 100 * torch.randn(2, 7)  # padded positions do not count
    torch.testing.assert_close(masked_entropy(changed, mask), masked_entropy(logits, mask))
    h = per_sample_entropy(logits)
    torch.testing.assert_close(masked_entropy(logits, mask), h[mask].mean())
    torch.testing.assert_close(masked_entropy(logits, mask, per_sample=True),
                               torch.stack([h[0, :3].mean(), h[1].mean()]))
    with pytest.raises(ValueError, match="mask"):
        masked_entropy(logits, mask[:, 1:])

    m = tiny_lm("llama")
    g = torch.Generator().manual_seed(0)
    texts = []
    for k in range(K):
        ids = torch.randint(3, VOCAB, (8, 6), generator=g)
        ids[::2, 4:] = PAD  # right-padded shorter texts
        texts.append(ids)
    cfg = pm.TrainerConfig(mode="unlabeled", steps=3, rank=2, batch_size=4, include="attention", progress=False,
                           per_sample=True, anchor=0.0, diversity=0.0)
    trainer = pm.ParetoMergingTrainer(m, config=cfg, logits_fn=llm.causal_lm_logits_fn(PAD), unlabeled=texts)
    f = trainer.objectives(torch.full((K,), 1.0 / K), [t[:4] for t in texts])
    assert f.shape == (K,) and torch.isfinite(f).all()
    trainer.train()
    assert len(trainer.history) == 3 and all(torch.isfinite(torch.tensor(h["loss"])) for h in trainer.history)


# ----------------------------------------------------------------------------- CLI
def _save_tiny_tokenizer(path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i for i in range(4, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>", unk_token="<unk>")
    fast.save_pretrained(path)


def test_cli_generate_and_export_formats(tmp_path, capsys):
    pytest.importorskip("peft")
    from paretomerge.cli import main

    model_dir = tmp_path / "tiny"
    m = tiny_lm("gpt2")
    m.save_pretrained(model_dir)
    _save_tiny_tokenizer(model_dir)
    fts = [{n: t + 0.05 * torch.randn_like(t) for n, t in m.state_dict().items()} for _ in range(2)]
    meta = {"architecture": {"kind": "hf", "dir": str(model_dir), "auto_class": "AutoModelForCausalLM"}}
    cfg = pm.TrainerConfig(mode="datafree", steps=3, rank=2, include="attention+mlp", progress=False,
                           objective_impl="torch")
    trainer = pm.ParetoMergingTrainer(m, finetuned=fts, config=cfg, meta=meta)
    trainer.train()
    ckpt = tmp_path / "pm.pt"
    trainer.save_checkpoint(ckpt)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("w5 w6 w7 w8\nw9 w10\n")
    argv = ["generate", "--checkpoint", str(ckpt), "--prompts", str(prompts), "--pref", "0.9,0.1",
            "--pref", "0.1,0.9", "--max-new-tokens", "3"]
    assert main(argv) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["prompt"], r["pref"]) for r in rows] == [(p, q) for p in ("w5 w6 w7 w8", "w9 w10")
                                                       for q in ([0.9, 0.1], [0.1, 0.9])]
    assert all(len(r["completion"].split()) <= 3 for r in rows)

    for fmt in ("hf", "peft"):
        out = tmp_path / fmt
        argv = ["export", "--checkpoint", str(ckpt), "--pref", "0.9,0.1", "--out", str(out), "--format", fmt]
        assert main(argv) == 0
        assert main(argv) == 2  # exists
        assert "already exists" in capsys.readouterr().err
        assert main(argv + ["--overwrite"]) == 0
    assert (tmp_path / "hf" / "config.json").is_file()
    assert (tmp_path / "peft" / "adapters" / "pref_0" / "adapter_config.json").is_file()
    bad = ["export", "--checkpoint", str(ckpt), "--pref", "0.9,0.1", "--pref", "0.5,0.5", "--out",
           str(tmp_path / "x"), "--format", "hf"]
    assert main(bad) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("paretomerge export: error: --format hf writes one model")
    assert main(["generate", "--checkpoint", str(ckpt), "--prompts", str(prompts), "--pref", "0.2,0.3,0.5"]) == 2
    assert "K = 2" in capsys.readouterr().err


def test_merge_config_with_hf_causal_lm_pool_then_generate(tmp_path, capsys):
    import yaml

    from paretomerge.cli import main
    from paretomerge.config import ConfigError, from_dict

    pre = tiny_lm("gpt2")
    pre.save_pretrained(tmp_path / "pre")
    _save_tiny_tokenizer(tmp_path / "pre")
    for t in ("a", "b"):
        ft = tiny_lm("gpt2")
        with torch.no_grad():
            for n, p in ft.named_parameters():
                if n.endswith(("c_attn.weight", "c_fc.weight")):
                    p.add_(0.05 * torch.randn_like(p))
        ft.save_pretrained(tmp_path / t)
    cfg = {"pool": {"format": "hf", "auto_class": "AutoModelForCausalLM", "pretrained": "pre",
                    "finetuned": {"a": "a", "b": "b"}},
           "base": {"method": "task_arithmetic", "lam": 0.5}, "mode": "datafree",
           "trainer": {"steps": 2, "rank": 2, "include": "attention+mlp", "objective_impl": "torch"},
           "output": {"dir": "out"}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["merge", "--config", str(tmp_path / "c.yaml")]) == 0
    ckpt = tmp_path / "out" / "pareto_merged.pt"
    capsys.readouterr()
    (tmp_path / "p.txt").write_text("w4 w5 w6\n")
    assert main(["generate", "--checkpoint", str(ckpt), "--prompts", str(tmp_path / "p.txt"), "--pref", "0.5,0.5",
                 "--max-new-tokens", "2"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[0])["prompt"] == "w4 w5 w6"
    with pytest.raises(ConfigError, match="auto_class"):
        from_dict({**cfg, "pool": {**cfg["pool"], "format": "open_clip"}})


def test_generate_per_row_through_triton_kernels_under_interpreter():
    """The fused kernels on the decode shapes (x (B, 1, in), Conv1D's transposed weight view), per-sample γ."""
    pytest.importorskip("triton")
    if not pmkernels.triton_available():
        pytest.skip("pmkernels' Triton kernels are not importable here")
    m = converted("gpt2", include="llm-attention")
    ids, mask = left_padded()
    kw = {"max_new_tokens": 3, "do_sample": False, "pad_token_id": PAD}
    want = llm.generate(m, ids, PREFS, attention_mask=mask, **kw)
    pm.set_impl(m, "triton")
    got = llm.generate(m, ids, PREFS, attention_mask=mask, **kw)
    assert torch.equal(got, want)


def test_gpt2_data_free_objective_from_a_pool_matches_the_dense_one():
    """DataFreeObjective.from_pool (what the trainer uses) reads Conv1D's (in, out) tensors and transposes them."""
    assert_pool_objective_matches_dense(tiny_lm("gpt2"), {"rank": 3, "include": "llm-all"}, 0.01, [0.3, 0.7])
