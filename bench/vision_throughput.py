"""Vision tower throughput at ~1 megapixel per image.

CPU (default): a reduced-width tower (same code, same head_dim 128, fewer/narrower blocks), the packed
path (all images in one forward, block-diagonal attention) against an image-at-a-time loop; reports the
ratio. Run:

    OMP_NUM_THREADS=2 .venv/bin/python bench/vision_throughput.py --device cpu

GPU: the full-size tower (42 blocks, 1536 wide) in bf16 with random weights (or --model-dir to load a
checkpoint's tower); reports images/s and model FLOP utilisation (MFU) against a measured bf16 matmul
peak on the same GPU. Run on a CUDA machine:

    .venv/bin/python bench/vision_throughput.py --device cuda

Results are written as JSON (with the exact command) to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
from PIL import Image

from dotsvlm_serving.model.config import VisionConfig
from dotsvlm_serving.model.preprocess import PreprocessedImages, preprocess_images
from dotsvlm_serving.model.vision import DotsVisionTower, _varlen_kernel

RESULTS = Path(__file__).resolve().parent / "results"

# Reduced width for CPU: head_dim 128 like the real tower, 2 heads, 2 blocks (keeps the run near a minute).
CPU_SMALL = VisionConfig(embed_dim=256, hidden_size=1024, intermediate_size=704, num_hidden_layers=2, num_attention_heads=2)


def tower_flops(cfg: VisionConfig, grid_thw: torch.Tensor) -> float:
    """Forward FLOPs (multiply-add = 2) of the tower for these images: patch embed, blocks (linear
    layers + block-diagonal attention QK^T and AV), merger. Norms, RoPE and softmax are left out."""
    d, i, h = cfg.embed_dim, cfg.intermediate_size, cfg.hidden_size
    m = cfg.spatial_merge_size**2
    total = 0.0
    for t, gh, gw in grid_thw.tolist():
        n = gh * gw
        per_block = 2 * n * (3 * d * d + d * d + 3 * d * i) + 4 * n * n * d
        total += t * (2 * n * cfg.patch_dim * d + cfg.num_hidden_layers * per_block + 2 * (n // m) * (m * d * m * d + m * d * h))
    return total


def make_images(count: int, megapixels: float, seed: int = 0) -> PreprocessedImages:
    """`count` noise images of about `megapixels` each, with slightly different aspect ratios."""
    g = torch.Generator().manual_seed(seed)
    images = []
    for k in range(count):
        aspect = 1.0 + 0.25 * (k % 3)  # 1:1, 5:4, 3:2
        w = int((megapixels * 1e6 * aspect) ** 0.5)
        h = int(megapixels * 1e6 / w)
        arr = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
        images.append(Image.fromarray(arr, "RGB"))
    return preprocess_images(images)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_fn(fn, device: torch.device, reps: int, warmup: int = 1) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 8192, reps: int = 20) -> float:
    """Measured dense matmul FLOP/s for this device and dtype (the MFU denominator)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sec = time_fn(lambda: a @ b, device, reps, warmup=3)
    return 2 * n**3 / sec


def build_tower(cfg: VisionConfig, device: torch.device, dtype: torch.dtype, model_dir: str | None) -> DotsVisionTower:
    if model_dir:
        from dotsvlm_serving.model.checkpoint import load_vision_tower

        return load_vision_tower(model_dir, device=device, dtype=dtype)
    torch.manual_seed(0)
    with torch.device("meta"):
        tower = DotsVisionTower(cfg)
    tower.to(dtype=dtype).to_empty(device=device)
    with torch.no_grad():
        for name, p in tower.named_parameters():
            p.copy_(torch.ones_like(p) if p.ndim == 1 and "norm" in name else torch.randn_like(p) * 0.02)
    return tower.eval()


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    cfg = VisionConfig() if args.preset == "full" else CPU_SMALL
    tower = build_tower(cfg, device, dtype, args.model_dir)
    if args.model_dir:
        cfg = tower.config
    batch = make_images(args.images, args.megapixels)
    px = batch.pixel_values.to(device)
    grid = batch.grid_thw
    flops = tower_flops(cfg, grid)
    singles = batch.split()

    def packed() -> None:
        with torch.inference_mode():
            tower(px, grid)

    def one_at_a_time() -> None:
        with torch.inference_mode():
            for s in singles:
                tower(s.pixel_values.to(device), s.grid_thw)

    if args.skip_loop:
        t_packed, t_loop = time_fn(packed, device, args.reps), None
    else:
        # Interleaved (packed, loop, packed, loop, ...) so background load drifts hit both alike.
        packed()  # warm-up (also warms the per-image shapes' kernels)
        tp, tl = [], []
        for _ in range(args.reps):
            tp.append(time_fn(packed, device, 1, warmup=0))
            tl.append(time_fn(one_at_a_time, device, 1, warmup=0))
        t_packed, t_loop = sorted(tp)[len(tp) // 2], sorted(tl)[len(tl) // 2]
    result: dict = {
        "command": " ".join(["python", "bench/vision_throughput.py", *map(shlex.quote, sys.argv[1:])]),
        "env": f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')}",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "dtype": args.dtype,
        "tower": {"preset": args.preset, "embed_dim": cfg.embed_dim, "blocks": cfg.num_hidden_layers, "heads": cfg.num_attention_heads,
                  "intermediate": cfg.intermediate_size, "hidden_size": cfg.hidden_size,
                  "params": sum(p.numel() for p in tower.parameters())},
        "attention": ("varlen flash kernel" if device.type == "cuda" and dtype != torch.float32 and _varlen_kernel() is not None
                      else "SDPA per image (block-diagonal)"),
        "images": args.images,
        "grid_thw": grid.tolist(),
        "patches": int(px.shape[0]),
        "image_tokens": sum(batch.num_tokens),
        "megapixels_per_image": [round(t * h * w * 196 / 1e6, 3) for t, h, w in grid.tolist()],
        "model_gflop_per_batch": round(flops / 1e9, 1),
        "reps": args.reps,
        "packed": {"seconds": round(t_packed, 4), "images_per_s": round(args.images / t_packed, 3),
                   "achieved_tflops": round(flops / t_packed / 1e12, 4)},
    }
    if t_loop is not None:
        result["one_at_a_time"] = {"seconds": round(t_loop, 4), "images_per_s": round(args.images / t_loop, 3)}
        result["packed_speedup"] = round(t_loop / t_packed, 3)
    if device.type == "cuda":
        peak = matmul_peak(device, dtype)
        result["matmul_peak_tflops"] = round(peak / 1e12, 1)
        result["mfu"] = round(flops / t_packed / peak, 4)
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--preset", default=None, choices=["cpu-small", "full"], help="default: cpu-small on CPU, full on CUDA")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--images", type=int, default=None, help="images per batch (default 3 on CPU, 16 on CUDA)")
    p.add_argument("--megapixels", type=float, default=1.0)
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--model-dir", default=None, help="load the tower from this checkpoint instead of random weights")
    p.add_argument("--skip-loop", action="store_true", help="measure only the packed path")
    p.add_argument("--out", default=None, help="JSON output path (default bench/results/vision_<device>.json)")
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        print("no CUDA device here: run with --device cpu, or on a GPU machine", file=sys.stderr)
        return 2
    args.preset = args.preset or ("full" if cuda else "cpu-small")
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.images = args.images or (16 if cuda else 3)
    args.reps = args.reps or (10 if cuda else 3)
    result = run(args)
    out = Path(args.out) if args.out else RESULTS / f"vision_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
