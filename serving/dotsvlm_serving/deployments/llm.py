"""LLMServer: an engine that pulls work from the tensor queue when it has KV-cache room.

Nothing is routed to this deployment by Serve for generation: the replica takes items from the queue
(pull), fetches the image embeddings through the transport, writes them into the prompt's input
embeddings, runs continuous batching, and publishes token events back through the queue. A heartbeat
task keeps the replica's leases alive even while a long prefill runs; if the replica dies the queue
redelivers or fails its requests.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from typing import Any

from ray import serve

from ..engine import EngineInput, EngineLimitError, SamplingParams
from ..engine.factory import build_engine
from ..events import ErrorEvent, Event, is_terminal
from ..metrics.publish import ReplicaMetrics, StatsPublisher
from ..model.preprocess import ImageError
from ..autoscaling.signals import llm_stats
from ..serve_config import (LLM_DEPLOYMENT, LLM_GRACEFUL_SHUTDOWN_TIMEOUT_S, LLM_DRAIN_TIMEOUT_S, RESTART_DIGEST_ENV,
                            LLMServerConfig, ServedModel)
from ..tensor_queue import QueueItem, RayObjectTransport, TransportError

log = logging.getLogger("ray.serve")


def _image_error(exc: BaseException) -> str | None:
    """The user-facing message when the embeddings failed because an image could not be decoded (the
    vision call raised `ImageError`, which Ray wraps as the cause of a RayTaskError)."""
    seen: BaseException | None = exc
    for _ in range(6):
        if seen is None:
            return None
        if isinstance(seen, ImageError):
            cause = getattr(seen, "cause", None)
            return str(cause if isinstance(cause, ImageError) else seen).strip().splitlines()[-1]
        seen = getattr(seen, "cause", None) or seen.__cause__
    return None


class _Unfetched:
    """Why a taken item's embeddings could not be fetched with its take (`LLMServer._take`)."""

    def __init__(self, error: Exception) -> None:
        self.error = error


