"""Batched decoding with one γ, one sampler and one stopping rule per row, and the batcher that feeds it.

* ``decode_rows``: the decode loop of a causal LM over rows of different prompts, preferences (K,),
  ``max_new_tokens``, temperatures, ``top_p`` and ``torch.Generator``s. The prompts are left-padded
  into one (B, L) prefill with an attention mask and position ids that count real tokens only, so a
  row's logits are what it computes alone; each decode step feeds x (B', 1) through the KV cache.
  A finished row (EOS, its token budget, a stop string, a client gone) leaves the batch at once:
  its KV-cache rows, mask row and γ row are dropped, so the others do not wait on it.
* ``Batcher``: one worker thread (the model is not thread-safe) that groups queued ``Job``s, up to
  ``max_batch`` and waiting at most ``batch_wait_s`` after the first, into one ``decode_rows``
  call, and sends each job's text deltas back to its asyncio event loop. A job cancelled before its
  batch starts is dropped; one cancelled while generating leaves the batch at the next step.

Nothing here knows HTTP; ``paretomerge.serve`` is the OpenAI-compatible front end.
"""
from __future__ import annotations

import asyncio
import functools
import inspect
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn

from .layers import use_preference

__all__ = ["Batcher", "DecodeRow", "Job", "decode_rows", "max_positions"]


@dataclass
class DecodeRow:
    """One row of ``decode_rows``: a prompt (token ids), its γ (K,) and how to sample and stop.

    ``temperature`` 0 is greedy (argmax). ``generator`` draws the row's samples (needed when
    temperature > 0; on the model's device). ``on_token(token)`` receives each new token that is not
    EOS and returns None to go on or a finish reason to stop the row; ``on_finish(reason)`` is called
    once, with "stop" (EOS or ``on_token``'s stop), "length" (``max_new_tokens`` reached) or whatever
    ``on_token`` returned.
    """
    prompt_ids: Sequence[int]
    pref: torch.Tensor
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    generator: Optional[torch.Generator] = None
    on_token: Callable[[int], Optional[str]] = lambda token: None
    on_finish: Callable[[str], None] = lambda reason: None


