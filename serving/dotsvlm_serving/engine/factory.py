"""Builds the LLM replica's engine from the serve config (`llm.engine`)."""

from __future__ import annotations

from ..serve_config import ServeAppConfig
from .base import InferenceEngine


def build_engine(cfg: ServeAppConfig) -> InferenceEngine:
    """The engine `cfg.llm.engine` names, with the model at `cfg.model_path` loaded (this takes a while)."""
    if cfg.llm.engine == "vllm":
        from .vllm_engine import VLLMEngine

        return VLLMEngine.from_config(cfg)
    return _transformers_engine(cfg)


def _transformers_engine(cfg: ServeAppConfig) -> InferenceEngine:
    import torch

    from ..model.checkpoint import load_llm
    from ..model.config import load_config
    from ..model.prompt import load_tokenizer, stop_token_ids
    from .transformers_engine import TransformersEngine

    model_config = load_config(cfg.model_path)
    tokenizer = load_tokenizer(cfg.model_path)
    llm = load_llm(cfg.model_path, device=cfg.device, dtype=getattr(torch, cfg.dtype), config=model_config)

    def detokenize(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True)

    return TransformersEngine(llm, detokenize, image_token_id=model_config.image_token_id,
                              eos_token_ids=set(stop_token_ids(tokenizer)),
                              max_running=cfg.llm.max_running_requests, kv_cache_tokens=cfg.llm.kv_cache_budget(),
                              context_length=cfg.llm.context_length)
