"""The cluster fixture's crash recovery, without starting a cluster."""

from __future__ import annotations

import subprocess
from pathlib import Path

from support.cluster import CLUSTER_PREFIX, _pid_alive, cleanup_leftovers


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_leftover_cluster_of_dead_session_is_deleted_and_its_processes_killed(tmp_path: Path) -> None:
    orphan = subprocess.Popen(["sleep", "600"])  # stands in for an etcd left by a crashed run
    try:
        leftover = tmp_path / "clusters" / f"{CLUSTER_PREFIX}{_dead_pid()}-abcd"
        (leftover / "pids").mkdir(parents=True)
        (leftover / "pids" / "etcd.pid").write_text(str(orphan.pid))
        removed = cleanup_leftovers(tmp_path, bin_dir=Path("/nonexistent"))
        assert removed == [leftover.name]
        assert not leftover.exists()
        orphan.wait(timeout=10)
        assert not _pid_alive(orphan.pid)
    finally:
        orphan.kill()
        orphan.wait()


def test_cluster_of_live_session_is_left_alone(tmp_path: Path) -> None:
    import os

    live = tmp_path / "clusters" / f"{CLUSTER_PREFIX}{os.getpid()}-beef"
    live.mkdir(parents=True)
    other = tmp_path / "clusters" / "someone-elses-cluster"
    other.mkdir()
    assert cleanup_leftovers(tmp_path, bin_dir=Path("/nonexistent")) == []
    assert live.exists() and other.exists()
