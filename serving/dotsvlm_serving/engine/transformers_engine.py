"""The transformers engine behind the engine interface: the CPU/tiny path (the embedded default, tests).

Image rows are written into the prompt's input embeddings here, then `Engine` (continuous batching over
transformers' model on one device) runs the request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import torch

from ..events import Event
from .base import EngineInput, InferenceEngine
from .detokenizer import TokenStream
from .engine import Engine, EngineRequest


class TransformersEngine(InferenceEngine):
    name = "transformers"

    def __init__(self, model: torch.nn.Module, detokenize: Callable[[list[int]], str], *, image_token_id: int,
                 eos_token_ids: set[int], max_running: int, kv_cache_tokens: int, context_length: int,
                 token_streams: Callable[[], TokenStream] | None = None) -> None:
        self.model = model
        self.image_token_id = image_token_id
        self.engine = Engine(model, detokenize, eos_token_ids=eos_token_ids, max_running=max_running,
                             kv_cache_tokens=kv_cache_tokens, context_length=context_length,
                             token_streams=token_streams)

    def check_limits(self, prompt_tokens: int, max_tokens: int) -> None:
        self.engine.check_limits(prompt_tokens, max_tokens)

    def add(self, request: EngineInput) -> None:
        from .. import pipeline

        self.engine.check_limits(request.prompt_tokens, request.params.max_tokens)
        x = pipeline.input_embeds(self.model, request.prompt_ids, request.image_embeds, self.image_token_id)
        self.engine.add(EngineRequest(request.request_id, x, request.params))

    def cancel(self, request_id: str) -> None:
        self.engine.cancel(request_id)

    async def step(self) -> list[Event]:
        return await asyncio.to_thread(self.engine.step)

    def has_work(self) -> bool:
        return self.engine.has_work()

    def free_slots(self) -> int:
        return self.engine.free_slots()

    def free_tokens(self) -> int:
        return self.engine.free_tokens()

    def stats(self) -> dict[str, float]:
        return self.engine.stats()

    def health_error(self) -> str | None:
        return self.engine.health_error()
