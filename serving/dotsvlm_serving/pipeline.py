"""Steps shared by the Serve deployments and the single-process reference, so both compute exactly the
same thing: image pixel bounds, token counts, prompt ids, vision encoding, input embeddings."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

from .model.config import DotsVLMConfig
from .model.preprocess import PreprocessedImages, image_token_count, preprocess_images, resize_for_model
from .model.prompt import encode_chat
from .serve_config import ImageLimits


def pixel_bounds(cfg: DotsVLMConfig, limits: ImageLimits) -> tuple[int, int]:
    """(min_pixels, max_pixels) after resize: the checkpoint's values narrowed by the serving limits."""
    lo = max(cfg.preprocess.min_pixels, limits.min_image_pixels)
    hi = min(cfg.preprocess.max_pixels, limits.max_image_pixels)
    return min(lo, hi), hi


def token_counts(images: list[Image.Image], cfg: DotsVLMConfig, limits: ImageLimits) -> list[int]:
    return token_counts_for_sizes([im.size for im in images], cfg, limits)


def token_counts_for_sizes(sizes: list[tuple[int, int]], cfg: DotsVLMConfig, limits: ImageLimits) -> list[int]:
    """Image-pad tokens per image from its original (width, height) (e.g. `probe_image`)."""
    lo, hi = pixel_bounds(cfg, limits)
    return [image_token_count(h, w, patch_size=cfg.preprocess.patch_size,
                              merge_size=cfg.preprocess.merge_size, min_pixels=lo, max_pixels=hi) for w, h in sizes]


def resized_pixels(images: list[Image.Image], cfg: DotsVLMConfig, limits: ImageLimits) -> int:
    """Pixels the vision tower will see (what the encode batch budget counts)."""
    per_token = (cfg.preprocess.patch_size * cfg.preprocess.merge_size) ** 2
    return sum(token_counts(images, cfg, limits)) * per_token


def prompt_ids(tokenizer: Any, cfg: DotsVLMConfig, messages: list[dict[str, Any]], counts: list[int]) -> list[int]:
    return encode_chat(tokenizer, messages, counts, image_token_id=cfg.image_token_id)


def resized(image: Image.Image, cfg: DotsVLMConfig, limits: ImageLimits) -> Image.Image:
    """One decoded image at the size `preprocess` gives it: a server resizes each as soon as it is decoded, so a
    request of large images holds one of them at full size, not all."""
    lo, hi = pixel_bounds(cfg, limits)
    return resize_for_model(image, factor=cfg.preprocess.patch_size * cfg.preprocess.merge_size,
                            min_pixels=lo, max_pixels=hi)


def preprocess(images: list[Image.Image], cfg: DotsVLMConfig, limits: ImageLimits, *,
               resized: bool = False) -> PreprocessedImages:
    """Resize, normalise and patchify (CPU; releases the GIL in Pillow and numpy, so threads scale). `resized`:
    each image comes from `resized` (resizing twice can change its size)."""
    lo, hi = pixel_bounds(cfg, limits)
    return preprocess_images(images, resized=resized, min_pixels=lo, max_pixels=hi, patch_size=cfg.preprocess.patch_size,
                             merge_size=cfg.preprocess.merge_size,
                             temporal_patch_size=cfg.preprocess.temporal_patch_size,
                             image_mean=cfg.preprocess.image_mean, image_std=cfg.preprocess.image_std)


@torch.inference_mode()
def encode_preprocessed(tower: torch.nn.Module, pre: PreprocessedImages, to_cpu: bool = True) -> list[torch.Tensor]:
    """Vision embeddings per image ([tokens_i, hidden], in the tower's dtype, on the CPU or, `to_cpu`
    False, on the tower's device), several images packed in one forward."""
    out = tower(pre.pixel_values, pre.grid_thw)
    out = out.cpu() if to_cpu else out
    return list(torch.split(out, pre.num_tokens))


def encode_images(tower: torch.nn.Module, images: list[Image.Image], cfg: DotsVLMConfig,
                  limits: ImageLimits) -> list[np.ndarray]:
    """Vision embeddings per image as float32 arrays (the reference's form)."""
    return [t.float().numpy() for t in encode_preprocessed(tower, preprocess(images, cfg, limits))]


def input_embeds(llm: torch.nn.Module, ids: list[int], image_embeds: np.ndarray | torch.Tensor | None,
                 image_token_id: int) -> torch.Tensor:
    from .model.llm import embed_with_images

    if image_embeds is None or image_embeds.shape[0] == 0:
        emb = None
    elif isinstance(image_embeds, torch.Tensor):
        emb = image_embeds
    else:
        emb = torch.from_numpy(np.asarray(image_embeds))
    with torch.inference_mode():
        return embed_with_images(llm, torch.tensor(ids, dtype=torch.long), emb, image_token_id)
