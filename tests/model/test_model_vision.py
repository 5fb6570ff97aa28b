"""The vision tower: checkpoint names/shapes at full size, packing, and an independent reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dotsvlm_serving.model.config import VisionConfig
from dotsvlm_serving.model.vision import DotsVisionTower, vision_rope

SMALL = VisionConfig(embed_dim=64, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2)


def expected_full_size_keys() -> dict[str, tuple[int, ...]]:
    """The vision checkpoint keys of the model facts (docs/dots-vlm1-model.md), prefix removed."""
    e = {
        "patch_embed.patchifier.proj.weight": (1536, 3, 14, 14),
        "patch_embed.patchifier.proj.bias": (1536,),
        "patch_embed.patchifier.norm.weight": (1536,),
        "post_trunk_norm.weight": (1536,),
        "merger.ln_q.weight": (1536,),
        "merger.ln_q.bias": (1536,),
        "merger.mlp.0.weight": (6144, 6144),
        "merger.mlp.0.bias": (6144,),
        "merger.mlp.2.weight": (7168, 6144),
        "merger.mlp.2.bias": (7168,),
    }
    for i in range(42):
        e.update({
            f"blocks.{i}.norm1.weight": (1536,),
            f"blocks.{i}.norm2.weight": (1536,),
            f"blocks.{i}.attn.qkv.weight": (4608, 1536),
            f"blocks.{i}.attn.proj.weight": (1536, 1536),
            f"blocks.{i}.mlp.fc1.weight": (4224, 1536),
            f"blocks.{i}.mlp.fc3.weight": (4224, 1536),
            f"blocks.{i}.mlp.fc2.weight": (1536, 4224),
        })
    return e


def test_full_size_tower_on_meta_has_exactly_the_checkpoint_keys_and_shapes() -> None:
    with torch.device("meta"):
        tower = DotsVisionTower(VisionConfig())
    state = tower.state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == expected_full_size_keys()
    assert all(v.is_meta for v in state.values())  # nothing allocated
    per_block = sum(p.numel() for p in tower.blocks[0].parameters())
    assert abs(per_block / 1e6 - 28.9) < 0.05
    trunk = sum(p.numel() for n, p in tower.named_parameters() if not n.startswith("merger."))
    assert abs(trunk / 1e9 - 1.21) < 0.01


def _random_tower(cfg: VisionConfig = SMALL, seed: int = 0) -> DotsVisionTower:
    torch.manual_seed(seed)
    tower = DotsVisionTower(cfg)
    with torch.no_grad():
        for n, p in tower.named_parameters():
            if (p.ndim == 1 and "norm" in n) or n.startswith("merger.ln_q"):
                p.copy_(1 + 0.1 * torch.randn_like(p))  # non-trivial norm weights, so a missed norm shows
            else:
                p.copy_(0.1 * torch.randn_like(p))
    return tower.eval()


def _inputs(grids: list[tuple[int, int, int]], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n = sum(t * h * w for t, h, w in grids)
    return torch.randn(n, 588, generator=g), torch.tensor(grids, dtype=torch.int64)


def test_packed_images_equal_one_at_a_time() -> None:
    """Tolerance: fp32, max abs difference 1e-5 (outputs are O(1))."""
    tower = _random_tower()
    grids = [(1, 4, 6), (1, 8, 4), (1, 2, 2), (1, 6, 10)]
    px, grid = _inputs(grids)
    with torch.inference_mode():
        packed = tower(px, grid)
        singles, start = [], 0
        for t, h, w in grids:
            singles.append(tower(px[start:start + t * h * w], torch.tensor([[t, h, w]])))
            start += t * h * w
    assert packed.shape == (sum(t * h * w for t, h, w in grids) // 4, 48)
    torch.testing.assert_close(packed, torch.cat(singles), atol=1e-5, rtol=0)


def test_image_attends_only_to_itself() -> None:
    tower = _random_tower()
    px, grid = _inputs([(1, 4, 4), (1, 4, 4)])
    with torch.inference_mode():
        a = tower(px, grid)
        px2 = px.clone()
        px2[16:] = torch.randn(16, 588)
        b = tower(px2, grid)
    torch.testing.assert_close(a[:4], b[:4], atol=1e-6, rtol=0)
    assert not torch.allclose(a[4:], b[4:])


def test_rope_positions_follow_merge_window_order() -> None:
    cos, sin = vision_rope(torch.tensor([[1, 4, 4]]), head_dim=32, merge=2, theta=10000.0, device=torch.device("cpu"))
    inv = 1.0 / 10000 ** (torch.arange(0, 16, 2).float() / 16)
    order = [(0, 0), (0, 1), (1, 0), (1, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 0), (2, 1), (3, 0), (3, 1)]
    for i, (r, c) in enumerate(order):
        ang = torch.cat([r * inv, c * inv])
        torch.testing.assert_close(cos[i], torch.cat([ang, ang]).cos())
        torch.testing.assert_close(sin[i], torch.cat([ang, ang]).sin())


def reference_tower(tower: DotsVisionTower, images: list[torch.Tensor]) -> torch.Tensor:
    """A plain re-derivation from the model facts, one image at a time: conv on the image, explicit
    (row, col) positions, an explicit softmax; then the 2x2 windows gathered from the image grid."""
    cfg = tower.config
    sd = {k: v.double() for k, v in tower.state_dict().items()}
    heads, hd, eps = cfg.num_attention_heads, cfg.head_dim, cfg.rms_norm_eps

    def rms(x, w):
        return w * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps))

    def rot(x, ang):  # x [L, heads, hd], ang [L, hd/2]
        a = torch.cat([ang, ang], -1)[:, None, :]
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return x * a.cos() + torch.cat([-x2, x1], -1) * a.sin()

    outs = []
    for img in images:  # img [3, H, W]
        feat = F.conv2d(img[None].double(), sd["patch_embed.patchifier.proj.weight"], sd["patch_embed.patchifier.proj.bias"], stride=14)[0]
        gh, gw = feat.shape[1:]
        x = feat.permute(1, 2, 0).reshape(gh * gw, -1)  # row-major patches
        x = rms(x, sd["patch_embed.patchifier.norm.weight"])
        rows = torch.arange(gh).repeat_interleave(gw).double()
        cols = torch.arange(gw).repeat(gh).double()
        inv = 1.0 / cfg.rope_theta ** (torch.arange(0, hd // 2, 2).double() / (hd // 2))
        ang = torch.cat([rows[:, None] * inv, cols[:, None] * inv], -1)
        for i in range(cfg.num_hidden_layers):
            p = f"blocks.{i}."
            h = rms(x, sd[p + "norm1.weight"])
            q, k, v = (h @ sd[p + "attn.qkv.weight"].T).view(-1, 3, heads, hd).unbind(1)
            q, k = rot(q, ang), rot(k, ang)
            att = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd)
            o = torch.einsum("hqk,khd->qhd", att.softmax(-1), v).reshape(len(x), -1)
            x = x + o @ sd[p + "attn.proj.weight"].T
            h = rms(x, sd[p + "norm2.weight"])
            g = F.silu(h @ sd[p + "mlp.fc1.weight"].T) * (h @ sd[p + "mlp.fc3.weight"].T)
            x = x + g @ sd[p + "mlp.fc2.weight"].T
        x = rms(x, sd["post_trunk_norm.weight"])
        x = F.layer_norm(x, (x.shape[-1],), sd["merger.ln_q.weight"], sd["merger.ln_q.bias"], eps=1e-6)
        x = x.view(gh // 2, 2, gw // 2, 2, -1).permute(0, 2, 1, 3, 4).reshape(gh * gw // 4, -1)  # 2x2 windows
        x = F.gelu(x @ sd["merger.mlp.0.weight"].T + sd["merger.mlp.0.bias"])
        outs.append(x @ sd["merger.mlp.2.weight"].T + sd["merger.mlp.2.bias"])
    return torch.cat(outs)


def test_tower_matches_independent_reference() -> None:
    """Images go through the real preprocessing patchify; fp32 tower vs float64 reference, atol 1e-4."""
    from dotsvlm_serving.model.preprocess import patchify

    tower = _random_tower()
    g = torch.Generator().manual_seed(3)
    images = [torch.randn(3, 56, 84, generator=g), torch.randn(3, 112, 56, generator=g)]
    rows, grids = [], []
    for img in images:
        r, grid = patchify(img.numpy())
        rows.append(torch.from_numpy(r))
        grids.append(grid)
    with torch.inference_mode():
        got = tower(torch.cat(rows), torch.tensor(grids))
    torch.testing.assert_close(got.double(), reference_tower(tower, images), atol=1e-4, rtol=0)


def test_bfloat16_tower_runs_and_stays_close() -> None:
    tower = _random_tower()
    px, grid = _inputs([(1, 4, 6)])
    with torch.inference_mode():
        ref = tower(px, grid)
        got = tower.to(torch.bfloat16)(px, grid)
    assert got.dtype == torch.bfloat16
    assert (got.float() - ref).abs().max() < 0.1 * ref.abs().max()


def test_bad_inputs_are_refused() -> None:
    tower = _random_tower()
    with pytest.raises(ValueError, match="pixel_values must be"):
        tower(torch.randn(10, 588), torch.tensor([[1, 4, 4]]))
    with pytest.raises(ValueError, match="multiples of spatial_merge_size"):
        tower(torch.randn(9, 588), torch.tensor([[1, 3, 3]]))
    with pytest.raises(ValueError, match="unknown attention implementation"):
        tower.set_attn_impl("flash")
