"""Stopping a Ray head that a test started with `ray start --head --block` in its own process group."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path


def pids_using(path: Path) -> list[int]:
    """Processes whose command line names `path` (our own Ray's temp dir, unique per test)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if str(path).encode() in (d / "cmdline").read_bytes():
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


def stop_ray_head(proc: subprocess.Popen, temp_dir: Path) -> None:
    """Stop every process of the head and remove its temp dir.

    Ray's own processes stop at SIGTERM; `ray start --block` then asks the (stopped) GCS to drain the node
    and gives up only after 30 s (with Serve replicas on the node, its drain takes those 30 s too). Nothing
    here needs that drain: a few seconds, then SIGKILL for what is left, and by pid for Ray's processes in
    sessions of their own (those that run from our temp dir, ours only)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=5)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for pid in pids_using(temp_dir):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    shutil.rmtree(temp_dir, ignore_errors=True)
