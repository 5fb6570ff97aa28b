"""vLLM behind the engine interface: the production engine (docs/engine.md).

vLLM runs as a library inside the LLM replica (`AsyncLLM`), with the language model of the dots.vlm1
checkpoint loaded as vLLM's DeepSeek-V3 (`vllm_plugin`). With tensor_parallel > 1 its workers are Ray
actors in the replica's placement group (Ray is the distributed executor), so one replica spans the GPUs
of several nodes.

Image embeddings enter as vLLM's mixed prompt embeddings: `prompt_token_ids` with a per-position mask
(`prompt_is_token_ids`) and a `prompt_embeds` tensor whose rows at the `<|imgpad|>` positions are the
vision tower's output; every other position is embedded by the model from its token id. vLLM has no
precomputed-image-embeddings input for DeepSeek-V3 (that needs a multimodal model class); the cost of
this form (a prompt-length tensor per request, and no prefix caching on such requests) is in
docs/engine.md. Text-only requests go in as plain token ids.

vLLM pins its own torch, so it lives in its own environment (`scripts/setup-vllm.sh`); importing this
module without vLLM installed fails with a message that says so.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..events import ErrorEvent, Event, FinishEvent, TokenEvent, Usage
from ..serve_config import LLMServerConfig, ServedModel
from .base import EngineInput, InferenceEngine, RequestBudget
from .sampling import SamplingParams
from .vllm_plugin import ARCHITECTURE

log = logging.getLogger("ray.serve")

# Keys of the dots.vlm1 config.json that vLLM's DeepSeek-V3 config must not see.
_WRAPPER_KEYS = ("vision_config", "image_token_id", "video_token_id", "auto_map")
# The checkpoint files the language model view links to.
_LINKED_SUFFIXES = (".safetensors", ".json", ".txt", ".model", ".tiktoken")
# How long one step() waits for the next events before it returns (the replica polls the queue between).
STEP_WAIT_S = 0.05


def _import_vllm() -> Any:
    try:
        import vllm
    except ImportError as exc:
        raise RuntimeError(
            "llm.engine is vllm but vLLM is not installed in this environment: use the serving image built for "
            "the vllm engine, or create the environment with scripts/setup-vllm.sh (it keeps vLLM's own torch "
            "apart from the default .venv); or set llm.engine to transformers") from exc
    return vllm


def language_model_view(model_path: str | Path, out_dir: str | Path) -> Path:
    """A directory vLLM loads as a DeepSeek-V3: the checkpoint's files linked, config.json rewritten
    (model_type deepseek_v3, our architecture name, without the vision wrapper's keys)."""
    src, out = Path(model_path), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    raw = json.loads((src / "config.json").read_text())
    llm = {k: v for k, v in raw.items() if k not in _WRAPPER_KEYS}
    llm["model_type"] = "deepseek_v3"
    llm["architectures"] = [ARCHITECTURE]
    for f in src.iterdir():
        if f.is_file() and f.name != "config.json" and f.name.endswith(_LINKED_SUFFIXES):
            link = out / f.name
            if not link.exists():
                link.symlink_to(f.resolve())
    (out / "config.json").write_text(json.dumps(llm, indent=2) + "\n")
    return out


@dataclass
class _Req:
    inp: EngineInput
    prompt: dict[str, Any]
    completion_tokens: int = 0
    started: bool = False
    task: asyncio.Task | None = None
    first_token_at: float | None = None
    added_at: float = field(default_factory=time.monotonic)


class VLLMEngine(InferenceEngine):
    name = "vllm"

    def __init__(self, engine_args: Any, *, image_token_id: int, hidden_size: int, dtype: str,
                 stop_token_ids: list[int], max_running: int, context_length: int, workdir: Any = None) -> None:
        vllm = _import_vllm()
        from vllm.v1.engine.async_llm import AsyncLLM

        from .vllm_plugin import register

        register()
        self._vllm = vllm
        self.image_token_id = image_token_id
        self.hidden_size = hidden_size
        self.dtype = dtype
        self.stop_token_ids = list(stop_token_ids)
        self._workdir = workdir  # a TemporaryDirectory holding the model view, removed on shutdown
        self.llm = AsyncLLM.from_engine_args(engine_args)
        cache = self.llm.vllm_config.cache_config
        kv_capacity = int((cache.num_gpu_blocks or 0) * cache.block_size) or max_running * context_length
        self.budget = RequestBudget(context_length=context_length, kv_tokens=kv_capacity, max_running=max_running)
        self._lock = threading.Lock()  # add() runs in a worker thread, step() on the event loop
        self._incoming: deque[_Req] = deque()
        self._cancel: set[str] = set()
        self._reqs: dict[str, _Req] = {}
        self._events: list[Event] = []
        self._wake: asyncio.Event | None = None
        self.tokens_generated = 0

    @classmethod
    def from_config(cls, model: ServedModel, llm: LLMServerConfig) -> "VLLMEngine":
        vllm = _import_vllm()
        from ..model.config import load_config
        from ..model.prompt import load_tokenizer, stop_token_ids

        model_config = load_config(model.model_path)
        workdir = tempfile.TemporaryDirectory(prefix="dotsvlm-vllm-")
        view = language_model_view(model.model_path, workdir.name)
        args = engine_args(model, llm, str(view), vllm.AsyncEngineArgs)
        return cls(args, image_token_id=model_config.image_token_id, hidden_size=model_config.llm_config().hidden_size,
                   dtype=model.dtype, stop_token_ids=stop_token_ids(load_tokenizer(model.model_path)),
                   max_running=llm.max_running_requests, context_length=llm.context_length, workdir=workdir)

    # ------------------------------------------------------------------ admission
    def check_limits(self, prompt_tokens: int, max_tokens: int) -> None:
        self.budget.check(prompt_tokens, max_tokens)

    def add(self, request: EngineInput) -> None:
        self.check_limits(request.prompt_tokens, request.params.max_tokens)
        req = _Req(request, self._prompt(request))
        with self._lock:
            self._incoming.append(req)
            self._reqs[request.request_id] = req

    def _prompt(self, request: EngineInput) -> dict[str, Any]:
        """Token ids, or mixed prompt embeddings when the request has images."""
        import numpy as np
        import torch

        ids = list(request.prompt_ids)
        emb = request.image_embeds
        if emb is None or emb.shape[0] == 0:
            return {"prompt_token_ids": ids}
        rows = torch.as_tensor(np.asarray(emb)) if not isinstance(emb, torch.Tensor) else emb
        is_token = [t != self.image_token_id for t in ids]
        pads = len(ids) - sum(is_token)
        if pads != rows.shape[0]:
            raise ValueError(f"the prompt has {pads} image-pad tokens but {rows.shape[0]} image embedding rows")
        if rows.shape[1] != self.hidden_size:
            raise ValueError(f"image embeddings are {rows.shape[1]} wide, the language model {self.hidden_size}")
        embeds = torch.zeros(len(ids), self.hidden_size, dtype=getattr(torch, self.dtype))
        # (rows that came by NIXL are on this replica's GPU: vLLM takes prompt embeddings in host memory)
        embeds[torch.tensor([not t for t in is_token])] = rows.to(device="cpu", dtype=embeds.dtype)
        return {"prompt_embeds": embeds, "prompt_token_ids": ids, "prompt_is_token_ids": is_token}

    def cancel(self, request_id: str) -> None:
        """Stop a request this engine holds; an id it does not hold is ignored (kept, it waited for a step
        that an idle engine does not run, and cancelled a later delivery of the same request id at once)."""
        with self._lock:
            if request_id in self._reqs:
                self._cancel.add(request_id)

    def sampling_params(self, p: SamplingParams) -> Any:
        from vllm.sampling_params import RequestOutputKind

        return self._vllm.SamplingParams(
            n=1, max_tokens=p.max_tokens, temperature=p.temperature, top_p=p.top_p,
            top_k=p.top_k if p.top_k > 0 else -1, seed=p.seed, stop=list(p.stop) or None,
            stop_token_ids=self.stop_token_ids, ignore_eos=p.ignore_eos, skip_special_tokens=True,
            output_kind=RequestOutputKind.DELTA)

    # ------------------------------------------------------------------ the loop body
    async def step(self) -> list[Event]:
        if self._wake is None:
            self._wake = asyncio.Event()
        with self._lock:
            new = list(self._incoming)
            self._incoming.clear()
            cancel, self._cancel = self._cancel, set()
        for req in new:
            req.task = asyncio.create_task(self._consume(req))
        for rid in cancel:
            req = self._reqs.pop(rid, None)
            if req is None:
                continue
            if req.task is not None:
                req.task.cancel()
            await self.llm.abort(rid)
            self._emit(self._finish(req, "cancelled"))
        if not self._events:
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), STEP_WAIT_S)
            except asyncio.TimeoutError:
                pass
        events, self._events = self._events, []
        return events

    async def _consume(self, req: _Req) -> None:
        rid = req.inp.request_id
        try:
            async for out in self.llm.generate(req.prompt, self.sampling_params(req.inp.params), rid):
                req.started = True
                c = out.outputs[0]
                n = len(c.token_ids)
                req.completion_tokens += n
                self.tokens_generated += n
                if req.first_token_at is None and n:
                    req.first_token_at = time.monotonic()
                if out.finished:
                    reason = "length" if c.finish_reason == "length" else "stop"
                    if reason == "stop" and not isinstance(c.stop_reason, str) and req.completion_tokens:
                        req.completion_tokens -= 1  # vLLM counts the stop token; usage does not (as transformers)
                    self._reqs.pop(rid, None)
                    self._emit(self._finish(req, reason, c.text))
                    return
                if c.text or n:
                    self._emit(TokenEvent(request_id=rid, type="token", text=c.text))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bad request must not take the replica down
            invalid = isinstance(exc, ValueError)  # vLLM's own validation errors are ValueErrors: the client's
            if not invalid:
                log.exception("vLLM request %s failed", rid)
            if self._reqs.pop(rid, None) is not None:
                self._emit(ErrorEvent(request_id=rid, type="error", code=400 if invalid else 500,
                                      message=f"generation failed: {type(exc).__name__}: {exc}"))

    def _emit(self, event: Event) -> None:
        self._events.append(event)
        if self._wake is not None:
            self._wake.set()

    @staticmethod
    def _finish(req: _Req, reason: str, text: str = "") -> FinishEvent:
        return FinishEvent(request_id=req.inp.request_id, type="finish", finish_reason=reason,  # type: ignore[typeddict-item]
                           text=text, usage=Usage(prompt_tokens=req.inp.prompt_tokens,
                                                  completion_tokens=req.completion_tokens))

    # ------------------------------------------------------------------ load and stats
    def has_work(self) -> bool:
        return bool(self._reqs) or bool(self._events)

    def reserved_tokens(self) -> int:
        return sum(r.inp.reserved_tokens for r in list(self._reqs.values()))

    def free_slots(self) -> int:
        return self.budget.free_slots(len(self._reqs))

    def free_tokens(self) -> int:
        return self.budget.free_tokens(self.reserved_tokens())

    def stats(self) -> dict[str, float]:
        reqs = list(self._reqs.values())
        running = sum(1 for r in reqs if r.started)
        return {"running": float(running), "pending": float(len(reqs) - running),
                "kv_tokens_reserved": float(self.reserved_tokens()), "kv_tokens_capacity": float(self.budget.kv_tokens),
                # what the running requests hold: their prompts and the tokens generated so far
                "kv_tokens_used": float(sum(r.inp.prompt_tokens + r.completion_tokens for r in reqs if r.started)),
                "tokens_generated_total": float(self.tokens_generated)}

    def health_error(self) -> str | None:
        # AsyncLLM.errored: its engine core process died; every request would now fail with EngineDeadError.
        if getattr(self.llm, "errored", False):
            return "vLLM's engine core has stopped (EngineDeadError); its first error is in this replica's log"
        return None

    async def shutdown(self) -> None:
        for req in list(self._reqs.values()):
            if req.task is not None:
                req.task.cancel()
        self.llm.shutdown()
        if self._workdir is not None:
            self._workdir.cleanup()


