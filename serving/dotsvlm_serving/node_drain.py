"""Drain this Ray node before its pod stops: the pool pods' `preStop` hook (`dotsvlm drain-node`).

Kubernetes stops a pod (a rollout, a scale-down, `kubectl drain`) by running its preStop hook and then
sending SIGTERM; whatever still runs when the pod's `terminationGracePeriodSeconds` are up is killed.
A Ray worker killed at once loses its Serve replicas' work. So the hook first asks Ray's GCS to drain
the node (`DrainNode`, reason PREEMPTION: always accepted, with the deadline by which the pod will be
killed). Ray then places no new work on the node, and Ray Serve migrates the node's replicas: it
starts a replacement elsewhere, and stops the old replica gracefully (Serve waits for its ongoing
requests; the LLM replica finishes its running requests, hands back what it cannot finish to the
tensor queue and leaves it) once the replacement runs, or at the latest its graceful-shutdown timeout
before the deadline. When the node has no work left the raylet exits by itself; the hook waits for
that (or the deadline) and returns. SIGTERM then reaches `ray start --block`, which stops what is left.

Everything here is best effort: a drain that cannot be asked for (the GCS is gone) must not keep a pod
from stopping, so every failure is logged and the hook returns.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass

log = logging.getLogger("dotsvlm.drain")

# The pod's IP (Kubernetes' downward API): a pool pod is one Ray node, registered under this address.
POD_IP_ENV = "DOTSVLM_POD_IP"
# The head's GCS address, as the pool pod's `ray start --address` has it.
RAY_ADDRESS_ENV = "RAY_ADDRESS"


@dataclass(frozen=True)
class DrainResult:
    """How the drain ended: `drained` when the node finished (its raylet left), else why not."""

    drained: bool
    node_id: str | None
    message: str
    seconds: float


def _gcs_client(address: str):
    from ray._raylet import GcsClient

    return GcsClient(address=address)


def _nodes(gcs) -> dict[str, object]:
    """Every node the GCS knows (alive or dead), by hex id."""
    infos = gcs.get_all_node_info(timeout=10)
    return {(k.hex() if hasattr(k, "hex") else str(k)): v for k, v in infos.items()}


def find_node_id(gcs, node_ip: str) -> str | None:
    """The alive, non-head node registered under `node_ip` (a pool pod's IP is its Ray node's)."""
    from ray.core.generated.gcs_pb2 import GcsNodeInfo

    for node_id, info in _nodes(gcs).items():
        if (info.node_manager_address == node_ip and info.state == GcsNodeInfo.GcsNodeState.ALIVE
                and not info.is_head_node):
            return node_id
    return None


def _alive(gcs, node_id: str) -> bool:
    from ray.core.generated.gcs_pb2 import GcsNodeInfo

    info = _nodes(gcs).get(node_id)
    return info is not None and info.state == GcsNodeInfo.GcsNodeState.ALIVE


def drain_node(address: str, *, deadline_s: float, node_id: str | None = None, node_ip: str | None = None,
               poll_s: float = 1.0, reason: str = "the pod is stopping") -> DrainResult:
    """Mark the node draining with a deadline `deadline_s` from now and wait until it has left the
    cluster (its raylet exits when no work is left) or the deadline passes. Finds the node by
    `node_ip` when `node_id` is not given."""
    from ray.core.generated import autoscaler_pb2

    started = time.monotonic()

    def result(drained: bool, node: str | None, message: str) -> DrainResult:
        return DrainResult(drained, node, message, round(time.monotonic() - started, 1))

    try:
        gcs = _gcs_client(address)
        if node_id is None:
            node_id = find_node_id(gcs, node_ip or "")
            if node_id is None:
                return result(False, None, f"no alive Ray worker node at {node_ip} (already gone?): nothing to drain")
        deadline_ms = int(time.time() * 1000 + deadline_s * 1000)
        accepted, rejection = gcs.drain_node(node_id, autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
                                             f"dotsvlm: {reason}", deadline_ms)
        if not accepted:
            return result(False, node_id, f"Ray did not accept the drain: {rejection}")
        log.info("node %s draining (deadline in %.0f s): its Serve replicas move to other nodes", node_id, deadline_s)
        end = started + deadline_s
        while time.monotonic() < end:
            if not _alive(gcs, node_id):
                return result(True, node_id, "the node finished draining (its raylet left the cluster)")
            time.sleep(poll_s)
        return result(False, node_id, f"the node was still busy when the deadline ({deadline_s:.0f} s) passed")
    except Exception as exc:  # noqa: BLE001 - best effort: the pod must stop anyway
        return result(False, node_id, f"drain failed: {type(exc).__name__}: {exc}")


def _default_node_ip() -> str:
    ip = os.environ.get(POD_IP_ENV)
    if ip:
        return ip
    from ray._private.services import get_node_ip_address

    return get_node_ip_address()


def run_before_deadline(work, timeout_s: float) -> list:
    """`work()`'s result in a one-item list, or [] when it has not returned within `timeout_s`: Ray's client
    retries an unreachable GCS for longer than a short deadline, and a stop hook's deadline must win."""
    done: list = []
    worker = threading.Thread(target=lambda: done.append(work()), daemon=True)
    worker.start()
    worker.join(timeout=timeout_s)
    return done


def stop_hook_address(args: argparse.Namespace, command: str) -> str | None:
    """Both stop hooks (drain-node, drain-head) log to stderr under their name and need the GCS address:
    --address, else $RAY_ADDRESS; None (and why, said) when neither is given."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format=f"%(asctime)s {command} %(message)s")
    address = args.address or os.environ.get(RAY_ADDRESS_ENV)
    if not address:
        print(f"dotsvlm {command}: give --address host:port (the Ray head's GCS) or set RAY_ADDRESS", file=sys.stderr)
    return address or None


def cli_main(args: argparse.Namespace) -> int:
    """`dotsvlm drain-node`: always exits 0 (a failed drain is logged; the pod stops anyway)."""
    address = stop_hook_address(args, "drain-node")
    if not address:
        return 0
    node_ip = None if args.node_id else (args.node_ip or _default_node_ip())
    done = run_before_deadline(lambda: drain_node(
        address, deadline_s=args.deadline_seconds, node_id=args.node_id, node_ip=node_ip,
        reason=args.reason or f"pod {socket.gethostname()} is stopping"), args.deadline_seconds + 1)
    if not done:
        log.warning("gave up at the deadline (%.0f s): the Ray head did not answer", args.deadline_seconds)
        return 0
    res = done[0]
    (log.info if res.drained else log.warning)("%s after %.1f s (node %s)", res.message, res.seconds, res.node_id)
    return 0
