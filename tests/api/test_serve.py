"""``paretomerge serve``: the batched decode loop, the batcher, and the OpenAI-compatible server driven by the real
``openai`` client against a tiny Llama merge made here (nothing downloaded; the server runs in a subprocess on a
free loopback port)."""
from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

transformers = pytest.importorskip("transformers")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

import paretomerge as pm  # noqa: E402
from paretomerge import llm  # noqa: E402
from paretomerge.batching import Batcher, DecodeRow, Job, decode_rows  # noqa: E402
from paretomerge.program import lm_from_checkpoint  # noqa: E402

from helpers import ROOT  # noqa: E402
from test_llm import EOS, PAD, PREFS, VOCAB, _save_tiny_tokenizer, converted, left_padded  # noqa: E402

K = 2
POSITIONS = 64


# ----------------------------------------------------------------------------- the decode loop
@pytest.mark.parametrize("family", ("llama", "gpt2"))
def test_decode_rows_greedy_equals_each_row_generated_alone(family):
    """Left padding + mask + position ids: each row's greedy tokens are generate's for the row alone, also when
    rows leave the batch early (different budgets, EOS)."""
    m = converted(family)
    ids, mask = left_padded(batch=3)
    got: dict[int, list] = {i: [] for i in range(3)}
    rows = [DecodeRow(ids[i, mask[i].bool()].tolist(), PREFS[i], 6 - 2 * i, on_token=lambda t, i=i: got[i].append(t),
                      on_finish=lambda r, i=i: got[i].append(r)) for i in range(3)]
    decode_rows(m, rows, pad_token_id=PAD)
    for i in range(3):
        real = ids[i : i + 1, mask[i].bool()]
        alone = llm.generate(m, real, PREFS[i], max_new_tokens=6 - 2 * i, do_sample=False, pad_token_id=PAD)
        assert got[i] == alone[0, real.shape[1]:].tolist() + ["length"], (family, i)
    # a row whose next token is EOS stops with "stop" and the token is not passed on
    first = got[0][0]
    out: list = []
    decode_rows(m, [DecodeRow(rows[0].prompt_ids, PREFS[0], 5, on_token=out.append, on_finish=out.append)],
                pad_token_id=PAD, eos_token_ids=[first])
    assert out == ["stop"]


def test_decode_rows_seeded_sampling_is_per_row_and_batch_invariant():
    m = converted("llama")
    ids, mask = left_padded(batch=3)

    def run(which: list[int]) -> dict[int, list]:
        got: dict[int, list] = {i: [] for i in which}
        rows = [DecodeRow(ids[i, mask[i].bool()].tolist(), PREFS[i], 5, temperature=0.9, top_p=0.95,
                          generator=torch.Generator().manual_seed(100 + i), on_token=got[i].append) for i in which]
        decode_rows(m, rows, pad_token_id=PAD)
        return got

    together = run([0, 1, 2])
    for i in range(3):
        assert run([i])[i] == together[i]
    assert run([0, 1, 2]) == together


def _job(index, ids, pref, n, loop, events, **kw) -> Job:
    return Job(index, ids, torch.as_tensor(pref, dtype=torch.float64), n, events, loop, temperature=0.0, **kw)


def _drain(loop, events) -> list:
    out = []
    while not events.empty():
        out.append(events.get_nowait())
    return out


class _WordTokenizer:
    """decode: the ids as 'w<id>' words (what the tiny WordLevel tokenizer does)."""

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(f"w{i}" for i in ids)


