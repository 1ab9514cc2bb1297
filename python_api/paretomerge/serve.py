"""``paretomerge serve``: one Pareto-merged causal LM behind an OpenAI-compatible HTTP API, one γ per request.

    GET  /health                 {"status": "ok", "batches": ..., "largest_batch": ...}
    GET  /v1/models              the model, its K tasks and the default (equal) preference
    POST /v1/completions         OpenAI completions (prompt: a string or a list of strings)
    POST /v1/chat/completions    OpenAI chat completions (the tokenizer's chat template, if it has one)

Besides the OpenAI fields (``max_tokens``, ``temperature`` (0 = greedy), ``top_p``, ``seed``, ``stop``,
``stream``) a request may carry ``preference``: K non-negative floats summing to 1 (default: the equal
preference). Concurrent requests share batches of the ``Batcher`` (``paretomerge.batching``): up to
``max_batch`` rows, each with its own γ, sampler and stopping rule, in one forward per token.

Built on FastAPI + uvicorn: pydantic request models (the project's config layer already uses pydantic),
plain ``async`` handlers that can wait on the batcher without a thread per request, SSE through
Starlette's ``StreamingResponse``, and uvicorn's graceful shutdown (SIGTERM: stop accepting, finish the
requests in flight, exit 0). The batching itself is ours because it is the point: rows of different γ
meet in the per-sample Pareto layers.

Bad input is HTTP 400 with OpenAI's error shape ``{"error": {"message", "type", "param", "code"}}``,
``param`` naming the field, before anything is queued.
"""
from __future__ import annotations

import asyncio
import json
import math
import signal
import socket
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Optional, Sequence, Union

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from .batching import Batcher, Job, max_positions
from .layers import single_preference

__all__ = ["RequestError", "ServedModel", "create_app", "run_server"]

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the positions left
MAX_STOP_STRINGS = 4


class RequestError(Exception):
    """A bad request: HTTP ``status`` with OpenAI's error body naming ``param``."""

    def __init__(self, message: str, param: Optional[str], status: int = 400, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.status, self.kind = message, param, status, kind


def error_body(message: str, param: Optional[str] = None, kind: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


@dataclass
class ServedModel:
    """A converted causal LM (Pareto layers) and its tokenizer, as the server needs them."""
    model: torch.nn.Module
    tokenizer: Any
    num_objectives: int
    name: str = "paretomerge"
    task_names: Optional[Sequence[str]] = None

    def __post_init__(self) -> None:
        tok = self.tokenizer
        self.max_positions = max_positions(self.model.config)
        gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        eos = {tok.eos_token_id} | set(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos])
        self.eos_token_ids = sorted(int(t) for t in eos if t is not None)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.pad_token_id = int(pad if pad is not None else 0)

    @classmethod
    def from_checkpoint(cls, ckpt_path, tokenizer_dir=None, device: str = "cpu") -> "ServedModel":
        """The model and tokenizer of a causal-LM checkpoint (see ``program.lm_from_checkpoint``) on ``device``."""
        from .program import lm_from_checkpoint

        try:
            device = torch.device(device)
        except RuntimeError:
            raise ValueError(f"device must be a torch device such as 'cpu' or 'cuda:0', got {device!r}") from None
        model, tok, ck = lm_from_checkpoint(ckpt_path, tokenizer_dir)
        return cls(model.to(device), tok, int(ck["num_objectives"]), name=Path(ckpt_path).stem,
                   task_names=list(ck.get("task_names") or []) or None)


# ----------------------------------------------------------------------------- request models
class _SamplingRequest(BaseModel):
    """The fields completions and chat completions share. Unknown OpenAI fields are ignored."""
    model_config = ConfigDict(extra="ignore")
    model: Optional[str] = None
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    seed: Optional[int] = None
    stop: Union[str, list[str], None] = None
    stream: Optional[bool] = False
    n: Optional[int] = None
    preference: Optional[list[float]] = None


class CompletionRequest(_SamplingRequest):
    prompt: Union[str, list[str]]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: Union[str, list[dict], None] = None


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage]
    max_completion_tokens: Optional[int] = None