class LLMServer:
    TAKE_INTERVAL_S = 0.05
    # While the engine runs, tokens in the middle of an answer are published at most this often (first
    # and last events at once): one call per PUBLISH_INTERVAL_S, not one per decode step. The ingress
    # fetches a stream's tokens at the same cadence (relay.STREAM_BATCH_S).
    PUBLISH_INTERVAL_S = 0.02
    _published_at = 0.0  # when the last publish call was sent (monotonic)
    # Takes are numbered; one whose answer was lost (it may have leased items all the same) is named in the
    # next take, and the queue puts what it leased back (`TensorQueueCore.take`).
    _take_seq = 0
    _taking_sent: tuple[str, int, tuple[int, ...]] = ("", 0, ())  # the take in flight: (consumer, id, lost ids)
    _lost_takes: tuple[int, ...] = ()
    _giving_back = False  # the take in flight only names lost takes (`_send_take`): it leases nothing
    # Until when takes go without numbers (monotonic): the queue replica refused them, being of an earlier release
    # (an image rollout rolls the LLM pool before it). Numbers are tried again after PLAIN_TAKES_S: by then the
    # rollout has usually replaced it (and a refusal with another cause does not turn them off for good).
    PLAIN_TAKES_S = 60.0
    _plain_takes_until = 0.0
    # Graceful shutdown (scale-down, rolling update, node drain): stop taking work and finish what is
    # running for up to this long (the slice's drain_timeout_s, llm.drainTimeoutSeconds); what is left is
    # handed back to the queue at once. Serve waits the deployment's graceful_shutdown_timeout_s
    # (LLMPoolConfig.graceful_shutdown_timeout_s(): LLM_SHUTDOWN_MARGIN_S more) before it kills the replica.
    DRAIN_TIMEOUT_S = LLM_DRAIN_TIMEOUT_S
    # A take answers within its own wait (at most 1 s) plus the call's time; one this much later waits
    # for a queue replica that is not there. Leaving the queue is bounded too: a lease not handed back
    # expires in the queue.
    TAKE_OVERDUE_S = 5.0
    LEAVE_TIMEOUT_S = 8.0
    # Engine steps failed in a row before the replica calls itself unhealthy (its health check fails and
    # Serve replaces it): one can be a bad batch, a run of them is a broken engine (a lost device, say).
    MAX_FAILED_STEPS = 3
    # Publishing answers failing for this long in a row (every try re-sends the unacknowledged events) also
    # makes the replica unhealthy: a tensor queue replica's hand-over takes seconds, not minutes, so a
    # publish that never succeeds is this replica's fault, and its answers would never reach anyone.
    PUBLISH_FAILING_UNHEALTHY_S = 60.0

    async def __init__(self, model: ServedModel, queue: Any) -> None:
        self.model = model
        self.queue = queue
        self.cfg: LLMServerConfig | None = None  # the slice: set by reconfigure, which builds the engine
        self.consumer_id = f"llm-{uuid.uuid4().hex[:12]}"
        self._to_cancel: set[str] = set()
        self._publishing: asyncio.Future[tuple[str, list[str] | None]] | None = None
        # A take sent while the engine runs: its answer is admitted at the next iteration, so the call's round
        # trip overlaps a decode step instead of stalling it.
        self._taking: asyncio.Future[tuple[str, list[QueueItem] | None, dict[str, Any]]] | None = None
        self._outbox: list[Event] = []
        # The numbered events of the publish call in flight, kept until it succeeds: a call that failed (a
        # blip of the queue replica) is sent again, first, with the next one; the queue drops repeats by their
        # number (`i`), while a lost number would hold back every later event of its answer for good.
        self._unacked: list[Event] = []
        self._sent: dict[str, int] = {}  # events numbered so far per request (this delivery): their `i`
        self._delivery: dict[str, int] = {}  # each running request's delivery (`d`: the item's count), for its events
        self._active: set[str] = set()  # requests handed to the engine whose terminal event is not out yet
        self._lost = False  # the queue declared this replica lost: rejoin (`_rejoin`) before anything else
        self._discarding = False  # after a rejoin: the engine's dropped copies are still winding down
        self._last_take = 0.0
        self._take_overdue_at: float | None = None  # while a take is in flight: when it should have returned
        self._fetched: dict[str, Any] = {}  # while a take's items are admitted: their embeddings (`_take`)
        self._failed_steps = 0  # engine steps failed in a row
        self._step_error = ""  # the last one's exception, for the health check's message
        self._publish_failing_since: float | None = None  # the first of the publish calls failed in a row
        self._publish_error = ""
        self._draining = False
        self._drained = asyncio.Event()  # set by the run loop: draining, no work left, every event delivered
        self.metrics = ReplicaMetrics("llm")

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """This deployment's slice (`LLMServerConfig`). Serve calls this once before the replica serves
        (the engine is built then), and again when only the slice changed. Only the lease applies in
        place: a change to the engine's fields changes the replica's `RESTART_DIGEST_ENV`, so Serve
        replaces the replicas (draining them) instead of calling this."""
        cfg = LLMServerConfig.model_validate(user_config)
        digest = os.environ.get(RESTART_DIGEST_ENV)
        if digest is not None and digest != cfg.restart_digest():
            raise ValueError(f"the LLM replica's engine settings changed without a restart ({RESTART_DIGEST_ENV} "
                             f"{digest} != {cfg.restart_digest()}): deploy the config through ServeAppConfig's "
                             "deploy body, which restarts the LLM replicas on such a change")
        if self.cfg is not None and cfg.restart_digest() != self.cfg.restart_digest():
            raise ValueError("the LLM replica's engine settings cannot change in place: restart its replicas")
        first = self.cfg is None
        self.cfg = cfg
        self.DRAIN_TIMEOUT_S = cfg.drain_timeout_s  # read when the replica stops: the latest value counts
        if first:
            await self._start()

    async def _start(self) -> None:
        # The engine cfg.engine names (engine/factory.py); loading the model takes a while.
        assert self.cfg is not None
        self.engine = await asyncio.to_thread(build_engine, self.model, self.cfg)
        self.transport = RayObjectTransport()
        publisher = StatsPublisher(self.metrics, self.engine.stats, gauges={
            "dotsvlm_llm_running_requests": "running", "dotsvlm_llm_waiting_requests": "pending",
            "dotsvlm_llm_kv_cache_used_tokens": "kv_tokens_used",
            "dotsvlm_llm_kv_cache_reserved_tokens": "kv_tokens_reserved",
            "dotsvlm_llm_kv_cache_capacity_tokens": "kv_tokens_capacity",
        }, counters={"dotsvlm_llm_generated_tokens": "tokens_generated_total"})
        loop = asyncio.get_running_loop()
        self._run_task = loop.create_task(self._run_forever())
        self._hb_task = loop.create_task(self._heartbeat_forever())
        self._publishing_metrics = loop.create_task(publisher.run_forever())

    async def _heartbeat_forever(self) -> None:
        while True:
            period = max(0.2, self.cfg.lease_timeout_s / 4)  # type: ignore[union-attr]
            try:
                cid = self.consumer_id
                self._cancel_or_rejoin(cid, await self.queue.heartbeat.remote(cid, self.engine.stats()))
            except Exception:
                log.exception("heartbeat to the tensor queue failed")
            await asyncio.sleep(period)

    async def _run_forever(self) -> None:
        while True:
            try:
                await self._iteration()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("LLM engine iteration failed")
                self._publishing = None  # the outbox and a failed call's events are sent on the next iteration
                await asyncio.sleep(0.5)

    async def _iteration(self) -> None:
        """Admit (pull) -> one engine step -> publish. While the engine is busy, the queue is polled at
        most every TAKE_INTERVAL_S by a take whose answer is admitted at a later iteration, and events are
        published by one call in flight at a time that overlaps the following steps (events produced
        meanwhile wait in the outbox and go together; the middle of an answer at most every
        PUBLISH_INTERVAL_S), so the latency and the CPU of actor calls stay off the decode loop. An idle
        engine long-polls the queue instead."""
        if self._lost:
            self._rejoin()
        busy = self.engine.has_work()
        if self._taking is not None and (self._taking.done() or not busy):
            await self._admit_taken()  # (an idle engine waits for it: it has nothing else to do)
            busy = self.engine.has_work()
        unhealthy = self._unhealthy() is not None  # (takes no work: it would only fail it)
        room = 0 if self._draining or self._discarding or unhealthy else self.engine.free_slots()
        now = time.monotonic()
        if room and self._taking is None and (not busy or now - self._last_take >= self.TAKE_INTERVAL_S):
            self._last_take = now
            if not busy:
                await self._publish(wait=True)
            wait_s = 0.0 if busy else 1.0
            giving_back = self._send_take(room, wait_s, now)
            if not busy:  # (busy: the room stays, as only this loop admits work and running requests only free it)
                await self._admit_taken()
                if giving_back and not (self._lost_takes or self._lost) and self._taking is None:  # given back: take
                    self._send_take(room, wait_s, now)
                    await self._admit_taken()
        if self._to_cancel:
            for rid in self._to_cancel:
                self.engine.cancel(rid)
            self._to_cancel.clear()
        if self.engine.has_work():
            try:
                events = await self.engine.step()  # (not `outbox += await`: the outbox may be swapped meanwhile)
            except Exception as exc:
                self._failed_steps += 1
                self._step_error = f"{type(exc).__name__}: {exc}"
                raise
            self._failed_steps = 0
            if not self._discarding:
                self._outbox += events
        if self._discarding and not self.engine.has_work():
            self._discarding = False
            log.info("LLM replica: the dropped copies have stopped; taking work again as %s", self.consumer_id)
        await self._publish(wait=not self.engine.has_work())
        if self._draining and not self.engine.has_work() and self._taking is None:
            # Only here is the drain over: the engine reports no work while its last step still runs (in a
            # thread), so a watcher of has_work() alone could leave the queue before the finish event is sent.
            # A take sent before the drain began is admitted first (next iteration): its items run here.
            self._drained.set()
            await asyncio.sleep(0.1)  # nothing left to do and nothing to take: do not spin
        elif unhealthy and not self.engine.has_work():
            await asyncio.sleep(0.5)  # takes no work until Serve replaces it: do not spin

    def _send_take(self, room: int, wait_s: float, now: float) -> bool:
        """Send a take (its answer is admitted by `_admit_taken`). While earlier takes' answers are lost, the
        take only names them and leases nothing (True): a take that fails then adds no id of its own to name,
        so the list stays one id long however long takes keep failing (before, each failed take added one, and
        every later take carried them all). The queue has given them back once one such take is answered."""
        self._take_overdue_at = now + wait_s + self.TAKE_OVERDUE_S
        self._take_seq += 1
        numbered_takes = now >= self._plain_takes_until
        giving_back = numbered_takes and bool(self._lost_takes)
        if giving_back:
            room, wait_s = 0, 0.0
        self._taking_sent = (self.consumer_id, self._take_seq if numbered_takes else 0, self._lost_takes)
        self._giving_back = giving_back
        numbered = (self._take_seq, list(self._lost_takes)) if numbered_takes else ()
        self._taking = asyncio.ensure_future(self._take(self.consumer_id, self.queue.take.remote(
            self.consumer_id, room, self.engine.free_tokens(), wait_s, *numbered)))
        return giving_back

    async def _admit_taken(self) -> None:
        """Wait for the take in flight and hand its items to the engine. None: the queue declared this replica
        lost. Items taken under an id this replica has since given up were given back by the queue when it
        declared that id lost (or answered None): they are not run here."""
        taking, (sent_as, take_id, named), giving_back = self._taking, self._taking_sent, self._giving_back
        try:
            consumer_id, items, fetched = await taking  # type: ignore[misc]
        except Exception as exc:
            if take_id and (isinstance(exc, TypeError) or "positional argument" in str(exc)):
                # A queue replica of an earlier release (an image rollout rolls the LLM pool before the queue's):
                # its take has no numbers. (Ray's error for a remote TypeError is a TypeError too.)
                log.warning("LLM replica: the tensor queue does not number takes (an earlier release); "
                            "taking without numbers for %.0f s, until it is replaced (%s)", self.PLAIN_TAKES_S, exc)
                self._plain_takes_until, self._lost_takes = time.monotonic() + self.PLAIN_TAKES_S, ()
            elif sent_as == self.consumer_id and take_id and not giving_back:
                # Its answer is lost, not necessarily what it leased: the next take names it (repeats are harmless).
                self._lost_takes = (*self._lost_takes, take_id)
            raise
        finally:
            self._taking = None
            self._take_overdue_at = None
        if consumer_id != self.consumer_id:
            return
        self._lost_takes = tuple(t for t in self._lost_takes if t not in named)  # the queue has dealt with them
        if items is None:
            self._lost = True
            return
        self._fetched = fetched
        try:
            for item in items:
                self._sent.pop(item.request_id, None)  # a new delivery numbers its events from 0
                self._delivery[item.request_id] = item.deliveries
                err = await asyncio.to_thread(self._admit, item)
                if err is not None:
                    self._outbox.append(err)
                else:
                    self._active.add(item.request_id)
        finally:
            self._fetched = {}

    async def _take(self, consumer_id: str, call: Any) -> tuple[str, list[QueueItem] | None, dict[str, Any]]:
        """A take's answer with its items' image embeddings already fetched (request id -> the tensor, or the
        `_Unfetched` error): fetching them (megabytes, from another node's object store or by NIXL) here, in
        the take's own future, overlaps the running requests' decode steps; fetched in `_admit`, inside the run
        loop, every running stream paused while one item's embeddings arrived."""
        consumer_id, items = await self._resolve(consumer_id, call)
        with_images = [item for item in items or () if item.payload.get("embeds") is not None]
        results = await asyncio.gather(*(asyncio.to_thread(self._fetch, item) for item in with_images))
        return consumer_id, items, {item.request_id: r for item, r in zip(with_images, results)}

    def _fetch(self, item: QueueItem) -> Any:
        try:
            return self.transport.get(item.payload["embeds"], timeout_s=60)
        except Exception as exc:  # raised again by `_admit`, which turns it into the request's error event
            return _Unfetched(exc)

    async def _publish(self, *, wait: bool) -> None:
        """Send the outbox when no publish is in flight (events stay in order); with wait, also wait
        until everything has been delivered."""
        while True:
            if self._publishing is not None:
                if not (wait or self._publishing.done()):
                    return
                pending, self._publishing = self._publishing, None
                try:
                    answer = await pending
                except Exception as exc:  # (sent again, with what came meanwhile, on the next iteration)
                    self._publish_failing_since = self._publish_failing_since or time.monotonic()
                    self._publish_error = f"{type(exc).__name__}: {exc}"
                    raise
                self._publish_failing_since = None
                self._cancel_or_rejoin(*answer)
                self._unacked = []
            if not (self._outbox or self._unacked):
                return
            if (not wait and not self._unacked and not self._urgent()
                    and time.monotonic() - self._published_at < self.PUBLISH_INTERVAL_S):
                return
            self._published_at = time.monotonic()
            events, self._outbox = self._outbox, []
            self._number(events)
            events = self._unacked = self._unacked + events  # (not renumbered: a repeat is known by its `i`)
            call = self.queue.publish.remote(self.consumer_id, events, self.engine.stats())
            self._publishing = asyncio.ensure_future(self._resolve(self.consumer_id, call))
            if not wait:
                return

    def _urgent(self) -> bool:
        """The outbox holds an event that must not wait: a request's first (time to first token) or last."""
        return any(is_terminal(ev) or ev["request_id"] not in self._sent for ev in self._outbox)

    def _number(self, events: list[Event]) -> None:
        """Give each event its place in its request's answer (`i`): while the tensor queue moves, two of its
        replicas may each receive some of an answer's events, and they put them back in this order."""
        for ev in events:
            rid = ev["request_id"]
            ev["i"] = self._sent.get(rid, 0)
            d = self._delivery.get(rid)
            if d:
                ev["d"] = d
            if is_terminal(ev):
                self._sent.pop(rid, None)
                self._delivery.pop(rid, None)
                self._active.discard(rid)
            else:
                self._sent[rid] = ev["i"] + 1

    @staticmethod
    async def _resolve(consumer_id: str, call: Any) -> tuple[str, Any]:
        """A queue call's answer with the consumer id it was sent under (a rejoin may change the id meanwhile)."""
        return consumer_id, await call

    def _cancel_or_rejoin(self, consumer_id: str, answer: list[str] | None) -> None:
        """A queue call's answer: requests to stop, or None when the queue declared this replica lost (it
        answers so only for the id the call was made with; an older id's answer is stale)."""
        if answer is not None:
            self._to_cancel.update(answer)
        elif consumer_id == self.consumer_id:
            self._lost = True

    def _rejoin(self) -> None:
        """The queue declared this replica lost (it missed heartbeats for the lease timeout: a stall, a
        network cut) and gave its requests to other replicas, or back to the queue. Drop every copy still
        running here, without publishing any more of their events, and take work again under a new id
        once the engine has let go of them (a redelivery of one of them may come back here)."""
        old, self.consumer_id = self.consumer_id, f"llm-{uuid.uuid4().hex[:12]}"
        log.warning("LLM replica: the tensor queue declared it lost (no heartbeat within %.0f s) and gave its %d "
                    "request(s) to other replicas; dropping them here and joining again as %s (was %s)",
                    self.cfg.lease_timeout_s if self.cfg else 0, len(self._active), self.consumer_id, old)
        for rid in self._active:
            self.engine.cancel(rid)
        self._active.clear()
        self._sent.clear()
        self._delivery.clear()
        self._outbox.clear()
        self._unacked = []  # (events of the copies given up: not to be sent again)
        self._publish_failing_since = None
        self._to_cancel.clear()
        self._lost_takes = ()  # (the old id's leases went to others)
        self._lost = False
        self._discarding = self.engine.has_work()

    def _admit(self, item: QueueItem) -> ErrorEvent | None:
        """Fetch the embeddings and hand the request to the engine; an error event if that fails."""
        p = item.payload
        try:
            embeds = None
            if p.get("embeds") is not None:
                embeds = self._fetched.pop(item.request_id, None)
                if embeds is None:  # (not fetched with its take)
                    embeds = self.transport.get(p["embeds"], timeout_s=60)
                elif isinstance(embeds, _Unfetched):
                    raise embeds.error
            params = SamplingParams(**p["params"])
            self.engine.add(EngineInput(item.request_id, p["ids"], embeds, params))
            return None
        except TransportError as exc:
            bad = _image_error(exc)
            if bad is not None:  # the vision replica could not decode an image: the client's to fix
                return ErrorEvent(request_id=item.request_id, type="error", code=400, message=bad)
            return ErrorEvent(request_id=item.request_id, type="error", code=503, stage="vision",
                              message=f"the image embeddings for this request were lost before generation (a vision "
                                      f"replica failed?): retry the request ({exc})")
        except EngineLimitError as exc:
            return ErrorEvent(request_id=item.request_id, type="error", code=400, message=str(exc))
        except Exception as exc:
            log.exception("admitting %s failed", item.request_id)
            return ErrorEvent(request_id=item.request_id, type="error", code=500,
                              message=f"the LLM replica could not start this request: {type(exc).__name__}: {exc}")

    async def _idle_behind_a_lost_take(self) -> None:
        """Returns when the drain is over although the run loop cannot say so: it waits on a take long
        overdue (the queue's deployment is being deleted with this one, and Serve holds a call to a
        deployment without replicas until one appears), and nothing is running or left to send. The
        run loop is then cancelled, and `leave` hands back whatever that take may still lease here."""
        while True:
            await asyncio.sleep(0.25)
            overdue = self._take_overdue_at
            if (overdue is not None and time.monotonic() > overdue and not self.engine.has_work()
                    and not self._outbox and not self._unacked and self._publishing is None):
                log.info("LLM replica: nothing left to drain; the tensor queue has not answered a take for "
                         "%.0f s (is it being deleted too?): leaving without waiting for it",
                         time.monotonic() - overdue + self.TAKE_OVERDUE_S)
                return

    async def stats(self) -> dict[str, float]:
        return self.engine.stats()

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Ray Serve's hook: running and waiting requests and KV-cache use for the autoscaling policy."""
        if not hasattr(self, "engine"):  # Serve asks while the first reconfigure still builds the engine
            return {}
        return llm_stats(self.engine.stats())

    async def __del__(self) -> None:
        """Drain before going away: no item is lost and, within the timeout, nothing is cut short."""
        if not hasattr(self, "_run_task"):  # the engine was never built: nothing to drain
            return
        self._draining = True
        drained = asyncio.ensure_future(self._drained.wait())
        idle = asyncio.ensure_future(self._idle_behind_a_lost_take())
        # A broken engine finishes nothing: what it holds goes back to the queue at once.
        drain_s = self.DRAIN_TIMEOUT_S if self._unhealthy() is None else 0.0
        await asyncio.wait({drained, idle, self._run_task}, timeout=drain_s, return_when=asyncio.FIRST_COMPLETED)
        drained.cancel()
        idle.cancel()
        # The run loop stops before the last publish: one publisher at a time, events stay in order.
        self._run_task.cancel()
        await asyncio.gather(self._run_task, return_exceptions=True)
        if self._taking is not None:  # what it may lease here goes back with `leave` below
            self._taking.cancel()
        try:
            await self._publish(wait=True)
        except Exception:
            log.exception("final publish failed")
        try:  # leases still held go back to the queue (bounded: a queue being deleted too never answers)
            await asyncio.wait_for(self.queue.leave.remote(self.consumer_id), self.LEAVE_TIMEOUT_S)
        except Exception:
            log.exception("could not leave the tensor queue; its lease will expire")
        self._hb_task.cancel()
        try:
            await self.engine.shutdown()
        except Exception:
            log.exception("engine shutdown failed")
        self._publishing_metrics.cancel()

    def _unhealthy(self) -> str | None:
        """Why this replica's engine can serve no more (its health check then fails), or None."""
        why = self.engine.health_error()
        if why is None and self._failed_steps >= self.MAX_FAILED_STEPS:
            why = f"its last {self._failed_steps} steps failed, the last with {self._step_error}"
        # (Only while events still wait to be sent: a rejoin drops them, and an idle replica has none.)
        failing = (time.monotonic() - self._publish_failing_since
                   if self._publish_failing_since is not None and self._unacked else 0.0)
        if why is None and failing >= self.PUBLISH_FAILING_UNHEALTHY_S:
            why = (f"its answers could not be sent to the tensor queue for {failing:.0f} s, the last try with "
                   f"{self._publish_error}")
        return why

    def check_health(self) -> None:
        if not hasattr(self, "_run_task"):
            raise RuntimeError("the LLM engine was not built (no reconfigure with the deployment's config yet)")
        if self._run_task.done():
            raise RuntimeError("the LLM engine loop stopped")
        why = self._unhealthy()
        if why is not None:
            raise RuntimeError(f"the LLM engine is broken ({why}); this replica takes no new requests and Serve "
                               "replaces it. If its replacements fail the same way, see their logs for the "
                               "engine's first error (a lost GPU, out of memory, engine settings)")


# The default drain, plus time to deliver the last events and hand back the leases; the deploy body sets the
# pool's own (ServeAppConfig.deployment_options), and the operator sizes the LLM pods' termination grace
# period from it.
GRACEFUL_SHUTDOWN_TIMEOUT_S = LLM_GRACEFUL_SHUTDOWN_TIMEOUT_S
# This deployment's own Serve options; its slice, replicas and placement (GPUs, pool resource, one
# bundle per node) come from ServeAppConfig.deployment_options().
LLMServerDeployment = serve.deployment(name=LLM_DEPLOYMENT, max_ongoing_requests=16,
                                       graceful_shutdown_timeout_s=GRACEFUL_SHUTDOWN_TIMEOUT_S)(LLMServer)