def engine_args(model: ServedModel, llm: LLMServerConfig, model_dir: str, args_cls: Any) -> Any:
    """vLLM's engine arguments from the pool's options (docs/engine.md has the mapping)."""
    on_gpu = model.device == "cuda"
    kw: dict[str, Any] = dict(
        model=model_dir, tokenizer=model_dir, dtype=model.dtype, max_model_len=llm.context_length,
        max_num_seqs=llm.max_running_requests, tensor_parallel_size=llm.tensor_parallel,
        enable_prompt_embeds=True, served_model_name=model.served_model_name,
        # On CPU vLLM reads the share of RAM for the KV cache from VLLM_CPU_KVCACHE_SPACE (GiB).
        gpu_memory_utilization=llm.memory_fraction or (0.9 if on_gpu else 0.3),
    )
    if on_gpu and llm.gpus_per_replica > 1:
        # Workers are Ray actors in the replica's placement group (app.llm_placement: one bundle per GPU),
        # on all of its nodes.
        kw["distributed_executor_backend"] = "ray"
    if llm.chunked_prefill is not None:
        kw["enable_chunked_prefill"] = llm.chunked_prefill
    if llm.max_prefill_tokens is not None:
        kw["max_num_batched_tokens"] = llm.max_prefill_tokens
    if llm.cuda_graph_max_batch_size is not None:
        kw["max_cudagraph_capture_size"] = llm.cuda_graph_max_batch_size
    if not on_gpu:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        kw["enforce_eager"] = True  # no graph compilation on CPU: it costs minutes of start-up for little
        if model.dtype == "float32":
            # On a CPU with AMX vLLM picks its AMX MLA backend, which packs only 16-bit or quantized weights
            # ("expect weight to be bfloat16, float16, ..." at load); its reference CPU MLA takes float32.
            kw["attention_backend"] = "CPU_MLA"
    return args_cls(**kw)