@dataclass
class _Sampling:
    pref: torch.Tensor
    temperature: float
    top_p: float
    seed: Optional[int]
    stop: tuple[str, ...]


def _check_sampling(req: _SamplingRequest, served: ServedModel) -> _Sampling:
    """The request's γ and sampler settings, checked; RequestError naming the field otherwise."""
    if req.n not in (None, 1):
        raise RequestError(f"n must be 1 (one completion per prompt), got {req.n}", "n")
    K = served.num_objectives
    if req.preference is None:
        pref = torch.full((K,), 1.0 / K, dtype=torch.float64)
    else:
        if len(req.preference) != K:
            tasks = f" {list(served.task_names)}" if served.task_names else ""
            raise RequestError(f"preference must have K = {K} entries (one per task{tasks}), got "
                               f"{len(req.preference)}", "preference")
        try:
            pref = single_preference(req.preference, name="preference")
        except (TypeError, ValueError) as e:
            raise RequestError(str(e).split("; pass normalize")[0], "preference") from None
    temperature = 1.0 if req.temperature is None else req.temperature
    if not (math.isfinite(temperature) and 0.0 <= temperature <= 2.0):
        raise RequestError(f"temperature must be in [0, 2] (0 = greedy), got {temperature}", "temperature")
    top_p = 1.0 if req.top_p is None else req.top_p
    if not (math.isfinite(top_p) and 0.0 < top_p <= 1.0):
        raise RequestError(f"top_p must be in (0, 1], got {top_p}", "top_p")
    stop = () if req.stop is None else (req.stop,) if isinstance(req.stop, str) else tuple(req.stop)
    if len(stop) > MAX_STOP_STRINGS or any(not s for s in stop):
        raise RequestError(f"stop must be up to {MAX_STOP_STRINGS} non-empty strings, got {list(stop)}", "stop")
    return _Sampling(pref, float(temperature), float(top_p), req.seed, stop)


def _max_new_tokens(requested: Optional[int], prompt_len: int, served: ServedModel, default: Optional[int],
                    field: str, prompt_field: str) -> int:
    """The request's token budget: ``requested`` (>= 1, within the positions the prompt leaves) or the default
    (capped by them)."""
    room = None if served.max_positions is None else served.max_positions - prompt_len
    if room is not None and room < 1:
        raise RequestError(f"{prompt_field} has {prompt_len} tokens; the model covers {served.max_positions} "
                           f"positions, leaving no room to generate", prompt_field)
    if requested is None:
        return min(default, room) if default is not None and room is not None else (default or room or 16)
    if requested < 1:
        raise RequestError(f"{field} must be >= 1, got {requested}", field)
    if room is not None and requested > room:
        raise RequestError(f"{field} = {requested} is beyond the model's positions: the prompt has {prompt_len} "
                           f"tokens and the model covers {served.max_positions}, so at most {room} can be "
                           f"generated", field)
    return requested


def _encode(served: ServedModel, text: str, field: str, add_special_tokens: bool = True) -> list[int]:
    if not text:
        raise RequestError(f"{field} must be a non-empty string", field)
    ids = served.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
    if not ids:
        raise RequestError(f"{field} encodes to no tokens", field)
    return list(ids)


def _chat_text(served: ServedModel, messages: list[ChatMessage]) -> str:
    """The prompt of a conversation: the tokenizer's chat template (with the assistant turn opened), or,
    for a tokenizer without one, ``role: content`` lines followed by ``assistant:``."""
    if not messages:
        raise RequestError("messages must hold at least one message", "messages")
    plain = []
    for i, m in enumerate(messages):
        content = m.content
        if isinstance(content, list):  # OpenAI content parts: the text parts, in order
            content = "".join(str(part.get("text", "")) for part in content if part.get("type") == "text")
        if not content:
            raise RequestError(f"messages[{i}].content must be non-empty text", "messages")
        plain.append({"role": m.role, "content": content})
    tok = served.tokenizer
    if getattr(tok, "chat_template", None):
        return tok.apply_chat_template(plain, add_generation_prompt=True, tokenize=False)
    return "".join(f"{m['role']}: {m['content']}\n" for m in plain) + "assistant:"


