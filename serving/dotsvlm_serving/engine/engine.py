"""Continuous batching for a transformers causal LM (DeepSeek-V3 here) on one device.

Each request is prefilled alone from `inputs_embeds` (image embeddings already written at the pad
positions), then joins one shared, left-padded `DynamicCache`; every `step()` admits pending
requests between decode steps and advances all running requests by one token. Left padding is masked
by a 2-D attention mask and positions are passed per sequence, so a request decodes exactly as it would
alone (the equivalence test checks this token for token). Finished and cancelled requests leave the
batch at once and free their KV rows. A request whose own token fails (sampling, detokenizing) ends with
an error and the rest of the batch goes on; a failed batch forward ends the running requests with an
error and keeps the step's other events for the next step.

Not thread-safe: one engine thread calls `add`, `cancel` and `step`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from transformers import DynamicCache

from ..events import ErrorEvent, Event, FinishEvent, TokenEvent, Usage
from .base import RequestBudget
from .detokenizer import TokenStream, WindowStream
from .sampling import SamplingParams, StopTail, find_stop, sample_token


@dataclass
class EngineRequest:
    request_id: str
    inputs_embeds: torch.Tensor  # [prompt_len, hidden]
    params: SamplingParams

    @property
    def prompt_tokens(self) -> int:
        return int(self.inputs_embeds.shape[0])

    @property
    def reserved_tokens(self) -> int:
        return self.prompt_tokens + self.params.max_tokens


@dataclass
class _Seq:
    req: EngineRequest
    generator: torch.Generator | None
    length: int = 0  # tokens in this sequence's KV cache
    generated: list[int] = field(default_factory=list)
    # The text of `generated` so far, built from each token's new text (`stream`), without a partial
    # character at its end; all tokens are decoded once more only when the request finishes.
    text: str = ""
    stream: TokenStream | None = None
    emitted: int = 0  # characters of the decoded text already sent
    first_token_at: float | None = None
    started_at: float = field(default_factory=time.monotonic)
    # What to hold back of the text for the stop strings, kept across tokens: a long stop string costs
    # per token only the new characters, not a search over its length.
    tail: StopTail = field(init=False)

    def __post_init__(self) -> None:
        self.tail = StopTail(self.req.params.stop)


class Engine:
    # Batch forwards failed in a row (no forward succeeding between) before `health_error` calls the engine
    # broken: a failed forward ends its batch, so the step after it has nothing to run and succeeds, and the
    # replica's own count of failed steps never reaches its limit.
    MAX_FAILED_FORWARDS = 3

    def __init__(self, model: torch.nn.Module, detokenize: Callable[[list[int]], str], *,
                 eos_token_ids: set[int], max_running: int, kv_cache_tokens: int, context_length: int,
                 token_streams: Callable[[], TokenStream] | None = None) -> None:
        """`detokenize` decodes a whole answer (once, when a request finishes); `token_streams` makes each
        request's incremental detokenizer (`detokenizer.decode_streams`), a `WindowStream` over
        `detokenize` when not given."""
        self.model = model
        self.detokenize = detokenize
        self.token_streams: Callable[[], TokenStream] = token_streams or (lambda: WindowStream(detokenize))
        self.eos_token_ids = set(eos_token_ids)
        self.budget = RequestBudget(context_length=context_length, kv_tokens=kv_cache_tokens, max_running=max_running)
        self.device = next(model.parameters()).device
        self._pending: list[EngineRequest] = []
        self._running: list[_Seq] = []  # row i of the batch cache belongs to _running[i]
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None  # [B, cache_len] 1 = real token
        self._cancelled: set[str] = set()
        # Events of a step that raised (its batch forward failed), handed out by the next step.
        self._undelivered: list[Event] = []
        self.failed_forwards = 0  # batch forwards failed in a row (`health_error`)
        self._forward_error = ""
        self.tokens_generated = 0

    # ------------------------------------------------------------------ admission
    def reserved_tokens(self) -> int:
        return sum(s.req.reserved_tokens for s in self._running) + sum(r.reserved_tokens for r in self._pending)

    def free_slots(self) -> int:
        return self.budget.free_slots(len(self._running) + len(self._pending))

    def free_tokens(self) -> int:
        return self.budget.free_tokens(self.reserved_tokens())

    def has_work(self) -> bool:
        return bool(self._running or self._pending or self._undelivered)

    def num_running(self) -> int:
        return len(self._running) + len(self._pending)

    def check_limits(self, prompt_tokens: int, max_tokens: int) -> None:
        self.budget.check(prompt_tokens, max_tokens)

    def add(self, req: EngineRequest) -> None:
        self.check_limits(req.prompt_tokens, req.params.max_tokens)
        self._pending.append(req)

    def cancel(self, request_id: str) -> None:
        """Stop a request this engine holds (at the next step). An id it does not hold (finished already,
        never added) is ignored: kept, it waited for a step that an idle engine does not run, and a later
        delivery of the same request id to this replica was cancelled as soon as it was added."""
        if any(r.request_id == request_id for r in self._pending) or \
                any(s.req.request_id == request_id for s in self._running):
            self._cancelled.add(request_id)

    # ------------------------------------------------------------------ the loop body
    @torch.inference_mode()
    def step(self) -> list[Event]:
        """Admit pending requests (prefill), then run one decode step for the whole batch."""
        events, self._undelivered = self._undelivered, []
        self._apply_cancellations(events)
        while self._pending:
            req = self._pending.pop(0)
            try:
                self._prefill(req, events)
            except Exception as exc:  # a bad request must not take the replica down
                events.append(ErrorEvent(request_id=req.request_id, type="error", code=500,
                                         message=f"prefill failed: {type(exc).__name__}: {exc}"))
        if self._running:
            try:
                self._decode(events)
            except Exception as exc:
                self.failed_forwards += 1
                self._forward_error = f"{type(exc).__name__}: {exc}"
                # The batch's forward failed: its KV cache may be half updated, so its requests cannot go on.
                # They end with an error, and what this step made before (prefills, cancellations) is kept
                # for the next step: raising loses nothing, and the caller still sees the step fail.
                for seq in self._running:
                    events.append(ErrorEvent(request_id=seq.req.request_id, type="error", code=500,
                                             message=f"generation failed: {type(exc).__name__}: {exc}"))
                self._running, self._cache, self._mask = [], None, None
                self._undelivered = events
                raise
        return events

    def health_error(self) -> str | None:
        """Why the engine can run nothing (its batch forwards keep failing: a lost device, say), or None."""
        if self.failed_forwards >= self.MAX_FAILED_FORWARDS:
            return f"its last {self.failed_forwards} batch forwards failed, the last with {self._forward_error}"
        return None

    def _apply_cancellations(self, events: list[Event]) -> None:
        if not self._cancelled:
            return
        for req in [r for r in self._pending if r.request_id in self._cancelled]:
            self._pending.remove(req)
            events.append(self._finish_event(_Seq(req, None), "cancelled"))
        rows = [i for i, s in enumerate(self._running) if s.req.request_id in self._cancelled]
        for i in rows:
            events.append(self._finish_event(self._running[i], "cancelled"))
        self._drop_rows(rows)
        self._cancelled.clear()

    def _prefill(self, req: EngineRequest, events: list[Event]) -> None:
        seq = _Seq(req, req.params.make_generator(), stream=self.token_streams())
        cache = DynamicCache(config=self.model.config)
        embeds = req.inputs_embeds.to(self.device, dtype=self._dtype())[None]
        out = self.model(inputs_embeds=embeds, past_key_values=cache, use_cache=True, logits_to_keep=1)
        seq.length = req.prompt_tokens
        if self._on_token(seq, sample_token(out.logits[0, -1], req.params, seq.generator), events):
            return
        self._join(seq, cache)

    def _decode(self, events: list[Event]) -> None:
        assert self._cache is not None and self._mask is not None
        b = len(self._running)
        ids = torch.tensor([[s.generated[-1]] for s in self._running], device=self.device)
        pos = torch.tensor([[s.length] for s in self._running], device=self.device)
        mask = torch.cat([self._mask, torch.ones(b, 1, dtype=self._mask.dtype, device=self.device)], dim=1)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=self._cache,
                         use_cache=True)
        self.failed_forwards = 0
        self._mask = mask
        finished: list[int] = []
        for i, seq in enumerate(self._running):
            seq.length += 1
            try:
                done = self._on_token(seq, sample_token(out.logits[i, -1], seq.req.params, seq.generator), events)
            except Exception as exc:  # this request's token (say NaN logits): it ends, the batch goes on
                events.append(ErrorEvent(request_id=seq.req.request_id, type="error", code=500,
                                         message=f"generation failed: {type(exc).__name__}: {exc}"))
                done = True
            if done:
                finished.append(i)
        self._drop_rows(finished)

    # ------------------------------------------------------------------ tokens and text
    def _on_token(self, seq: _Seq, token: int, events: list[Event]) -> bool:
        """Record one sampled token; emit text; return True when the sequence has finished."""
        rid = seq.req.request_id
        first = seq.first_token_at is None
        if first:
            seq.first_token_at = time.monotonic()
        if token in self.eos_token_ids and not seq.req.params.ignore_eos:
            events.append(self._finish_event(seq, "stop", self._flush(seq)))
            return True
        seq.generated.append(token)
        self.tokens_generated += 1
        assert seq.stream is not None
        piece = seq.stream.step(token)  # a window of the last tokens, not the whole answer again
        if piece:
            seq.text += piece
        text = seq.text
        stops = seq.req.params.stop
        if stops:
            at = find_stop(text, stops, max(0, seq.emitted - max(len(s) for s in stops)))
            if at >= 0:
                delta = text[seq.emitted:at] if at > seq.emitted else ""
                seq.emitted = max(seq.emitted, at)
                events.append(self._finish_event(seq, "stop", delta))
                return True
        if len(seq.generated) >= seq.req.params.max_tokens:
            events.append(self._finish_event(seq, "length", self._flush(seq)))
            return True
        safe = len(text) - seq.tail.holdback(text)
        if safe > seq.emitted or first:
            events.append(TokenEvent(request_id=rid, type="token", text=text[seq.emitted:max(safe, seq.emitted)]))
            seq.emitted = max(safe, seq.emitted)
        return False

    def _flush(self, seq: _Seq) -> str:
        """The rest of the answer: all its tokens decoded once, so its end is the full decode's (a partial
        character that never completed is U+FFFD here, as in the reference's text)."""
        text = self.detokenize(seq.generated)
        delta = text[seq.emitted:]
        seq.emitted = len(text)
        return delta

    def _finish_event(self, seq: _Seq, reason: Literal["stop", "length", "cancelled"], text: str = "") -> FinishEvent:
        return FinishEvent(request_id=seq.req.request_id, type="finish", finish_reason=reason, text=text,
                           usage=Usage(prompt_tokens=seq.req.prompt_tokens, completion_tokens=len(seq.generated)))

    # ------------------------------------------------------------------ the batch cache
    def _dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def _join(self, seq: _Seq, cache: DynamicCache) -> None:
        length = seq.length
        if self._cache is None:
            self._cache, self._mask = cache, torch.ones(1, length, dtype=torch.long, device=self.device)
            self._running.append(seq)
            return
        assert self._mask is not None
        cur = self._mask.shape[1]
        if length < cur:
            self._pad_left(cache, cur - length)
            new_mask = torch.cat([torch.zeros(1, cur - length, dtype=torch.long, device=self.device),
                                  torch.ones(1, length, dtype=torch.long, device=self.device)], dim=1)
        else:
            if length > cur:
                self._pad_left(self._cache, length - cur)
                self._mask = torch.cat([torch.zeros(self._mask.shape[0], length - cur, dtype=torch.long,
                                                    device=self.device), self._mask], dim=1)
            new_mask = torch.ones(1, length, dtype=torch.long, device=self.device)
        for mine, theirs in zip(self._cache.layers, cache.layers):
            mine.keys = torch.cat([mine.keys, theirs.keys], dim=0)
            mine.values = torch.cat([mine.values, theirs.values], dim=0)
        self._mask = torch.cat([self._mask, new_mask], dim=0)
        self._running.append(seq)

    @staticmethod
    def _pad_left(cache: DynamicCache, n: int) -> None:
        for layer in cache.layers:
            for name in ("keys", "values"):
                t = getattr(layer, name)
                pad = torch.zeros(*t.shape[:-2], n, t.shape[-1], dtype=t.dtype, device=t.device)
                setattr(layer, name, torch.cat([pad, t], dim=-2))

    def _drop_rows(self, rows: list[int]) -> None:
        if not rows:
            return
        keep = [i for i in range(len(self._running)) if i not in set(rows)]
        self._running = [self._running[i] for i in keep]
        if not keep:
            self._cache, self._mask = None, None
            return
        assert self._cache is not None and self._mask is not None
        idx = torch.tensor(keep, device=self.device)
        self._mask = self._mask[idx]
        # Trim columns that are padding in every remaining row.
        first = int(torch.nonzero(self._mask.sum(dim=0) > 0)[0].item())
        self._mask = self._mask[:, first:]
        for layer in self._cache.layers:
            layer.keys = layer.keys[idx][..., first:, :]
            layer.values = layer.values[idx][..., first:, :]

    def stats(self) -> dict[str, float]:
        return {"running": float(len(self._running)), "pending": float(len(self._pending)),
                "kv_tokens_reserved": float(self.reserved_tokens()), "kv_tokens_capacity": float(self.budget.kv_tokens),
                "kv_tokens_used": float(sum(s.length for s in self._running)),
                "tokens_generated_total": float(self.tokens_generated)}
