"""The dots.vlm1 vision tower (NaViT-style ViT + 2x2 patch merger).

Parameter names equal the checkpoint keys without the `vision_tower.` prefix, so a state dict loads
without renaming. Several images are packed into one sequence: every linear layer runs once over all
patches, and attention is block-diagonal (an image attends only to itself) via a varlen flash kernel on
GPU when available, else one SDPA call per image.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import VisionConfig


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 and cast back before the weight, as the checkpoint was trained."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)


class Patchifier(nn.Module):
    """Conv2d(kernel = stride = patch) + RMSNorm; checkpoint names `patchifier.proj`, `patchifier.norm`."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        p = cfg.patch_size
        self.proj = nn.Conv2d(cfg.num_channels, cfg.embed_dim, kernel_size=p, stride=p, bias=True)
        self.norm = RMSNorm(cfg.embed_dim, cfg.rms_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        c, t, p = self.cfg.num_channels, self.cfg.temporal_patch_size, self.cfg.patch_size
        # Rows are (c, t, py, px); the tower uses the first temporal slice. A conv whose kernel equals its
        # stride over one patch is a matmul with the flattened kernel: same numbers, no im2col.
        x = pixel_values.view(-1, c, t, p, p)[:, :, 0].reshape(-1, c * p * p).to(self.proj.weight.dtype)
        x = F.linear(x, self.proj.weight.view(self.proj.out_channels, -1), self.proj.bias)
        return self.norm(x)


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.patchifier = Patchifier(cfg)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.patchifier(pixel_values)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def vision_rope(grid_thw: torch.Tensor, head_dim: int, merge: int, theta: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [N, head_dim] (fp32) of the 2D RoPE, patches in merge-window order.

    Rotary dim is head_dim/2: angles [row * inv_freq, col * inv_freq] (head_dim/4 each), duplicated to
    head_dim for the NeoX-style rotate_half.
    """
    rot = head_dim // 2
    inv_freq = 1.0 / (theta ** (torch.arange(0, rot, 2, dtype=torch.float32, device=device) / rot))
    pos = []
    for t, h, w in grid_thw.tolist():
        rows = torch.arange(h, device=device).unsqueeze(1).expand(h, w)
        cols = torch.arange(w, device=device).unsqueeze(0).expand(h, w)
        rc = torch.stack([rows, cols], dim=-1)  # [h, w, 2]
        rc = rc.view(h // merge, merge, w // merge, merge, 2).permute(0, 2, 1, 3, 4).reshape(-1, 2)
        pos.append(rc.repeat(t, 1))
    pos_t = torch.cat(pos).float()  # [N, 2]
    freqs = torch.cat([pos_t[:, :1] * inv_freq, pos_t[:, 1:] * inv_freq], dim=-1)  # [N, rot]
    emb = torch.cat([freqs, freqs], dim=-1)  # [N, head_dim]
    return emb.cos(), emb.sin()


@dataclass(frozen=True)
class PackedSeqs:
    """Where each image/frame lies in the packed sequence (computed once per forward, not per block)."""

    cu_seqlens: torch.Tensor  # [n+1] int32 on the model's device
    lens: tuple[int, ...]
    max_len: int


@functools.cache
def _varlen_kernel():
    """A varlen flash-attention function (q, k, v [T, H, D], cu_seqlens, max_len) -> [T, H, D], or None."""
    try:
        from flash_attn import flash_attn_varlen_func  # type: ignore[import-not-found]

        def fa(q, k, v, cu, max_len, scale):
            return flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, softmax_scale=scale, causal=False)

        return fa
    except Exception:
        pass
    try:
        from torch.nn.attention.varlen import varlen_attn

        def tv(q, k, v, cu, max_len, scale):
            return varlen_attn(q, k, v, cu, cu, max_len, max_len, scale=scale)

        return tv
    except Exception:
        return None


_VARLEN_FAILED = False


def _disable_varlen(exc: BaseException) -> None:
    """Fall back to per-image SDPA for the rest of the process, and say why once."""
    global _VARLEN_FAILED
    _VARLEN_FAILED = True
    logging.getLogger(__name__).warning("varlen flash attention unavailable (%s); using per-image SDPA", exc)


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.head_dim
        self.qkv = nn.Linear(cfg.embed_dim, 3 * cfg.embed_dim, bias=cfg.use_bias)
        self.proj = nn.Linear(cfg.embed_dim, cfg.embed_dim, bias=cfg.use_bias)
        # Set by DotsVisionTower: "auto" (varlen on CUDA half precision, else SDPA per image) or "sdpa".
        self.attn_impl = "auto"

    def forward(self, x: torch.Tensor, seqs: PackedSeqs, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        qkv = self.qkv(x).view(n, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.unbind(1)  # [N, H, D] each
        dtype = q.dtype
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)
        qf, kf = q.float(), k.float()
        q = (qf * c + rotate_half(qf) * s).to(dtype)
        k = (kf * c + rotate_half(kf) * s).to(dtype)
        scale = self.head_dim**-0.5
        out = self._attend(q, k, v, seqs, scale)
        return self.proj(out.reshape(n, -1))

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqs: PackedSeqs, scale: float) -> torch.Tensor:
        if self.attn_impl == "auto" and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
            kernel = _varlen_kernel()
            if kernel is not None and not _VARLEN_FAILED:
                try:
                    return kernel(q, k, v, seqs.cu_seqlens, seqs.max_len, scale)
                except (RuntimeError, NotImplementedError) as exc:  # e.g. no backend for this GPU/shape
                    _disable_varlen(exc)
        if len(seqs.lens) == 1:
            return F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), scale=scale).transpose(0, 1)
        # Block-diagonal attention without an N x N mask: one SDPA call per image/frame.
        outs = []
        start = 0
        for length in seqs.lens:
            sl = slice(start, start + length)
            qi, ki, vi = (t[sl].transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # [1, H, L, D]
            outs.append(F.scaled_dot_product_attention(qi, ki, vi, scale=scale)[0].transpose(0, 1))
            start += length
        return torch.cat(outs, dim=0)


class VisionMLP(nn.Module):
    """SwiGLU: fc2(silu(fc1(x)) * fc3(x))."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.embed_dim, cfg.intermediate_size, bias=cfg.use_bias)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.embed_dim, bias=cfg.use_bias)
        self.fc3 = nn.Linear(cfg.embed_dim, cfg.intermediate_size, bias=cfg.use_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.silu(self.fc1(x)) * self.fc3(x))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.norm1 = RMSNorm(cfg.embed_dim, cfg.rms_norm_eps)
        self.attn = VisionAttention(cfg)
        self.norm2 = RMSNorm(cfg.embed_dim, cfg.rms_norm_eps)
        self.mlp = VisionMLP(cfg)

    def forward(self, x: torch.Tensor, seqs: PackedSeqs, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), seqs, cos, sin)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """LayerNorm per patch, concatenate each 2x2 window (4 consecutive rows), MLP to the LLM width."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.in_dim = cfg.embed_dim * cfg.spatial_merge_size**2
        self.ln_q = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(self.in_dim, self.in_dim), nn.GELU(), nn.Linear(self.in_dim, cfg.hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).view(-1, self.in_dim))


class DotsVisionTower(nn.Module):
    """pixel_values [N, 588] + grid_thw [n, 3] -> image embeddings [N/4, hidden_size], images in order."""

    def __init__(self, cfg: VisionConfig, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.config = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.num_hidden_layers))
        self.post_trunk_norm = RMSNorm(cfg.embed_dim, cfg.rms_norm_eps) if cfg.post_norm else None
        self.merger = PatchMerger(cfg)
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embed.patchifier.proj.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.patch_embed.patchifier.proj.weight.device

    def set_attn_impl(self, impl: str) -> None:
        """"auto" (varlen flash kernel on CUDA fp16/bf16 when present) or "sdpa" (per-image SDPA)."""
        if impl not in ("auto", "sdpa"):
            raise ValueError(f"unknown attention implementation {impl!r}: use 'auto' or 'sdpa'")
        for b in self.blocks:
            b.attn.attn_impl = impl

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        grid_thw = grid_thw.to(torch.int64).cpu()
        if grid_thw.ndim != 2 or grid_thw.shape[1] != 3:
            raise ValueError(f"grid_thw must be [n_images, 3], got {list(grid_thw.shape)}")
        m = cfg.spatial_merge_size
        if bool(((grid_thw[:, 1] % m) != 0).any() or ((grid_thw[:, 2] % m) != 0).any()):
            raise ValueError(f"grid heights and widths must be multiples of spatial_merge_size {m}: {grid_thw.tolist()}")
        seq_lens = (grid_thw[:, 1] * grid_thw[:, 2]).repeat_interleave(grid_thw[:, 0])
        total = int(seq_lens.sum())
        if pixel_values.ndim != 2 or pixel_values.shape != (total, cfg.patch_dim):
            raise ValueError(f"pixel_values must be [{total}, {cfg.patch_dim}] for grid_thw {grid_thw.tolist()}, "
                             f"got {list(pixel_values.shape)}")
        device = self.device
        if total == 0:
            return torch.empty(0, cfg.hidden_size, device=device, dtype=self.dtype)
        lens = tuple(int(v) for v in seq_lens.tolist())
        seqs = PackedSeqs(F.pad(seq_lens.cumsum(0), (1, 0)).to(device=device, dtype=torch.int32), lens, max(lens))
        cos, sin = vision_rope(grid_thw, cfg.head_dim, m, cfg.rope_theta, device)
        x = self.patch_embed(pixel_values.to(device=device, dtype=self.dtype))
        for block in self.blocks:
            x = block(x, seqs, cos, sin)
        if self.post_trunk_norm is not None:
            x = self.post_trunk_norm(x)
        return self.merger(x)


def vision_param_count(cfg: VisionConfig) -> int:
    """Number of parameters, without allocating them (meta device)."""
    with torch.device("meta"):
        return sum(p.numel() for p in DotsVisionTower(cfg).parameters())
