"""p99 latency under load: what the ingress and the tensor queue add, and what image traffic does to text.

Issue 12's load target, measured on the whole application (tiny checkpoint, CPU, one LLM and one vision
replica, streaming over HTTP) with open-loop arrivals (a request's latency counts from when it was due,
so a slow server cannot slow the sender down and hide its own queueing):

- **Path under load**: the same text-only arrivals (a) through the served application and (b) into the
  LLM replica's own engine in this process (no HTTP, no Serve, no queue; admitted as the replica admits,
  by free slots and KV tokens). p99(a) / p99(b) - 1 is what the ingress and the queue add.
- **Image traffic**: text p99 with image requests mixed into the same text arrivals, against the
  text-only run: how much image work passing through the ingress and the queue delays text.

Each for a sustained load (`--seconds`, Poisson arrivals at `--load` of the text throughput measured
through the application at the start) and for a burst (all at once: the test suite's 30-request burst;
with images, 10 image requests more), with the CPU time each process of the stack spent per request.
`--before REV` measures git revision REV's serving code first, at the rate it calibrated, then this
checkout's at the same rate and arrivals. Results in bench/results/load_latency.{md,json}.

    .venv/bin/python bench/load_latency.py [--seconds 60] [--load 0.6 | --rate R] [--before REV] [--out bench/results/load_latency]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import platform
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench_serving import (before_and_after, bench_environment, cpu_by_role, cpu_since, noise_png, run_child,
                           serve_app, write_results)

MAX_TOKENS = 32
BURST_TEXT = 30  # the test suite's burst (tests/serving/test_serving_observability.py)
BURST_IMAGES = 10
IMAGE_SIDE = (448, 448)
IMAGE_SHARE = 0.25  # image requests added to the text arrivals, as a share of the text rate
CALIBRATION_S = 15.0
CALIBRATION_CLIENTS = 16  # the LLM replica's max_running_requests by default

NOTES = """
Reading it: each row is one load; latency is from when a request was due to its last streamed byte
(open loop), first token from when it was due to its first content chunk. "Path under load" compares
the served application with the LLM replica's own engine driven in this process under the same
arrivals; "image traffic" compares text requests with and without image requests mixed in. The
target in issue 12 is at most 5% added to p99 for both. The CPU table says where the difference comes
from: on this machine the proxy, the ingress, the queue, the vision replica and the engine share 2
CPUs, so every CPU-ms the path spends per request is taken from the decode (on GPU nodes the pools do
not compete for it), and image requests add decoding, preprocessing and the vision tower.

2026-12-06, `--before 72bf2ae` (the tables above, one run, same arrivals): the LLM replica's take no
longer stalls its decode loop (b08944a). Nothing stands out of the noise on 2 CPUs (the engine alone,
which the change does not touch, moved 213 -> 144 ms at p99 between the two runs): text p99 513 -> 738
ms sustained text-only, 2838 -> 2089 ms with images mixed in, 965 -> 897 and 1507 -> 1411 ms in the
burst; the LLM replica's CPU per request is the same (48 -> 51, 35 -> 36 ms).

