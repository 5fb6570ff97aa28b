"""Tensor-queue throughput for 18 MB image embeddings between two processes, against a raw memory copy.

The embeddings are a bf16 torch tensor (the model's dtype on GPU). A producer actor puts them into the
object store (RayObjectTransport.put: bf16 travels as an int16 view) and enqueues their handles; a
consumer actor (another process) takes items, fetches each tensor through the transport (zero-copy:
a bf16 view of the object store's shared memory; the bench checks that no copy was made) and copies
it into a preallocated bf16 buffer, as an LLM replica writes embeddings into its input embeddings
(that copy is the one touch of the bytes the consumer needs). The baseline is a bf16 `copy_` of the
same tensor in one process: the ratio says what the queue + transport cost relative to touching the
bytes once.

Two queue front-ends (the TensorQueue deployment's class as a plain Ray actor, and behind Ray Serve handles, as
the application deploys it), each on a Ray started as usual and on one started with
`RAY_preallocate_plasma_memory=1` (the object store's shared memory is touched once at start, so a
`put` does not pay a page fault per 4 KiB page of fresh memory); and, on the usual Ray, the embeddings
by Ray's direct transport with NIXL instead of the object store (`queue.embeddingTransport: NIXL`).

    .venv/bin/python bench/queue_throughput.py [--items 60] [--out bench/results/queue_throughput]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

SHAPE = (1256, 7168)  # embeddings of one ~1000-token image at the full model's width: 18.0 MB in bf16
NBYTES = SHAPE[0] * SHAPE[1] * 2


def raw_copy_gbps(reps: int = 30) -> float:
    import torch

    torch.set_num_threads(1)
    src = torch.randn(SHAPE).to(torch.bfloat16)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t)
    return NBYTES / statistics.median(times) / 1e9


def put_alone_gbps(reps: int = 30) -> float:
    """The object store's own ceiling: the transport's put of the same tensor, in one process, nothing
    else running (a few recent objects kept alive, as queued items are)."""
    import torch

    from dotsvlm_serving.tensor_queue import RayObjectTransport

    tr = RayObjectTransport()
    arr = torch.randn(SHAPE).to(torch.bfloat16)
    alive, times = [], []
    for _ in range(reps):
        t = time.perf_counter()
        alive.append(tr.put(arr))
        times.append(time.perf_counter() - t)
        del alive[:-4]
    return NBYTES / statistics.median(times) / 1e9


def run_pipeline(queue, serve_mode: bool, items: int, direct: str | None = None) -> dict:
    """`direct`: the embeddings go by Ray's direct transport (e.g. "nixl"), as a vision replica sends them
    with queue.embedding_transport set: the producer keeps the tensor and the consumer pulls it."""
    import ray

    from dotsvlm_serving.tensor_queue import DirectTensorRef, QueueItem, RayObjectTransport, from_wire

    def call(method: str, *args):
        m = getattr(queue, method)
        return m.remote(*args).result() if serve_mode else ray.get(m.remote(*args))

    @ray.remote(num_cpus=0)
    class Producer:
        def run(self, n: int, queue, serve_mode: bool) -> tuple[float, list[float]]:
            import torch

            torch.set_num_threads(1)
            tr = RayObjectTransport()
            arr = torch.randn(SHAPE).to(torch.bfloat16)
            t0 = time.time()
            puts = []
            for i in range(n):
                t = time.perf_counter()
                if direct:  # the vision replica's answer: a small DirectTensorRef, by object reference
                    h = RayObjectTransport.from_ref(ray.put(DirectTensorRef.put(arr, direct)), shape=SHAPE,
                                                    dtype=arr.dtype)
                else:
                    h = tr.put(arr)
                puts.append(time.perf_counter() - t)
                item = QueueItem(request_id=f"{direct or 'store'}-{i}", nbytes=h.nbytes, reserved_tokens=1, payload={"embeds": h})
                res = queue.put.remote(item, 60.0)
                res = res.result() if serve_mode else ray.get(res)
                assert res["ok"], res
            return t0, puts

    @ray.remote(num_cpus=0)
    class Consumer:
        def run(self, n: int, queue, serve_mode: bool) -> tuple[float, list[float], int]:
            import torch

            torch.set_num_threads(1)
            tr = RayObjectTransport()
            buf = torch.empty(SHAPE, dtype=torch.bfloat16)
            got, lat, copies = 0, [], 0
            while got < n:
                r = queue.take.remote("bench-consumer", 4, 10**9, 1.0)
                batch = r.result() if serve_mode else ray.get(r)
                for it in batch:
                    t = time.perf_counter()
                    h = it.payload["embeds"]
                    if direct:  # received into this process's memory by the transport itself
                        x = tr.get(h)
                        buf.copy_(x)
                        copies += int(x.dtype != torch.bfloat16)
                    else:
                        wire = tr.get_array(h)  # zero-copy from shared memory
                        x = from_wire(wire, h.dtype)
                        buf.copy_(x)
                        # a copy anywhere before `buf` would show as memory not backed by the object store
                        copies += int(x.dtype != torch.bfloat16 or wire.flags.writeable
                                      or x.data_ptr() != wire.ctypes.data)
                    lat.append(time.perf_counter() - t)
                    done = queue.publish.remote("bench-consumer", [{"request_id": it.request_id, "type": "finish"}])
                    done.result() if serve_mode else ray.get(done)
                    got += 1
            return time.time(), lat, copies

    prod, cons = Producer.remote(), Consumer.remote()
    ray.get([prod.__ray_ready__.remote(), cons.__ray_ready__.remote()])
    cf = cons.run.remote(items, queue, serve_mode)
    t0, puts = ray.get(prod.run.remote(items, queue, serve_mode))
    t1, lat, copies = ray.get(cf)
    elapsed = t1 - t0
    return {"items": items, "item_bytes": NBYTES, "dtype": "bfloat16", "seconds": elapsed, "items_per_s": items / elapsed,
            "gbps": items * NBYTES / elapsed / 1e9, "fetch_copy_ms_median": 1000 * statistics.median(lat),
            "put_ms_median": 1000 * statistics.median(puts), "consumer_extra_copies": copies}


NOTES = """
Reading it: bf16 halves the bytes of float32 (what travelled before). The consumer side makes no copy
(the tensor is a bf16 view of the object store's shared memory: `consumer_extra_copies` counts any);
its cost is mapping plus the one copy into its own buffer. On the producer side `ray.put` copies the
tensor into shared memory; on a Ray started as usual, the object store's pages are fresh the first
time each part of it is used, and the page faults cost more than the copy itself: with
`RAY_preallocate_plasma_memory=1` (set on every Ray node of a deployment) they are paid once at start.
Queue calls move only small handles. Producer, consumer, queue and Ray's own processes share the CPUs
of this machine (2), which caps the pipeline.

The ">= 0.5 of memcpy" target cannot be met through the object store on this machine: the transport's
put alone (`ray.put` of the tensor, one process, nothing else running: the "put alone" rows) moves the
bytes at 0.14-0.21 of a memcpy, so no pipeline through it can reach 0.5. The earlier result of 0.38
(2026-12-01) was measured at load average ~20, when the memcpy baseline itself ran at 1.2 GB/s instead
of 13: a ratio of two slowed figures. On a quiet machine (this run) the pipeline runs at 0.06-0.11 of
the memcpy: besides the put, every item costs the producer's and the consumer's queue calls and the
consumer's mapping, on 2 CPUs shared by four processes. The issue asks for Ray's own transports, not a
hand-made shared-memory ring; a faster CPU path would have to come from Ray (on GPU nodes, its GPU
transport moves the tensors without host copies).

The last row is `queue.embeddingTransport: NIXL`: the producer keeps the tensor (Ray's direct transport,
`ray.put(tensor, _tensor_transport="nixl")`, as a vision replica does with that setting) and the
consumer pulls it with NIXL (UCX) into its own memory. On CPU it is several times slower than the object
store (the consumer's pull dominates), which is why ObjectStore is the default; NIXL is for GPU pools,
where it moves the embeddings GPU to GPU without the two host copies (not measured here: no GPU)."""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=60)
    ap.add_argument("--out", default="bench/results/queue_throughput")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    from dotsvlm_serving.deployments.queue import TensorQueue, TensorQueueDeployment
    from dotsvlm_serving.serve_config import QueueConfig

    qcfg = QueueConfig(max_items=8, max_bytes=8 * 20 * 1024 * 1024, enqueue_timeout_s=60)
    baseline = raw_copy_gbps()
    result = {
        "what": "tensor queue: 18 MB bf16 embeddings producer process -> queue -> consumer process (zero-copy fetch + one copy into a buffer)",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "raw_memcpy_gbps": baseline, "command": " ".join(["bench/queue_throughput.py"] + sys.argv[1:]),
    }
    for label, env in (("default", {}), ("preallocated", {"RAY_preallocate_plasma_memory": "1"})):
        os.environ.update(env)
        for attempt in range(3):  # on a loaded machine the raylet can miss Ray's fixed 30 s start window
            try:
                ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="WARNING",
                         log_to_driver=False, object_store_memory=1024**3)
                break
            except Exception as exc:
                if "timed out during startup" not in str(exc) or attempt == 2:
                    raise
                ray.shutdown()
        try:
            result[f"put_alone_gbps_{label}"] = put_alone_gbps()
            actor = ray.remote(num_cpus=0)(TensorQueue).remote()
            ray.get(actor.reconfigure.remote(qcfg.model_dump(mode="json")))  # what Serve does before serving
            direct = run_pipeline(actor, False, args.items)
            if label == "default":
                nixl = run_pipeline(actor, False, args.items, direct="nixl")
                result["queue_ray_actor_nixl"] = nixl | {"ratio_to_memcpy": nixl["gbps"] / baseline}
            serve.start(http_options={"host": "127.0.0.1", "port": 0})
            handle = serve.run(TensorQueueDeployment.options(num_replicas=1, user_config=qcfg.model_dump(mode="json")).bind(),
                               name="qbench", route_prefix=None)
            via_serve = run_pipeline(handle, True, args.items)
        finally:
            serve.shutdown()
            ray.shutdown()
            for k in env:
                os.environ.pop(k, None)
        result[f"queue_ray_actor_{label}"] = direct | {"ratio_to_memcpy": direct["gbps"] / baseline}
        result[f"queue_serve_deployment_{label}"] = via_serve | {"ratio_to_memcpy": via_serve["gbps"] / baseline}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# Tensor queue throughput (18 MB bf16 embeddings, two processes)", "",
             f"Machine: {os.cpu_count()} CPUs, {platform.platform()}; `{result['command']}`", "",
             "| path | items/s | GB/s | ratio to raw memcpy (bf16) | producer put per item (ms, median) | consumer fetch+copy per item (ms, median) | consumer extra copies |",
             "|---|---|---|---|---|---|---|",
             f"| raw bf16 `copy_` in one process | {baseline * 1e9 / NBYTES:.0f} | {baseline:.2f} | 1.00 | - | {NBYTES / baseline / 1e6:.2f} | - |"]
    for label in ("default", "preallocated"):
        g = result[f"put_alone_gbps_{label}"]
        lines.append(f"| transport put alone in one process ({label} object store): the ceiling | {g * 1e9 / NBYTES:.0f} | "
                     f"{g:.2f} | {g / baseline:.3f} | {NBYTES / g / 1e6:.2f} | - | - |")
    for key, name in [("queue_ray_actor_default", "queue as Ray actor"),
                      ("queue_serve_deployment_default", "queue as Serve deployment"),
                      ("queue_ray_actor_preallocated", "queue as Ray actor, preallocated object store"),
                      ("queue_serve_deployment_preallocated", "queue as Serve deployment, preallocated object store"),
                      ("queue_ray_actor_nixl", "queue as Ray actor, embeddings by Ray's direct transport (NIXL, CPU memory)")]:
        r = result[key]
        lines.append(f"| {name} | {r['items_per_s']:.1f} | {r['gbps']:.2f} | {r['ratio_to_memcpy']:.3f} | "
                     f"{r['put_ms_median']:.2f} | {r['fetch_copy_ms_median']:.2f} | {r['consumer_extra_copies']} |")
    lines += NOTES.splitlines()
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
