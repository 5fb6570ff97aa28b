"""`dotsvlm cleanup-redis` (the operator's Job on deletion) against a real Redis (Debian's package): it
removes this deployment's keys and no other's; a wrong password is said plainly, not as Ray's abort."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from support.redis_server import RedisServer

pytestmark = [pytest.mark.slow]


@pytest.fixture
def redis():
    server = RedisServer(password="s3cret")
    try:
        yield server
    finally:
        server.stop()


def _cleanup(address: str, namespace: str, password: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RAY_REDIS_ADDRESS": address, "RAY_external_storage_namespace": namespace,
           "DOTSVLM_REDIS_PASSWORD": password}
    return subprocess.run([sys.executable, "-m", "dotsvlm_operator.cli", "cleanup-redis"], env=env,
                          capture_output=True, text=True, timeout=300)


def _seed(redis: RedisServer, *keys: str) -> None:
    from support.redis_server import ensure_redis_server

    binary, env = ensure_redis_server()
    for key in keys:
        subprocess.run([str(binary.parent / "redis-cli"), "-p", str(redis.port), "-a", redis.password,
                        "--no-auth-warning", "hset", key, "f", "v"], env={**os.environ, **env}, check=True,
                       capture_output=True)


def test_cleanup_removes_this_deployments_keys_only(redis: RedisServer) -> None:
    _seed(redis, "RAYuid-a@NODE", "RAYuid-a@ACTOR", "RAYuid-b@NODE")
    done = _cleanup(redis.address, "uid-a", "s3cret")
    assert done.returncode == 0, done.stderr
    assert "removed the Ray state of storage namespace 'uid-a'" in done.stdout
    assert redis.keys("RAY*") == ["RAYuid-b@NODE"]


def test_a_wrong_password_is_said_plainly_and_nothing_is_removed(redis: RedisServer) -> None:
    _seed(redis, "RAYuid-a@NODE")
    done = _cleanup(redis.address, "uid-a", "wrong")
    assert done.returncode == 1
    assert "WRONGPASS" in done.stderr and "passwordSecretRef" in done.stderr, done.stderr
    assert "StackTrace" not in done.stderr
    assert redis.keys("RAY*") == ["RAYuid-a@NODE"]
