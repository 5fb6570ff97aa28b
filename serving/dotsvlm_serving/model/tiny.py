"""A tiny checkpoint of the dots.vlm1 architecture (same code paths, small widths, seeded weights).

`write_tiny_checkpoint` writes a real checkpoint directory (config.json in the real format, sharded
safetensors + index, preprocessor_config.json, a byte-level BPE tokenizer holding every special token
of the template), which the rest of the project loads through the normal loader.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from .checkpoint import INDEX_NAME, save_checkpoint
from .config import DotsVLMConfig
from .tiny_tokenizer import IMAGE_PAD, VIDEO_PAD, build_tiny_tokenizer, write_tokenizer_files

TINY_VISION_CONFIG: dict[str, Any] = {
    "model_type": "dots_vit", "embed_dim": 64, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
    "num_attention_heads": 2, "num_channels": 3, "patch_size": 14, "temporal_patch_size": 1, "spatial_merge_size": 2,
    "rms_norm_eps": 1e-5, "use_bias": False, "post_norm": True, "is_causal": False,
}

TINY_LLM_CONFIG: dict[str, Any] = {
    "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32, "num_hidden_layers": 2,
    "first_k_dense_replace": 1, "num_attention_heads": 4, "num_key_value_heads": 4, "n_shared_experts": 1,
    "n_routed_experts": 8, "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1, "routed_scaling_factor": 2.5,
    "norm_topk_prob": True, "scoring_func": "sigmoid", "topk_method": "noaux_tc", "moe_layer_freq": 1, "ep_size": 1,
    "kv_lora_rank": 16, "q_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
    "hidden_act": "silu", "max_position_embeddings": 163840, "rms_norm_eps": 1e-6, "rope_theta": 10000,
    "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                     "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    "attention_bias": False, "attention_dropout": 0.0, "tie_word_embeddings": False, "use_cache": True,
    "num_nextn_predict_layers": 0, "initializer_range": 0.02,
}

# The tiny checkpoint for the vllm engine: vLLM's MLA kernels support only the real model's latent sizes
# (kv_lora_rank 512, qk_rope_head_dim 64; still small at hidden size 64). It keeps YaRN and group-limited
# routing, as the real model has: vLLM and transformers agree on both (docs/engine.md).
VLLM_MLA_DIMS: dict[str, Any] = {"kv_lora_rank": 512, "qk_rope_head_dim": 64}

TINY_PREPROCESSOR_CONFIG: dict[str, Any] = {
    "image_processor_type": "Qwen2VLImageProcessor", "min_pixels": 3136, "max_pixels": 11289600, "patch_size": 14,
    "temporal_patch_size": 1, "merge_size": 2, "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255,
    "do_normalize": True, "do_convert_rgb": True, "resample": 3,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
}

# Files a complete tiny checkpoint has besides its shards.
_REQUIRED = ("config.json", INDEX_NAME, "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json")


def tiny_config_dict(vocab_size: int, bos_id: int, eos_id: int, image_token_id: int, video_token_id: int, *,
                     vllm_mla: bool = False) -> dict[str, Any]:
    # Deep copies: transformers' config adds keys to the rope_scaling dict it is given, and config.json
    # must keep the checkpoint's own form.
    return {
        "architectures": ["DotsVLMForCausalLM"], "model_type": "dots_vlm",
        **copy.deepcopy(TINY_LLM_CONFIG), **(copy.deepcopy(VLLM_MLA_DIMS) if vllm_mla else {}), "vocab_size": vocab_size, "bos_token_id": bos_id, "eos_token_id": eos_id,
        "image_token_id": image_token_id, "video_token_id": video_token_id, "torch_dtype": "float32",
        "vision_config": dict(TINY_VISION_CONFIG),
    }


def _random_state(shapes: dict[str, tuple[torch.Size, torch.dtype]], gen: torch.Generator, std: float,
                  fan_in_scaled: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Seeded weights in sorted-name order: norms 1, biases small, router bias small, matrices N(0, std);
    matrices whose name contains one of `fan_in_scaled` get std * sqrt(16 / fan_in), so a wide input
    (vLLM's kv_lora_rank 512) does not blow the activations up into one repeated token."""
    out = {}
    for name in sorted(shapes):
        shape, dtype = shapes[name]
        if name.endswith("e_score_correction_bias"):
            t = torch.rand(shape, generator=gen) * 0.01
        elif len(shape) == 1 and ("norm" in name or "ln_q" in name) and name.endswith("weight"):
            t = torch.ones(shape)
        elif len(shape) == 1:
            t = torch.randn(shape, generator=gen) * 0.01
        else:
            scale = (16 / shape[-1]) ** 0.5 if any(f in name for f in fan_in_scaled) else 1.0
            t = torch.randn(shape, generator=gen) * std * scale
        out[name] = t.to(dtype)
    return out


