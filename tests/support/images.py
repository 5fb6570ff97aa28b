"""Build and run the container images (images/*.Dockerfile) on a machine without a registry or
privileged containers.

- A private Docker engine per test session: `dockerd` with no iptables and no bridge (containers use
  `--network host`), its socket and exec root under /tmp, at a lower CPU priority (nice 10); stopped,
  with its containers, at the end. Storage driver overlay2 (copy-on-write; works on these machines'
  ext4), or vfs where overlay2 cannot start (vfs copies the whole filesystem for every layer and
  container: the serving image's ~6 GB many times over). Its data root persists in
  ~/.cache/dotsvlm/docker/<driver>/ (a lock lets one session at a time use it), so unchanged images
  are not built again.
- The base image is made locally: `debootstrap --variant=minbase` of Debian bookworm with python3 and
  python3-venv, cached as a tarball under ~/.cache/dotsvlm/images/, `docker import`ed per session.
- Python packages come from a wheelhouse downloaded on the host (cached under
  ~/.cache/dotsvlm/wheelhouse/, keyed by pyproject.toml), served over HTTP on 127.0.0.1 during the
  build (`--network host`, `PIP_FIND_LINKS`): the registry's TLS certificate is not trusted inside a
  container, and no wheel lands in an image layer.
Missing Debian packages (docker.io, debootstrap) are installed with apt-get when running as root.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import http.server
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from support.cluster import CACHE, REPO, _log, wait_for
from support.ports import free_port

BASE_TAG = "dotsvlm-base:bookworm"
DEBIAN_MIRROR = os.environ.get("DOTSVLM_DEBIAN_MIRROR", "http://deb.debian.org/debian")


def ensure_debian_packages(binaries: dict[str, str]) -> None:
    """`binaries`: program -> Debian package. Installs the missing packages (root only)."""
    missing = sorted({pkg for prog, pkg in binaries.items() if not shutil.which(prog)})
    if not missing:
        return
    if os.geteuid() != 0:
        pytest.skip(f"needs the Debian packages {missing} (install them, or run as root to let the tests do it)")
    _log(f"installing {missing} with apt-get ...")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, capture_output=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], check=True, env=env,
                   capture_output=True)


# Storage drivers in the order tried, each with its own data root under the cache (vfs keeps the name
# it had when it was the only one).
STORAGE_DRIVERS = {"overlay2": "overlay2", "vfs": "data"}


@dataclass
class DockerEngine:
    root: Path  # socket, exec root, log (per session)
    cache: Path  # one data root per storage driver (images and build cache, kept between sessions)
    proc: subprocess.Popen | None = None
    driver: str = ""
    _lock: Any = None

    @property
    def data_root(self) -> Path:
        return self.cache / STORAGE_DRIVERS[self.driver]

    @property
    def host(self) -> str:
        return f"unix://{self.root / 'docker.sock'}"

    @property
    def env(self) -> dict[str, str]:
        return dict(os.environ, DOCKER_HOST=self.host, DOCKER_BUILDKIT="0")

    def start(self) -> "DockerEngine":
        self.root.mkdir(parents=True, exist_ok=True)
        self.cache.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.cache / "data-root.lock", "w")
        deadline = time.monotonic() + 1800
        while True:
            try:
                fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    pytest.fail(f"another test session has held {self.cache} for 30 minutes")
                time.sleep(2)
        for driver in STORAGE_DRIVERS:
            self.driver = driver
            self.data_root.mkdir(parents=True, exist_ok=True)
            log = open(self.root / "dockerd.log", "ab")
            # At a lower priority (nice 10): image builds are long and CPU-heavy on a shared machine; the
            # engine's containers inherit it.
            self.proc = subprocess.Popen(
                ["nice", "-n", "10", "dockerd", f"--storage-driver={driver}", "--iptables=false", "--ip6tables=false",
                 "--bridge=none", f"--data-root={self.data_root}", f"--exec-root={self.root / 'exec'}",
                 f"-H={self.host}", f"--pidfile={self.root / 'docker.pid'}"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            log.close()
            wait_for(lambda: self.docker("info", check=False).returncode == 0 or self._died(), 60, "dockerd to answer")
            if not self._died():
                _log(f"private Docker engine up with the {driver} storage driver ({self.data_root})")
                return self
            _log(f"dockerd did not start with the {driver} storage driver")
        raise RuntimeError(f"dockerd exited:\n{(self.root / 'dockerd.log').read_text()[-3000:]}")

    def _died(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def stop(self) -> None:
        if self.proc is None:
            return
        if not self._died():
            ids = self.docker("ps", "-aq", check=False).stdout.split()
            if ids:
                self.docker("rm", "-f", *ids, check=False, timeout=300)
            if self.docker("images", "-q", "-f", "dangling=true", check=False).stdout.strip():
                self.docker("image", "prune", "-f", check=False, timeout=300)  # superseded builds
        if not self._died():
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        self.proc = None
        _unmount_under(self.root)  # dockerd leaves its network namespace mount behind
        _unmount_under(self.data_root)  # and, when killed, its containers' overlay mounts
        shutil.rmtree(self.root, ignore_errors=True)
        if self._lock is not None:
            self._lock.close()  # releases the flock
            self._lock = None

    def docker(self, *args: str, check: bool = True, timeout: float = 600,
               input: str | None = None) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(["docker", *args], env=self.env, capture_output=True, text=True, timeout=timeout,
                              input=input)
        if check and proc.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}{proc.stdout[-2000:]}")
        return proc


def _unmount_under(path: Path) -> None:
    """debootstrap mounts /proc (and more) inside the new root; a failed run can leave them mounted."""
    mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    for mount in sorted((m for m in mounts if m.startswith(f"{path}/")), reverse=True):
        subprocess.run(["umount", "-l", mount], capture_output=True)


def base_rootfs_tarball() -> Path:
    """Debian bookworm minbase with python3 and python3-venv, as a tarball (built once, ~1 min)."""
    out = CACHE / "images" / "base-bookworm-python3.tar"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    rootfs = out.parent / "rootfs.tmp"
    _unmount_under(rootfs)
    shutil.rmtree(rootfs, ignore_errors=True)
    _log(f"debootstrap of Debian bookworm (minbase, python3) from {DEBIAN_MIRROR} ...")
    t0 = time.monotonic()
    subprocess.run(["debootstrap", "--variant=minbase", "--include=python3,python3-venv", "bookworm", str(rootfs),
                    DEBIAN_MIRROR], check=True, capture_output=True, timeout=1200)
    # No package lists or caches in the image.
    for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for p in (rootfs / junk).glob("*"):
            if p.is_file():
                p.unlink()
    subprocess.run(["tar", "-C", str(rootfs), "-cf", f"{out}.tmp", "."], check=True)
    os.replace(f"{out}.tmp", out)
    _unmount_under(rootfs)
    shutil.rmtree(rootfs, ignore_errors=True)
    _log(f"base rootfs ready in {time.monotonic() - t0:.0f}s ({out.stat().st_size / 1e6:.0f} MB)")
    return out


def import_base_image(engine: DockerEngine) -> str:
    if engine.docker("image", "inspect", BASE_TAG, check=False).returncode != 0:
        engine.docker("import", "--change", 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin',
                      "--change", 'CMD ["/bin/bash"]', str(base_rootfs_tarball()), BASE_TAG)
    return BASE_TAG


def wheelhouse(extra: str) -> Path:
    """Every wheel `dotsvlm[extra]` needs (and the build backend), downloaded once per set of requirements."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    wanted = [project["build-system"]["requires"], project["project"]["dependencies"],
              project["project"]["optional-dependencies"][extra], project["project"]["requires-python"]]
    key = hashlib.sha256(json.dumps(wanted).encode()).hexdigest()[:12]
    out = CACHE / "wheelhouse" / f"{extra}-{key}"
    if (out / ".complete").exists():
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    _log(f"downloading the wheelhouse for dotsvlm[{extra}] into {out} ...")
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "-q", "-d", str(out),
                    "--only-binary=:all:", "setuptools>=69", "wheel", "pip"], check=True, timeout=1800)
    subprocess.run([sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "-q", "-d", str(out),
                    f"{REPO}[{extra}]"], check=True, timeout=3600)
    for sdist in out.glob("dotsvlm-*"):
        sdist.unlink()
    (out / ".complete").write_text("")
    size = sum(p.stat().st_size for p in out.iterdir()) / 1e6
    _log(f"wheelhouse dotsvlm[{extra}] ready in {time.monotonic() - t0:.0f}s ({size:.0f} MB)")
    return out


