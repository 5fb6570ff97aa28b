"""The tensor queue as a single-replica Serve deployment, so that its life follows the application's.

It holds only `QueueItem`s with small `TensorHandle`s (the embeddings stay in the object store) and
the per-request result mailboxes. Results are returned as status dicts rather than raised exceptions
so that callers in other processes get typed outcomes without depending on exception pickling.

When Serve replaces the replica (its API pod or node drains, its options change), the old and the new one
live side by side for a while (a drain starts the new one first; a rolling update stops the old one first,
which then waits for the new one); the two find each other (`queue_peers`), and the old one gives its whole
state to the new one as it stops (`__del__` -> `adopt`): queued requests, leases and undelivered events
carry on, and open streams go on where they were (docs/serving.md, "When the queue moves: the hand-over").
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import ray
from ray import serve

from ..events import Event
from ..autoscaling.signals import queue_stats
from ..metrics.publish import ReplicaMetrics, StatsPublisher
from ..serve_config import QUEUE_DEPLOYMENT, QUEUE_GRACEFUL_SHUTDOWN_TIMEOUT_S, QueueConfig
from ..tensor_queue import ConsumerLost, ItemTooLarge, QueueFull, QueueItem, QueueMoved, QueueSnapshot, TensorQueueCore
from .queue_peers import HEARTBEAT_S, PeerRegistry, handoff_role

log = logging.getLogger("ray.serve")


class TensorQueue:
    """Its slice (`QueueConfig`) arrives through `reconfigure`, which Serve calls before the first
    request and again whenever only the slice changes: the limits then apply in place, the queued work
    stays."""

    async def __init__(self) -> None:
        self.cfg = QueueConfig()  # until Serve calls reconfigure with the deployment's own
        metrics = ReplicaMetrics("queue")
        self.core = TensorQueueCore(max_items=self.cfg.max_items, max_bytes=self.cfg.max_bytes,
                                    lease_timeout_s=self.cfg.lease_timeout_s, max_deliveries=self.cfg.max_deliveries,
                                    observe_wait=lambda s: metrics.observe("dotsvlm_queue_wait_seconds", s))
        publisher = StatsPublisher(metrics, self.core.stats, gauges={
            "dotsvlm_queue_depth": "depth", "dotsvlm_queue_bytes": "bytes",
            "dotsvlm_queue_oldest_age_seconds": "oldest_age_s", "dotsvlm_queue_waiting_producers": "waiting_producers",
            "dotsvlm_queue_leased_items": "leased", "dotsvlm_queue_max_items": "max_items",
            "dotsvlm_queue_max_bytes": "max_bytes", "dotsvlm_queue_consumers": "consumer_count",
        }, labelled_counters={"dotsvlm_queue_events": ("counters", "event")})
        self.peers: PeerRegistry | None = None
        self._app_name = ""
        self._peers_checked = 0.0
        self._adopted = False
        try:
            ctx = serve.get_replica_context()
            self._app_name = ctx.app_name
            self.peers = PeerRegistry(ctx.app_name, ctx.replica_id.unique_id, time.time(),
                                      ray.get_runtime_context().get_actor_name())
        except Exception:  # noqa: BLE001 - outside Serve (tests): no hand-over
            log.warning("TensorQueue: not in a Serve replica; no hand-over to a successor")
        await self._check_peers()  # before the first request: a successor knows at once that it is one
        loop = asyncio.get_running_loop()
        self._reaper = loop.create_task(self._reap_forever())
        self._publishing = loop.create_task(publisher.run_forever())
        self._peering = loop.create_task(self._peers_forever())

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        self.cfg = QueueConfig.model_validate(user_config)
        self.core.set_limits(max_items=self.cfg.max_items, max_bytes=self.cfg.max_bytes,
                             lease_timeout_s=self.cfg.lease_timeout_s, max_deliveries=self.cfg.max_deliveries)
        log.info("TensorQueue: config applied in place: %s", self.cfg.model_dump(mode="json"))

    async def _check_peers(self) -> None:
        """Heartbeat, and take (or leave) a hand-over role from which other replicas are alive."""
        if self.peers is None:
            return
        self._peers_checked = time.monotonic()
        try:
            me, peers = await asyncio.wait_for(asyncio.to_thread(self.peers.beat), 5.0)
        except Exception as exc:  # noqa: BLE001 - the GCS restarting: keep the role we have
            log.debug("TensorQueue: heartbeat failed: %s", exc)
            return
        role = handoff_role(me, peers, adopted=self._adopted)
        if role is not None and self.core.handoff is None:
            log.info("TensorQueue: another replica of the queue is alive: this one is its %s", role)
            self.core.begin_handoff(role)
        elif role is None and self.core.handoff == "successor":
            log.warning("TensorQueue: the replica this one replaces stopped without handing over its state; "
                        "requests only it knew are enqueued again by the API")
            self.core.end_handoff()
        elif role is None and self.core.handoff == "predecessor":
            # Its replacement is gone (crashed, or stopped first): this replica is the queue again, or every
            # put would be sent on to nobody and no dead LLM replica would ever be declared dead.
            log.warning("TensorQueue: the replica that was to replace this one is gone; this one serves again "
                        "(what only the other one knew is enqueued again by the API)")
            self.core.end_handoff()

    async def _peers_forever(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            await self._check_peers()

    async def _maybe_handoff(self, request_ids: list[str]) -> None:
        """A request unknown here may be the other replica's: check for one before calling it unknown."""
        if (self.core.handoff is None and self.core.unknown_requests(request_ids)
                and time.monotonic() - self._peers_checked > 0.2):
            await self._check_peers()

    async def adopt(self, snapshot: QueueSnapshot) -> dict[str, int]:
        """The replica this one replaces gives its state as it stops."""
        counts = self.core.adopt(snapshot)
        self._adopted = True  # the replica that gave it may beat once more as it stops: not a predecessor now
        log.info("TensorQueue: adopted the previous replica's state: %s", counts)
        return counts

    async def __del__(self) -> None:
        """Stopping (Serve has drained the calls in flight): give the state to the successor."""
        for task in ("_peering", "_reaper"):
            if hasattr(self, task):
                getattr(self, task).cancel()
        if getattr(self, "peers", None) is None:
            return
        await self._check_peers()
        if self.core.handoff is None and self.core.holds_state() and not await self._app_going():
            # A rolling update of the queue's own options stops this replica before its replacement starts
            # (a node drain starts the replacement first): wait for it rather than drop what is held.
            log.info("TensorQueue: stopping with work in hand; waiting up to %.0f s for the replica that "
                     "replaces it", SUCCESSOR_WAIT_S)
            deadline = time.monotonic() + SUCCESSOR_WAIT_S
            while self.core.handoff is None and time.monotonic() < deadline:
                await asyncio.sleep(HEARTBEAT_S / 2)
                await self._check_peers()
                if self.core.handoff is None and await self._app_going():
                    break
        if self.core.handoff == "predecessor":
            snap = self.core.snapshot()
            try:
                ctx = serve.get_replica_context()
                successor = serve.get_deployment_handle(QUEUE_DEPLOYMENT, app_name=ctx.app_name)
                counts = await asyncio.wait_for(successor.adopt.remote(snap), ADOPT_TIMEOUT_S)
                log.info("TensorQueue: handed its state to the replica that replaces it: %s", counts)
            except Exception:
                log.exception("TensorQueue: could not hand its state to the replica that replaces it; the API "
                              "enqueues those requests again")
        try:
            await asyncio.wait_for(asyncio.to_thread(self.peers.leave), 5.0)
        except Exception:  # noqa: BLE001 - the key goes stale and is forgotten
            pass

    async def _app_going(self) -> bool:
        """Whether no replica will replace this one: the application (or this deployment) is being
        deleted, so waiting for a successor would only delay the deletion by SUCCESSOR_WAIT_S."""
        if self.peers is None:
            return True
        try:
            status = await asyncio.wait_for(asyncio.to_thread(serve.status), 5.0)
        except Exception:  # noqa: BLE001 - the controller unreachable: wait, as before
            return False
        return no_successor_coming(status, self._app_name)

    async def _reap_forever(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.cfg.lease_timeout_s / 4))
            dead = self.core.reap()
            if dead:
                log.warning("tensor queue: LLM replicas %s stopped heartbeating; their items were redelivered "
                            "or failed", dead)

    async def put(self, item: QueueItem, timeout_s: float | None = None) -> dict[str, Any]:
        try:
            await self.core.put(item, self.cfg.enqueue_timeout_s if timeout_s is None else timeout_s)
        except QueueFull as exc:
            return {"ok": False, "reason": "full", "message": str(exc), "retry_after_s": exc.retry_after_s}
        except QueueMoved as exc:
            return {"ok": False, "reason": "moved", "message": str(exc)}
        except ItemTooLarge as exc:
            return {"ok": False, "reason": "too_large", "message": str(exc)}
        return {"ok": True}

    # take, publish and heartbeat answer None to an LLM replica that was declared lost (`ConsumerLost`): it
    # drops what it still runs (other replicas have it now) and joins again under a new id.
    async def take(self, consumer_id: str, max_items: int, token_budget: int, wait_s: float,
                   take_id: int | None = None, lost_takes: list[int] | None = None) -> list[QueueItem] | None:
        """`take_id`, `lost_takes`: `TensorQueueCore.take` (LLM replicas of earlier releases send neither)."""
        try:
            return await self.core.take(consumer_id, max_items=max_items, token_budget=token_budget, wait_s=wait_s,
                                        take_id=take_id, lost_takes=lost_takes or ())
        except ConsumerLost:
            return None

    async def publish(self, consumer_id: str, events: list[Event],
                      stats: dict[str, float] | None = None) -> list[str] | None:
        await self._maybe_handoff([ev["request_id"] for ev in events])
        try:
            return self.core.publish(consumer_id, events, stats)
        except ConsumerLost:
            return None

    async def heartbeat(self, consumer_id: str, stats: dict[str, float] | None = None) -> list[str] | None:
        try:
            return self.core.heartbeat(consumer_id, stats)
        except ConsumerLost:
            return None

    async def leave(self, consumer_id: str) -> None:
        self.core.leave(consumer_id)

    async def next_events(self, request_id: str, wait_s: float, until_done: bool = False,
                          _unused_linger_s: float = 0.0) -> list[Event] | None:
        """None when the request is unknown (e.g. the queue replica restarted and lost it). The fourth
        argument is ignored: ingresses of earlier releases still send it during an image rollout."""
        await self._maybe_handoff([request_id])
        try:
            return await self.core.next_events(request_id, wait_s, until_done=until_done)
        except KeyError:
            return None

    async def next_events_many(self, request_ids: list[str], wait_s: float,
                               linger_s: float = 0.0) -> dict[str, list[Event] | None]:
        """One long-poll for an ingress's streams (`TensorQueueCore.next_events_many`); None for each
        request unknown here."""
        await self._maybe_handoff(request_ids)
        return await self.core.next_events_many(request_ids, wait_s, linger_s=linger_s)

    async def cancel(self, request_id: str) -> bool:
        return self.core.cancel(request_id)

    async def stats(self) -> dict[str, Any]:
        return self.core.stats()

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Ray Serve's hook: depth, oldest age and waiting producers for the autoscaling policy."""
        return queue_stats(self.core.stats())


