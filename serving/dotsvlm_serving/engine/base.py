"""What the LLM replica drives: one interface over the transformers engine and the production engine.

The replica hands an engine a request as token ids plus the image embeddings for the `<|imgpad|>`
positions (rows in order of appearance), and gets back the request's events (`events.py`). Each engine
does its own thing with them: the transformers engine writes the rows into the prompt's input
embeddings; vLLM gets them as precomputed prompt embeddings. No torch import here: the operator image
imports the option models.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any

from ..events import Event
from .sampling import SamplingParams


class EngineLimitError(ValueError):
    """A request that this engine can never run (too long for the context or the KV budget)."""


@dataclass
class EngineInput:
    request_id: str
    prompt_ids: list[int]
    # [number of <|imgpad|> positions, hidden] (numpy array or torch tensor), or None for text only.
    image_embeds: Any
    params: SamplingParams

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def reserved_tokens(self) -> int:
        return self.prompt_tokens + self.params.max_tokens


@dataclass(frozen=True)
class RequestBudget:
    """A replica's admission bookkeeping, the same for every engine: which requests can ever run (the
    client's 400), and how many more requests and KV-cache tokens the replica can take now. A request
    reserves its prompt plus max_tokens from admission until it ends."""

    context_length: int
    kv_tokens: int
    max_running: int

    def check(self, prompt_tokens: int, max_tokens: int) -> None:
        """Raise EngineLimitError for a request too long for the context or for the whole KV budget."""
        total = prompt_tokens + max_tokens
        if total > self.context_length:
            raise EngineLimitError(
                f"this model's maximum context length is {self.context_length} tokens, but the request needs "
                f"{total} ({prompt_tokens} in the messages, {max_tokens} for the completion); shorten the "
                f"messages, send fewer or smaller images, or lower max_tokens")
        if total > self.kv_tokens:
            raise EngineLimitError(f"the request needs {total} KV-cache tokens but a replica has only "
                                   f"{self.kv_tokens}; lower max_tokens")

    def free_slots(self, in_flight: int) -> int:
        return max(0, self.max_running - in_flight)

    def free_tokens(self, reserved: int) -> int:
        return max(0, self.kv_tokens - reserved)


# The keys every engine's stats() has: the autoscaler reads them (autoscaling.signals.llm_stats), the
# replica sends them with its heartbeats and publishes them as the LLM pool's metrics (deployments/llm.py:
# a missing key would read 0 there).
STATS_KEYS = ("running", "pending", "kv_tokens_reserved", "kv_tokens_capacity", "kv_tokens_used",
              "tokens_generated_total")


class InferenceEngine(abc.ABC):
    """One LLM replica's engine. One task drives it: `add` and `cancel` between `step` calls."""

    name: str

    @abc.abstractmethod
    def check_limits(self, prompt_tokens: int, max_tokens: int) -> None:
        """Raise EngineLimitError (the client's 400) for a request that can never run here."""

    @abc.abstractmethod
    def add(self, request: EngineInput) -> None:
        """Start a request; its events come out of `step`. Raises EngineLimitError."""

    @abc.abstractmethod
    def cancel(self, request_id: str) -> None:
        """Stop a request; its stream ends with a `finish` event with reason `cancelled`. An id the engine
        does not hold (finished, never added) is ignored: a later `add` of that id runs."""

    @abc.abstractmethod
    async def step(self) -> list[Event]:
        """Advance the running requests and return their new events (waits at most a moment)."""

    @abc.abstractmethod
    def has_work(self) -> bool: ...

    @abc.abstractmethod
    def free_slots(self) -> int:
        """How many more requests the replica should take now."""

    @abc.abstractmethod
    def free_tokens(self) -> int:
        """KV-cache tokens still free for new requests (prompt + max_tokens)."""

    @abc.abstractmethod
    def stats(self) -> dict[str, float]:
        """At least STATS_KEYS, as floats."""

    def health_error(self) -> str | None:
        """Why this engine can run no more requests (the replica must be replaced), or None. Asked on every
        loop iteration and health check of the replica, so it must be cheap. Default: healthy."""
        return None

    async def shutdown(self) -> None:
        """Free the engine's processes and devices."""
