"""Images/s at the ingress: 8 concurrent requests with one 1-MP image each, before and after a change.

The whole application runs (tiny checkpoint, CPU) and every request asks for one token, so the
figure is what the image path sustains: body parsing, image loading and decoding, resize and
patchify, the vision tower, the queue hop and one prefill. While the load runs, a probe asks the
ingress for `/v1/models` every 50 ms: its latency shows whether the ingress's event loop is blocked
by CPU work (it answers in about a millisecond when it is free).

`--before REF` measures the code of git revision REF (its `serving/` is put first on PYTHONPATH of a
separate run) and then this checkout's code, one after the other in one invocation, and reports the
ratio.

    .venv/bin/python bench/ingress_images.py --before 4bdca64 [--requests 48] [--out bench/results/ingress_images]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench_serving import (REPLICA_DEPLOYMENTS, ROLES, before_and_after, bench_environment, cpu_by_role, run_child,
                           serve_app, write_results)

NOTES = """
Reading it: the end-to-end rate on this machine is set by the model's compute (vision tower and
prefill of ~1275 image tokens per request) on 2 CPUs shared with other work, not by the ingress, so
moving the image work does not raise it here (it moves the same CPU work to another process on the
same 2 cores). What the change buys is the ingress's own cost per image (its CPU time, measured with
psutil on its replica process): that is what caps a deployment's image throughput per ingress
replica, while the vision pool, where decode/resize/patchify now run on a thread pool per replica,
scales with its replicas. The probe column is the ingress's answer time to a trivial request while
it is loaded."""

CONCURRENCY = 8
SIDE = 1000  # 1000 x 1000 = 1 MP


def jpeg_1mp(seed: int) -> bytes:
    """A photo-like 1-MP JPEG (smooth gradients plus noise), about what a phone picture downscaled is."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:SIDE, 0:SIDE].astype(np.float32) / SIDE
    base = np.stack([x * 200 + 30, y * 180 + 40, (x + y) * 100 + 20], axis=-1)
    img = np.clip(base + rng.normal(0, 18, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img, "RGB").save(buf, "JPEG", quality=90)
    return buf.getvalue()


async def load(url: str, model: str, n_requests: int) -> dict:
    import httpx

    bodies = [{"model": model, "max_tokens": 1, "temperature": 0, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + base64.b64encode(jpeg_1mp(i)).decode()}},
        {"type": "text", "text": "What is in this picture?"}]}]} for i in range(CONCURRENCY)]
    limits = httpx.Limits(max_connections=CONCURRENCY + 2)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as c:
        async def worker(k: int, count: int) -> list[int]:
            codes = []
            for j in range(count):
                r = await c.post("/v1/chat/completions", json=bodies[(k + j) % CONCURRENCY])
                codes.append(r.status_code)
            return codes

        await asyncio.gather(*(worker(k, 1) for k in range(CONCURRENCY)))  # warm-up
        probe_ms: list[float] = []
        stop = asyncio.Event()

        async def probe() -> None:
            while not stop.is_set():
                t = time.perf_counter()
                await c.get("/v1/models")
                probe_ms.append(1000 * (time.perf_counter() - t))
                await asyncio.sleep(0.05)

        prober = asyncio.create_task(probe())
        t0 = time.perf_counter()
        per = n_requests // CONCURRENCY
        codes = [x for xs in await asyncio.gather(*(worker(k, per) for k in range(CONCURRENCY))) for x in xs]
        elapsed = time.perf_counter() - t0
        stop.set()
        await prober
    return {"requests": len(codes), "ok": sum(1 for x in codes if x == 200), "seconds": elapsed,
            "images_per_s": len(codes) / elapsed, "probe_ms_median": statistics.median(probe_ms),
            "probe_ms_p99": float(np.percentile(probe_ms, 99)), "probe_ms_max": max(probe_ms),
            "probes": len(probe_ms)}


