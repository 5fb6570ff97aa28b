"""Set-up shared by the benchmarks that serve the whole application (load_latency, ingress_images,
disagg_overhead): a local Ray with the application served and answering, a child process per git
revision of the serving code (`--before REV`), CPU time by process role, and noise images.

Shared so that the benchmarks start, measure and compare revisions the same way: a difference between
their figures is then one of what they load, not of how the stack was started.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from support.ports import free_port  # noqa: E402  (the tests' picker: away from the ports Ray takes)

READY_TIMEOUT_S = 300.0

# Deployment (in the replica's Ray process title, `ray::ServeReplica:<app>:<deployment>`) or Serve actor
# -> role; the role names are those of bench/results/load_latency.*, checked in this order.
ROLES = {"Ingress": "ingress", "TensorQueue": "tensor queue", "LLMServer": "LLM replica",
         "VisionEncoder": "vision replica", "ProxyActor": "HTTP proxy", "ServeController": "Serve controller"}
REPLICA_DEPLOYMENTS = ("Ingress", "TensorQueue", "LLMServer", "VisionEncoder")
RAY_ROLE = "Ray (raylet, GCS, agents, idle workers)"
OWN_ROLE = "benchmark (client or engine)"


def start_ray() -> None:
    """A local Ray (4 CPUs, no dashboard) whose workers get one OMP thread and this process's PYTHONPATH,
    so that under `--before` the replicas import that revision's serving code by design, not by
    inheriting the driver's environment."""
    import ray

    env = {"OMP_NUM_THREADS": "1"}
    if os.environ.get("PYTHONPATH"):
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    for attempt in range(3):  # on a loaded machine the raylet can miss Ray's fixed 30 s start window
        try:
            ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="WARNING",
                     log_to_driver=False, runtime_env={"env_vars": env})
            return
        except Exception as exc:
            if "timed out during startup" not in str(exc) or attempt == 2:
                raise
            ray.shutdown()


def healthy(url: str) -> bool:
    """The application's own readiness: its ingress answers `/health` (all its deployments are up)."""
    return httpx.get(url + "/health").status_code == 200


@contextmanager
def serve_app(app_config: dict, *, extra_apps: Sequence[tuple[str, str, Any]] = (),
              ready: Callable[[str], bool] = healthy) -> Iterator[str]:
    """Start Ray and Serve, run the application (from `ServeAppConfig.model_dump(mode="json")`) at "/"
    and each of `extra_apps` (name, route prefix, bound application), and yield the proxy's URL once
    `ready(url)` holds; Serve and Ray are shut down on leaving, also on an error."""
    import ray
    from ray import serve

    from dotsvlm_serving.app import build_app
    from dotsvlm_serving.serve_config import APP_NAME

    port = free_port()
    start_ray()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(app_config), name=APP_NAME, route_prefix="/", blocking=False)
        for name, prefix, app in extra_apps:
            serve.run(app, name=name, route_prefix=prefix, blocking=False)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                if ready(url):
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            raise SystemExit(f"the served application(s) did not become ready within {READY_TIMEOUT_S:.0f} s")
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()


@contextmanager
def serving_code_at(revision: str) -> Iterator[str]:
    """A PYTHONPATH entry holding `revision`'s `serving/` (`git archive`: the working tree, which
    others may be editing, is not touched), removed on leaving."""
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "archive", revision, "serving"], check=True, capture_output=True).stdout
        tarfile.open(fileobj=io.BytesIO(archive)).extractall(tmp, filter="data")
        yield str(Path(tmp) / "serving")


def working_tree_revision() -> str:
    """How a run of this checkout's code is labelled: HEAD plus whatever is uncommitted."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    return f"{head} (+ working tree)"


def bench_environment() -> None:
    """One thread per torch op and no usage report, in this process and (inherited) its children: on 2
    CPUs a torch pool per replica would fight the others, and the figures would say so, not the code."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def before_and_after(before: str | None, run: Callable[[str | None, dict[str, dict]], dict]) -> dict[str, dict]:
    """`{"before": ..., "after": ...}`: `run(pythonpath, earlier runs)` for `before`'s serving code (when
    given), then for this checkout's, each labelled with its `revision`. The earlier runs are handed on
    so that the second can reuse what the first measured (load_latency's calibrated rate)."""
    runs: dict[str, dict] = {}
    if before:
        with serving_code_at(before) as pythonpath:
            runs["before"] = run(pythonpath, runs) | {"revision": before}
    runs["after"] = run(None, runs) | {"revision": working_tree_revision()}
    return runs


def write_results(out: str, result: dict, lines: Sequence[str]) -> None:
    """`out`.json (every figure) and `out`.md (the tables a person reads, also printed)."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def run_child(script: str, args: Sequence[str], pythonpath: str | None, *, timeout_s: float,
              stream_stderr: bool = False) -> dict:
    """Run `script --child ARGS` in a fresh interpreter and return the JSON of its last stdout line.

    A fresh process per revision, because the driver and (through `start_ray`) the Ray workers must
    import one revision's code: `pythonpath` from `serving_code_at`, or None for this checkout's as
    installed. `stream_stderr` shows the child's progress as it runs instead of its tail on failure."""
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    else:
        env.pop("PYTHONPATH", None)
    p = subprocess.run([sys.executable, script, "--child", *args], env=env, stdout=subprocess.PIPE,
                       stderr=None if stream_stderr else subprocess.PIPE, text=True, timeout=timeout_s)
    if p.returncode != 0:
        raise SystemExit("the measuring run failed (its output is above)" if stream_stderr
                         else f"child run failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def _role(cmdline: list[str], name: str) -> str | None:
    """Which part of the stack a process is, from its title (Ray names its workers `ray::<actor>`)."""
    title = " ".join(cmdline)
    for key, role in ROLES.items():
        if title.startswith("ray::") and key in title.split()[0]:
            return role
    if "raylet" in name or "gcs_server" in name or title.startswith("ray::") or "ray/" in title:
        return RAY_ROLE
    return None


def cpu_by_role() -> dict[str, float]:
    """CPU seconds (user + system) so far of each process of the stack, summed by role (this process is
    OWN_ROLE). By title rather than by asking the replicas for their pids, so that the proxy, the
    controller and Ray's own processes are counted too; only this process and its descendants (the
    local Ray it started: GCS, raylet, workers), so that another Ray on a shared machine, with the same
    titles, is not counted."""
    import psutil

    out: dict[str, float] = {}
    me = psutil.Process()
    for proc in [me, *me.children(recursive=True)]:
        try:
            with proc.oneshot():
                cmdline, name, times = proc.cmdline(), proc.name(), proc.cpu_times()
        except psutil.Error:  # gone since it was listed, or not ours to read
            continue
        role = OWN_ROLE if proc.pid == me.pid else _role(cmdline, name)
        if role:
            out[role] = out.get(role, 0.0) + times.user + times.system
    return out


def cpu_since(before: dict[str, float]) -> dict[str, float]:
    """CPU seconds by role since `before` (a `cpu_by_role()`), roles that spent none left out."""
    now = cpu_by_role()
    return {k: v - before.get(k, 0.0) for k, v in now.items() if v - before.get(k, 0.0) > 0}


def noise_png(w: int, h: int, sigma: float) -> bytes:
    """A w x h RGB PNG of Gaussian noise: incompressible, so the image path pays for every byte."""
    from PIL import Image

    buf = io.BytesIO()
    Image.effect_noise((w, h), sigma).convert("RGB").save(buf, "PNG")
    return buf.getvalue()
