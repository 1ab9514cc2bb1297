"""The memory plan of a 7B Llama, against bytes computed by hand (nothing is allocated: meta device)."""
from __future__ import annotations

import pytest
import torch

from paretomerge.config import TrainerConfig
from paretomerge.plan import memory_plan, meta_model, safetensors_bytes

transformers = pytest.importorskip("transformers")

H, I, L, VOCAB = 4096, 11008, 32, 32000


def llama7b():
    return transformers.LlamaConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=L, num_attention_heads=32,
                                    num_key_value_heads=32, vocab_size=VOCAB, tie_word_embeddings=False)


def test_7b_attention_plan_by_hand():
    model = meta_model(llama7b(), dtype=torch.bfloat16)
    plan = memory_plan(model, 4, TrainerConfig(include="attention", rank=8), lowrank_R=64)
    params = 2 * VOCAB * H + L * (4 * H * H + 3 * H * I + 2 * H) + H
    assert params == 6_738_415_616  # Llama-2-7B
    p = plan.parts
    assert p["base_model"] == p["base_merge"] == 2 * params
    assert plan.converted_layers == 4 * L
    pareto = 4 * L * (H * 8 + H * 8 + 8 * 8 * 4) * 2  # U, V, G in bf16
    assert p["pareto_params"] == p["pareto_grads"] == pareto and p["optimizer"] == 2 * pareto
    assert p["deltas_dense"] == 4 * (4 * L) * H * H * 2 == 17_179_869_184
    assert p["deltas_lowrank"] == 4 * (4 * L) * (H + H) * 64 * 2 == 536_870_912  # 32x less
    assert plan.totals["dense"] == 2 * 2 * params + 4 * pareto + 17_179_869_184
    assert plan.fits["dense"] == {"24 GB CPU box": False, "80 GB GPU": True}
    assert "total (lowrank objective)" in plan.markdown()


def test_7b_attention_mlp_dense_is_52gb():
    model = meta_model(llama7b(), dtype=torch.bfloat16)
    plan = memory_plan(model, 4, TrainerConfig(include="attention+mlp", rank=8), lowrank_R=64)
    assert plan.converted_layers == 7 * L
    assert plan.parts["deltas_dense"] == 4 * L * (4 * H * H + 3 * H * I) * 2  # ≈ 51.8 GB
    assert plan.parts["deltas_lowrank"] == 4 * L * (4 * 2 * H + 3 * (H + I)) * 64 * 2
    assert 78e9 < plan.totals["dense"] < 80e9  # K = 4 dense just fits an 80 GB GPU; K = 8 does not
    plan8 = memory_plan(meta_model(llama7b(), dtype=torch.bfloat16), 8, TrainerConfig(include="attention+mlp"),
                        lowrank_R=64)
    assert plan8.fits["dense"]["80 GB GPU"] is False and plan8.fits["lowrank"]["80 GB GPU"] is True
    assert plan8.fits["lowrank"]["24 GB CPU box"] is False  # the two bf16 copies of the base alone are 27 GB
    assert all(t.device.type == "meta" for t in model.parameters())


def test_safetensors_header_bytes(tmp_path):
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(3, 5, dtype=torch.bfloat16), "b": torch.zeros(7)}, str(tmp_path / "x.safetensors"))
    assert safetensors_bytes(tmp_path / "x.safetensors") == 3 * 5 * 2 + 7 * 4


def test_plan_cli_on_a_peft_config(tmp_path, capsys):
    """`paretomerge plan` on a LoRA pool config: adapters' bytes from their headers, base from config.json."""
    import yaml

    from paretomerge.cli import main
    from test_peft_pool import make_adapter
    from test_pools_lazy import tiny_llama

    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    for t in ("a", "b"):
        make_adapter(base, tmp_path / t, seed=1, r=2, lora_alpha=4)
    cfg = {"pool": {"format": "peft", "auto_class": "AutoModelForCausalLM", "pretrained": "base",
                    "finetuned": {"a": "a", "b": "b"}},
           "trainer": {"include": "attention", "rank": 2}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["plan", str(tmp_path / "c.yaml")]) == 0
    out = capsys.readouterr().out
    assert "| deltas_lowrank |" in out and "24 GB CPU box: fits" in out
    cfg["pool"]["compress"] = {"rank": 2, "keep": 0.5}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["plan", str(tmp_path / "bad.yaml")]) == 2
    assert "pool.compress.rank: give exactly one of rank" in capsys.readouterr().err