def max_positions(config) -> Optional[int]:
    """The longest sequence (prompt + generated tokens) the model's position embeddings cover, if known."""
    for name in ("max_position_embeddings", "n_positions", "max_seq_len"):
        v = getattr(config, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def _forward_kwargs(model: nn.Module) -> tuple[str, bool]:
    params = inspect.signature(model.forward).parameters
    cache_name = "cache" if "cache" in params else "past_key_values"  # transformers 5 renamed it
    return cache_name, "logits_to_keep" in params


def _next_tokens(logits: torch.Tensor, rows: Sequence[DecodeRow]) -> list[int]:
    """logits (B, V) float -> one token per row: argmax for greedy rows, else a draw from the row's
    temperature-scaled, top-p-truncated distribution with the row's own generator."""
    out = logits.argmax(dim=-1).tolist()
    for j, row in enumerate(rows):
        if row.temperature <= 0:
            continue
        probs = torch.softmax(logits[j].float() / row.temperature, dim=-1)
        if row.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            keep = (sorted_p.cumsum(0) - sorted_p) < row.top_p  # the smallest prefix with mass >= top_p
            pick = torch.multinomial(sorted_p * keep, 1, generator=row.generator)
            out[j] = int(order[pick])
        else:
            out[j] = int(torch.multinomial(probs, 1, generator=row.generator))
    return out


@torch.inference_mode()
def decode_rows(model: nn.Module, rows: Sequence[DecodeRow], *, pad_token_id: int,
                eos_token_ids: Sequence[int] = ()) -> None:
    """Generate every row to its end in one batch (see ``DecodeRow``); results go to the rows' callbacks.

    The prompts (lengths L_i) are left-padded to (B, max L_i); position ids count each row's real
    tokens from 0, as the row alone would, and padding is masked out of attention; the KV cache
    (a transformers ``DynamicCache``) keeps each row's keys and values. Rows that finish are removed
    from the cache and the batch before the next step.
    """
    from transformers import DynamicCache

    if not rows:
        return
    for i, row in enumerate(rows):
        if len(row.prompt_ids) == 0:
            raise ValueError(f"rows[{i}].prompt_ids is empty; every row needs at least one prompt token")
        if row.max_new_tokens < 1:
            raise ValueError(f"rows[{i}].max_new_tokens must be >= 1, got {row.max_new_tokens}")
    device = next(model.parameters()).device
    cache_name, has_logits_to_keep = _forward_kwargs(model)
    eos = set(int(t) for t in eos_token_ids)
    B, L = len(rows), max(len(r.prompt_ids) for r in rows)
    ids = torch.full((B, L), int(pad_token_id), dtype=torch.long)
    mask = torch.zeros((B, L), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, L - len(r.prompt_ids):] = torch.as_tensor(list(r.prompt_ids), dtype=torch.long)
        mask[i, L - len(r.prompt_ids):] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate: padding at 0, real tokens 0..L_i-1
    prefs = torch.stack([torch.as_tensor(r.pref, dtype=torch.float64) for r in rows])
    cache = DynamicCache(config=model.config)
    extra = {"logits_to_keep": 1} if has_logits_to_keep else {}
    with use_preference(prefs):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                       **{cache_name: cache}, **extra).logits[:, -1]
    active = list(range(B))  # the rows still in the batch, in batch order
    generated = [0] * B
    last_pos = positions[:, -1]
    while True:
        tokens = _next_tokens(logits, [rows[i] for i in active])
        keep: list[int] = []
        for j, i in enumerate(active):
            generated[i] += 1
            if tokens[j] in eos:
                reason = "stop"
            else:
                reason = rows[i].on_token(tokens[j])
                if reason is None and generated[i] >= rows[i].max_new_tokens:
                    reason = "length"
            if reason is None:
                keep.append(j)
            else:
                rows[i].on_finish(reason)
        if not keep:
            return
        step = torch.tensor([tokens[j] for j in keep], dtype=torch.long, device=device)[:, None]
        if len(keep) < len(active):
            index = torch.tensor(keep, dtype=torch.long, device=device)
            cache.batch_select_indices(index)
            mask, last_pos, prefs = mask[index], last_pos[index], prefs[index.cpu()]
            active = [active[j] for j in keep]
        mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=1)
        last_pos = last_pos + 1
        with use_preference(prefs):
            logits = model(input_ids=step, attention_mask=mask, position_ids=last_pos[:, None], use_cache=True,
                           **{cache_name: cache}).logits[:, -1]


# ----------------------------------------------------------------------------- jobs and the batcher
@dataclass
class Job:
    """One request row: prompt ids, γ (K,), sampling and stopping settings, and the channel back.

    Events go to ``events`` (an ``asyncio.Queue`` of ``loop``) as tuples ``(index, kind, value)``:
    ``("text", delta)`` pieces of the completion (held back while they could still begin a stop
    string), then one ``("done", (finish_reason, completion_tokens))`` or ``("error", message)``.
    ``cancel()`` (from any thread) makes the batcher drop the job, or end its row at the next step.
    """
    index: int
    prompt_ids: list[int]
    pref: torch.Tensor
    max_new_tokens: int
    events: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    temperature: float = 1.0
    top_p: float = 1.0
    seed: Optional[int] = None
    stop: tuple[str, ...] = ()
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()

    def _send(self, kind: str, value) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (self.index, kind, value))
        except RuntimeError:  # the event loop is closed: nobody is waiting for this job any more
            pass


