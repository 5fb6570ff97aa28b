"""The LLM engine: continuous batching over a KV cache, sampling, stop strings."""

from .engine import Engine, EngineLimitError, EngineRequest
from .sampling import SamplingParams

__all__ = ["Engine", "EngineLimitError", "EngineRequest", "SamplingParams"]
