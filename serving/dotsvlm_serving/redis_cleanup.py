"""Remove a deleted deployment's Ray state from the external Redis (`dotsvlm cleanup-redis`).

With GCS fault tolerance (`spec.head.gcsFaultTolerance`) the Ray head keeps its tables in Redis under a
storage namespace. Nothing in Ray removes them when the cluster goes for good, so the operator runs this
command in a Job (the head's image and Redis settings) once the resource is deleted and its head pod has
stopped, as KubeRay does. The deletion itself is Ray's own (`ray._private.gcs_utils.cleanup_redis_storage`,
which knows its key layout); it runs in a child process because Ray aborts the process on a Redis error (a
wrong password, an unreachable address) instead of raising, and this command must say what went wrong.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from dataclasses import dataclass

# The head pod's Redis password (from the user's Secret): `ray start --redis-password` and this command read it.
REDIS_PASSWORD_ENV = "DOTSVLM_REDIS_PASSWORD"
# Where the head's Redis settings are (the same environment variables the head pod has).
REDIS_ADDRESS_ENV = "RAY_REDIS_ADDRESS"
STORAGE_NAMESPACE_ENV = "RAY_external_storage_namespace"

# Ray retries an unreachable Redis for about a minute before it gives up.
CHILD_TIMEOUT_S = 180.0

_CHILD = """
import sys
from ray._private.gcs_utils import cleanup_redis_storage
host, port, namespace, password = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.stdin.read()
sys.exit(0 if cleanup_redis_storage(host, port, password, False, namespace) else 3)
"""
# Ray's fatal log line: "... Check failed: context.Connect(...) Status not OK: RedisError: WRONGPASS ...".
_RAY_STATUS = re.compile(r"Status not OK: (.+?)(?:\s*Failed to connect to Redis\.?)?$", re.M)


@dataclass(frozen=True)
class Outcome:
    ok: bool
    message: str


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"the Redis address {address!r} is not host:port (e.g. redis.redis.svc:6379)")
    return host, int(port)


def explain_failure(returncode: int, stderr: str) -> str:
    """A person's reading of the child's failure: Ray's own Redis error where it printed one."""
    m = None
    for m in _RAY_STATUS.finditer(stderr):
        pass
    if m is not None:
        reason = m[1].strip().rstrip(".")
        hint = ""
        if "WRONGPASS" in reason or "NOAUTH" in reason or "invalid password" in reason.lower():
            hint = " (check the Secret named by spec.head.gcsFaultTolerance.passwordSecretRef)"
        elif "cluster info" in reason:  # what Ray says when a Redis with a password was given none
            hint = " (does Redis need a password? set spec.head.gcsFaultTolerance.passwordSecretRef)"
        elif "Could not establish connection" in reason:
            hint = " (check spec.head.gcsFaultTolerance.redisAddress, and that Redis is up and reachable from this namespace)"
        return f"Redis refused: {reason}{hint}"
    if returncode == 3:
        return "Ray reported that the keys could not be deleted"
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    return f"the cleanup exited with code {returncode}: {lines[-1] if lines else 'no output'}"


def cleanup(address: str, namespace: str, password: str, timeout_s: float = CHILD_TIMEOUT_S) -> Outcome:
    host, port = split_address(address)
    try:
        done = subprocess.run([sys.executable, "-c", _CHILD, host, str(port), namespace], input=password,
                              capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return Outcome(False, f"Redis at {address} did not answer within {timeout_s:.0f} s")
    if done.returncode == 0:
        return Outcome(True, f"removed the Ray state of storage namespace {namespace!r} from Redis at {address}")
    return Outcome(False, f"could not remove the Ray state of storage namespace {namespace!r} from Redis at "
                          f"{address}: {explain_failure(done.returncode, done.stderr)}")


def cli_main(args: argparse.Namespace) -> int:
    address = args.address or os.environ.get(REDIS_ADDRESS_ENV, "")
    namespace = args.storage_namespace or os.environ.get(STORAGE_NAMESPACE_ENV, "")
    if not address or not namespace:
        print(f"dotsvlm cleanup-redis: error: give --address and --storage-namespace (or set ${REDIS_ADDRESS_ENV} "
              f"and ${STORAGE_NAMESPACE_ENV}, as the Ray head pod has them)", file=sys.stderr)
        return 2
    try:
        out = cleanup(address, namespace, os.environ.get(REDIS_PASSWORD_ENV, ""))
    except ValueError as exc:
        print(f"dotsvlm cleanup-redis: error: {exc}", file=sys.stderr)
        return 2
    print(f"dotsvlm cleanup-redis: {out.message}" if out.ok else f"dotsvlm cleanup-redis: error: {out.message}",
          file=sys.stdout if out.ok else sys.stderr, flush=True)
    return 0 if out.ok else 1
