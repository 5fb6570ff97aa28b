"""A real Kubernetes control plane for tests: etcd, kube-apiserver, kube-controller-manager and
kube-scheduler from `tests/cluster/build-binaries.sh`, started by `kwokctl --runtime binary`, bound to
127.0.0.1, with kwok fake nodes that carry `nvidia.com/gpu` capacity.

Pods on fake nodes are scheduled by the real scheduler and marked Running by kwok; no container runs.
Each pytest session gets its own cluster named `dotsvlm-test-<pid>-<n>`; clusters left by a crashed
session (their pid is gone) are deleted at start, never reused.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pytest

from support.ports import free_port

T = TypeVar("T")

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "tests" / "cluster" / "build-binaries.sh"
CACHE = Path(os.environ.get("DOTSVLM_CACHE", Path.home() / ".cache" / "dotsvlm"))
CLUSTER_PREFIX = "dotsvlm-test-"
KUBE_VERSION = "v1.36.3"


@dataclass(frozen=True)
class FakeNode:
    name: str
    gpu_product: str
    gpus: int = 8
    cpu: str = "96"
    memory: str = "1024Gi"

    def manifest(self) -> dict:
        capacity = {"cpu": self.cpu, "memory": self.memory, "pods": "110", "nvidia.com/gpu": str(self.gpus)}
        return {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": self.name,
                "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
                "labels": {
                    "type": "kwok",
                    "kubernetes.io/hostname": self.name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                    "nvidia.com/gpu.product": self.gpu_product,
                    "nvidia.com/gpu.count": str(self.gpus),
                },
            },
            "spec": {},
            "status": {"capacity": capacity, "allocatable": capacity,
                       "nodeInfo": {"kubeletVersion": f"fake-{KUBE_VERSION}", "architecture": "amd64",
                                    "operatingSystem": "linux"}},
        }


H100 = "NVIDIA-H100-80GB-HBM3"
L40S = "NVIDIA-L40S"
DEFAULT_NODES = tuple(
    [FakeNode(f"gpu-h100-{i}", H100) for i in range(4)] + [FakeNode(f"gpu-l40s-{i}", L40S) for i in range(2)]
)


def _log(msg: str) -> None:
    print(f"[kube-fixture {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def wait_for(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.5) -> T:
    """Poll `predicate` until it returns something truthy; fail the test with `what` at the deadline."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - kept for the failure message
            last_exc = exc
        if time.monotonic() > deadline:
            detail = f" (last error: {last_exc})" if last_exc else ""
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}{detail}")
        time.sleep(interval)


def build_binaries() -> Path:
    """Build whatever is missing (minutes when cold), return the folder of current binaries."""
    _log("checking control-plane binaries (a cold build takes 8-18 min on 2 cores)...")
    out = subprocess.run([str(BUILD_SCRIPT)], check=True, stdout=subprocess.PIPE, text=True)
    return Path(out.stdout.strip().splitlines()[-1])