def test_batcher_drops_jobs_cancelled_before_their_batch():
    m = converted("llama")
    loop = asyncio.new_event_loop()
    try:
        events: asyncio.Queue = asyncio.Queue()
        b = Batcher(m, _WordTokenizer(), max_batch=4, batch_wait_s=0.5, pad_token_id=PAD)
        keep = _job(0, [5, 6, 7], PREFS[1], 8, loop, events)
        gone = _job(1, [8, 9], PREFS[2], 8, loop, events)
        b.submit(keep)
        b.submit(gone)
        gone.cancel()  # within the batch wait: never batched
        b.submit(_job(2, [10, 11, 12, 13], PREFS[0], 8, loop, events))
        b.close(timeout=60)
        loop.run_until_complete(asyncio.sleep(0.01))
        evs = _drain(loop, events)
    finally:
        loop.close()
    assert b.stats["dropped"] == 1 and b.stats["largest_batch"] == 2
    assert not [e for e in evs if e[0] == 1]
    done = {e[0]: e[2] for e in evs if e[1] == "done"}
    assert done[0] == ("length", 8) and done[2] == ("length", 8)
    text0 = "".join(e[2] for e in evs if e[0] == 0 and e[1] == "text")
    alone = llm.generate(m, torch.tensor([[5, 6, 7]]), PREFS[1], max_new_tokens=8, do_sample=False, pad_token_id=PAD)
    assert text0 == " ".join(f"w{t}" for t in alone[0, 3:].tolist())


def test_batcher_row_cancelled_while_generating_stops_and_others_finish():
    m = converted("llama")
    loop = asyncio.new_event_loop()
    try:
        events: asyncio.Queue = asyncio.Queue()
        b = Batcher(m, _WordTokenizer(), max_batch=4, batch_wait_s=0.2, pad_token_id=PAD)
        a = _job(0, [5, 6, 7], PREFS[1], 10, loop, events)
        c = _job(1, [8, 9], PREFS[2], 10, loop, events)
        seen = []
        real_send = a._send

        def send_then_cancel(kind, value):  # the client of `a` leaves after its first piece of text
            seen.append(kind)
            real_send(kind, value)
            a.cancel()

        a._send = send_then_cancel
        b.submit(a)
        b.submit(c)
        b.close(timeout=60)
        loop.run_until_complete(asyncio.sleep(0.01))
        evs = _drain(loop, events)
    finally:
        loop.close()
    assert b.stats["cancelled"] == 1 and b.stats["largest_batch"] == 2
    assert seen == ["text"]  # one token out, then the row left the batch: no more text, no "done"
    assert [e[1] for e in evs if e[0] == 1][-1] == "done" and [e for e in evs if e[0] == 1][-1][2] == ("length", 10)


def test_batcher_failure_reaches_only_unfinished_rows_and_the_worker_goes_on():
    import functools

    m = converted("llama")
    calls = {"n": 0}
    forward = m.forward

    @functools.wraps(forward)
    def failing_second_call(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # the first decode step, after the prefill
            raise RuntimeError("device lost")
        return forward(*a, **k)

    m.forward = failing_second_call
    loop = asyncio.new_event_loop()
    try:
        events: asyncio.Queue = asyncio.Queue()
        b = Batcher(m, _WordTokenizer(), max_batch=4, batch_wait_s=0.3, pad_token_id=PAD)
        b.submit(_job(0, [5, 6, 7], PREFS[1], 1, loop, events))  # done after the prefill's token
        b.submit(_job(1, [8, 9], PREFS[2], 5, loop, events))
        time.sleep(1.0)
        b.submit(_job(2, [8, 9], PREFS[2], 3, loop, events))  # a later batch works
        b.close(timeout=60)
        loop.run_until_complete(asyncio.sleep(0.01))
        evs = _drain(loop, events)
    finally:
        loop.close()
    kinds = {i: [e[1] for e in evs if e[0] == i] for i in range(3)}
    assert kinds[0] == ["text", "done"] and kinds[1] == ["text", "error"] and kinds[2][-1] == "done"
    assert [e[2] for e in evs if e[1] == "error"] == ["RuntimeError: device lost"]


def test_incremental_detokenization_equals_decoding_everything():
    """Byte-level BPE (SmolLM2's kind) with multi-byte characters split across tokens: the text streamed piece by
    piece equals decode(all ids), with and without stop strings held back."""
    from tokenizers import ByteLevelBPETokenizer

    from paretomerge.batching import _TextStream

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["héllo wörld ✓ 你好 naïve café 🙂 déjà vu"] * 3, vocab_size=300, min_frequency=1,
                            show_progress=False)
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer)
    g = torch.Generator().manual_seed(0)
    loop = asyncio.new_event_loop()
    try:
        for trial in range(20):
            ids = torch.randint(0, tok.vocab_size, (int(torch.randint(1, 30, (), generator=g)),), generator=g).tolist()
            stop = ("zzzz",) if trial % 2 else ()
            job = Job(0, [1], PREFS[0][:K], 5, asyncio.Queue(), loop, stop=stop)
            sent: list = []
            job._send = lambda kind, value, sent=sent: sent.append((kind, value))
            stream = _TextStream(job, tok)
            for t in ids:
                assert stream.on_token(t) is None
            stream.on_finish("length")
            assert "".join(v for k, v in sent if k == "text") == tok.decode(ids, skip_special_tokens=True), ids
            assert sent[-1] == ("done", ("length", len(ids)))
    finally:
        loop.close()


