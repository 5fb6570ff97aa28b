"""Steps shared by the Serve deployments and the single-process reference, so both compute exactly the
same thing: image pixel bounds, token counts, prompt ids, vision encoding, input embeddings."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

from .model.config import DotsVLMConfig
from .model.preprocess import image_token_count, preprocess_images
from .model.prompt import encode_chat
from .serve_config import ImageLimits


def pixel_bounds(cfg: DotsVLMConfig, limits: ImageLimits) -> tuple[int, int]:
    """(min_pixels, max_pixels) after resize: the checkpoint's values narrowed by the serving limits."""
    lo = max(cfg.preprocess.min_pixels, limits.min_image_pixels)
    hi = min(cfg.preprocess.max_pixels, limits.max_image_pixels)
    return min(lo, hi), hi


def token_counts(images: list[Image.Image], cfg: DotsVLMConfig, limits: ImageLimits) -> list[int]:
    lo, hi = pixel_bounds(cfg, limits)
    return [image_token_count(im.height, im.width, patch_size=cfg.preprocess.patch_size,
                              merge_size=cfg.preprocess.merge_size, min_pixels=lo, max_pixels=hi) for im in images]


def resized_pixels(images: list[Image.Image], cfg: DotsVLMConfig, limits: ImageLimits) -> int:
    """Pixels the vision tower will see (what the encode batch budget counts)."""
    per_token = (cfg.preprocess.patch_size * cfg.preprocess.merge_size) ** 2
    return sum(token_counts(images, cfg, limits)) * per_token


def prompt_ids(tokenizer: Any, cfg: DotsVLMConfig, messages: list[dict[str, Any]], counts: list[int]) -> list[int]:
    return encode_chat(tokenizer, messages, counts, image_token_id=cfg.image_token_id)


@torch.inference_mode()
def encode_images(tower: torch.nn.Module, images: list[Image.Image], cfg: DotsVLMConfig,
                  limits: ImageLimits) -> list[np.ndarray]:
    """Vision embeddings per image ([tokens_i, hidden] float32), several images packed in one forward."""
    lo, hi = pixel_bounds(cfg, limits)
    pre = preprocess_images(images, min_pixels=lo, max_pixels=hi, patch_size=cfg.preprocess.patch_size,
                            merge_size=cfg.preprocess.merge_size,
                            temporal_patch_size=cfg.preprocess.temporal_patch_size,
                            image_mean=cfg.preprocess.image_mean, image_std=cfg.preprocess.image_std)
    out = tower(pre.pixel_values, pre.grid_thw).float().cpu()
    return [t.numpy() for t in torch.split(out, pre.num_tokens)]


def input_embeds(llm: torch.nn.Module, ids: list[int], image_embeds: np.ndarray | None,
                 image_token_id: int) -> torch.Tensor:
    from .model.llm import embed_with_images

    emb = None if image_embeds is None or image_embeds.shape[0] == 0 else torch.from_numpy(np.array(image_embeds))
    with torch.inference_mode():
        return embed_with_images(llm, torch.tensor(ids, dtype=torch.long), emb, image_token_id)
