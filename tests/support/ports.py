"""Ports for the servers the tests start (Serve proxies, Ray heads, etcd, the API server, Prometheus, Redis)."""

from __future__ import annotations

import random
import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A free port between Ray's worker ports (10002-19999) and the kernel's ephemeral range (32768 up).

    A port is picked here and bound later, by another process: one from the ephemeral range (what
    `bind(0)` returns) can be taken meanwhile by any outgoing connection or by a Ray process's gRPC
    server (seen in CI: a Serve proxy's port taken while the cluster started)."""
    for port in random.sample(range(20000, 32768), 200):
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port between 20000 and 32767")