def tiny_states(config: DotsVLMConfig, seed: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(vision state, LLM state in transformers' in-memory names) with seeded random weights."""
    from .llm import build_llm
    from .vision import DotsVisionTower

    with torch.device("meta"):
        tower = DotsVisionTower(config.vision)
    llm = build_llm(config, device="meta", dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    vis = _random_state({k: (v.shape, v.dtype) for k, v in tower.state_dict().items()}, gen, std=0.05)
    wide = ("kv_b_proj",) if config.llm_config().kv_lora_rank > 16 else ()
    lm = _random_state({k: (v.shape, v.dtype) for k, v in llm.state_dict().items()}, gen, std=0.05, fan_in_scaled=wide)
    return vis, lm


def write_tiny_checkpoint(model_dir: str | Path, *, seed: int = 0, fp8: bool = False, vllm_mla: bool = False) -> Path:
    """Write the tiny checkpoint into `model_dir` (created; existing checkpoint files are replaced).
    vllm_mla: with the MLA latent sizes vLLM supports (VLLM_MLA_DIMS), for the vllm engine."""
    d = Path(model_dir)
    d.mkdir(parents=True, exist_ok=True)
    tok = build_tiny_tokenizer()
    ids = tok.ids
    cfg_raw = tiny_config_dict(len(tok.tokenizer.get_vocab()), ids["bos"], ids["eos"], tok.tokenizer.token_to_id(IMAGE_PAD),
                               tok.tokenizer.token_to_id(VIDEO_PAD), vllm_mla=vllm_mla)
    config = DotsVLMConfig.from_dict(cfg_raw, TINY_PREPROCESSOR_CONFIG)
    vis, lm = tiny_states(config, seed)
    # Small shards so the index and multi-shard paths are exercised; vision shards come first.
    save_checkpoint(d, vision_state=vis, llm_state=lm, config=cfg_raw, shard_max_bytes=256 * 1024, fp8_weights=fp8)
    write_tokenizer_files(tok, d)
    (d / "preprocessor_config.json").write_text(json.dumps(TINY_PREPROCESSOR_CONFIG, indent=2) + "\n")
    (d / "generation_config.json").write_text(json.dumps({"bos_token_id": ids["bos"], "eos_token_id": ids["eos"], "do_sample": False}, indent=2) + "\n")
    return d


def is_complete_checkpoint(model_dir: str | Path) -> bool:
    """All metadata files present and every shard the index lists on disk."""
    d = Path(model_dir)
    if not all((d / f).is_file() for f in _REQUIRED):
        return False
    try:
        wm = json.loads((d / INDEX_NAME).read_text())["weight_map"]
    except (ValueError, KeyError):
        return False
    return all((d / f).is_file() for f in set(wm.values()))


def ensure_tiny_checkpoint(model_dir: str | Path, *, seed: int = 0, fp8: bool = False) -> Path:
    """Write the tiny checkpoint only if `model_dir` lacks a complete one. Safe when several processes
    race: each writes into a private temporary directory that is renamed into place (or, when the target
    directory cannot be replaced, e.g. a mount point, whose files are moved in one by one, shards first)."""
    d = Path(model_dir)
    if is_complete_checkpoint(d):
        return d
    d.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{d.name}.tmp-", dir=d.parent))
    try:
        write_tiny_checkpoint(tmp, seed=seed, fp8=fp8)
        if d.is_dir() and not any(d.iterdir()):
            try:
                d.rmdir()
            except OSError:
                pass  # a mount point: fill it in place below
        if not d.exists():
            try:
                os.rename(tmp, d)
                return d
            except OSError:
                pass  # another process won the race
        if not is_complete_checkpoint(d):
            d.mkdir(parents=True, exist_ok=True)
            # Shards before the index and config, so a reader never sees an index naming absent shards.
            for f in sorted(tmp.iterdir(), key=lambda p: (not p.name.endswith(".safetensors"), p.name == "config.json")):
                os.replace(f, d / f.name)
        return d
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cli_main(args: argparse.Namespace) -> int:
    """`dotsvlm model init-tiny DIR [--seed N] [--fp8] [--force]`."""
    import sys

    d = Path(args.dir)
    if d.exists() and not d.is_dir():
        print(f"dotsvlm: {d} exists and is not a directory", file=sys.stderr)
        return 1
    if d.is_dir() and any(d.iterdir()) and not getattr(args, "force", False):
        print(f"dotsvlm: {d} is not empty; pass --force to overwrite the checkpoint files in it", file=sys.stderr)
        return 1
    try:
        write_tiny_checkpoint(d, seed=int(getattr(args, "seed", 0)), fp8=bool(getattr(args, "fp8", False)))
    except OSError as exc:  # a parent that cannot be made, a read-only or full disk
        print(f"dotsvlm: cannot write the checkpoint to {d}: {exc.strerror or exc}"
              f"{f' ({exc.filename})' if exc.filename and str(exc.filename) != str(d) else ''}", file=sys.stderr)
        return 1
    files = sorted(p for p in d.iterdir() if p.is_file())
    size = sum(p.stat().st_size for p in files)
    print(f"wrote a tiny dots.vlm1 checkpoint to {d} ({len(files)} files, {size / 1024:.0f} KiB, seed {args.seed}"
          f"{', FP8 LLM weights' if getattr(args, 'fp8', False) else ''}):")
    for p in files:
        print(f"  {p.name}")
    return 0
