"""Helpers shared by the operator tests (imported by name: tests/operator is on sys.path)."""

from __future__ import annotations

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
CRD_FILE = REPO / "crds" / "dotsvlm.io_dotsvlmdeployments.yaml"
PEERING_CRD_FILE = REPO / "crds" / "kopf-peering.yaml"
EXAMPLES = REPO / "examples"


def load_example(name: str) -> dict:
    return yaml.safe_load((EXAMPLES / name).read_text())


import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

VENV_BIN = Path(sys.executable).parent


class OperatorProcess:
    """`dotsvlm operator` as a real subprocess, so tests can kill and restart it.

    Its output goes to a log file that failing tests print. `stop()` always runs in fixtures."""

    def __init__(self, kube, namespaces: list[str], log_path: Path, *, head_url: str | None = "http://127.0.0.1:9/",
                 peering: str | None = None, priority: int | None = None, resync: float = 5.0,
                 extra: list[str] | None = None, kubeconfig: Path | None = None) -> None:
        self.kube, self.namespaces, self.log_path = kube, namespaces, log_path
        self.head_url, self.peering, self.priority, self.resync = head_url, peering, priority, resync
        self.extra = extra or []
        self.kubeconfig = kubeconfig
        self.proc: subprocess.Popen | None = None
        self._log = None

    def start(self) -> "OperatorProcess":
        args = [str(VENV_BIN / "dotsvlm"), "operator", "--log-format", "json", "--resync-seconds", str(self.resync)]
        for ns in self.namespaces:
            args += ["--namespace", ns]
        if self.head_url:
            args += ["--ray-head-url-override", self.head_url]
        if self.peering:
            args += ["--peering", self.peering]
        if self.priority is not None:
            args += ["--priority", str(self.priority)]
        env = dict(self.kube.env, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        if self.kubeconfig:
            env["KUBECONFIG"] = str(self.kubeconfig)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(args + self.extra, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no cleanup, as when a node dies."""
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        if self._log:
            self._log.close()
            self._log = None

    def log_tail(self, n: int = 25) -> str:
        try:
            return "\n".join(line[:600] for line in self.log_path.read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return "(no log)"


def write_sa_kubeconfig(kube, namespace: str, service_account: str, path: Path) -> Path:
    """A kubeconfig that acts as the ServiceAccount (a token from the API), so a local operator process has
    exactly the permissions the operator has in the cluster."""
    token = kube.kubectl("create", "token", service_account, "-n", namespace, "--duration=1h").stdout.strip()
    admin = json.loads(kube.kubectl("config", "view", "--raw", "--minify", "--flatten", "-o", "json").stdout)
    cluster = admin["clusters"][0]
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "sa",
        "clusters": [cluster],
        "users": [{"name": "sa", "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": cluster["name"], "user": "sa"}}],
    }))
    return path


def get_json(kube, *args: str) -> Any:
    proc = kube.kubectl("get", *args, "-o", "json", check=False)
    if proc.returncode != 0:
        return None
    return json.loads(proc.stdout)


def condition(cr: dict | None, type_: str) -> dict | None:
    for c in ((cr or {}).get("status") or {}).get("conditions") or []:
        if c.get("type") == type_:
            return c
    return None


def poll(predicate: Callable[[], Any], timeout: float, what: str, on_fail: Callable[[], str] | None = None) -> Any:
    """Like kube.wait_for, but appends diagnostics (e.g. the operator's log) to the failure."""
    import pytest
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001
            last = exc
        if time.monotonic() > deadline:
            extra = f"\n--- diagnostics ---\n{on_fail()}" if on_fail else ""
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what} (last error: {last}){extra}")
        time.sleep(0.5)


def release_namespace(kube, name: str) -> None:
    """Delete a test namespace, leaving the next test nothing that acts or holds a fake GPU (without waiting for
    the namespace to go: KubeCluster.discard_namespace). The operator may be gone already: drop the finalizers
    of its DotsVLMDeployments first, or they would stay forever; then they go, so that no operator of a later
    test meets them."""
    for cr in (get_json(kube, "dvlm", "-n", name) or {}).get("items", []):
        kube.kubectl("patch", "dvlm", cr["metadata"]["name"], "-n", name, "--type=merge",
                     "-p", '{"metadata":{"finalizers":null}}', check=False)
    kube.discard_namespace(name)
    kube.kubectl("delete", "dvlm", "--all", "-n", name, "--ignore-not-found", "--timeout=60s", check=False)