def test_batcher_bad_arguments():
    m = converted("llama")
    with pytest.raises(ValueError, match="max_batch"):
        Batcher(m, _WordTokenizer(), max_batch=0, pad_token_id=PAD)
    with pytest.raises(ValueError, match="batch_wait_s"):
        Batcher(m, _WordTokenizer(), batch_wait_s=-1, pad_token_id=PAD)
    with pytest.raises(ValueError, match="max_new_tokens"):
        decode_rows(m, [DecodeRow([5], PREFS[0], 0)], pad_token_id=PAD)
    with pytest.raises(ValueError, match="prompt_ids is empty"):
        decode_rows(m, [DecodeRow([], PREFS[0], 2)], pad_token_id=PAD)


# ----------------------------------------------------------------------------- the server
def _tiny_llama_checkpoint(tmp) -> str:
    """A tiny Llama merge of two fine-tuned copies (data-free, 2 steps), factors made non-zero so γ matters."""
    model_dir = tmp / "tiny-llama"
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=POSITIONS,
                                   bos_token_id=0, eos_token_id=EOS, pad_token_id=PAD)
    m = transformers.LlamaForCausalLM(cfg).eval()
    m.save_pretrained(model_dir)
    _save_tiny_tokenizer(model_dir)
    fts = [{n: t + 0.05 * torch.randn_like(t) for n, t in m.state_dict().items()} for _ in range(K)]
    meta = {"architecture": {"kind": "hf", "dir": str(model_dir), "auto_class": "AutoModelForCausalLM"}}
    tcfg = pm.TrainerConfig(mode="datafree", steps=2, rank=3, include="attention+mlp", progress=False,
                            objective_impl="torch")
    trainer = pm.ParetoMergingTrainer(m, finetuned=fts, config=tcfg, meta=meta)
    trainer.train()
    with torch.no_grad():
        for p in pm.pareto_parameters(m):
            p.normal_(std=0.3)
    ckpt = tmp / "pm.pt"
    trainer.save_checkpoint(ckpt)
    return str(ckpt)


