"""The language model: transformers' own DeepSeek-V3 (MLA + MoE are not reimplemented), fed input
embeddings with the vision embeddings written at the image-pad positions."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from transformers import DeepseekV3ForCausalLM, DynamicCache

from .config import DotsVLMConfig


def build_llm(config: DotsVLMConfig, *, device: str | torch.device = "meta", dtype: torch.dtype = torch.float32) -> DeepseekV3ForCausalLM:
    """An LLM of the checkpoint's shape. On "meta" nothing is allocated (use it to plan or to load into);
    elsewhere the weights are transformers' random init."""
    cfg = config.llm_config()
    with torch.device(device):
        model = DeepseekV3ForCausalLM(cfg)
    model.to(dtype)  # free on meta; no process-global default-dtype switching
    # The router's correction bias is kept in fp32 (transformers' _keep_in_fp32_modules_strict).
    for layer in model.model.layers:
        gate = getattr(layer.mlp, "gate", None)
        if gate is not None and hasattr(gate, "e_score_correction_bias"):
            gate.e_score_correction_bias = gate.e_score_correction_bias.float()
    return model.eval()


def embed_with_images(llm: DeepseekV3ForCausalLM, input_ids: torch.Tensor, image_embeds: torch.Tensor | None,
                      image_token_id: int) -> torch.Tensor:
    """Token embeddings with `image_embeds` rows written, in order, at exactly the image-pad positions."""
    embed = llm.get_input_embeddings()
    input_ids = input_ids.to(embed.weight.device)
    embeds = embed(input_ids)
    mask = input_ids == image_token_id
    n_pad = int(mask.sum())
    n_rows = 0 if image_embeds is None else int(image_embeds.shape[0])
    if n_pad != n_rows:
        raise ValueError(f"the prompt has {n_pad} image-pad tokens but {n_rows} image embedding rows were given")
    if n_pad:
        if image_embeds.ndim != 2 or image_embeds.shape[1] != embeds.shape[-1]:
            raise ValueError(f"image embeddings must be [{n_pad}, {embeds.shape[-1]}], got {list(image_embeds.shape)}")
        embeds = embeds.clone()
        embeds[mask] = image_embeds.to(device=embeds.device, dtype=embeds.dtype)
    return embeds


@torch.inference_mode()
def generate_greedy(llm: DeepseekV3ForCausalLM, tokenizer_or_none: Any, input_embeds: torch.Tensor, max_new_tokens: int,
                    eos_token_ids: Iterable[int]) -> list[int]:
    """Single-sequence greedy decoding: the reference the serving engine is checked against.

    Prefill with `inputs_embeds` ([T, H] or [1, T, H]) into a DynamicCache, then decode one token at a
    time. Returns the generated ids, without the stop token that ended generation (if any); fewer than
    `max_new_tokens` ids therefore means a stop token was produced. `tokenizer_or_none` is unused
    (kept for call-site symmetry with engines that detokenise as they go).
    """
    del tokenizer_or_none
    eos = set(int(t) for t in eos_token_ids)
    x = input_embeds if input_embeds.ndim == 3 else input_embeds.unsqueeze(0)
    if x.shape[0] != 1:
        raise ValueError("generate_greedy decodes one sequence: input_embeds must be [T, H] or [1, T, H]")
    device = llm.get_input_embeddings().weight.device
    cache = DynamicCache(config=llm.config)
    out = llm(inputs_embeds=x.to(device), past_key_values=cache, use_cache=True, logits_to_keep=1)
    generated: list[int] = []
    for _ in range(max_new_tokens):
        next_id = int(out.logits[0, -1].argmax())
        if next_id in eos:
            break
        generated.append(next_id)
        if len(generated) == max_new_tokens:
            break
        out = llm(input_ids=torch.tensor([[next_id]], device=device), past_key_values=out.past_key_values,
                  use_cache=True, logits_to_keep=1)
    return generated
