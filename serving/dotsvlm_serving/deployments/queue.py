"""The tensor queue as a single-replica Serve deployment, so that its life follows the application's.

It holds only `QueueItem`s with small `TensorHandle`s (the embeddings stay in the object store) and
the per-request result mailboxes. Results are returned as status dicts rather than raised exceptions
so that callers in other processes get typed outcomes without depending on exception pickling.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ray import serve

from ..events import Event
from ..autoscaling.signals import queue_stats
from ..metrics.publish import ReplicaMetrics, StatsPublisher
from ..serve_config import QUEUE_DEPLOYMENT, QueueConfig
from ..tensor_queue import ItemTooLarge, QueueFull, QueueItem, TensorQueueCore

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
        loop = asyncio.get_running_loop()
        self._reaper = loop.create_task(self._reap_forever())
        self._publishing = loop.create_task(publisher.run_forever())

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        self.cfg = QueueConfig.model_validate(user_config)
        self.core.set_limits(max_items=self.cfg.max_items, max_bytes=self.cfg.max_bytes,
                             lease_timeout_s=self.cfg.lease_timeout_s, max_deliveries=self.cfg.max_deliveries)
        log.info("TensorQueue: config applied in place: %s", self.cfg.model_dump(mode="json"))

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
        except ItemTooLarge as exc:
            return {"ok": False, "reason": "too_large", "message": str(exc)}
        return {"ok": True}

    async def take(self, consumer_id: str, max_items: int, token_budget: int, wait_s: float) -> list[QueueItem]:
        return await self.core.take(consumer_id, max_items=max_items, token_budget=token_budget, wait_s=wait_s)

    async def publish(self, consumer_id: str, events: list[Event], stats: dict[str, float] | None = None) -> list[str]:
        return self.core.publish(consumer_id, events, stats)

    async def heartbeat(self, consumer_id: str, stats: dict[str, float] | None = None) -> list[str]:
        return self.core.heartbeat(consumer_id, stats)

    async def leave(self, consumer_id: str) -> None:
        self.core.leave(consumer_id)

    async def next_events(self, request_id: str, wait_s: float, until_done: bool = False,
                          linger_s: float = 0.0) -> list[Event] | None:
        """None when the request is unknown (e.g. the queue replica restarted and lost it)."""
        try:
            return await self.core.next_events(request_id, wait_s, until_done=until_done, linger_s=linger_s)
        except KeyError:
            return None

    async def cancel(self, request_id: str) -> bool:
        return self.core.cancel(request_id)

    async def stats(self) -> dict[str, Any]:
        return self.core.stats()

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Ray Serve's hook: depth, oldest age and waiting producers for the autoscaling policy."""
        return queue_stats(self.core.stats())


# This deployment's own Serve options; its one replica, CPU share and slice come from
# ServeAppConfig.deployment_options().
TensorQueueDeployment = serve.deployment(name=QUEUE_DEPLOYMENT, max_ongoing_requests=100_000)(TensorQueue)