@functools.cache
def _quiet_handler(directory: str):
    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=directory, **kw)

        def log_message(self, *a) -> None:
            pass
    return Handler


# The wheelhouse's URL is a build argument, part of Docker's cache key: a fixed port keeps cached layers
# valid between sessions (a random one is used only when this one is taken).
WHEELHOUSE_PORT = 38471


class served_folder:
    """Serve a folder over HTTP on 127.0.0.1 while the `with` block runs (pip's --find-links)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        handler = _quiet_handler(str(folder))
        try:
            self.server = http.server.ThreadingHTTPServer(("127.0.0.1", WHEELHOUSE_PORT), handler)
        except OSError:
            self.server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
        self.port = self.server.server_address[1]

    def __enter__(self) -> str:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.port}/"

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def build_image(engine: DockerEngine, dockerfile: str, tag: str, extra: str) -> float:
    """Build images/<dockerfile> FROM the local base with the cached wheelhouse; returns the seconds it took."""
    base = import_base_image(engine)
    wheels = wheelhouse(extra)
    t0 = time.monotonic()
    with served_folder(wheels) as url:
        engine.docker("build", "--network", "host", "--build-arg", f"BASE_IMAGE={base}",
                      "--build-arg", f"PIP_FIND_LINKS={url}", "-f", str(REPO / "images" / dockerfile), "-t", tag,
                      str(REPO), timeout=3600)
    seconds = time.monotonic() - t0
    _log(f"built {tag} in {seconds:.0f}s")
    return seconds


@pytest.fixture(scope="session")
def docker_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DockerEngine]:
    """A private, unprivileged Docker engine for this test session, with the local base image."""
    ensure_debian_packages({"dockerd": "docker.io", "docker": "docker.io", "debootstrap": "debootstrap"})
    engine = DockerEngine(Path(f"/tmp/dotsvlm-docker-{os.getpid()}"), CACHE / "docker").start()
    try:
        yield engine
    finally:
        engine.stop()