class Server:
    """``python -m paretomerge serve`` in a subprocess on a free loopback port (read from its first line)."""

    def __init__(self, ckpt: str, *args: str) -> None:
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1",
                   PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "python_api"), os.environ.get("PYTHONPATH", "")]))
        self.proc = subprocess.Popen([sys.executable, "-m", "paretomerge", "--threads", "1", "serve", "--checkpoint",
                                      ckpt, "--port", "0", *args], env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if "http://" not in line:
            self.proc.kill()
            raise RuntimeError(f"server did not start: {line!r} {self.proc.stderr.read()[-2000:]}")
        self.port = int(line.split("http://127.0.0.1:")[1].split("/")[0])
        self.client = openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="unused", max_retries=0,
                                    timeout=120)

    def request(self, method: str, path: str, body=None, raw: bytes = None) -> tuple[int, dict]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        out = resp.read()
        conn.close()
        return resp.status, (json.loads(out) if out else {})

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return _tiny_llama_checkpoint(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def server(ckpt):
    s = Server(ckpt, "--max-batch", "16", "--batch-wait-ms", "200")
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def reference(ckpt):
    """The model and tokenizer in this process: what each request computes alone (``llm.generate``)."""
    model, tok, _ = lm_from_checkpoint(ckpt)

    def alone(prompt: str, pref, max_tokens: int) -> str:
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        out = llm.generate(model, ids, torch.tensor(pref, dtype=torch.float64), max_new_tokens=max_tokens,
                           do_sample=False, pad_token_id=PAD, eos_token_id=EOS)
        return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    return alone


def test_models_and_health(server):
    status, health = server.request("GET", "/health")
    assert status == 200 and health["status"] == "ok"
    models = server.client.models.list()
    assert models.data[0].id == "pm"
    assert models.data[0].model_extra["preference"]["num_objectives"] == K


def test_sixteen_concurrent_requests_with_different_preferences_equal_each_run_alone(server, reference):
    g = torch.Generator().manual_seed(3)
    prefs = torch.distributions.Dirichlet(torch.ones(K)).sample((16,)).double()
    prefs[:2] = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    prefs = (prefs / prefs.sum(-1, keepdim=True)).tolist()
    prompts = [" ".join(f"w{int(t)}" for t in torch.randint(4, VOCAB, (1 + i % 5,), generator=g)) for i in range(16)]
    before = server.request("GET", "/health")[1]["batches"]

    def ask(i: int):
        return server.client.completions.create(model="pm", prompt=prompts[i], max_tokens=5, temperature=0,
                                                extra_body={"preference": prefs[i]})

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, range(16)))
    health = server.request("GET", "/health")[1]
    assert health["largest_batch"] > 1 and health["batches"] - before < 16  # they did share batches
    for i, a in enumerate(answers):
        assert a.choices[0].text == reference(prompts[i], prefs[i], 5), i
        assert a.usage.prompt_tokens == len(prompts[i].split()) and a.choices[0].finish_reason in ("length", "stop")
    # the preference matters: one prompt, the two one-hot γ
    one = [server.client.completions.create(model="pm", prompt="w5 w6 w7", max_tokens=6, temperature=0,
                                            extra_body={"preference": p}).choices[0].text for p in ([1, 0], [0, 1])]
    assert one[0] != one[1]


