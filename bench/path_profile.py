"""Where the path's CPU goes under load: a py-spy profile of each process of the stack, by who runs the code.

`bench/load_latency.py` measures the CPU each process spends per request (the ingress and the tensor queue
~20 CPU-ms each for a 32-token streamed text request on 2 CPUs). This says what that CPU runs: the stack
(tiny checkpoint, CPU, one replica per deployment) serves a sustained text load (Poisson arrivals, streamed,
32 tokens each, as load_latency's) while py-spy samples the HTTP proxy, the ingress, the tensor queue and the
LLM replica; each sample is put in one bucket by the frames on its stack:

- dotsvlm: a frame of dotsvlm's own code (serving/dotsvlm_serving) is on the stack,
- model: torch / transformers (the LLM's forward, under dotsvlm's engine step: counted here, not above),
- Serve handle routing: Ray Serve's router (choosing a replica and sending each handle call),
- HTTP: starlette / fastapi / uvicorn (the ingress's app and the proxy's server, outside dotsvlm's handlers),
- Serve replica: Ray Serve's replica wrapper (receiving a call, its metrics, its context),
- Ray core: Ray's worker and serialization in Python,
- native: no Python frame at all (Ray's C++ core worker threads, gRPC, the GIL's wait),
- other Python.

    .venv/bin/python bench/path_profile.py [--rate 10] [--seconds 40] [--out bench/results/path_profile]

Needs py-spy (in the dev extras) and ptrace permission on the Ray worker processes (root, or
kernel.yama.ptrace_scope=0).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_serving import bench_environment, cpu_by_role, cpu_since, serve_app, write_results

import load_latency as ll

PROFILED = {"ProxyActor": "HTTP proxy", "Ingress": "ingress", "TensorQueue": "tensor queue", "LLMServer": "LLM replica"}
# (bucket, substrings of a frame that put a sample in it), tried in order: the first that matches any frame wins.
BUCKETS = [
    ("model", ("torch/", "transformers/")),
    ("dotsvlm", ("dotsvlm_serving/",)),
    ("Serve handle routing", ("ray/serve/_private/router.py", "ray/serve/_private/request_router/",
                              "ray/serve/handle.py")),
    ("HTTP", ("starlette/", "fastapi/", "uvicorn/")),
    ("Serve replica", ("ray/serve/_private/replica.py", "ray/serve/_private/http_util.py",
                       "ray/serve/_private/replica_result.py")),
    ("Ray core", ("ray/_private/", "ray/actor.py", "ray/util/", "ray/_raylet")),
]


def bucket_of(frames: list[str]) -> str:
    """The bucket of one sample (frames outermost first, as py-spy writes them)."""
    py = [f for f in frames if f and not f.startswith(("process ", "thread "))]
    if not any("(" in f for f in py):
        return "native"
    for name, marks in BUCKETS:
        if any(m in f for f in py for m in marks):
            return name
    if all(f.startswith(("Thread.", "_worker ", "_WorkItem.", "_bootstrap")) or "threading.py" in f
           or "concurrent/futures" in f for f in py):
        return "native"  # a thread's top frame only: its time is in C (Ray's core worker, a lock)
    return "other Python"


def summarize(raw: Path) -> dict[str, float]:
    """Share of the samples of one py-spy raw (collapsed stacks) file by bucket."""
    counts: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if n.isdigit():
            counts[bucket_of(stack.split(";"))] += int(n)
    total = sum(counts.values()) or 1
    return {k: v / total for k, v in counts.items()} | {"samples": float(total)}


def replica_pids() -> dict[str, int]:
    import psutil

    out = {}
    for p in psutil.process_iter(["cmdline"]):
        title = " ".join(p.info["cmdline"] or [])
        for key, role in PROFILED.items():
            if title.startswith("ray::") and key in title.split()[0]:
                out[role] = p.pid
    return out


def measure(rate: float, seconds: float, tmp: Path) -> dict:
    import torch

    from dotsvlm_serving.model.tiny import ensure_tiny_checkpoint
    from dotsvlm_serving.serve_config import ServeAppConfig

    torch.set_num_threads(1)
    model_dir = ensure_tiny_checkpoint(Path(tempfile.gettempdir()) / "dotsvlm-bench-tiny")
    cfg = ServeAppConfig.model_validate({"model_path": str(model_dir), "api": {"api_keys_env": None}})
    spy = str(Path(sys.executable).parent / "py-spy")
    with serve_app(cfg.model_dump(mode="json")) as url:
        model = cfg.served_model_name
        asyncio.run(ll.over_http(url, model, ll.Load("warm-up", ll.text_arrivals([0.0] * 8, "warm-up"))))
        load = ll.Load("sustained", ll.text_arrivals(ll.poisson(rate, seconds, random.Random(7)), "profile"))
        pids = replica_pids()
        print(f"profiling {sorted(pids)} for {seconds - 8:.0f} s under {len(load.arrivals)} requests ...",
              file=sys.stderr)
        spies = {role: subprocess.Popen([spy, "record", "-p", str(pid), "-d", str(int(seconds - 8)), "-r", "200",
                                         "--nonblocking", "-f", "raw", "-o", str(tmp / f"{pid}.txt")],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                 for role, pid in pids.items()}
        cpu0 = cpu_by_role()
        asyncio.run(ll.over_http(url, model, load))
        cpu = cpu_since(cpu0)
        for role, p in spies.items():
            _, err = p.communicate(timeout=120)
            if p.returncode != 0:
                raise SystemExit(f"py-spy on the {role} failed: {err.decode()[-500:]}")
    n = len(load.arrivals)
    return {"rate": rate, "seconds": seconds, "requests": n, "latency": ll.summary(load),
            "cpu_ms_per_request": {role: 1000 * cpu.get(role, 0.0) / n for role in PROFILED.values()},
            "buckets": {role: summarize(tmp / f"{pid}.txt") for role, pid in pids.items()}}


def report(run: dict, command: str) -> list[str]:
    names = [b for b, _ in BUCKETS] + ["native", "other Python"]
    lines = ["# Where the path's CPU goes (py-spy, tiny model, CPU)", "",
             f"Machine: 2 CPUs; `{command}`; {run['requests']} streamed text requests (32 tokens) at "
             f"{run['rate']:g}/s for {run['seconds']:g} s; text p50 / p99 {run['latency']['p50_ms']:.0f} / "
             f"{run['latency']['p99_ms']:.0f} ms.", "",
             "Share of each process's samples (py-spy, 200 Hz, active threads only) by who runs the code, and the "
             "process's CPU per request:", "",
             "| process | CPU ms per request | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for role in PROFILED.values():
        b = run["buckets"].get(role)
        if b is None:
            continue
        cells = [f"{100 * b.get(k, 0.0):.0f}%" for k in names]
        lines.append(f"| {role} | {run['cpu_ms_per_request'][role]:.1f} | " + " | ".join(cells) + " |")
    return lines + ["", NOTES.strip(), ""]


NOTES = """
Reading it: "dotsvlm" counts a sample whose stack holds a frame of dotsvlm's own code (the LLM replica's
model forward is counted as "model" even under dotsvlm's engine step). In the ingress and the tensor queue,
the path's CPU is Ray Serve's and Ray's per-call machinery: choosing a replica and sending each handle call
(the router's event loop), the replica wrapper that receives a call, and Ray's C++ core worker ("native");
dotsvlm's own code (parsing, tokenizing, the queue's bookkeeping, the relay) is a few percent. So the path's
CPU per request follows the number of Serve calls per request (enqueue, the LLM replica's takes and
publishes, the ingress's shared long-poll, heartbeats), not what dotsvlm does in them; cutting it further
means fewer calls (longer batching intervals, which cost latency) or calls that bypass Serve's handles.
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=10.0, help="text requests per second")
    ap.add_argument("--seconds", type=float, default=40.0, help="length of the load (py-spy records 8 s less)")
    ap.add_argument("--out", default="bench/results/path_profile")
    args = ap.parse_args()
    if args.seconds <= 10:
        ap.error("--seconds must be more than 10")
    bench_environment()
    command = "bench/path_profile.py " + " ".join(sys.argv[1:])
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    with tempfile.TemporaryDirectory() as tmp:
        run = measure(args.rate, args.seconds, Path(tmp))
    run.update(command=command, started=started)
    lines = report(run, command)
    write_results(args.out, run, lines)


if __name__ == "__main__":
    main()
