"""The ingress's CPU for knowing when a request's embeddings exist: polling Ray per request vs one watcher thread.

While the vision pool encodes a request's images, the ingress waits for the answer's object reference to be
ready without fetching the bytes (`ray.wait(fetch_local=False)`). Before, each request polled it from the
event loop (`timeout=0`, backing off to every 10 ms); now one thread per process waits on all of them
(`dotsvlm_serving.deployments.ref_watch`). The end-to-end image benchmark (ingress_images) cannot resolve
a difference of this size on 2 shared CPUs, so this measures the one thing directly: the process's CPU time
per awaited reference, for N references awaited at once that become ready after S seconds (Ray tasks that
sleep, then return 4 MB), in one process and one run, the variants alternating. "nothing" awaits the
same time with asyncio.sleep: Ray's own background threads in this process, the floor.

    .venv/bin/python bench/ref_wait.py [--concurrent 8] [--seconds 1.5] [--rounds 4] [--out bench/results/ref_wait]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "serving"))

import ray  # noqa: E402

from dotsvlm_serving.deployments import ref_watch  # noqa: E402

from bench_serving import write_results  # noqa: E402


@ray.remote(num_cpus=0)
def _answer(seconds: float) -> bytes:
    time.sleep(seconds)
    return b"x" * (4 << 20)


async def _poll(ref: ray.ObjectRef, seconds: float) -> None:
    """The code before: a readiness poll from the event loop per request."""
    delay = 0.001
    while not ray.wait([ref], timeout=0, fetch_local=False)[0]:
        await asyncio.sleep(delay)
        delay = min(0.01, delay * 2)


async def _watch(ref: ray.ObjectRef, seconds: float) -> None:
    assert await ref_watch.ready(ref, 60.0)


async def _nothing(ref: ray.ObjectRef, seconds: float) -> None:
    await asyncio.sleep(seconds)


VARIANTS = {"poll per request (before)": _poll, "one watcher thread (now)": _watch, "nothing (floor)": _nothing}


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def _measure(fn, concurrent: int, seconds: float, rounds: int) -> float:
    c0 = _cpu_s()
    for _ in range(rounds):
        refs = [_answer.remote(seconds) for _ in range(concurrent)]
        await asyncio.gather(*[fn(r, seconds) for r in refs])
        ray.get(refs)  # (all done: the floor's refs too, before the next round)
    return (_cpu_s() - c0) * 1000 / (concurrent * rounds)


async def _main(args: argparse.Namespace) -> dict[str, list[float]]:
    ray.get([_answer.remote(0) for _ in range(args.concurrent)])  # workers started
    per: dict[str, list[float]] = {k: [] for k in VARIANTS}
    for _ in range(args.repeats):
        for name, fn in VARIANTS.items():
            per[name].append(await _measure(fn, args.concurrent, args.seconds, args.rounds))
            print(f"{name}: {per[name][-1]:.2f} CPU ms per reference", file=sys.stderr)
    return per


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--concurrent", type=int, default=8, help="references awaited at once (requests encoding)")
    ap.add_argument("--seconds", type=float, default=1.5, help="how long each takes to be ready (the encode)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3, help="times each variant is measured, alternating")
    ap.add_argument("--out", default="bench/results/ref_wait")
    args = ap.parse_args()
    ray.init(address="local", num_cpus=max(2, args.concurrent), include_dashboard=False, log_to_driver=False)
    try:
        per = asyncio.run(_main(args))
    finally:
        ray.shutdown()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    cmd = " ".join(["bench/ref_wait.py", *sys.argv[1:]])
    floor = statistics.median(per["nothing (floor)"])
    lines = [f"# The ingress's CPU for waiting on embeddings: poll per request vs one watcher thread", "",
             f"Command: `.venv/bin/python {cmd}` (commit {commit}, {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())})",
             f"Machine: {os.cpu_count()} CPUs, {platform.platform()}; {args.concurrent} references awaited at once, "
             f"each ready after {args.seconds} s, {args.rounds} rounds per measurement, {args.repeats} measurements "
             "per variant, alternating, in one process.", "",
             "| variant | CPU ms per awaited reference (median) | all measurements | above the floor |",
             "|---|---|---|---|"]
    for name, values in per.items():
        med = statistics.median(values)
        lines.append(f"| {name} | {med:.2f} | {', '.join(f'{v:.2f}' for v in values)} | "
                     f"{'-' if name.startswith('nothing') else f'{med - floor:.2f}'} |")
    before = statistics.median(per["poll per request (before)"]) - floor
    now = statistics.median(per["one watcher thread (now)"]) - floor
    lines += ["", f"Above the floor, the watcher costs **{now / before:.2f}x** the CPU of polling per request "
              f"({before:.2f} -> {now:.2f} ms per reference). The per-request poll's cost grows with the encode's "
              "length and the number of requests encoding; the watcher's is one `ray.wait` per 10 ms slice for all "
              "of them, shared. Measured on 2 shared CPUs: compare the ratio, not the milliseconds."]
    write_results(args.out, {"command": cmd, "commit": commit, "concurrent": args.concurrent,
                             "seconds": args.seconds, "rounds": args.rounds, "cpu_ms_per_ref": per}, lines)


if __name__ == "__main__":
    main()