def test_streaming_completions_and_chat(server, reference):
    kw = dict(model="pm", max_tokens=6, temperature=0, extra_body={"preference": [0.3, 0.7]})
    whole = server.client.completions.create(prompt="w9 w10 w11", **kw)
    chunks = list(server.client.completions.create(prompt="w9 w10 w11", stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text == reference("w9 w10 w11", [0.3, 0.7], 6)
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert len(chunks) > 2  # one piece per token, not one blob
    msgs = [{"role": "user", "content": "w12 w13"}]
    chat = server.client.chat.completions.create(messages=msgs, **kw)
    streamed = list(server.client.chat.completions.create(messages=msgs, stream=True, **kw))
    assert chat.choices[0].message.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == chat.choices[0].message.content
    assert streamed[-1].choices[0].finish_reason == chat.choices[0].finish_reason
    # the raw stream: data: lines, then data: [DONE]
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", "/v1/completions", body=json.dumps({"prompt": "w9", "max_tokens": 2, "stream": True}),
                 headers={"Content-Type": "application/json"})
    body = conn.getresponse().read().decode()
    events = [e for e in body.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_stop_strings_seeded_sampling_and_prompt_lists(server, reference):
    full = reference("w20 w21", [0.5, 0.5], 8)
    words = full.split()
    assert len(words) >= 3
    cut = server.client.completions.create(model="pm", prompt="w20 w21", max_tokens=8, temperature=0, stop=[words[2]])
    assert cut.choices[0].text == full[: full.index(words[2])] and cut.choices[0].finish_reason == "stop"
    kw = dict(model="pm", prompt="w30 w31", max_tokens=6, temperature=1.0, top_p=0.9, seed=11)
    first, again = (server.client.completions.create(**kw).choices[0].text for _ in range(2))
    assert first == again
    two = server.client.completions.create(model="pm", prompt=["w20 w21", "w40"], max_tokens=8, temperature=0)
    assert [c.index for c in two.choices] == [0, 1] and two.choices[0].text == full


BAD = [  # (path, body, param)
    ("/v1/completions", {"prompt": "w5", "preference": [0.2, 0.3, 0.5]}, "preference"),
    ("/v1/completions", {"prompt": "w5", "preference": [1.5, -0.5]}, "preference"),
    ("/v1/completions", {"prompt": "w5", "preference": [0.2, 0.3]}, "preference"),
    ("/v1/completions", {"prompt": "w5", "preference": "0.5,0.5"}, "preference"),
    ("/v1/completions", {"prompt": ""}, "prompt"),
    ("/v1/completions", {"prompt": []}, "prompt"),
    ("/v1/completions", {}, "prompt"),
    ("/v1/completions", {"prompt": "w5", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": "w5", "max_tokens": -3}, "max_tokens"),
    ("/v1/completions", {"prompt": "w5", "max_tokens": POSITIONS}, "max_tokens"),
    ("/v1/completions", {"prompt": " ".join(["w5"] * POSITIONS)}, "prompt"),
    ("/v1/completions", {"prompt": "w5", "temperature": -1}, "temperature"),
    ("/v1/completions", {"prompt": "w5", "top_p": 0}, "top_p"),
    ("/v1/completions", {"prompt": "w5", "n": 2}, "n"),
    ("/v1/completions", {"prompt": "w5", "stop": [""]}, "stop"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": ""}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "w5"}], "max_tokens": 1000}, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "w5"}], "max_completion_tokens": 0},
     "max_completion_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "w5"}], "preference": [1.0]}, "preference"),
]


@pytest.mark.parametrize("path,body,param", BAD, ids=[f"{p}:{param}:{i}" for i, (p, _, param) in enumerate(BAD)])
def test_bad_input_is_400_naming_the_field(server, path, body, param):
    status, out = server.request("POST", path, body)
    assert status == 400, out
    assert out["error"]["param"] == param and out["error"]["type"] == "invalid_request_error"
    assert param in out["error"]["message"] or param == "prompt"


def test_nan_preference_malformed_json_and_the_openai_client_error(server):
    status, out = server.request("POST", "/v1/completions", raw=b'{"prompt": "w5", "preference": [NaN, 1.0]}')
    assert status == 400 and out["error"]["param"] == "preference" and "finite" in out["error"]["message"]
    status, out = server.request("POST", "/v1/completions", raw=b'{"prompt": "w5", "max_tokens": ')
    assert status == 400 and "malformed JSON" in out["error"]["message"]
    with pytest.raises(openai.BadRequestError) as e:
        server.client.completions.create(model="pm", prompt="w5", extra_body={"preference": [0.9, 0.9]})
    assert e.value.status_code == 400 and e.value.body["param"] == "preference"
    # the server is fine: a good request right after
    assert server.client.completions.create(model="pm", prompt="w5", max_tokens=2, temperature=0).choices[0].text


def test_client_that_disconnects_frees_its_slot(server):
    before = server.request("GET", "/health")[1]
    for stream in (False, True):  # closed within the 200 ms batch wait: dropped before batching
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        conn.request("POST", "/v1/completions", body=json.dumps({"prompt": "w5 w6", "max_tokens": 40,
                                                                 "stream": stream}),
                     headers={"Content-Type": "application/json"})
        conn.sock.close()
        conn.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        after = server.request("GET", "/health")[1]
        if after["dropped"] + after["cancelled"] - before["dropped"] - before["cancelled"] >= 2:
            break
        time.sleep(0.1)
    assert after["dropped"] + after["cancelled"] - before["dropped"] - before["cancelled"] == 2
    assert after["rows"] - before["rows"] == after["cancelled"] - before["cancelled"]
    assert server.client.completions.create(model="pm", prompt="w5", max_tokens=2, temperature=0).choices[0].text


def test_client_that_disconnects_while_generating_leaves_the_batch(server, reference):
    """Read one streamed chunk (the row is generating), hang up: the row ends early ('cancelled'), while a
    request batched with it still gets its whole answer."""
    for attempt in range(3):  # the row must still be generating when the hang-up is noticed; retried if not
        before = server.request("GET", "/health")[1]
        other = ThreadPoolExecutor(1).submit(
            server.client.completions.create, model="pm", prompt="w7 w8", max_tokens=40, temperature=0)
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        conn.request("POST", "/v1/completions", body=json.dumps({"prompt": "w5 w6", "max_tokens": POSITIONS - 3,
                                                                 "temperature": 0, "stream": True}),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.readline().startswith(b"data: ")
        conn.sock.shutdown(2)
        conn.close()
        assert other.result(timeout=60).choices[0].text == reference("w7 w8", [0.5, 0.5], 40)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            after = server.request("GET", "/health")[1]
            if after["cancelled"] - before["cancelled"] == 1:
                return
            time.sleep(0.05)
    pytest.fail(f"the hung-up row was never cancelled in 3 attempts: {before} -> {after}")


@pytest.mark.slow  # its own server process (~15 s on a loaded 2-core VM)
def test_sigterm_drains_requests_in_flight_and_exits_0(ckpt, reference):
    """SIGTERM while four streamed requests are generating (each has had its first chunk): every stream is
    finished, whole and equal to the request alone, then the server exits 0."""
    s = Server(ckpt, "--max-batch", "8", "--batch-wait-ms", "100")
    try:
        texts: dict[int, str] = {}
        started = [threading.Event() for _ in range(4)]

        def ask(i: int) -> None:
            out = []
            for chunk in s.client.completions.create(model="pm", prompt=f"w{10 + i} w{20 + i}", max_tokens=30,
                                                     temperature=0, stream=True,
                                                     extra_body={"preference": [i / 3, 1 - i / 3]}):
                out.append(chunk.choices[0].text)
                started[i].set()
            texts[i] = "".join(out)

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        assert all(e.wait(60) for e in started)
        s.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(120)
        assert s.proc.wait(timeout=60) == 0
        assert texts == {i: reference(f"w{10 + i} w{20 + i}", [i / 3, 1 - i / 3], 30) for i in range(4)}
    finally:
        s.stop()


def test_cli_serve_bad_arguments_exit_2(ckpt, tmp_path, capsys):
    from paretomerge.cli import main

    assert main(["serve", "--checkpoint", str(tmp_path / "missing.pt")]) == 2
    assert "missing.pt" in capsys.readouterr().err
    assert main(["serve", "--checkpoint", ckpt, "--max-batch", "0"]) == 2
    assert capsys.readouterr().err.strip().endswith("--max-batch must be >= 1, got 0")
    assert main(["serve", "--checkpoint", ckpt, "--device", "gpu0"]) == 2
    assert "--device must be a torch device" in capsys.readouterr().err
    import socket

    with socket.socket() as taken:  # a port something else listens on
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert main(["serve", "--checkpoint", ckpt, "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith(f"paretomerge serve: error: --host/--port: cannot listen on 127.0.0.1:{port}")
