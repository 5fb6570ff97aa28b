"""Builds the LLM replica's engine from its slice of the serve config (`engine`)."""

from __future__ import annotations

from ..serve_config import LLMServerConfig, ServedModel
from .base import InferenceEngine


def build_engine(model: ServedModel, llm: LLMServerConfig) -> InferenceEngine:
    """The engine `llm.engine` names, with the model at `model.model_path` loaded (this takes a while)."""
    if llm.engine == "vllm":
        from .vllm_engine import VLLMEngine

        return VLLMEngine.from_config(model, llm)
    return _transformers_engine(model, llm)


def _transformers_engine(model: ServedModel, llm_cfg: LLMServerConfig) -> InferenceEngine:
    import torch

    from ..model.checkpoint import load_llm
    from ..model.config import load_config
    from ..model.prompt import load_tokenizer, stop_token_ids
    from .detokenizer import decode_streams
    from .transformers_engine import TransformersEngine

    model_config = load_config(model.model_path)
    tokenizer = load_tokenizer(model.model_path)
    llm = load_llm(model.model_path, device=model.device, dtype=getattr(torch, model.dtype), config=model_config)

    def detokenize(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True)

    return TransformersEngine(llm, detokenize, image_token_id=model_config.image_token_id,
                              eos_token_ids=set(stop_token_ids(tokenizer)),
                              max_running=llm_cfg.max_running_requests, kv_cache_tokens=llm_cfg.kv_cache_tokens,
                              context_length=llm_cfg.context_length,
                              token_streams=decode_streams(tokenizer, detokenize))
