"""dotsvlm's vLLM plugin: the language model of dots.vlm1 as a vLLM model.

vLLM loads `register` in every process it starts (entry point `vllm.general_plugins` in pyproject.toml),
so tensor-parallel workers on other nodes know the architecture too. The model is vLLM's own
DeepSeek-V3; the checkpoint's `vision_tower.*` weights belong to the vision pool and are skipped.
"""

from __future__ import annotations

ARCHITECTURE = "DotsVLMLanguageModel"


def register() -> None:
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "dotsvlm_serving.engine.vllm_model:DotsVLMLanguageModel")
