"""`dotsvlm check-redis` (the head pod's init container) and `dotsvlm cleanup-redis` (the operator's Job on
deletion) against a real Redis (Debian's package): the check passes with the right password and says in its
last line what to fix otherwise; the cleanup removes this deployment's keys and no other's. A Redis error is
said plainly, not as Ray's abort and stack trace."""

from __future__ import annotations

import os
import socket
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


def _dotsvlm(command: str, address: str, password: str, namespace: str = "") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RAY_REDIS_ADDRESS": address, "RAY_external_storage_namespace": namespace,
           "DOTSVLM_REDIS_PASSWORD": password, "RAY_redis_db_connect_retries": "3"}
    return subprocess.run([sys.executable, "-m", "dotsvlm_operator.cli", command], env=env,
                          capture_output=True, text=True, timeout=300)


def _cleanup(address: str, namespace: str, password: str) -> subprocess.CompletedProcess[str]:
    return _dotsvlm("cleanup-redis", address, password, namespace)


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


def test_check_passes_with_the_right_password_and_names_what_to_fix_otherwise(redis: RedisServer) -> None:
    ok = _dotsvlm("check-redis", redis.address, "s3cret")
    assert ok.returncode == 0 and "answers" in ok.stdout, ok.stderr
    for password, says, fix in [("wrong", "WRONGPASS", "passwordSecretRef"),
                                ("", "cluster info", "does Redis need a password")]:
        bad = _dotsvlm("check-redis", redis.address, password)
        last = bad.stderr.strip().splitlines()[-1]  # what the pod's termination message, and the status, quote
        assert bad.returncode == 1 and last.startswith("dotsvlm check-redis: error: the Ray head cannot use Redis")
        assert says in last and fix in last, bad.stderr


def test_check_of_an_address_where_nothing_listens_names_the_address_field() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{s.getsockname()[1]}"
    bad = _dotsvlm("check-redis", closed, "")
    assert bad.returncode == 1 and "redisAddress" in bad.stderr.strip().splitlines()[-1], bad.stderr
