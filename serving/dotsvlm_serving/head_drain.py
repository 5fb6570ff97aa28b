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

No decision compares the wall clock of one process with another's: with `spec.apiPool` the ingress
replicas run on other nodes than the hook, and a clock off by seconds (NTP stepped, a node never synced)
made the hook return at once ("nothing to drain": the reports looked stale) and cut every open stream,
let an ingress replica ignore the drain (its clock past the flag's end, or its start "after" the drain)
or made a new head refuse every request until its clock reached the old flag's end. The hook times its
deadline and the reports' freshness on its monotonic clock (`backpressure.ReportAges`); a report says
which drain it follows (`head_drain_since`, the flag's `since`); an ingress replica times the flag from
when it saw it appear (`FlagWatch`). Only a flag already there at an ingress replica's first read (a
drain that began as it started, or the previous head's with GCS fault tolerance) is judged by the wall
clocks, and held for the drain's deadline at most.

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

from .deployments.backpressure import KV_NAMESPACE, REPORT_KV_PREFIX, REPORT_STALE_S, WATCH_INTERVAL_S, ReportAges
from .node_drain import run_before_deadline, stop_hook_address

log = logging.getLogger("dotsvlm.drain-head")

DRAIN_KV_KEY = "dotsvlm/head-drain"
# An ingress replica writes its report every WATCH_INTERVAL_S: the hook counts one it has not seen change yet as
# live for this long at least, whatever the clocks say, so a replica on a clock far behind is never missed (a
# report long gone delays the drain by this much).
REPORT_SETTLE_S = 3 * WATCH_INTERVAL_S


@dataclass(frozen=True)
class HeadDrain:
    """The flag an ingress replica reads: refuse new requests for the drain's deadline (`until` - `since`, both
    unix times on the hook's clock), if the replica was already running when the drain began (`FlagWatch`).
    `since` also names the drain: a report that follows it carries it (`head_drain_since`).

    With GCS fault tolerance (`spec.head.gcsFaultTolerance`) Ray's internal KV lives in Redis and outlives
    the head: the new head's ingress replicas read the flag of the drain that stopped the old one. They
    started after it began, so it is not theirs."""

    until: float
    retry_after_s: int
    since: float | None = None  # None: a flag written before `since` existed, for every replica

    def hold_s(self, wall_now: float) -> float:
        """How long the drain holds new requests back: its deadline (`until` and `since` are both the hook's
        clock); for a flag without `since`, what is left of it on the reader's wall clock."""
        return self.until - (self.since if self.since is not None else wall_now)

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


# A flag already there at an ingress replica's first read is its own only if the drain began between the replica's
# start and that read, by the wall clocks, give or take this much (the two clocks' offset on synced nodes).
FIRST_READ_MARGIN_S = 2.0


class FlagWatch:
    """Which head drain an ingress replica follows now (one event loop: no lock). A flag that appears while the
    replica runs is its own, held for the drain's deadline from when it was seen, on the replica's monotonic
    clock. One already there at the replica's first read is the previous head's (GCS fault tolerance keeps the
    KV in Redis) unless the drain began between the replica's start and that read, which only the two wall
    clocks can tell (within FIRST_READ_MARGIN_S): a replica on a clock far behind the old head's does not take
    the old drain for its own. Such a flag is held until its end on the replica's wall clock, never longer than
    the drain's deadline."""

    def __init__(self, started_at: float, *, clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.started_at = started_at  # the replica's start, on its wall clock
        self._clock, self._wall_clock = clock, wall_clock
        self._started = clock()  # the same moment on its monotonic clock
        self._read = False  # a read went through before (the flag then was not this one)
        self._flag: HeadDrain | None = None
        self._ends: float | None = None  # monotonic: when following `_flag` ends; None: not following it

    def saw(self, flag: HeadDrain | None) -> None:
        """The flag as read now (None: there is none)."""
        if flag != self._flag:
            self._flag, self._ends = flag, None if flag is None else self._ends_for(flag)
        self._read = True

    def _ends_for(self, flag: HeadDrain) -> float | None:
        now, wall = self._clock(), self._wall_clock()
        hold = max(flag.hold_s(wall), 0.0)
        if self._read:
            return now + hold
        if flag.since is not None and not -FIRST_READ_MARGIN_S <= flag.since - self.started_at <= (
                now - self._started) + FIRST_READ_MARGIN_S:
            return None  # a drain that did not begin between this replica's start and now: not its own
        return now + min(max(flag.until - wall, 0.0), hold)

    def current(self) -> HeadDrain | None:
        """The flag this replica follows now, or None."""
        return self._flag if self._ends is not None and self._clock() < self._ends else None


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


def follows(report: dict[str, Any], since: float) -> bool:
    """Whether a report was written by a replica following this drain (the flag's `since`). A report of an
    ingress from before `head_drain_since` counts when written after the flag was set, by the wall clocks."""
    if "head_drain_since" in report:
        return bool(report.get("head_draining")) and report["head_drain_since"] == since
    return bool(report.get("head_draining")) and float(report.get("time", 0.0)) >= since


def drain_state(fresh: list[dict[str, Any]], since: float) -> DrainState:
    """Over the fresh reports (`backpressure.ReportAges`): a replica counts as draining only with a report that
    says it follows this drain."""
    draining = [r for r in fresh if follows(r, since)]
    return DrainState(len(fresh), len(draining), sum(int(r.get("open_requests", 0)) for r in fresh))


@dataclass(frozen=True)
class DrainResult:
    drained: bool
    message: str
    seconds: float
    open_requests: int


def _reports(gcs: Any) -> dict[str, dict[str, Any]]:
    out = {}
    for key in gcs.internal_kv_keys(REPORT_KV_PREFIX.encode(), KV_NAMESPACE.encode()):
        raw = gcs.internal_kv_get(key, KV_NAMESPACE.encode())
        try:
            record = json.loads(raw) if raw else None
        except ValueError:
            continue
        if isinstance(record, dict):
            out[key.decode() if isinstance(key, bytes) else str(key)] = record
    return out


def drain_head(gcs: Any, *, deadline_s: float, retry_after_s: int, poll_s: float = 0.5,
               clock: Callable[[], float] = time.monotonic, wall_clock: Callable[[], float] = time.time,
               sleep: Callable[[float], None] = time.sleep) -> DrainResult:
    """Set the flag (held until the deadline, and only for the ingress replicas running now, so a later head
    never inherits it) and wait until every ingress replica has seen it and has nothing open, or the deadline.
    `clock` (monotonic) times the drain and the reports' freshness; `wall_clock` only stamps the flag."""
    started, since = clock(), wall_clock()
    gcs.internal_kv_put(DRAIN_KV_KEY.encode(), HeadDrain(since + deadline_s, retry_after_s, since).to_json(), True,
                        KV_NAMESPACE.encode())
    log.info("new requests are refused (503, Retry-After %d s); waiting up to %.0f s for the open ones",
             retry_after_s, deadline_s)
    ages = ReportAges(REPORT_STALE_S - REPORT_SETTLE_S, clock=clock, wall_clock=wall_clock)
    state = DrainState(0, 0, 0)
    while clock() - started < deadline_s:
        state = drain_state(ages.fresh(_reports(gcs)), since)
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
