"""A deployment's Ray state in the external Redis of `spec.head.gcsFaultTolerance`.

- `dotsvlm check-redis`: the head pod's init container. `ray start --head` reads Redis first, and on a
  wrong password or an unreachable address Ray aborts with a stack trace that buries the reason (and fills
  the pod's termination message). This check makes the same first read and, when it fails, ends with one
  line that says what to fix; the operator's status quotes it (status.crash_summary).
- `dotsvlm cleanup-redis`: once the resource is deleted and its head has stopped, the operator runs it in
  a Job (as KubeRay does): Ray never removes its tables from Redis itself.

Both call Ray's own functions (they know its key layout and connection options) in a child process,
because Ray aborts the process on a Redis error instead of raising.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from dataclasses import dataclass

# The head pod's Redis password (from the user's Secret): `ray start --redis-password` and these commands read it.
REDIS_PASSWORD_ENV = "DOTSVLM_REDIS_PASSWORD"
# Where the head's Redis settings are (the same environment variables the head pod has).
REDIS_ADDRESS_ENV = "RAY_REDIS_ADDRESS"
STORAGE_NAMESPACE_ENV = "RAY_external_storage_namespace"

# Ray retries an unreachable Redis for about a minute before it gives up.
CHILD_TIMEOUT_S = 180.0

# argv: host, port, namespace; stdin: the password.
_CLEANUP = """
import sys
from ray._private.gcs_utils import cleanup_redis_storage
host, port, namespace, password = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.stdin.read()
sys.exit(0 if cleanup_redis_storage(host, port, password, False, namespace) else 3)
"""
# What `ray start --head` reads first (ray._private.node: the session name), nothing written.
_CHECK = """
import sys
from ray._private.services import serialize_config
from ray._raylet import get_session_key_from_storage
host, port, password = sys.argv[1], int(sys.argv[2]), sys.stdin.read()
get_session_key_from_storage(host, port, "", password, False, serialize_config({}), b"session_name")
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
        return f"{reason}{hint}"
    if returncode == 3:
        return "Ray reported that the keys could not be deleted"
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    return f"exited with code {returncode}: {lines[-1] if lines else 'no output'}"


def _run(code: str, args: list[str], password: str, timeout_s: float) -> subprocess.CompletedProcess[str] | None:
    try:
        return subprocess.run([sys.executable, "-c", code, *args], input=password, capture_output=True, text=True,
                              timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return None


def check(address: str, password: str, timeout_s: float = CHILD_TIMEOUT_S) -> Outcome:
    host, port = split_address(address)
    done = _run(_CHECK, [host, str(port)], password, timeout_s)
    if done is None:
        return Outcome(False, f"Redis at {address} did not answer within {timeout_s:.0f} s")
    if done.returncode == 0:
        return Outcome(True, f"Redis at {address} answers: the Ray head can keep its state there")
    return Outcome(False, f"the Ray head cannot use Redis at {address}: {explain_failure(done.returncode, done.stderr)}")


def cleanup(address: str, namespace: str, password: str, timeout_s: float = CHILD_TIMEOUT_S) -> Outcome:
    host, port = split_address(address)
    done = _run(_CLEANUP, [host, str(port), namespace], password, timeout_s)
    if done is None:
        return Outcome(False, f"Redis at {address} did not answer within {timeout_s:.0f} s")
    if done.returncode == 0:
        return Outcome(True, f"removed the Ray state of storage namespace {namespace!r} from Redis at {address}")
    return Outcome(False, f"could not remove the Ray state of storage namespace {namespace!r} from Redis at "
                          f"{address}: {explain_failure(done.returncode, done.stderr)}")


def _report(command: str, out: Outcome) -> int:
    # The last line is what the pod's termination message (and so the operator's status) quotes.
    print(f"dotsvlm {command}: {out.message}" if out.ok else f"dotsvlm {command}: error: {out.message}",
          file=sys.stdout if out.ok else sys.stderr, flush=True)
    return 0 if out.ok else 1


def _address(args: argparse.Namespace, command: str) -> str | None:
    address = args.address or os.environ.get(REDIS_ADDRESS_ENV, "")
    if not address:
        print(f"dotsvlm {command}: error: give --address (or set ${REDIS_ADDRESS_ENV}, as the Ray head pod has it)",
              file=sys.stderr)
        return None
    try:
        split_address(address)
    except ValueError as exc:
        print(f"dotsvlm {command}: error: {exc}", file=sys.stderr)
        return None
    return address


def check_main(args: argparse.Namespace) -> int:
    address = _address(args, "check-redis")
    if address is None:
        return 2
    return _report("check-redis", check(address, os.environ.get(REDIS_PASSWORD_ENV, "")))


def cleanup_main(args: argparse.Namespace) -> int:
    address = _address(args, "cleanup-redis")
    if address is None:
        return 2
    namespace = args.storage_namespace or os.environ.get(STORAGE_NAMESPACE_ENV, "")
    if not namespace:
        print(f"dotsvlm cleanup-redis: error: give --storage-namespace (or set ${STORAGE_NAMESPACE_ENV}, as the "
              "Ray head pod has it)", file=sys.stderr)
        return 2
    return _report("cleanup-redis", cleanup(address, namespace, os.environ.get(REDIS_PASSWORD_ENV, "")))
