"""A Redis server for the tests of Ray's GCS fault tolerance (the external store a restarted head reads).

No Redis is installed on the test machine and no container registry is reachable, so the server comes from
Debian's own packages: `apt-get download` of redis-tools (the server binary; Debian's redis-server package is
only its service files) and the two libraries it links, unpacked with `dpkg-deb -x` into the cache folder
(no install: Debian's redis-server package would start a server on 6379, Ray's GCS port). Reused from there
on later runs.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from support.ports import free_port

CACHE = Path(os.environ.get("DOTSVLM_CACHE", Path.home() / ".cache" / "dotsvlm")) / "redis"
PACKAGES = ("redis-tools", "libjemalloc2", "liblzf1")


def _unpacked() -> tuple[Path, Path]:
    return CACHE / "usr" / "bin" / "redis-server", CACHE / "usr" / "lib" / "x86_64-linux-gnu"


def ensure_redis_server() -> tuple[Path, dict[str, str]]:
    """The redis-server binary and the environment it runs with (a system one if installed)."""
    system = shutil.which("redis-server")
    if system:
        return Path(system), {}
    binary, libs = _unpacked()
    if not binary.exists():
        print(f"\n[tests] fetching Redis from Debian's archive ({' '.join(PACKAGES)}) into {CACHE} ...", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            got = subprocess.run(["apt-get", "download", *PACKAGES], cwd=tmp, capture_output=True, text=True)
            if got.returncode != 0:  # no package lists yet on a fresh machine
                subprocess.run(["apt-get", "update", "-q"], capture_output=True, check=False)
                got = subprocess.run(["apt-get", "download", *PACKAGES], cwd=tmp, capture_output=True, text=True)
            debs = sorted(Path(tmp).glob("*.deb"))
            if len(debs) < len(PACKAGES):
                raise RuntimeError(f"could not download Redis from Debian's archive ({' '.join(PACKAGES)}): "
                                   f"{got.stderr.strip()[-500:]}")
            staging = Path(tmp) / "root"
            for deb in debs:
                subprocess.run(["dpkg-deb", "-x", str(deb), str(staging)], check=True)
            # The server is the same binary as redis-check-rdb: Debian links it under the other name.
            (staging / "usr" / "bin" / "redis-server").symlink_to("redis-check-rdb")
            CACHE.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(CACHE, ignore_errors=True)
            shutil.move(str(staging), CACHE)
    return binary, {"LD_LIBRARY_PATH": str(libs)}


class RedisServer:
    """A throwaway Redis on a free local port, no persistence; `stop()` ends it."""

    def __init__(self, password: str | None = None) -> None:
        binary, env = ensure_redis_server()
        self.password = password
        self.port = free_port()
        args = [str(binary), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        if password:
            args += ["--requirepass", password]
        self.proc = subprocess.Popen(args, env={**os.environ, **env}, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"redis-server did not start on port {self.port}")
                time.sleep(0.1)
        self.address = f"127.0.0.1:{self.port}"

    def keys(self, pattern: str) -> list[str]:
        """The keys matching `pattern` (redis-cli, from the same package as the server)."""
        binary, env = ensure_redis_server()
        args = [str(binary.parent / "redis-cli"), "-p", str(self.port), "--no-auth-warning"]
        if self.password:
            args += ["-a", self.password]
        out = subprocess.run([*args, "--scan", "--pattern", pattern], env={**os.environ, **env}, capture_output=True,
                             text=True, check=True, timeout=30)
        return out.stdout.split()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
