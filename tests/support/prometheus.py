"""A real Prometheus server (and promtool) for tests: Debian's `prometheus` package.

`ensure_prometheus()` installs the package with apt-get when the binaries are missing and the tests
run as root (as on CI); otherwise it fails with what to install. `PrometheusServer` runs one server
on a free loopback port with its own data folder and stops it afterwards.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from support.ports import free_port

PACKAGE = "prometheus"


def ensure_prometheus() -> tuple[str, str]:
    """Paths of `prometheus` and `promtool`, installing Debian's package when they are missing."""
    prom, tool = shutil.which("prometheus"), shutil.which("promtool")
    if prom and tool:
        return prom, tool
    apt = shutil.which("apt-get")
    if apt is None or os.geteuid() != 0:
        raise RuntimeError("these tests need Prometheus and promtool: install Debian's 'prometheus' package "
                           "(sudo apt-get install -y prometheus) or put both binaries on PATH")
    print(f"\n[tests] installing Debian's '{PACKAGE}' package (prometheus + promtool) with apt-get ...",
          file=sys.stderr, flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = [apt, "install", "-y", "-q", "--no-install-recommends", PACKAGE]
    if subprocess.run(install, env=env, capture_output=True).returncode != 0:
        subprocess.run([apt, "update", "-q"], env=env, capture_output=True, check=False)
        done = subprocess.run(install, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"apt-get install {PACKAGE} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    prom, tool = shutil.which("prometheus"), shutil.which("promtool")
    if not (prom and tool):
        raise RuntimeError(f"the '{PACKAGE}' package installed but prometheus/promtool are not on PATH")
    return prom, tool


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    _, tool = ensure_prometheus()
    return subprocess.run([tool, *args], input=stdin, capture_output=True, text=True, timeout=120)


class PrometheusServer:
    """`prometheus` scraping `jobs` ({job name: scrape config without job_name}) every `interval`."""

    def __init__(self, workdir: Path, jobs: dict[str, dict[str, Any]], interval: str = "1s") -> None:
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {"global": {"scrape_interval": interval, "evaluation_interval": interval},
                  "scrape_configs": [{"job_name": name, **job} for name, job in jobs.items()]}
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 60) -> "PrometheusServer":
        prom, _ = ensure_prometheus()
        log = open(self.workdir / "prometheus.log", "wb")
        self.proc = subprocess.Popen(
            [prom, f"--config.file={self.config_path}", f"--storage.tsdb.path={self.workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1h"],
            stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited: {(self.workdir / 'prometheus.log').read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/-/ready", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"prometheus not ready within {timeout_s} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def __enter__(self) -> "PrometheusServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's result vector (a scalar comes back as one sample without labels)."""
        r = httpx.get(self.url + "/api/v1/query", params={"query": expr}, timeout=30)
        body = r.json()
        if body.get("status") != "success":
            raise AssertionError(f"query failed: {expr}\n{body.get('error')}")
        data = body["data"]
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def query_range(self, expr: str, seconds: float, step: str = "2s") -> list[dict[str, Any]]:
        """A range query over the last `seconds`, as Grafana evaluates a panel (a series absent from one
        scrape, e.g. a gauge whose report arrived late, still shows)."""
        end = time.time()
        r = httpx.get(self.url + "/api/v1/query_range",
                      params={"query": expr, "start": end - seconds, "end": end, "step": step}, timeout=30)
        body = r.json()
        if body.get("status") != "success":
            raise AssertionError(f"query failed: {expr}\n{body.get('error')}")
        return body["data"]["result"]

    def value(self, expr: str) -> float | None:
        res = self.query(expr)
        return float(res[0]["value"][1]) if res else None

    def targets_up(self) -> dict[str, bool]:
        r = httpx.get(self.url + "/api/v1/targets", timeout=10).json()
        return {t["scrapeUrl"]: t["health"] == "up" for t in r["data"]["activeTargets"]}
