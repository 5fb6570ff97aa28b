"""LLM wiring: image embeddings at the pad positions, greedy decoding, the full-size shape on meta."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import DeepseekV3ForCausalLM
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MLP, DeepseekV3MoE

from dotsvlm_serving.model.config import DotsVLMConfig
from dotsvlm_serving.model.llm import build_llm, embed_with_images, generate_greedy
from dotsvlm_serving.model.preprocess import preprocess_with_config
from dotsvlm_serving.model.prompt import encode_chat, stop_token_ids


def test_embeddings_land_exactly_at_pad_positions(tiny_llm, tiny_config) -> None:
    pad = tiny_config.image_token_id
    ids = torch.tensor([5, pad, pad, 7, 8, pad, 9])
    rows = torch.arange(3 * 64, dtype=torch.float32).view(3, 64) + 1000
    out = embed_with_images(tiny_llm, ids, rows, pad)
    plain = tiny_llm.get_input_embeddings()(ids)
    assert out.shape == (7, 64)
    torch.testing.assert_close(out[[1, 2, 5]], rows, atol=0, rtol=0)  # in order, exactly
    torch.testing.assert_close(out[[0, 3, 4, 6]], plain[[0, 3, 4, 6]], atol=0, rtol=0)


def test_embed_with_images_batched_and_count_mismatch(tiny_llm, tiny_config) -> None:
    pad = tiny_config.image_token_id
    ids = torch.tensor([[pad, 3], [4, pad]])
    out = embed_with_images(tiny_llm, ids, torch.ones(2, 64), pad)
    assert out.shape == (2, 2, 64) and bool((out[0, 0] == 1).all()) and bool((out[1, 1] == 1).all())
    with pytest.raises(ValueError, match="2 image-pad tokens but 1 image embedding rows"):
        embed_with_images(tiny_llm, ids, torch.ones(1, 64), pad)
    with pytest.raises(ValueError, match="1 image-pad tokens but 0"):
        embed_with_images(tiny_llm, torch.tensor([pad, 1]), None, pad)
    text_only = embed_with_images(tiny_llm, torch.tensor([1, 2]), None, pad)
    assert text_only.shape == (2, 64)


def test_tiny_llm_is_deepseek_v3_with_one_dense_and_one_moe_layer(tiny_llm) -> None:
    assert type(tiny_llm) is DeepseekV3ForCausalLM
    assert isinstance(tiny_llm.model.layers[0].mlp, DeepseekV3MLP)
    assert isinstance(tiny_llm.model.layers[1].mlp, DeepseekV3MoE)
    assert tiny_llm.model.layers[1].mlp.experts.gate_up_proj.shape == (8, 64, 64)


def _prompt_embeds(tiny_dir, tiny_config, tiny_tower, tiny_llm, tiny_tokenizer):
    images = [Image.new("RGB", (60, 90), (200, 30, 30)), Image.new("RGB", (100, 40), (10, 200, 90))]
    pp = preprocess_with_config(images, tiny_config.preprocess)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "vs"}, {"type": "image"},
                                         {"type": "text", "text": " which is redder?"}]}]
    ids = encode_chat(tiny_tokenizer, msgs, pp.num_tokens)
    with torch.inference_mode():
        emb = tiny_tower(pp.pixel_values, pp.grid_thw)
    return embed_with_images(tiny_llm, torch.tensor(ids), emb, tiny_config.image_token_id)


def test_greedy_generation_is_deterministic_and_matches_uncached_decoding(tiny_dir, tiny_config, tiny_tower, tiny_llm, tiny_tokenizer) -> None:
    x = _prompt_embeds(tiny_dir, tiny_config, tiny_tower, tiny_llm, tiny_tokenizer)
    eos = stop_token_ids(tiny_tokenizer)
    a = generate_greedy(tiny_llm, tiny_tokenizer, x, 12, eos)
    b = generate_greedy(tiny_llm, None, x.unsqueeze(0), 12, eos)
    assert a == b and len(a) >= 1
    # Reference without a KV cache: recompute the whole sequence for every token.
    seq = x.unsqueeze(0)
    ref = []
    with torch.inference_mode():
        for _ in range(len(a)):
            nxt = int(tiny_llm(inputs_embeds=seq, use_cache=False).logits[0, -1].argmax())
            ref.append(nxt)
            seq = torch.cat([seq, tiny_llm.get_input_embeddings()(torch.tensor([[nxt]]))], dim=1)
    assert ref == a


def test_greedy_stops_at_stop_token_and_respects_max(tiny_llm, tiny_tokenizer) -> None:
    x = tiny_llm.get_input_embeddings()(torch.tensor([10, 11, 12]))
    free = generate_greedy(tiny_llm, None, x, 6, [])
    assert len(free) == 6
    stop = free[2]
    stopped = generate_greedy(tiny_llm, None, x, 6, [stop])
    assert stopped == free[: free.index(stop)]  # the stop token itself is not returned


def test_full_size_llm_builds_on_meta() -> None:
    raw = {"vocab_size": 129280, "rope_theta": 10000, "max_position_embeddings": 163840,
           "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                            "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}}
    model = build_llm(DotsVLMConfig.from_dict(raw), device="meta", dtype=torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    assert 670e9 < n < 672e9
    assert all(p.is_meta for p in model.parameters())
    sd = model.state_dict()
    assert sd["model.layers.3.mlp.experts.gate_up_proj"].shape == (256, 4096, 7168)
    assert sd["model.layers.3.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert model.config.rope_parameters["rope_type"] == "yarn"