2026-12-05, `--before d906ef1` (one run, same arrivals): after its first event, each stream used to
long-poll the tensor queue on its own (one Serve call per open stream every ~20 ms, in the ingress and
in the queue); now one shared long-poll per ingress replica serves all its streams
(`relay.StreamPoller`, `TensorQueue.next_events_many`). Per request, the ingress fell from 31 to 21
CPU-ms and the queue from 26 to 19 under the sustained load (burst: 25 -> 12 and 18 -> 7); text p99
fell from 1045 to 581 ms, and the mixed load, which the old path could not keep up with (its backlog
built up to a p50 of 10.5 s and a p99 of 16.4 s), now runs at a p99 of 1.2 s. What is left: the path still costs ~60
CPU-ms per request beyond the LLM replica (about one Serve call's overhead per hop and per SSE chunk,
the proxy's HTTP), more than the tiny model's whole decode (~47 CPU-ms for 32 tokens), so the 5%
targets are far off on 2 CPUs; with a real model the decode is on the GPU and the path's CPU is not
taken from it (not measured: no GPU)."""


@dataclass
class Arrival:
    at: float  # seconds after the load starts
    text: str
    image: bytes | None = None


@dataclass
class Outcome:
    image: bool
    code: int
    latency_s: float
    first_s: float


@dataclass
class Load:
    name: str
    arrivals: list[Arrival]
    outcomes: list[Outcome] = field(default_factory=list)
    wall_s: float = 0.0
    cpu_s: dict[str, float] = field(default_factory=dict)  # CPU seconds by process role during the load


def poisson(rate: float, seconds: float, rng: random.Random) -> list[float]:
    out, t = [], 0.0
    while True:
        t += rng.expovariate(rate)
        if t >= seconds:
            return out
        out.append(t)


def text_arrivals(times: list[float], tag: str) -> list[Arrival]:
    return [Arrival(t, f"Tell me a story about {tag} number {i}.") for i, t in enumerate(times)]


def with_images(text: list[Arrival], times: list[float]) -> list[Arrival]:
    imgs = [Arrival(t, "Describe this picture.", noise_png(*IMAGE_SIDE, 40 + i % 40)) for i, t in enumerate(times)]
    return sorted(text + imgs, key=lambda a: a.at)


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    k = min(len(s) - 1, max(0, int(round(q * (len(s) - 1)))))
    return s[k]


def summary(load: Load, image: bool | None = False) -> dict:
    sel = [o for o in load.outcomes if image is None or o.image == image]
    ok = [o for o in sel if o.code == 200]
    lat = [o.latency_s * 1000 for o in ok]
    first = [o.first_s * 1000 for o in ok]
    return {"requests": len(sel), "ok": len(ok), "refused": len(sel) - len(ok),
            "p50_ms": pct(lat, 0.5), "p99_ms": pct(lat, 0.99), "max_ms": max(lat, default=float("nan")),
            "first_p50_ms": pct(first, 0.5), "first_p99_ms": pct(first, 0.99)}


def body(model: str, a: Arrival) -> dict:
    content: list[dict] = []
    if a.image is not None:
        content.append({"type": "image_url", "image_url": {"url": "data:image/png;base64,"
                                                           + base64.b64encode(a.image).decode()}})
    content.append({"type": "text", "text": a.text})
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": MAX_TOKENS,
            "temperature": 0, "ignore_eos": True, "stream": True}


async def over_http(url: str, model: str, load: Load) -> None:
    """Send each arrival when it is due (open loop) and stream its answer."""
    limits = httpx.Limits(max_connections=len(load.arrivals) + 4, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        bodies = [body(model, a) for a in load.arrivals]
        t0 = time.perf_counter() + 0.2

        async def one(a: Arrival, b: dict) -> Outcome:
            await asyncio.sleep(max(0.0, t0 + a.at - time.perf_counter()))
            due = t0 + a.at
            first = None
            async with client.stream("POST", "/v1/chat/completions", json=b) as r:
                async for line in r.aiter_lines():
                    if first is None and '"content":"' in line and '"content":""' not in line:
                        first = time.perf_counter()
            end = time.perf_counter()
            return Outcome(a.image is not None, r.status_code, end - due, (first or end) - due)

        load.outcomes = list(await asyncio.gather(*(one(a, b) for a, b in zip(load.arrivals, bodies))))
        load.wall_s = time.perf_counter() - t0


async def calibrate(url: str, model: str) -> float:
    """Streamed text requests per second through the application with the LLM replica's slots kept full."""
    done = 0
    stop = time.perf_counter() + CALIBRATION_S
    async with httpx.AsyncClient(base_url=url, timeout=600,
                                 limits=httpx.Limits(max_connections=CALIBRATION_CLIENTS + 2)) as client:
        async def worker(k: int) -> None:
            nonlocal done
            i = 0
            while time.perf_counter() < stop:
                async with client.stream("POST", "/v1/chat/completions",
                                         json=body(model, Arrival(0, f"Warm {k} {i}"))) as r:
                    await r.aread()
                    assert r.status_code == 200, r.text
                done += 1
                i += 1
        t = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(CALIBRATION_CLIENTS)))
        return done / (time.perf_counter() - t)


def in_engine(engine, tokenizer_ids, load: Load) -> None:
    """The same arrivals into the LLM replica's engine in this process, admitted as the replica admits
    them (free slots and KV tokens), stepped as the replica steps it."""
    from dotsvlm_serving.engine import EngineInput, SamplingParams

    async def run() -> None:
        pending: list[tuple[int, EngineInput]] = []
        due: dict[str, float] = {}
        first: dict[str, float] = {}
        out: dict[str, Outcome] = {}
        t0 = time.perf_counter() + 0.2
        inputs = [EngineInput(f"load-{i}-{time.monotonic_ns()}", tokenizer_ids(a.text), None,
                              SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True))
                  for i, a in enumerate(load.arrivals)]
        nxt = 0
        while len(out) < len(inputs):
            now = time.perf_counter()
            while nxt < len(inputs) and t0 + load.arrivals[nxt].at <= now:
                pending.append((nxt, inputs[nxt]))
                due[inputs[nxt].request_id] = t0 + load.arrivals[nxt].at
                nxt += 1
            while pending and engine.free_slots() > 0 and engine.free_tokens() >= pending[0][1].reserved_tokens:
                engine.add(pending.pop(0)[1])
            if not engine.has_work():
                wait = (t0 + load.arrivals[nxt].at - time.perf_counter()) if nxt < len(inputs) else 0.001
                await asyncio.sleep(max(0.0, min(wait, 0.05)))
                continue
            for ev in await engine.step():
                rid, now = ev["request_id"], time.perf_counter()
                if ev["type"] in ("token", "finish") and ev.get("text") and rid not in first:
                    first[rid] = now
                if ev["type"] in ("finish", "error"):
                    out[rid] = Outcome(False, 200 if ev["type"] == "finish" else int(ev.get("code", 500)),
                                       now - due[rid], first.get(rid, now) - due[rid])
        load.outcomes = [out[i.request_id] for i in inputs]
        load.wall_s = time.perf_counter() - t0

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(run())
    finally:
        loop.close()


