"""The single-process reference: preprocess -> vision tower -> embeddings -> greedy decode, all in one
process with the model package's own greedy loop. The equivalence test and the overhead benchmark
compare the disaggregated Serve path against it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from . import pipeline
from .model.checkpoint import load_llm, load_vision_tower
from .model.config import load_config
from .model.llm import generate_greedy
from .model.prompt import load_tokenizer, stop_token_ids
from .serve_config import ImageLimits


class ReferencePipeline:
    def __init__(self, model_dir: str | Path, *, limits: ImageLimits | None = None) -> None:
        self.config = load_config(model_dir)
        self.limits = limits or ImageLimits()
        self.tokenizer = load_tokenizer(model_dir)
        self.tower = load_vision_tower(model_dir, device="cpu", dtype=torch.float32)
        self.llm = load_llm(model_dir, device="cpu", dtype=torch.float32)
        self.eos = stop_token_ids(self.tokenizer)

    def generate_ids(self, messages: list[dict[str, Any]], images: list[Image.Image], max_new_tokens: int, *,
                     ignore_eos: bool = False) -> list[int]:
        counts = pipeline.token_counts(images, self.config, self.limits)
        ids = pipeline.prompt_ids(self.tokenizer, self.config, messages, counts)
        embeds = np.concatenate(pipeline.encode_images(self.tower, images, self.config, self.limits)) if images else None
        x = pipeline.input_embeds(self.llm, ids, embeds, self.config.image_token_id)
        return generate_greedy(self.llm, None, x, max_new_tokens, [] if ignore_eos else self.eos)

    def generate_text(self, messages: list[dict[str, Any]], images: list[Image.Image], max_new_tokens: int) -> str:
        return self.tokenizer.decode(self.generate_ids(messages, images, max_new_tokens), skip_special_tokens=True)
