"""The ingress's side of backpressure: its admission state, the vision pool's running replicas, and the
rejection figures of all ingress replicas for the autoscaler's report (`GET /-/autoscaler`).

The decisions themselves are pure (`dotsvlm_serving.admission`); this module holds what they need in a
running ingress: the bytes it holds, the rate the vision stage drains, how many vision replicas run
(read from Serve's status every `WATCH_INTERVAL_S`; a pool at zero counts as one, it is waking up),
and what it refused. Each ingress replica writes its figures to Ray's internal KV, so whichever replica
answers the report sums them over all.

Whether a replica's figures are fresh is judged without comparing clocks (`ReportAges`): a report's `time` is
its writer's wall clock, on another node with `spec.apiPool`, and judging its age by the reader's wall clock let
a clock off by REPORT_STALE_S (NTP stepped, or a node's clock never synced) drop a live replica's figures or keep
a gone replica's for as long as it was ahead. The reader notes on its own monotonic clock when a report last
changed; a report's age goes by the wall clocks' difference only within bounds: at its first sighting, and
when it changed since the last read, never more than the time since that read.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from ..admission import STAGE_OF, TURN_GRACE_S, ByteBudget, DrainRate, Rejection, admit_pixels, share
from ..api.errors import ApiError
from ..serve_config import APP_NAME, VISION_DEPLOYMENT, IngressConfig

log = logging.getLogger("ray.serve")

WATCH_INTERVAL_S = 2.0
KV_NAMESPACE = "dotsvlm"
REPORT_KV_PREFIX = "dotsvlm/ingress/"
REPORT_STALE_S = 30.0  # figures of an ingress replica that stopped writing them (gone) are left out


def rejection_error(rejection: Rejection) -> ApiError:
    """The 429 a client gets: OpenAI's error body, the reason as its code, and Retry-After."""
    return ApiError(429, rejection.message, code=rejection.reason,
                    headers={"Retry-After": str(rejection.retry_after_s)})