class _TextStream:
    """A job's detokenizer: turns the generated ids into text incrementally, finds stop strings, sends the text
    not yet sent.

    Each step decodes only a short window: the text of tokens[prefix:] minus that of tokens[prefix:read]
    is what the new token adds (the window's first token keeps word-boundary handling, e.g. a
    SentencePiece leading space, out of the difference). A step whose text ends in an incomplete UTF-8
    character adds nothing yet; the window moves on once it decodes cleanly.
    """

    def __init__(self, job: Job, tokenizer) -> None:
        self.job, self.tokenizer = job, tokenizer
        self.tokens: list[int] = []
        self.prefix = self.read = 0
        self.text, self.sent = "", 0
        self.hold = max((len(s) for s in job.stop), default=1) - 1  # a stop string's prefix may end the text
        self.stop_string = self.finished = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def on_token(self, token: int) -> Optional[str]:
        if self.job.cancelled.is_set():
            return "cancelled"
        self.tokens.append(token)
        before = self._decode(self.tokens[self.prefix:self.read])
        after = self._decode(self.tokens[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before):]
            self.prefix, self.read = self.read, len(self.tokens)
        cut = min((i for i in (self.text.find(s) for s in self.job.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.stop_string = self.text[:cut], True
            return "stop"
        safe = len(self.text) - self.hold
        if safe > self.sent:
            self.job._send("text", self.text[self.sent:safe])
            self.sent = safe
        return None

    def on_finish(self, reason: str) -> None:
        self.finished = True
        if reason == "cancelled":
            return
        if self.read < len(self.tokens) and not self.stop_string:  # the tail not yet taken (as decode shows it)
            window = self._decode(self.tokens[self.prefix:])
            self.text += window[len(self._decode(self.tokens[self.prefix:self.read])):]
        if len(self.text) > self.sent:
            self.job._send("text", self.text[self.sent:])
        eos = reason == "stop" and not self.stop_string  # EOS was generated: it counts as a completion token
        self.job._send("done", (reason, len(self.tokens) + eos))


class Batcher:
    """Groups submitted ``Job``s into batches and runs ``decode_rows`` on one worker thread.

    A batch starts with the oldest waiting job and takes every job that arrives within ``batch_wait_s``
    of it, up to ``max_batch``; jobs cancelled by then are dropped. ``close()`` lets the worker finish
    the jobs already submitted, then stops it.
    """

    def __init__(self, model: nn.Module, tokenizer, *, max_batch: int = 32, batch_wait_s: float = 0.01,
                 pad_token_id: int, eos_token_ids: Sequence[int] = ()) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if batch_wait_s < 0:
            raise ValueError(f"batch_wait_s must be >= 0, got {batch_wait_s}")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.batch_wait_s = max_batch, batch_wait_s
        self.pad_token_id, self.eos_token_ids = pad_token_id, tuple(eos_token_ids)
        self.device = next(model.parameters()).device
        # dropped: cancelled before their batch started; cancelled: rows ended early because their client left
        self.stats = {"batches": 0, "rows": 0, "largest_batch": 0, "dropped": 0, "cancelled": 0}
        self._queue: "queue.Queue[Optional[Job]]" = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="paretomerge-batcher", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        self._queue.put(job)

    def close(self, timeout: Optional[float] = None) -> None:
        """Finish the jobs submitted so far, then stop the worker thread."""
        self._queue.put(None)
        self._thread.join(timeout)

    def _collect(self, first: Job) -> tuple[list[Job], bool]:
        batch, closing = [first], False
        deadline = time.monotonic() + self.batch_wait_s
        while len(batch) < self.max_batch:
            try:
                job = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if job is None:
                closing = True
                break
            batch.append(job)
        return batch, closing

    def _work(self) -> None:
        closing = False
        while not closing:
            first = self._queue.get()
            if first is None:
                break
            batch, closing = self._collect(first)
            live = [j for j in batch if not j.cancelled.is_set()]
            self.stats["dropped"] += len(batch) - len(live)
            if live:
                self._run(live)
        while True:  # closing: what is still queued was submitted before close()
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if job is not None and not job.cancelled.is_set():
                self._run([job])

    def _finished(self, stream: "_TextStream", reason: str) -> None:
        self.stats["cancelled"] += reason == "cancelled"
        stream.on_finish(reason)

    def _run(self, jobs: list[Job]) -> None:
        self.stats["batches"] += 1
        self.stats["rows"] += len(jobs)
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(jobs))
        rows, streams = [], []
        for job in jobs:
            stream = _TextStream(job, self.tokenizer)
            streams.append(stream)
            gen = None
            if job.temperature > 0:
                gen = torch.Generator(device=self.device)
                if job.seed is None:
                    gen.seed()
                else:
                    gen.manual_seed(job.seed)
            rows.append(DecodeRow(job.prompt_ids, job.pref, job.max_new_tokens, job.temperature, job.top_p, gen,
                                  stream.on_token, functools.partial(self._finished, stream)))
        try:
            decode_rows(self.model, rows, pad_token_id=self.pad_token_id, eos_token_ids=self.eos_token_ids)
        except Exception as e:  # noqa: BLE001 - reported to every unfinished request of the batch; the server goes on
            for stream in streams:
                if not stream.finished:
                    stream.job._send("error", f"{type(e).__name__}: {e}")
