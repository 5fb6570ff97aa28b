"""FP8 (e4m3) weights with 128x128 block scales, DeepSeek-V3 style.

A quantized linear weight W [out, in] is stored as `weight` (float8_e4m3fn) and `weight_scale_inv`
(float32, [ceil(out/128), ceil(in/128)]): W ~= weight * scale_inv of its block. The loader dequantizes
to the serving dtype (this project runs the LLM in bf16/fp32, not FP8 matmuls).
"""

from __future__ import annotations

import math
import re

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
DEFAULT_BLOCK = (128, 128)
QUANTIZATION_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": list(DEFAULT_BLOCK)}

# LLM weights DeepSeek-V3 stores in FP8: every linear projection inside the decoder layers. Embeddings,
# lm_head, norms and the MoE router (`mlp.gate.weight`) stay in high precision.
_QUANTIZED = re.compile(r"^model\.layers\.\d+\..*_proj(_with_mqa)?\.weight$")


def is_fp8_candidate(key: str, shape: tuple[int, ...]) -> bool:
    return len(shape) == 2 and bool(_QUANTIZED.match(key))


def scale_shape(shape: tuple[int, int] | torch.Size, block: tuple[int, int] = DEFAULT_BLOCK) -> tuple[int, int]:
    return math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1])


def _expand(scale: torch.Tensor, shape: tuple[int, int], block: tuple[int, int]) -> torch.Tensor:
    return scale.repeat_interleave(block[0], 0)[: shape[0]].repeat_interleave(block[1], 1)[:, : shape[1]]


def dequantize(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = DEFAULT_BLOCK) -> torch.Tensor:
    """float32 weight from an FP8 weight and its per-block scales."""
    shape = tuple(weight.shape)
    return weight.to(torch.float32) * _expand(scale_inv.to(device=weight.device, dtype=torch.float32), shape, block)


def quantize(weight: torch.Tensor, block: tuple[int, int] = DEFAULT_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 weight, float32 scale_inv) with each block's absolute max mapped to the e4m3 max."""
    w = weight.to(torch.float32)
    out, inp = w.shape
    sr, sc = scale_shape((out, inp), block)
    padded = torch.zeros(sr * block[0], sc * block[1], dtype=torch.float32, device=w.device)
    padded[:out, :inp] = w
    amax = padded.view(sr, block[0], sc, block[1]).abs().amax(dim=(1, 3))
    scale_inv = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (w / _expand(scale_inv, (out, inp), block)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale_inv


def block_size(quantization_config: dict | None) -> tuple[int, int]:
    if quantization_config and quantization_config.get("weight_block_size"):
        b = quantization_config["weight_block_size"]
        return int(b[0]), int(b[1])
    return DEFAULT_BLOCK