class IngressAdmission:
    """One ingress replica's backpressure state (single event loop: no lock but the report's, `withdraw_report`)."""

    def __init__(self, cfg: IngressConfig) -> None:
        self._report_lock = asyncio.Lock()  # a report write and its withdrawal never overlap
        self._report_withdrawn = False
        self.bytes = ByteBudget(cfg.api.max_image_bytes_in_flight)
        self.pixels_drained = DrainRate()
        # Until Serve's status was read: the pool's minimum (a fixed pool: its size).
        self.vision_replicas = cfg.vision.min_replicas
        self.rejected: Counter[str] = Counter()  # reason -> requests answered 429
        self.turn: tuple[int, float] = (0, 0.0)  # pixels a refused request has the next turn for, until (monotonic)
        self.configure(cfg)

    def configure(self, cfg: IngressConfig) -> None:
        """New limits, in place (the ingress's reconfigure): what is held stays held."""
        self.vision_limits = cfg.vision
        self.ingress_replicas = cfg.api.ingress_replicas
        self.bytes.limit = cfg.api.max_image_bytes_in_flight

    def pixel_limit(self) -> int:
        """This replica's share of the vision stage's limit with the replicas running now."""
        return share(self.vision_limits.pending_pixels_limit(self.vision_replicas), self.ingress_replicas)

    def check_pixels(self, request_pixels: int, pending_pixels: int, now: float) -> None:
        """Raise the 429 when the request's images do not fit in the vision stage now. A refused request as
        large as any refused lately takes the next turn (`admission`: large requests are not starved)."""
        turn_pixels, until = self.turn if now < self.turn[1] else (0, 0.0)
        rejection = admit_pixels(request_pixels=request_pixels, pending_pixels=pending_pixels,
                                 limit=self.pixel_limit(), running_replicas=self.vision_replicas,
                                 drain_pixels_per_s=self.pixels_drained.rate(now), turn_pixels=turn_pixels,
                                 turn_left_s=until - now)
        if request_pixels >= turn_pixels:
            self.turn = (0, 0.0) if rejection is None else (request_pixels,
                                                             now + rejection.retry_after_s + TURN_GRACE_S)
        if rejection is not None:
            raise rejection_error(rejection)

    def reserve_bytes(self, nbytes: int, now: float, own: int = 0) -> None:
        rejection = self.bytes.reserve(nbytes, now, own)
        if rejection is not None:
            raise rejection_error(rejection)

    def count(self, exc: ApiError) -> str | None:
        """Count a backpressure 429 (any stage); its stage, or None for other errors."""
        if exc.status != 429 or exc.code not in STAGE_OF:
            return None
        self.rejected[exc.code] += 1
        return STAGE_OF[exc.code]

    def figures(self, pending_pixels: int) -> dict[str, Any]:
        return {"vision_replicas": self.vision_replicas, "pending_pixels": pending_pixels,
                "pending_pixels_limit": self.pixel_limit(), "image_bytes": self.bytes.held,
                "image_bytes_limit": self.bytes.limit, "rejected": dict(self.rejected)}

    async def watch_vision_replicas(self, interval_s: float = WATCH_INTERVAL_S) -> None:
        """Keep `vision_replicas` at the number of RUNNING VisionEncoder replicas (Serve's status)."""
        while True:
            try:
                running = await asyncio.to_thread(running_replicas, VISION_DEPLOYMENT)
                if running is not None:
                    self.vision_replicas = running
            except asyncio.CancelledError:
                raise
            except Exception:  # the previous count stays; admission never stops on this
                log.warning("could not read the vision pool's replicas from Serve", exc_info=True)
            await asyncio.sleep(interval_s)

    async def publish_forever(self, key: str, pending_pixels: Any, interval_s: float = WATCH_INTERVAL_S,
                              extra: Any = dict) -> None:
        """Write this replica's figures where every ingress replica can sum them (Ray's internal KV), with
        `extra()` (the open requests and the head drain, which `dotsvlm drain-head` reads)."""
        from ray.experimental import internal_kv

        while True:
            try:
                async with self._report_lock:
                    if self._report_withdrawn:
                        return
                    record = json.dumps({"time": time.time(), **self.figures(int(pending_pixels())),
                                         **extra()}).encode()
                    await asyncio.to_thread(internal_kv._internal_kv_put, REPORT_KV_PREFIX + key, record,
                                            overwrite=True, namespace=KV_NAMESPACE)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("could not publish the ingress's backpressure figures", exc_info=True)
            await asyncio.sleep(interval_s)


    async def withdraw_report(self, key: str) -> None:
        """Delete this replica's report and write none after (Serve stops the replica). A report left behind
        counts as a live replica's for `dotsvlm drain-head` until it has seen it not change (REPORT_SETTLE_S,
        `head_drain`): it cannot tell it from a live replica's on a clock far behind."""
        from ray.experimental import internal_kv

        async with self._report_lock:
            self._report_withdrawn = True
            await asyncio.to_thread(internal_kv._internal_kv_del, REPORT_KV_PREFIX + key, namespace=KV_NAMESPACE)


def running_replicas(deployment: str) -> int | None:
    """RUNNING replicas of one of the application's deployments (None: not known yet).

    Read from the controller's details as a plain dict (what Serve's REST API answers): `serve.status()`
    builds the same answer into pydantic models first, which cost ~28 CPU-ms per call against ~2 here, and
    every ingress replica asks every WATCH_INTERVAL_S."""
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:
        return None
    app = (client.get_serve_details().get("applications") or {}).get(APP_NAME) or {}
    dep = (app.get("deployments") or {}).get(deployment)
    if dep is None:
        return None
    return sum(1 for r in dep.get("replicas") or () if r.get("state") == "RUNNING")