def measure(n_requests: int) -> dict:
    """One run against the code importable here (PYTHONPATH decides which)."""
    import dotsvlm_serving
    from dotsvlm_serving.model.tiny import ensure_tiny_checkpoint
    from dotsvlm_serving.serve_config import ServeAppConfig

    model_dir = ensure_tiny_checkpoint(Path(tempfile.gettempdir()) / "dotsvlm-bench-tiny")
    cfg = ServeAppConfig.model_validate({"model_path": str(model_dir), "api": {"api_keys_env": None},
                                         "llm": {"context_length": 4096}})
    with serve_app(cfg.model_dump(mode="json")) as url:
        cpu0 = cpu_by_role()
        out = asyncio.run(load(url, cfg.served_model_name, n_requests))
        cpu1 = cpu_by_role()
    # CPU seconds each deployment's (single) replica spent (warm-up included: 8 more requests)
    n_images = out["requests"] + CONCURRENCY
    for dep in REPLICA_DEPLOYMENTS:
        if ROLES[dep] in cpu0:
            out[f"{dep.lower()}_cpu_ms_per_image"] = 1000 * (cpu1[ROLES[dep]] - cpu0[ROLES[dep]]) / n_images
    return out | {"code": str(Path(dotsvlm_serving.__file__).parent)}


def child(n_requests: int, pythonpath: str | None) -> dict:
    """One measuring run of the serving code on `pythonpath`."""
    return run_child(__file__, ["--requests", str(n_requests)], pythonpath, timeout_s=1200)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", help="git revision whose serving code is measured first")
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="bench/results/ingress_images")
    args = ap.parse_args()
    bench_environment()
    if args.child:
        print(json.dumps(measure(args.requests)))
        return
    runs = before_and_after(args.before, lambda pythonpath, _: child(args.requests, pythonpath))
    result = {"what": f"{CONCURRENCY} concurrent chat requests, one {SIDE}x{SIDE} JPEG each, max_tokens 1, tiny checkpoint, CPU",
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "runs": runs}
    if "before" in runs:
        result["images_per_s_ratio_after_to_before"] = runs["after"]["images_per_s"] / runs["before"]["images_per_s"]
        result["ingress_capacity_ratio_after_to_before"] = (runs["before"]["ingress_cpu_ms_per_image"]
                                                            / runs["after"]["ingress_cpu_ms_per_image"])
    cmd = " ".join(["bench/ingress_images.py"] + sys.argv[1:])
    lines = ["# Images/s at the ingress (8 concurrent 1-MP image requests)", "",
             f"Machine: {os.cpu_count()} CPUs, {platform.platform()}; `{cmd}`", "",
             "| code | images/s (end to end) | requests ok | ingress CPU ms per image | ingress capacity (images/s per core) "
             "| vision replica CPU ms per image | ingress probe latency during load (ms: median / p99 / max) |",
             "|---|---|---|---|---|---|---|"]
    for name, r in runs.items():
        ing = r.get("ingress_cpu_ms_per_image", float("nan"))
        lines.append(f"| {name} ({r['revision']}) | {r['images_per_s']:.2f} | {r['ok']}/{r['requests']} | {ing:.1f} | "
                     f"{1000 / ing:.0f} | {r.get('visionencoder_cpu_ms_per_image', float('nan')):.1f} | "
                     f"{r['probe_ms_median']:.1f} / {r['probe_ms_p99']:.1f} / {r['probe_ms_max']:.1f} |")
    if "before" in runs:
        lines += ["", f"Ratios after / before: ingress capacity (images/s per ingress core) "
                      f"**{result['ingress_capacity_ratio_after_to_before']:.1f}**; end-to-end images/s on this machine "
                      f"**{result['images_per_s_ratio_after_to_before']:.2f}**", "", NOTES.strip()]
    write_results(args.out, result, lines)


if __name__ == "__main__":
    main()