# ----------------------------------------------------------------------------- the app
class _JobStream(StreamingResponse):
    """SSE whose jobs are cancelled however the response ends: done, failed, or the client gone (then
    Starlette cancels the response, possibly before the event generator has even started)."""

    def __init__(self, jobs: list[Job], content, **kw) -> None:
        super().__init__(content, **kw)
        self.jobs = jobs

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            for job in self.jobs:
                job.cancel()


def create_app(served: ServedModel, *, max_batch: int = 32, batch_wait_s: float = 0.01):
    """The FastAPI application serving ``served``; its batcher starts and stops with the app's lifespan."""
    state: dict[str, Batcher] = {}

    @asynccontextmanager
    async def lifespan(app) -> AsyncIterator[None]:
        state["batcher"] = Batcher(served.model, served.tokenizer, max_batch=max_batch, batch_wait_s=batch_wait_s,
                                   pad_token_id=served.pad_token_id, eos_token_ids=served.eos_token_ids)
        try:
            yield
        finally:  # uvicorn has drained the connections: the batcher finishes what is queued and stops
            await asyncio.to_thread(state["batcher"].close)

    app = FastAPI(title="paretomerge", lifespan=lifespan)

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, e: RequestError):
        return JSONResponse(error_body(e.message, e.param, e.kind), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        err = (e.errors() or [{}])[0]
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        if err.get("type") == "json_invalid":
            return JSONResponse(error_body(f"malformed JSON body: {err.get('msg', '')} "
                                           f"({err.get('ctx', {}).get('error', '')})", None), status_code=400)
        param = loc[0] if loc else None
        where = ".".join(loc) or "body"
        return JSONResponse(error_body(f"{where}: {err.get('msg', 'invalid value')}", param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        return JSONResponse(error_body(str(e.detail), None), status_code=e.status_code)

    @app.get("/health")
    async def health():
        return {"status": "ok", **state["batcher"].stats}

    @app.get("/v1/models")
    async def models():
        K = served.num_objectives
        return {"object": "list", "data": [{
            "id": served.name, "object": "model", "created": 0, "owned_by": "paretomerge",
            "preference": {"num_objectives": K, "task_names": served.task_names, "default": [1.0 / K] * K}}]}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        sampling = _check_sampling(req, served)
        prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
        if not prompts:
            raise RequestError("prompt must be a non-empty string or a non-empty list of strings", "prompt")
        encoded = [_encode(served, p, "prompt") for p in prompts]
        budgets = [_max_new_tokens(req.max_tokens, len(ids), served, DEFAULT_COMPLETION_MAX_TOKENS,
                                   "max_tokens", "prompt") for ids in encoded]

        def chunk(index: int, text: str, finish: Optional[str]) -> dict:
            return {"index": index, "text": text, "finish_reason": finish, "logprobs": None}

        return await _respond(request, req, sampling, encoded, budgets, "cmpl", "text_completion", chunk, chunk)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        sampling = _check_sampling(req, served)
        ids = _encode(served, _chat_text(served, req.messages), "messages", add_special_tokens=False)
        field = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        budget = _max_new_tokens(requested, len(ids), served, None, field, "messages")

        def delta(index: int, text: str, finish: Optional[str]) -> dict:
            return {"index": index, "delta": {"content": text} if finish is None else {}, "finish_reason": finish,
                    "logprobs": None}

        def whole(index: int, text: str, finish: Optional[str]) -> dict:
            return {"index": index, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                    "logprobs": None}

        return await _respond(request, req, sampling, [ids], [budget], "chatcmpl", "chat.completion", whole, delta)

    async def _respond(request, req, sampling: _Sampling, encoded: list[list[int]], budgets: list[int],
                       id_prefix: str, obj: str, whole: Callable, delta: Callable):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        jobs = [Job(i, ids, sampling.pref, n, events, loop, sampling.temperature, sampling.top_p, sampling.seed,
                    sampling.stop) for i, (ids, n) in enumerate(zip(encoded, budgets))]
        for job in jobs:
            state["batcher"].submit(job)
        head = {"id": f"{id_prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": served.name}
        if req.stream:
            return _JobStream(jobs, _stream(jobs, events, head, obj, delta), media_type="text/event-stream")
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            texts, finishes, counts = await _collect(jobs, events, gone)
        finally:
            gone.cancel()
            for job in jobs:  # a no-op for finished jobs; frees the rows of a client that left
                job.cancel()
        if texts is None:
            return JSONResponse(error_body("client disconnected", None), status_code=499)
        prompt_tokens = sum(len(ids) for ids in encoded)
        return {**head, "object": obj, "choices": [whole(i, texts[i], finishes[i]) for i in range(len(jobs))],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": sum(counts),
                          "total_tokens": prompt_tokens + sum(counts)},
                "preference": sampling.pref.tolist()}

    return app


async def _disconnected(request) -> None:
    """Return when the client goes away (the body has been read, so the next ASGI message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _collect(jobs: list[Job], events: asyncio.Queue, gone: "asyncio.Future"):
    """Wait for every job's text; (None, None, None) if the client disconnects first."""
    texts, finishes, counts = [""] * len(jobs), [None] * len(jobs), [0] * len(jobs)
    remaining = len(jobs)
    while remaining:
        get = asyncio.ensure_future(events.get())
        done, _ = await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
        if get not in done:
            get.cancel()
            return None, None, None
        index, kind, value = get.result()
        if kind == "text":
            texts[index] += value
        elif kind == "done":
            finishes[index], counts[index] = value
            remaining -= 1
        else:
            raise RequestError(value, None, status=500, kind="server_error")
    return texts, finishes, counts


async def _stream(jobs: list[Job], events: asyncio.Queue, head: dict, obj: str, delta: Callable):
    """Server-sent events: ``data: {chunk}`` per text piece and per finish, then ``data: [DONE]``."""
    chunk_obj = obj + ".chunk" if obj == "chat.completion" else obj

    def sse(choices: list) -> str:
        return f"data: {json.dumps({**head, 'object': chunk_obj, 'choices': choices})}\n\n"

    try:
        if obj == "chat.completion":
            yield sse([{"index": j.index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                        "logprobs": None} for j in jobs])
        remaining = len(jobs)
        while remaining:
            index, kind, value = await events.get()
            if kind == "text":
                yield sse([delta(index, value, None)])
            elif kind == "done":
                remaining -= 1
                yield sse([delta(index, "", value[0])])
            else:
                remaining -= 1
                yield f"data: {json.dumps(error_body(value, None, 'server_error'))}\n\n"
        yield "data: [DONE]\n\n"
    finally:  # also when the client leaves mid-stream (the generator is closed)
        for job in jobs:
            job.cancel()


# ----------------------------------------------------------------------------- running it
def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on (host, port); port 0 picks a free one. OSError if it cannot bind."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"host/port: cannot listen on {host}:{port} ({e.strerror or e})") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def run_server(served: ServedModel, *, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 32,
               batch_wait_ms: float = 10.0, log_level: str = "warning", announce: Callable[[str], None] = print) -> int:
    """Serve until SIGTERM / SIGINT, then finish the requests in flight and return 0."""
    import uvicorn

    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    if not (math.isfinite(batch_wait_ms) and batch_wait_ms >= 0):
        raise ValueError(f"batch_wait_ms must be >= 0, got {batch_wait_ms}")
    sock = bind_socket(host, port)
    app = create_app(served, max_batch=max_batch, batch_wait_s=batch_wait_ms / 1000.0)
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="on", timeout_graceful_shutdown=None))
    bound = sock.getsockname()
    announce(f"paretomerge serve: {served.name} (K = {served.num_objectives}) on http://{host}:{bound[1]}/v1 "
             f"(max batch {max_batch}, batch wait {batch_wait_ms:g} ms)")
    # uvicorn drains on SIGTERM / SIGINT and then re-raises the signal to the handler it found: a no-op here,
    # so a drained server exits 0 instead of dying of the re-raised signal.
    previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run(sockets=[sock])
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        sock.close()
    return 0 if server.started else 2