def report_silence(heard: tuple[float, float, float] | None, written: float, wall_age_s: float, now: float,
                   first_cap_s: float) -> tuple[tuple[float, float, float], float]:
    """How long a report has not changed, from what this reader saw of it before. `heard`: (the `time` it last
    read, when on its monotonic clock it first read that one, when it last read), None at the first sighting;
    `written`: the `time` read now; `wall_age_s`: this reader's wall clock minus `written` (the writer's); `now`:
    the reader's monotonic clock. A report's silence is its wall age, within [0, first_cap_s] at its first
    sighting and within [0, the time since the last read] when it changed since: it was written after that read,
    so a clock off by any amount misjudges it by that much at most, and with synced clocks a reader that had not
    read for minutes does not take a gone replica's last report for a new one. Returns the new `heard` and the
    silence."""
    if heard is not None and heard[0] == written:  # not written since
        return (written, heard[1], now), now - heard[1]
    bound = first_cap_s if heard is None else max(now - heard[2], 0.0)
    since = now - min(max(wall_age_s, 0.0), bound)
    return (written, since, now), now - since


class ReportAges:
    """Which ingress replicas' reports are fresh (changed within REPORT_STALE_S), for one reader that reads them
    again and again: an ingress replica answering `GET /-/autoscaler`, or `dotsvlm drain-head`.

    `first_cap_s`: the most a first sighting's wall age counts. Above REPORT_STALE_S (the default) a report
    long gone is left out at once, and a live one from a clock that is far behind is missed until it changes;
    the head drain, which must not miss a live replica, passes less (`head_drain`)."""

    def __init__(self, first_cap_s: float = 2 * REPORT_STALE_S, *, clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.first_cap_s = first_cap_s
        self._clock, self._wall_clock = clock, wall_clock
        self._heard: dict[str, tuple[float, float, float]] = {}  # report key -> `report_silence`'s `heard`

    def fresh(self, reports: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
        """The reports (key -> record) fresh now; a key gone is forgotten (it comes back as a first sighting)."""
        now, wall = self._clock(), self._wall_clock()
        heard, out = {}, []
        for key, record in reports.items():
            try:
                written = float(record.get("time", 0.0))
            except (TypeError, ValueError):
                continue
            heard[key], silent = report_silence(self._heard.get(key), written, wall - written, now, self.first_cap_s)
            if silent <= REPORT_STALE_S:
                out.append(record)
        self._heard = heard
        return out


def sum_reports(fresh: list[dict[str, Any]]) -> dict[str, Any]:
    """The vision stage and the rejections over the ingress replicas whose figures are fresh (`ReportAges`)."""
    rejected: Counter[str] = Counter()
    for r in fresh:
        rejected.update({k: int(v) for k, v in (r.get("rejected") or {}).items()})
    return {"ingress_replicas": len(fresh),
            "vision_replicas": max((int(r.get("vision_replicas", 0)) for r in fresh), default=None),
            "pending_pixels": sum(int(r.get("pending_pixels", 0)) for r in fresh),
            "pending_pixels_limit": sum(int(r.get("pending_pixels_limit", 0)) for r in fresh),
            "image_bytes": sum(int(r.get("image_bytes", 0)) for r in fresh),
            "image_bytes_limit": sum(int(r.get("image_bytes_limit", 0)) for r in fresh),
            "rejected": dict(rejected), "rejected_total": sum(rejected.values())}


def worst_p90s(fresh: list[dict[str, Any]], own: dict[str, float]) -> dict[str, float | None]:
    """The observed p90 latencies for status.slo as the autoscaling policy reads them: the worst ingress
    replica's (its snapshot takes the max over replicas), not whichever replica answered. `fresh`: the fresh
    reports (`ReportAges`); `own`: this replica's, newer than its last report; a key no replica has data for
    is None."""
    p90s = [r.get("p90_s") or {} for r in fresh]
    out: dict[str, float | None] = {}
    for key in own:
        values = [float(v) for v in (own[key], *(f.get(key) for f in p90s)) if v is not None]
        out[key] = max(values) if values else None
    return out


def read_reports() -> dict[str, dict[str, Any]]:
    """Every ingress replica's report, by its key."""
    from ray.experimental import internal_kv

    out = {}
    for key in internal_kv._internal_kv_list(REPORT_KV_PREFIX, namespace=KV_NAMESPACE):
        raw = internal_kv._internal_kv_get(key, namespace=KV_NAMESPACE)
        if raw:
            try:
                record = json.loads(raw)
            except ValueError:
                continue
            if isinstance(record, dict):
                out[key.decode() if isinstance(key, bytes) else str(key)] = record
    return out
