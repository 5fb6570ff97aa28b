"""vLLM's DeepSeek-V3 reading the LLM part of a dots.vlm1 checkpoint (imported by vLLM only)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from vllm.model_executor.models.deepseek_v2 import DeepseekV3ForCausalLM

VISION_PREFIX = "vision_tower."


class DotsVLMLanguageModel(DeepseekV3ForCausalLM):
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return super().load_weights((n, w) for n, w in weights if not n.startswith(VISION_PREFIX))
