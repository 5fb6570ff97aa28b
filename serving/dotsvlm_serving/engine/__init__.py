"""The LLM replica's engines behind one interface (`base.InferenceEngine`): the transformers engine
(continuous batching over one device; `engine.Engine`) and vLLM (`vllm_engine`, its own environment)."""

from .base import STATS_KEYS, EngineInput, EngineLimitError, InferenceEngine, RequestBudget
from .engine import Engine, EngineRequest
from .sampling import SamplingParams

__all__ = ["STATS_KEYS", "Engine", "EngineInput", "EngineLimitError", "EngineRequest", "InferenceEngine", "RequestBudget",
           "SamplingParams"]