def measure(seconds: float, load_fraction: float, seed: int, fixed_rate: float | None = None) -> dict:
    """The six loads against the code importable here (PYTHONPATH decides which); `fixed_rate` (text
    requests/s) skips the calibration, so that two revisions see the same arrivals."""
    import torch

    import dotsvlm_serving
    from dotsvlm_serving import pipeline
    from dotsvlm_serving.engine.factory import build_engine
    from dotsvlm_serving.model.tiny import ensure_tiny_checkpoint
    from dotsvlm_serving.reference import ReferencePipeline
    from dotsvlm_serving.serve_config import ServeAppConfig

    torch.set_num_threads(1)
    model_dir = ensure_tiny_checkpoint(Path(tempfile.gettempdir()) / "dotsvlm-bench-tiny")
    cfg = ServeAppConfig.model_validate({"model_path": str(model_dir), "api": {"api_keys_env": None}})
    ref = ReferencePipeline(model_dir, limits=cfg.api.images)
    engine = build_engine(cfg.served_model(), cfg.llm_server_config())

    def ids(text: str) -> list[int]:
        return pipeline.prompt_ids(ref.tokenizer, ref.config, [{"role": "user", "content": [
            {"type": "text", "text": text}]}], [])

    loads: list[Load] = []
    with serve_app(cfg.model_dump(mode="json")) as url:
        model = cfg.served_model_name
        in_engine(engine, ids, Load("warm-up", text_arrivals([0.0] * 4, "warm-up")))
        if fixed_rate is None:
            print("calibrating: text requests per second through the application ...", file=sys.stderr)
            throughput = asyncio.run(calibrate(url, model))
            rate = load_fraction * throughput
        else:
            throughput, rate = float("nan"), fixed_rate
        rng = random.Random(seed)
        text_times = poisson(rate, seconds, rng)
        image_times = poisson(rate * IMAGE_SHARE, seconds, rng)
        text = text_arrivals(text_times, "sustained")
        burst = text_arrivals([0.0] * BURST_TEXT, "burst")
        plan = [
            ("sustained, text only: LLM engine alone", text, "engine"),
            ("sustained, text only: served", text, "http"),
            ("sustained, text + images: served", with_images(text, image_times), "http"),
            ("burst, text only: LLM engine alone", burst, "engine"),
            ("burst, text only: served", burst, "http"),
            ("burst, text + images: served", with_images(burst, [0.0] * BURST_IMAGES), "http"),
        ]
        for name, arrivals, how in plan:
            print(f"{name}: {len(arrivals)} requests ...", file=sys.stderr)
            load = Load(name, arrivals)
            cpu0 = cpu_by_role()
            if how == "engine":
                in_engine(engine, ids, load)
            else:
                asyncio.run(over_http(url, model, load))
            load.cpu_s = cpu_since(cpu0)
            loads.append(load)

    rows = {ld.name: {"text": summary(ld, False), "image": summary(ld, True), "wall_s": ld.wall_s,
                      "cpu_s": ld.cpu_s} for ld in loads}

    def ratio(a: str, b: str, key: str = "p99_ms") -> float:
        return rows[a]["text"][key] / rows[b]["text"][key] - 1

    added = {
        "sustained: path under load (served / engine alone - 1), p99": ratio(
            "sustained, text only: served", "sustained, text only: LLM engine alone"),
        "sustained: image traffic (text with images / text only - 1), p99": ratio(
            "sustained, text + images: served", "sustained, text only: served"),
        "burst: path under load (served / engine alone - 1), p99": ratio(
            "burst, text only: served", "burst, text only: LLM engine alone"),
        "burst: image traffic (text with images / text only - 1), p99": ratio(
            "burst, text + images: served", "burst, text only: served"),
    }
    return {"throughput_text_rps": throughput, "rate_text_rps": rate, "rate_image_rps": rate * IMAGE_SHARE,
            "loads": rows, "added": added, "code": str(Path(dotsvlm_serving.__file__).parent)}


