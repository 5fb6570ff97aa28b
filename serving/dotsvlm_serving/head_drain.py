"""Drain the API before the Ray head's pod stops: the head pod's `preStop` hook (`dotsvlm drain-head`).

The Ingress and the TensorQueue run on the head, and without GCS fault tolerance every Ray node goes
when the head goes. So a head that stops (the last step of an image rollout, a head pod deleted or
evicted) would cut every request in flight. Instead the hook first asks every ingress replica to stop
admitting (a flag in Ray's internal KV, `DRAIN_KV_KEY`, with the time it holds until): a new request
gets 503 with `Retry-After` and a message saying the deployment is restarting its Ray head. The
requests already admitted (streams included) run to their end. Each ingress replica reports its open
requests and that it saw the flag (its backpressure report, `backpressure.REPORT_KV_PREFIX`); the hook
returns when every fresh report says draining with nothing open, or at the deadline. SIGTERM then
stops Ray.

Best effort, like `node_drain`: a drain that cannot be asked for (the GCS is gone, no application is
deployed) must not keep the pod from stopping; every failure is logged and the hook returns 0.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .deployments.backpressure import KV_NAMESPACE, REPORT_KV_PREFIX, REPORT_STALE_S
from .node_drain import run_before_deadline, stop_hook_address

log = logging.getLogger("dotsvlm.drain-head")

DRAIN_KV_KEY = "dotsvlm/head-drain"


@dataclass(frozen=True)
class HeadDrain:
    """The flag an ingress replica reads: refuse new requests until `until` (unix time), if the replica was
    already running when the drain began (`since`).

    With GCS fault tolerance (`spec.head.gcsFaultTolerance`) Ray's internal KV lives in Redis and outlives
    the head: the new head's ingress replicas read the flag of the drain that stopped the old one. They
    started after it began, so it is not theirs (the ingress runs on the head: one clock)."""

    until: float
    retry_after_s: int
    since: float | None = None  # None: a flag written before `since` existed, for every replica

    def active(self, now: float) -> bool:
        return now < self.until

    def applies_to(self, replica_started_at: float, now: float) -> bool:
        return self.active(now) and (self.since is None or replica_started_at < self.since)

    def message(self) -> str:
        return (f"this deployment is restarting its Ray head (a rollout or a head pod restart): the requests already "
                f"running finish, new ones are refused until it is back; retry in {self.retry_after_s} s")

    def to_json(self) -> bytes:
        return json.dumps({"until": self.until, "retry_after_s": self.retry_after_s, "since": self.since}).encode()

    @classmethod
    def from_json(cls, raw: bytes | None) -> "HeadDrain | None":
        if not raw:
            return None
        try:
            d = json.loads(raw)
            since = d.get("since")
            return cls(until=float(d["until"]), retry_after_s=int(d["retry_after_s"]),
                       since=None if since is None else float(since))
        except (ValueError, KeyError, TypeError):
            return None


def read_flag() -> HeadDrain | None:
    """The flag, from the ingress replica's own Ray connection."""
    from ray.experimental import internal_kv

    return HeadDrain.from_json(internal_kv._internal_kv_get(DRAIN_KV_KEY, namespace=KV_NAMESPACE))


@dataclass(frozen=True)
class DrainState:
    replicas: int  # ingress replicas with a fresh report
    draining: int  # of those, how many have seen the flag
    open_requests: int  # requests admitted and not answered yet, all replicas

    @property
    def done(self) -> bool:
        return self.draining == self.replicas and self.open_requests == 0


def drain_state(reports: list[dict[str, Any]], since: float, now: float) -> DrainState:
    """Over the fresh reports: a replica counts as draining only with a report written after the flag was set."""
    fresh = [r for r in reports if now - float(r.get("time", 0.0)) <= REPORT_STALE_S]
    draining = [r for r in fresh if r.get("head_draining") and float(r.get("time", 0.0)) >= since]
    return DrainState(len(fresh), len(draining), sum(int(r.get("open_requests", 0)) for r in fresh))


@dataclass(frozen=True)
class DrainResult:
    drained: bool
    message: str
    seconds: float
    open_requests: int


def _reports(gcs: Any) -> list[dict[str, Any]]:
    out = []
    for key in gcs.internal_kv_keys(REPORT_KV_PREFIX.encode(), KV_NAMESPACE.encode()):
        raw = gcs.internal_kv_get(key, KV_NAMESPACE.encode())
        try:
            out.append(json.loads(raw)) if raw else None
        except ValueError:
            continue
    return out


def drain_head(gcs: Any, *, deadline_s: float, retry_after_s: int, poll_s: float = 0.5,
               clock: Callable[[], float] = time.time, sleep: Callable[[float], None] = time.sleep) -> DrainResult:
    """Set the flag (held until the deadline, and only for the ingress replicas running now, so a later head
    never inherits it) and wait until every ingress replica has seen it and has nothing open, or the deadline."""
    started = clock()
    gcs.internal_kv_put(DRAIN_KV_KEY.encode(), HeadDrain(started + deadline_s, retry_after_s, started).to_json(), True,
                        KV_NAMESPACE.encode())
    log.info("new requests are refused (503, Retry-After %d s); waiting up to %.0f s for the open ones",
             retry_after_s, deadline_s)
    state = DrainState(0, 0, 0)
    while clock() - started < deadline_s:
        state = drain_state(_reports(gcs), started, clock())
        if state.replicas == 0:
            return DrainResult(True, "no ingress replica is reporting (no application deployed?): nothing to drain",
                               round(clock() - started, 1), 0)
        if state.done:
            return DrainResult(True, f"all {state.replicas} ingress replica(s) drained: no request open",
                               round(clock() - started, 1), 0)
        sleep(poll_s)
    return DrainResult(False, f"{state.open_requests} request(s) still open at the deadline ({deadline_s:.0f} s); "
                              f"{state.draining} of {state.replicas} ingress replica(s) had seen the drain",
                       round(clock() - started, 1), state.open_requests)


def cli_main(args: argparse.Namespace) -> int:
    """`dotsvlm drain-head`: always exits 0 (a failed drain is logged; the pod stops anyway)."""
    address = stop_hook_address(args, "drain-head")
    if not address:
        return 0
    def run() -> DrainResult:
        try:
            from ray._raylet import GcsClient

            return drain_head(GcsClient(address=address), deadline_s=args.deadline_seconds,
                              retry_after_s=args.retry_after_seconds)
        except Exception as exc:  # noqa: BLE001 - best effort: the pod must stop anyway
            return DrainResult(False, f"drain failed: {type(exc).__name__}: {exc}", 0.0, 0)

    done = run_before_deadline(run, args.deadline_seconds + 5)
    if not done:
        log.warning("gave up at the deadline (%.0f s): the Ray head did not answer", args.deadline_seconds)
        return 0
    res = done[0]
    (log.info if res.drained else log.warning)("%s after %.1f s", res.message, res.seconds)
    return 0
