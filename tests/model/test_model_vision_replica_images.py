"""The vision replica's image preparation (decode, resize at once, patchify) against what the ingress counted:
each image must give exactly the prompt's image tokens, whatever its shape and the deployment's pixel limits."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from dotsvlm_serving import pipeline
from dotsvlm_serving.deployments.vision_encoder import VisionEncoder
from dotsvlm_serving.serve_config import ImageLimits, VisionEncoderConfig


def _png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize(("size", "max_pixels"), [((640, 480), 11_289_600), ((5636, 32), 11_289_600),
                                                  ((22775, 117), 100_000)])
def test_each_image_gets_the_tokens_the_ingress_counted(tiny_config, size, max_pixels) -> None:
    """Resizing at decode and again in preprocess refused a 5636x32 image ("aspect ratio is 201:1 (5628x28)",
    a size the client never sent) and gave a 22775x117 one at 100,000 pixels 141 embeddings for 157 tokens."""
    replica = object.__new__(VisionEncoder)
    replica.model_config = tiny_config
    limits = ImageLimits(max_image_pixels=max_pixels)
    replica.cfg = VisionEncoderConfig(max_batch_pixels=10**8, max_batch_wait_ms=1, max_pending_pixels_per_replica=10**8,
                                      images=limits)
    pre = replica._prepare([_png(*size)])
    assert pre.num_tokens == pipeline.token_counts_for_sizes([size], tiny_config, limits)