def _f(v: float) -> str:
    return "-" if v != v else f"{v:.0f}"


def child(args: argparse.Namespace, pythonpath: str | None, rate: float | None) -> dict:
    """One measuring run (its progress shown as it goes) of the serving code on `pythonpath`."""
    child_args = ["--seconds", str(args.seconds), "--load", str(args.load), "--seed", str(args.seed)]
    child_args += ["--rate", str(rate)] if rate is not None else []
    return run_child(__file__, child_args, pythonpath, timeout_s=3000, stream_stderr=True)


def report(run: dict, label: str) -> list[str]:
    lines = [f"### {label}", "",
             "| load | text requests (ok / refused) | text p50 (ms) | **text p99 (ms)** | text max (ms) | "
             "text 1st token p50 / p99 (ms) | image requests (ok / refused) | image p50 / p99 (ms) |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in run["loads"].items():
        t, i = r["text"], r["image"]
        img = (f"{i['ok']} / {i['refused']} | {_f(i['p50_ms'])} / {_f(i['p99_ms'])}" if i["requests"] else "- | -")
        lines.append(f"| {name} | {t['ok']} / {t['refused']} | {_f(t['p50_ms'])} | {_f(t['p99_ms'])} | "
                     f"{_f(t['max_ms'])} | {_f(t['first_p50_ms'])} / {_f(t['first_p99_ms'])} | {img} |")
    roles = sorted({k for r in run["loads"].values() for k in r["cpu_s"]},
                   key=lambda k: -run["loads"]["sustained, text only: served"]["cpu_s"].get(k, 0.0))
    lines += ["", "CPU ms per request by process during each load (the stack's processes and the benchmark's; "
              "2 CPUs in all):", "",
              "| load | " + " | ".join(roles) + " | all |", "|---|" + "---|" * (len(roles) + 1)]
    for name, r in run["loads"].items():
        n = r["text"]["requests"] + r["image"]["requests"]
        cells = [f"{1000 * r['cpu_s'].get(k, 0.0) / n:.1f}" for k in roles]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {1000 * sum(r['cpu_s'].values()) / n:.1f} |")
    lines += ["", "| what is added to text p99 | measured | target |", "|---|---|---|"]
    for name, v in run["added"].items():
        lines.append(f"| {name} | {100 * v:+.0f}% | <= +5% |")
    return lines + [""]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=60.0, help="length of the sustained load")
    ap.add_argument("--load", type=float, default=0.6, help="sustained text rate as a share of the measured throughput")
    ap.add_argument("--rate", type=float, help="sustained text requests/s (instead of calibrating)")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--before", help="git revision whose serving code is measured first, at the same rate")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="bench/results/load_latency")
    args = ap.parse_args()
    bench_environment()
    if args.child:
        print(json.dumps(measure(args.seconds, args.load, args.seed, args.rate)))
        return
    load1 = os.getloadavg()[0]
    # The second run sends at the rate the first calibrated, so both carry the same load.
    runs = before_and_after(args.before, lambda pythonpath, earlier: child(
        args, pythonpath, earlier["before"]["rate_text_rps"] if earlier else args.rate))
    first = next(iter(runs.values()))
    result = {"what": f"open-loop load, streaming, greedy, {MAX_TOKENS} new tokens, tiny checkpoint, CPU",
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "load_average_1m": [load1, os.getloadavg()[0]]},
              "command": " ".join(["bench/load_latency.py"] + sys.argv[1:]), "runs": runs}
    lines = ["# Latency under load: the path and image traffic (CPU, tiny model)", "",
             f"Machine: {os.cpu_count()} CPUs (1-minute load average {load1:.1f} at the start, "
             f"{os.getloadavg()[0]:.1f} at the end); `{result['command']}`. Streamed text throughput through the "
             f"application with its 16 slots full (measured by the first run): {first['throughput_text_rps']:.1f} "
             f"requests/s; the sustained load sends text at {first['rate_text_rps']:.1f}/s for {args.seconds:g} s "
             f"(Poisson, the same arrivals in every run), and images (one {IMAGE_SIDE[0]}x{IMAGE_SIDE[1]} PNG each) "
             f"at {first['rate_image_rps']:.1f}/s more where they are mixed in; every request streams {MAX_TOKENS} "
             "tokens.", ""]
    for name, run in runs.items():
        lines += report(run, f"{name}: {run['revision']}")
    lines += NOTES.splitlines()
    write_results(args.out, result, lines)


if __name__ == "__main__":
    main()