def no_successor_coming(status: Any, app_name: str) -> bool:
    """From `serve.status()`: True when the application is gone or being deleted, or the queue's
    deployment is, so a stopping queue replica has nobody to hand its state to."""
    app = status.applications.get(app_name)
    if app is None or str(getattr(app.status, "value", app.status)) == "DELETING":
        return True
    dep = app.deployments.get(QUEUE_DEPLOYMENT)
    return dep is None or str(getattr(dep.status_trigger, "value", dep.status_trigger)) == "DELETING"


# This deployment's own Serve options; its one replica, CPU share and slice come from
# ServeAppConfig.deployment_options().
# A stopping replica's calls in flight end within a second or two (hand-over polls are short, producers are
# sent on), then `__del__` waits for its successor when none has appeared yet (a rolling update of the queue's
# options stops the old replica first; up to SUCCESSOR_WAIT_S) and hands the state over (up to
# ADOPT_TIMEOUT_S): Serve must not kill it before (serve_config.QUEUE_GRACEFUL_SHUTDOWN_TIMEOUT_S).
SUCCESSOR_WAIT_S = 20.0
ADOPT_TIMEOUT_S = 15.0
TensorQueueDeployment = serve.deployment(name=QUEUE_DEPLOYMENT, max_ongoing_requests=100_000,
                                         graceful_shutdown_timeout_s=QUEUE_GRACEFUL_SHUTDOWN_TIMEOUT_S)(TensorQueue)