@dataclass
class KubeCluster:
    name: str
    workdir: Path
    bin_dir: Path
    nodes: tuple[FakeNode, ...] = DEFAULT_NODES
    namespaces: list[str] = field(default_factory=list)

    @property
    def cluster_dir(self) -> Path:
        return self.workdir / "clusters" / self.name

    @property
    def kubeconfig(self) -> Path:
        return self.cluster_dir / "kubeconfig.yaml"

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(KUBECONFIG=str(self.kubeconfig), KWOK_WORKDIR=str(self.workdir), KWOK_KUBE_VERSION=KUBE_VERSION,
                   PATH=f"{self.bin_dir}{os.pathsep}{env.get('PATH', '')}")
        return env

    def _kwokctl(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.bin_dir / "kwokctl"), "--name", self.name, *args], env=self.env,
                              capture_output=True, text=True, timeout=timeout)

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run the built kubectl against this cluster, as a user would."""
        proc = subprocess.run([str(self.bin_dir / "kubectl"), *args], input=input, env=self.env,
                              capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}{proc.stdout}")
        return proc

    def kubectl_json(self, *args: str) -> dict:
        return json.loads(self.kubectl(*args, "-o", "json").stdout)

    def apply(self, yaml_text: str, namespace: str | None = None) -> subprocess.CompletedProcess[str]:
        ns = ["-n", namespace] if namespace else []
        return self.kubectl("apply", *ns, "-f", "-", input=yaml_text)

    def create_namespace(self, prefix: str = "t") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:6]}"
        self.kubectl("create", "namespace", name)
        self.namespaces.append(name)
        return name

    def delete_namespace(self, name: str, wait: bool = True) -> None:
        self.kubectl("delete", "namespace", name, "--ignore-not-found", f"--wait={str(wait).lower()}",
                     timeout=180)
        if name in self.namespaces:
            self.namespaces.remove(name)

    def discard_namespace(self, name: str) -> None:
        """Delete a namespace without waiting the ~10 s its controller takes to empty it. Once it is terminating
        nothing new can start in it; its pods are force-deleted, so their (fake) GPUs are free for the next
        test at once. The rest goes in the background."""
        self.delete_namespace(name, wait=False)
        self.kubectl("delete", "pods", "--all", "-n", name, "--grace-period=0", "--force", "--ignore-not-found",
                     check=False)

    wait_for = staticmethod(wait_for)

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        b = self.bin_dir
        etcd_client, etcd_peer, apiserver, kcm, sched, kwok = (free_port() for _ in range(6))
        peer = f"http://127.0.0.1:{etcd_peer}"
        client = f"http://127.0.0.1:{etcd_client}"
        # kwokctl binds every component to 0.0.0.0; these overrides keep the whole plane on loopback.
        extra = [
            f"etcd=listen-client-urls={client}", f"etcd=advertise-client-urls={client}",
            f"etcd=listen-peer-urls={peer}", f"etcd=initial-advertise-peer-urls={peer}",
            f"etcd=initial-cluster=node0={peer}",
            "kube-apiserver=bind-address=127.0.0.1", "kube-apiserver=advertise-address=127.0.0.1",
            # As OpenShift runs it: an ownerReference with blockOwnerDeletion needs update on the owner's finalizers.
            "kube-apiserver=enable-admission-plugins=OwnerReferencesPermissionEnforcement",
            "kube-controller-manager=bind-address=127.0.0.1", "kube-scheduler=bind-address=127.0.0.1",
            f"kwok-controller=server-address=127.0.0.1:{kwok}",
        ]
        args = ["create", "cluster", "--runtime", "binary", "--kubeconfig", str(self.workdir / f"{self.name}.merged"),
                "--etcd-binary", str(b / "etcd"), "--kube-apiserver-binary", str(b / "kube-apiserver"),
                "--kube-controller-manager-binary", str(b / "kube-controller-manager"),
                "--kube-scheduler-binary", str(b / "kube-scheduler"), "--kwok-controller-binary", str(b / "kwok"),
                "--etcd-port", str(etcd_client), "--kube-apiserver-port", str(apiserver),
                "--kube-controller-manager-port", str(kcm), "--kube-scheduler-port", str(sched),
                "--controller-port", str(kwok), "--wait", "120s", "--quiet-pull"]
        for e in _first_per_component_first(extra):
            args += ["--extra-args", e]
        _log(f"starting cluster {self.name} (apiserver https://127.0.0.1:{apiserver})...")
        t0 = time.monotonic()
        proc = self._kwokctl(*args)
        if proc.returncode != 0:
            logs = self.cluster_dir / "logs"
            tails = "".join(f"\n--- {p.name}\n" + p.read_text()[-2000:] for p in sorted(logs.glob("*.log"))) \
                if logs.exists() else ""
            self.stop()
            raise RuntimeError(f"kwokctl create cluster failed:\n{proc.stderr[-4000:]}{tails}")
        wait_for(lambda: self.kubectl("get", "--raw", "/readyz", check=False).returncode == 0, 60,
                 "kube-apiserver /readyz")
        self.apply("\n---\n".join(json.dumps(n.manifest()) for n in self.nodes))
        wait_for(self._nodes_ready, 60, f"{len(self.nodes)} fake GPU nodes to become Ready")
        # The controller-manager creates each namespace's default ServiceAccount; pods wait on it.
        wait_for(lambda: self.kubectl("get", "serviceaccount", "default", check=False).returncode == 0, 60,
                 "the default ServiceAccount")
        _log(f"cluster {self.name} ready in {time.monotonic() - t0:.1f}s")

    def _nodes_ready(self) -> bool:
        items = self.kubectl_json("get", "nodes")["items"]
        ready = [n for n in items if any(c["type"] == "Ready" and c["status"] == "True"
                                         for c in n.get("status", {}).get("conditions", []))]
        return len(ready) == len(self.nodes)

    def stop(self) -> None:
        try:
            proc = self._kwokctl("delete", "cluster", timeout=120)
            failure = proc.stderr.strip()[-500:] if proc.returncode != 0 else None
        except (OSError, subprocess.TimeoutExpired) as exc:
            failure = str(exc)
        if failure:
            _log(f"kwokctl delete cluster {self.name} failed ({failure}); killing its processes")
        kill_cluster_processes(self.cluster_dir)
        shutil.rmtree(self.cluster_dir, ignore_errors=True)
        (self.workdir / f"{self.name}.merged").unlink(missing_ok=True)


def _first_per_component_first(extra_args: list[str]) -> list[str]:
    """kwokctl v0.8.0 indexes its per-component patches by the position of the component's first
    --extra-args flag, so that position must equal the component's order of first appearance:
    list one arg of every component first, then the rest."""
    firsts: dict[str, str] = {}
    for e in extra_args:
        firsts.setdefault(e.split("=", 1)[0], e)
    return list(firsts.values()) + [e for e in extra_args if e not in firsts.values()]


def kill_cluster_processes(cluster_dir: Path) -> None:
    for pidfile in (cluster_dir / "pids").glob("*.pid"):
        try:
            pid = int(pidfile.read_text().strip())
            os.kill(pid, signal.SIGKILL)
        except (ValueError, ProcessLookupError, PermissionError, FileNotFoundError):
            pass


def cleanup_leftovers(workdir: Path, bin_dir: Path) -> list[str]:
    """Delete clusters of earlier test sessions whose pytest process is gone (a crashed run)."""
    removed = []
    clusters = workdir / "clusters"
    if not clusters.exists():
        return removed
    for d in clusters.iterdir():
        if not d.name.startswith(CLUSTER_PREFIX):
            continue
        try:
            owner = int(d.name[len(CLUSTER_PREFIX):].split("-")[0])
        except ValueError:
            owner = -1
        if owner > 0 and _pid_alive(owner):
            continue  # another live test session owns it
        KubeCluster(d.name, workdir, bin_dir).stop()
        removed.append(d.name)
    return removed


@pytest.fixture(scope="session")
def kube() -> Iterator[KubeCluster]:
    """A started control plane with six fake 8-GPU nodes (four H100, two L40S), torn down at the end."""
    bin_dir = build_binaries()
    workdir = CACHE / "kwok"
    for name in cleanup_leftovers(workdir, bin_dir):
        _log(f"removed leftover cluster {name} from a crashed run")
    cluster = KubeCluster(f"{CLUSTER_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:4]}", workdir, bin_dir)
    cluster.start()
    try:
        yield cluster
    finally:
        _log(f"deleting cluster {cluster.name}")
        cluster.stop()
