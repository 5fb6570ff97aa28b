"""The tensor queue between the vision pool and the LLM pool (pure asyncio, no Ray).

Semantics (docs/serving.md, "Tensor queue"):
- bounded in items and in bytes; FIFO for items and for producers waiting for room;
- backpressure: `put` waits up to a timeout for room, then raises `QueueFull` (the API answers 429 with
  Retry-After); nothing is ever dropped silently;
- pull-based: a consumer (an LLM replica) `take`s items when it has room in its KV cache; an item leaves
  the queue only then, and stays *leased* to that consumer until it publishes a final event;
- a consumer that stops heartbeating for `lease_timeout_s` is declared dead: its leased items are put
  back at the head of the queue (redelivered) when nothing has been streamed to the client yet and the
  delivery budget allows, otherwise the request fails with a clear error;
- results flow back through per-request mailboxes that the ingress long-polls; an event the LLM replica
  numbered (`i`, its place in the request's answer) is handed out only after every earlier one, so that
  two queue replicas receiving alternate calls cannot reorder an answer;
- hand-over: when Serve replaces the queue replica (its node drains, its options change), the old one
  (the *predecessor*) and the new one (the *successor*) are both in hand-over mode while both live: work
  the other one holds is not called unknown (its events are kept in an *orphan* mailbox), the
  predecessor sends producers to the successor (`QueueMoved`), and when it stops it gives its whole state
  (`snapshot`) to the successor, which merges it (`adopt`): nothing queued, leased or undelivered is lost.

`TensorQueueCore` is wrapped by a Ray Serve deployment (`deployments/queue.py`); keeping the logic here
makes it unit-testable without Ray.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..events import TERMINAL_EVENTS, ErrorEvent, Event, RestartEvent


async def _wait_until(ready: Callable[[], bool], changed: asyncio.Event, wait_s: float) -> None:
    """Wait until `ready()` holds or `wait_s` passes; `changed` is set whenever `ready()` may have become true."""
    deadline = time.monotonic() + wait_s
    while not ready():
        changed.clear()
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        try:
            await asyncio.wait_for(changed.wait(), timeout=remaining)
        except asyncio.TimeoutError:
            return

# How long a lost consumer's id is remembered (it is refused meanwhile; one gone that long is not coming back).
LOST_CONSUMER_TTL_S = 3600.0
# How long a long-poll waits during a hand-over: the stopping replica's ongoing calls end quickly.
HANDOFF_POLL_S = 0.5


class QueueFull(Exception):
    """No room in the queue within the enqueue timeout."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class QueueMoved(Exception):
    """This queue replica is being replaced: put the item into its successor (the caller retries)."""


class ConsumerLost(Exception):
    """The calling LLM replica was declared lost (no heartbeat within the lease timeout) and its work was
    given to others: it must drop what it still runs and join again under a new consumer id."""


class ItemTooLarge(ValueError):
    """An item larger than the whole queue's byte budget can never be admitted."""


@dataclass
class QueueItem:
    """One request's work for the LLM pool. `payload` is opaque to the queue (prompt ids, sampling
    parameters, `TensorHandle` of the image embeddings)."""

    request_id: str
    nbytes: int
    reserved_tokens: int
    payload: Any
    stream: bool = False
    enqueued_at: float = field(default_factory=time.monotonic)
    deliveries: int = 0


# A put's wait ends with one of these: room was reserved for it, or the queue is moving.
_ADMITTED, _MOVED = "admitted", "moved"


@dataclass
class _Mailbox:
    events: list[Event] = field(default_factory=list)  # ready for the ingress, in order
    waiter: asyncio.Event = field(default_factory=asyncio.Event)
    # Long-polls over several mailboxes at once (next_events_many) wait on one event of their own.
    watchers: set[asyncio.Event] = field(default_factory=set)
    streamed: bool = False  # a token event was published (so a redelivery would repeat output)
    done: bool = False  # the terminal event is in `events` (or was handed out)
    last_touch: float = field(default_factory=time.monotonic)
    next_index: int = 0  # the numbered event (`i`) that may be handed out next
    held: dict[int, Event] = field(default_factory=dict)  # numbered events that came before an earlier one
    orphan: bool = False  # the request is not known here (yet): kept during a hand-over only
    # Since when `held` has waited for an earlier event (None: nothing held). Outside a hand-over only a lost
    # event leaves a hole for that long: `reap` then ends the answer instead of holding its end back forever.
    gap_since: float | None = None
    # The delivery (`d`: the item's delivery count when an LLM replica took it) whose events the box hands out
    # now; 0 until one is known. Events of an earlier one are dropped: while the queue moves, the replica
    # that did not redeliver the request may still hold the first delivery's events, whose numbers the new
    # delivery uses again. (Events of LLM replicas of an earlier release carry none.)
    delivery: int = 0

    def wake(self) -> None:
        """Something changed: events arrived, the box was ended, or it is no longer the request's."""
        self.waiter.set()
        for w in self.watchers:
            w.set()

    def accept(self, ev: Event) -> bool:
        """Queue the event for the ingress, in its answer's order; True if something became ready."""
        i, d = ev.get("i"), ev.get("d")  # type: ignore[union-attr]
        if d is not None:
            if d < self.delivery or (d == self.delivery and ev["type"] == "restart"):
                return False  # a superseded delivery's event, or a restart this box has already made
            if d > self.delivery:
                self.delivery = d
                if ev["type"] != "restart" and d > 1:  # the restart came to the replica that redelivered it
                    self._ready(RestartEvent(request_id=ev["request_id"], type="restart", d=d))
                    self.next_index, self.held, self.gap_since = 0, {}, None
        if i is None:  # made by the queue itself (restart, error): in arrival order
            self._ready(ev)
            if ev["type"] == "restart":  # the next delivery numbers its events from 0 again
                self.next_index, self.held, self.gap_since = 0, {}, None
            return True
        if i < self.next_index or i in self.held:
            return False  # a repeat
        self.held[i] = ev
        ready = False
        while self.next_index in self.held:
            self._ready(self.held.pop(self.next_index))
            self.next_index += 1
            ready = True
        self.gap_since = (self.gap_since or time.monotonic()) if self.held else None
        return ready

    def fail_hole(self, request_id: str) -> None:
        """An event this answer needs was lost (it reached a queue replica that is gone): end the answer."""
        self.held, self.gap_since = {}, None
        self._ready(ErrorEvent(request_id=request_id, type="error", code=503,
                               message="part of this answer was lost while the tensor queue moved to "
                                       "another node; please retry the request"))

    def _ready(self, ev: Event) -> None:
        if self.done:
            return
        if ev["type"] == "token":
            self.streamed = True
        self.events.append(ev)
        if ev["type"] in TERMINAL_EVENTS:
            self.done = True


@dataclass
class _Consumer:
    consumer_id: str
    last_seen: float
    leased: dict[str, QueueItem] = field(default_factory=dict)
    cancelled: set[str] = field(default_factory=set)
    stats: dict[str, float] = field(default_factory=dict)
    # A take's answer can be lost on its way back (a blip of this replica's connection): the consumer names
    # the takes it never got an answer to, and what they leased goes back (`_give_back_take`). Take id ->
    # the requests it leased (the last few takes), and the ids given up before they ran here.
    takes: dict[int, list[str]] = field(default_factory=dict)
    given_up: set[int] = field(default_factory=set)


# Takes remembered per consumer (a lost answer is named by the consumer's next take, a moment later).
_TAKES_KEPT = 16


@dataclass
class MailboxState:
    """A mailbox as it travels in a snapshot."""

    events: list[Event]
    held: dict[int, Event]
    next_index: int
    streamed: bool
    orphan: bool
    delivery: int = 0  # `_Mailbox.delivery` (a snapshot of an earlier release has none)


@dataclass
class QueueSnapshot:
    """What a stopping queue replica gives its successor (`TensorQueueCore.snapshot`); it travels as one
    Ray call's argument, so the image embeddings' object refs inside the items stay tracked."""

    items: list[tuple[QueueItem, float]]  # (item, seconds it has waited)
    mailboxes: dict[str, MailboxState]
    leases: dict[str, tuple[list[QueueItem], list[str]]]  # consumer -> (leased items, cancelled request ids)
    ended: list[str]
    cancelled: list[str]
    lost: list[str] = field(default_factory=list)  # consumers declared lost (refused if they call again)
    # consumer -> (its numbered takes: take id -> the requests it leased, and the take ids it gave up): a take
    # whose answer the predecessor never sent is named to the successor (`TensorQueueCore.take`). (A snapshot
    # of an earlier release has none.)
    takes: dict[str, tuple[dict[int, list[str]], list[int]]] = field(default_factory=dict)


def _merge_mailbox(box: _Mailbox, other: MailboxState) -> None:
    """Put two replicas' views of one answer together, in order. Each numbered event reached one replica;
    what either replica already handed out is the prefix below the larger `next_index` of the two. Only the
    latest delivery's events count (`_Mailbox.delivery`): a replica that redelivered the request made a restart
    the other one never saw, and the other one's events of the earlier delivery use the same numbers."""
    delivery = max(box.delivery, getattr(other, "delivery", 0))

    def stale(ev: Event) -> bool:
        return ev.get("d", delivery) < delivery  # type: ignore[union-attr, operator]

    def current(ready: list[Event], held: dict[int, Event], next_index: int,
                side: int) -> tuple[list[Event], dict[int, Event], int]:
        """A replica's ready events, held events and next number, without an earlier delivery's: the numbered
        events before its last restart (the client drops them at the restart, and the numbers after it count
        from 0 again: kept, they took the places of the new delivery's events), and those a later delivery
        (seen by the other replica) superseded; a replica still on an earlier delivery handed out none of it."""
        last = max((k for k, ev in enumerate(ready) if ev["type"] == "restart"), default=-1)
        ready = [ev for k, ev in enumerate(ready)  # type: ignore[union-attr]
                 if (k > last or ev.get("i") is None) and not stale(ev)]
        held = {i: ev for i, ev in held.items() if not stale(ev)}
        return ready, held, 0 if 0 < side < delivery else next_index

    def handed_out(ready: list[Event], next_index: int) -> int:
        numbered = [ev["i"] for ev in ready if ev.get("i") is not None]  # type: ignore[union-attr]
        return min(numbered) if numbered else next_index

    def restart_handed_out(ready: list[Event], side: int) -> bool:
        """The replica handed out the current delivery's restart already: it was on that delivery (so it had its
        restart: made, received, or its own when the delivery's first event came) and holds it no more. The
        other replica's own restart would reach the client a second time, after the new delivery's first tokens:
        an ingress of an earlier release (a rolling update) then dropped them from the answer."""
        return 1 < delivery == side and not any(
            ev["type"] == "restart" and ev.get("d") == delivery for ev in ready)  # type: ignore[union-attr]

    had_restart = (restart_handed_out(box.events, box.delivery)
                   or restart_handed_out(list(other.events), getattr(other, "delivery", 0)))
    box_ready, box_held, box_next = current(box.events, box.held, box.next_index, box.delivery)
    other_ready, other_held, other_next = current(list(other.events), dict(other.held), other.next_index,
                                                  getattr(other, "delivery", 0))
    start = max(handed_out(box_ready, box_next), handed_out(other_ready, other_next))
    pending = other_ready + box_ready
    numbered = {**other_held, **box_held}
    unnumbered: list[Event] = []
    restarts: set[int] = {delivery} if had_restart else set()
    for ev in pending:
        i = ev.get("i")  # type: ignore[union-attr]
        if i is not None:
            numbered[i] = ev
        elif ev["type"] != "restart" or ev.get("d") is None or ev["d"] not in restarts:  # type: ignore[typeddict-item]
            unnumbered.append(ev)
            if ev["type"] == "restart" and ev.get("d") is not None:
                restarts.add(ev["d"])  # type: ignore[typeddict-item]  # (each replica may have made one)
    box.events, box.held, box.done, box.gap_since = [], {}, False, None
    box.next_index, box.delivery = start, delivery
    box.streamed = box.streamed or other.streamed
    box.orphan = box.orphan and other.orphan
    for ev in unnumbered:  # made by a queue (a restart or an error): before what follows
        box._ready(ev)
    for i in sorted(numbered):
        if i >= start:
            box.accept(numbered[i])
    box.wake()


class TensorQueueCore:
    def __init__(self, *, max_items: int, max_bytes: int, lease_timeout_s: float = 10.0,
                 max_deliveries: int = 2, mailbox_ttl_s: float = 120.0,
                 observe_wait: Callable[[float], None] | None = None) -> None:
        """`observe_wait` is told, for each item taken, how long it waited in the queue (a metric)."""
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.lease_timeout_s = lease_timeout_s
        self.max_deliveries = max_deliveries
        self.mailbox_ttl_s = mailbox_ttl_s
        self.observe_wait = observe_wait
        self._items: deque[QueueItem] = deque()
        self._bytes = 0
        # (future, nbytes) of producers waiting for room, in arrival order; a woken producer holds a
        # reservation (_reserved_*) until it has appended, so a newcomer cannot take its room.
        self._put_waiters: deque[tuple[asyncio.Future[None], int]] = deque()
        self._reserved_items = 0
        self._reserved_bytes = 0
        self._item_available = asyncio.Event()
        self._mailboxes: dict[str, _Mailbox] = {}
        self._consumers: dict[str, _Consumer] = {}
        # Consumers declared lost -> when. One that was only slow (a stall longer than the lease timeout) and
        # calls again gets ConsumerLost rather than a fresh registration: its leases went to others, and its
        # copies of those requests must not publish into their mailboxes (two copies of one answer).
        self._lost: dict[str, float] = {}
        self._seq = itertools.count()
        # Hand-over (module docstring): None, "predecessor" or "successor"; what happened to requests this
        # replica did not know while it was in hand-over mode, to apply once the predecessor's state is here.
        self.handoff: str | None = None
        self._ended_unknown: set[str] = set()  # their terminal event was handed out or published here
        self._cancelled_unknown: set[str] = set()
        self.counters: dict[str, int] = {"enqueued": 0, "rejected_full": 0, "taken": 0, "redelivered": 0,
                                         "failed_consumer_lost": 0, "cancelled": 0, "completed": 0,
                                         "moved": 0, "adopted": 0}

    def set_limits(self, *, max_items: int, max_bytes: int, lease_timeout_s: float, max_deliveries: int) -> None:
        """New limits, in place: what is queued stays (even over a lowered limit: producers wait until
        it drains below); a raised limit admits waiting producers at once."""
        self.max_items, self.max_bytes = max_items, max_bytes
        self.lease_timeout_s, self.max_deliveries = lease_timeout_s, max_deliveries
        self._wake_producers()

    # ---------------------------------------------------------------- producers
    def _has_room(self, nbytes: int) -> bool:
        return (len(self._items) + self._reserved_items < self.max_items
                and self._bytes + self._reserved_bytes + nbytes <= self.max_bytes)

    async def put(self, item: QueueItem, timeout_s: float) -> None:
        """Enqueue, waiting FIFO behind earlier producers for up to `timeout_s`; raises `QueueFull`."""
        if item.nbytes > self.max_bytes:
            raise ItemTooLarge(f"the request's image embeddings take {item.nbytes} bytes, more than the tensor "
                               f"queue's whole budget ({self.max_bytes} bytes): send fewer or smaller images")
        if item.request_id in self._mailboxes and not self._mailboxes[item.request_id].orphan:
            raise ValueError(f"duplicate request id {item.request_id}")
        if self.handoff == "predecessor":
            raise self._moved()
        if self._put_waiters or not self._has_room(item.nbytes):
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            entry = (fut, item.nbytes)
            self._put_waiters.append(entry)
            try:
                outcome = await asyncio.wait_for(asyncio.shield(fut), timeout=timeout_s)
            except asyncio.TimeoutError:
                if not fut.done():
                    self._put_waiters.remove(entry)
                    self.counters["rejected_full"] += 1
                    self._wake_producers()
                    raise QueueFull(
                        f"the server is at capacity: the tensor queue stayed full ({len(self._items)} items, "
                        f"{self._bytes} bytes) for {timeout_s:g} s; retry later",
                        retry_after_s=self.retry_after_hint()) from None
                # Woken (room reserved, or the queue moved) in the very turn the timeout fired: the wake
                # counts, else the reservation would never be released.
                outcome = fut.result()
            except BaseException:
                if fut.done() and not fut.cancelled() and fut.result() == _ADMITTED:
                    self._release_reservation(item.nbytes)
                elif entry in self._put_waiters:
                    self._put_waiters.remove(entry)
                self._wake_producers()
                raise
            if outcome == _MOVED:
                raise self._moved()
            self._release_reservation(item.nbytes)
        item.enqueued_at = time.monotonic()
        self._items.append(item)
        self._bytes += item.nbytes
        orphan = self._mailboxes.get(item.request_id)  # (a hand-over: events that came before the item)
        box = self._mailboxes[item.request_id] = orphan or _Mailbox()
        box.orphan = False
        self.counters["enqueued"] += 1
        self._item_available.set()
        self._wake_producers()

    def _moved(self) -> QueueMoved:
        self.counters["moved"] += 1
        return QueueMoved("this tensor queue replica is being replaced; put the request into its successor")

    def _wake_producers(self) -> None:
        """Admit waiting producers in arrival order while there is room, reserving it for them."""
        if self.handoff == "predecessor":
            for fut, _ in self._put_waiters:
                if not fut.done():
                    fut.set_result(_MOVED)
            self._put_waiters.clear()
            return
        while self._put_waiters:
            fut, nbytes = self._put_waiters[0]
            if fut.done():
                self._put_waiters.popleft()
                continue
            if not self._has_room(nbytes):
                break
            self._put_waiters.popleft()
            self._reserved_items += 1
            self._reserved_bytes += nbytes
            fut.set_result(_ADMITTED)

    def _release_reservation(self, nbytes: int) -> None:
        self._reserved_items -= 1
        self._reserved_bytes -= nbytes

    def retry_after_hint(self) -> float:
        """Seconds a rejected client should wait: roughly the age of the oldest queued item, 1..30 s."""
        age = self.oldest_age_s()
        return float(min(30.0, max(1.0, round(age))))

    # ---------------------------------------------------------------- consumers
    def _touch(self, consumer_id: str) -> _Consumer:
        if consumer_id in self._lost:
            raise ConsumerLost(f"LLM replica {consumer_id} was declared lost; its work went to other replicas")
        now = time.monotonic()
        c = self._consumers.get(consumer_id)
        if c is None:
            c = self._consumers[consumer_id] = _Consumer(consumer_id, now)
        c.last_seen = now
        return c

    async def take(self, consumer_id: str, *, max_items: int, token_budget: int, wait_s: float,
                   take_id: int | None = None, lost_takes: list[int] | tuple[int, ...] = ()) -> list[QueueItem]:
        """Lease up to `max_items` head items whose reserved tokens fit `token_budget` (FIFO: stops at
        the first that does not fit). Waits up to `wait_s` when the queue is empty. `take_id` numbers the
        consumer's takes; `lost_takes` are earlier ones whose answer never reached it: what they leased and
        the consumer has not started (no event came for it) goes back to the head of the queue first."""
        c = self._touch(consumer_id)
        for tid in lost_takes:
            self._give_back_take(c, tid)
        if take_id is not None and take_id in c.given_up:
            return []  # (given up before it ran: its answer would be lost too)
        await _wait_until(lambda: bool(self._items) or max_items <= 0, self._item_available, wait_s)
        c = self._touch(consumer_id)
        if take_id is not None and take_id in c.given_up:
            c.given_up.discard(take_id)
            return []
        out: list[QueueItem] = []
        while self._items and len(out) < max_items:
            head = self._items[0]
            if head.reserved_tokens > token_budget and (out or c.leased):
                break
            self._items.popleft()
            self._bytes -= head.nbytes
            head.deliveries += 1
            c.leased[head.request_id] = head
            token_budget -= head.reserved_tokens
            out.append(head)
        if out and take_id is not None:
            c.takes[take_id] = [it.request_id for it in out]
            for old in list(c.takes)[:-_TAKES_KEPT]:
                del c.takes[old]
        if out:
            self.counters["taken"] += len(out)
            self._wake_producers()
            if self.observe_wait is not None:
                now = time.monotonic()
                for item in out:
                    self.observe_wait(now - item.enqueued_at)
        return out

    def _give_back_take(self, c: _Consumer, take_id: int) -> None:
        """The consumer never got the answer of its take `take_id`: what it leased and has not started
        goes back to the head of the queue (not counted as a delivery); one given up before it ran here
        leases nothing when it does."""
        rids = c.takes.pop(take_id, None)
        if rids is None:
            c.given_up.add(take_id)
            while len(c.given_up) > _TAKES_KEPT:
                c.given_up.discard(min(c.given_up))
            return
        back: list[QueueItem] = []
        for rid in rids:
            item = c.leased.get(rid)
            box = self._mailboxes.get(rid)
            if item is None or (box is not None and (box.held or box.next_index or box.done)):
                continue  # ended, or it runs there after all (this delivery's events came)
            del c.leased[rid]
            c.cancelled.discard(rid)
            if box is None:
                continue  # cancelled by its client meanwhile: nothing to give back
            item.deliveries -= 1
            back.append(item)
        self._requeue(back)

    def publish(self, consumer_id: str, events: list[Event], stats: dict[str, float] | None = None) -> list[str]:
        """Deliver events (`dotsvlm_serving.events`) to their requests' mailboxes; doubles as
        a heartbeat. Returns the ids of this consumer's requests that it should stop: cancelled by
        their clients, or unknown here (this queue replica replaced one that died: the ingress has
        enqueued those requests again under new ids, so the consumer must not keep generating them).
        During a hand-over nothing is called unknown: the other replica may hold it."""
        c = self._touch(consumer_id)
        if stats is not None:
            c.stats = dict(stats)
        unknown: set[str] = set()
        for ev in events:
            rid = ev["request_id"]
            box = self._mailboxes.get(rid)
            if box is None and self.handoff is not None and rid not in self._ended_unknown:
                box = self._mailboxes[rid] = _Mailbox(orphan=True)
            if ev["type"] in TERMINAL_EVENTS:
                if c.leased.pop(rid, None) is not None:
                    self.counters["completed"] += 1
                elif self.handoff is not None:
                    self._ended_unknown.add(rid)  # its lease may be in the other replica's state
                c.cancelled.discard(rid)
            elif box is None and rid not in c.leased:
                unknown.add(rid)
            if box is not None and box.accept(ev):
                box.wake()
        return sorted(c.cancelled | unknown)

    def unknown_requests(self, request_ids: list[str]) -> bool:
        """Whether any of these requests is unknown here (the adapter then checks for a hand-over)."""
        return any(rid not in self._mailboxes for rid in request_ids)

    def heartbeat(self, consumer_id: str, stats: dict[str, float] | None = None) -> list[str]:
        return self.publish(consumer_id, [], stats)

    def leave(self, consumer_id: str) -> None:
        """A consumer shutting down cleanly hands its leases back (as if it had died, but at once)."""
        c = self._consumers.get(consumer_id)
        if c is not None:
            self._declare_dead(c, reason="the LLM replica shut down")

    # ---------------------------------------------------------------- clients (the ingress)
    async def next_events(self, request_id: str, wait_s: float, *, until_done: bool = False) -> list[Event]:
        """Long-poll a request's mailbox. Returns [] on timeout; raises KeyError for an unknown id (during
        a hand-over it waits instead, at most HANDOFF_POLL_S: the other replica may hold it). With
        `until_done` (a non-streaming client) it waits for the terminal event, so one call usually
        carries the whole answer. (Streams after their first event use next_events_many, which lingers
        to batch tokens.) The mailbox is removed once its terminal event has been returned."""
        box = self._poll_box(request_id)
        if box is None:
            return []
        if self.handoff is not None:  # short polls, so that a stopping replica drains within seconds
            wait_s = min(wait_s, HANDOFF_POLL_S)
        box.last_touch = time.monotonic()
        await _wait_until(lambda: bool(box.events) and (not until_done or box.done), box.waiter, wait_s)
        return self._take_events(request_id, box)

    async def next_events_many(self, request_ids: list[str], wait_s: float,
                               linger_s: float = 0.0) -> dict[str, list[Event] | None]:
        """One long-poll for several streaming requests (an ingress's streams after their first event):
        waits until any of them has events, lingers up to `linger_s` for more (or until those that have
        events are done), then returns every request's events: a list for each (empty when it has none
        yet) and None for an id this replica does not know (next_events' KeyError). One call per cadence
        for all of an ingress's streams instead of one per stream."""
        out: dict[str, list[Event] | None] = {}
        boxes: dict[str, _Mailbox] = {}
        for rid in dict.fromkeys(request_ids):
            try:
                box = self._poll_box(rid)
            except KeyError:
                out[rid] = None
                continue
            if box is None:
                out[rid] = []
            else:
                boxes[rid] = box
        if self.handoff is not None:
            wait_s, linger_s = min(wait_s, HANDOFF_POLL_S), min(linger_s, HANDOFF_POLL_S)
        if out or not boxes:  # an unknown one is news already: answer at once
            wait_s = linger_s = 0.0
        changed = asyncio.Event()
        for box in boxes.values():
            box.last_touch = time.monotonic()
            box.watchers.add(changed)
        try:
            gone = lambda: any(self._mailboxes.get(rid) is not box for rid, box in boxes.items())  # noqa: E731
            await _wait_until(lambda: gone() or any(b.events for b in boxes.values()), changed, wait_s)
            if linger_s > 0 and not gone():
                await _wait_until(lambda: all(b.done for b in boxes.values() if b.events), changed, linger_s)
        finally:
            for box in boxes.values():
                box.watchers.discard(changed)
        for rid, box in boxes.items():
            out[rid] = self._take_events(rid, box)
        return out

    def _poll_box(self, request_id: str) -> _Mailbox | None:
        """The request's mailbox for a long-poll; None when it ended unknown during a hand-over; KeyError
        when this replica does not know it (during a hand-over an orphan box waits for its events)."""
        box = self._mailboxes.get(request_id)
        if box is None:
            if self.handoff is None:
                raise KeyError(request_id)
            if request_id in self._ended_unknown:
                return None
            box = self._mailboxes[request_id] = _Mailbox(orphan=True)
        return box

    def _take_events(self, request_id: str, box: _Mailbox) -> list[Event]:
        """Hand out what the box holds; the box goes once its terminal event has been handed out."""
        events, box.events = box.events, []
        box.last_touch = time.monotonic()
        if box.done and events and events[-1]["type"] in TERMINAL_EVENTS:
            self._mailboxes.pop(request_id, None)
            if self.handoff is not None:
                self._ended_unknown.add(request_id)  # the other replica's copy of it is stale
        return events

    def cancel(self, request_id: str) -> bool:
        """The client went away: drop a queued item at once, or ask the leasing consumer to stop."""
        box = self._mailboxes.pop(request_id, None)
        found = box is not None and not box.orphan
        if self.handoff is not None and not found:
            self._cancelled_unknown.add(request_id)  # applied once the other replica's state is here
        for i, it in enumerate(self._items):
            if it.request_id == request_id:
                del self._items[i]
                self._bytes -= it.nbytes
                self._wake_producers()
                break
        for c in self._consumers.values():
            if request_id in c.leased:
                c.cancelled.add(request_id)
        if found:
            self.counters["cancelled"] += 1
        return found

    # ---------------------------------------------------------------- liveness
    def reap(self, now: float | None = None) -> list[str]:
        """Declare consumers without a heartbeat for `lease_timeout_s` dead; drop stale mailboxes.
        Returns the dead consumer ids."""
        now = time.monotonic() if now is None else now
        # A predecessor's consumers heartbeat its successor now: their leases travel with the snapshot.
        dead = [c for c in self._consumers.values()
                if now - c.last_seen > self.lease_timeout_s and self.handoff != "predecessor"]
        for c in dead:
            self._declare_dead(c, reason=f"the LLM replica stopped responding (no heartbeat for "
                                         f"{self.lease_timeout_s:g} s)")
        for rid, box in list(self._mailboxes.items()):
            if box.done and now - box.last_touch > self.mailbox_ttl_s:
                del self._mailboxes[rid]
            elif (self.handoff is None and box.held and not box.done and box.gap_since is not None
                  and now - box.gap_since > self.lease_timeout_s):
                # A hole outside a hand-over, for a lease timeout: its event went to a queue replica that
                # vanished during one (a successor killed, an adoption that failed). Nothing can fill it.
                self._fail_hole(rid, box)
        for cid, at in list(self._lost.items()):
            if now - at > LOST_CONSUMER_TTL_S:
                del self._lost[cid]
        return [c.consumer_id for c in dead]

    def _declare_dead(self, c: _Consumer, *, reason: str) -> None:
        self._consumers.pop(c.consumer_id, None)
        self._lost[c.consumer_id] = time.monotonic()
        requeue: list[QueueItem] = []
        for rid, item in c.leased.items():
            box = self._mailboxes.get(rid)
            if box is None or box.done:
                continue
            if (box.streamed and item.stream) or item.deliveries >= self.max_deliveries:
                self.counters["failed_consumer_lost"] += 1
                box.events.append(ErrorEvent(request_id=rid, type="error", code=503,
                                             message=f"{reason} while generating this answer; please retry the request"))
                box.done = True
            else:
                self.counters["redelivered"] += 1
                # Tell the client to discard partial output it may have buffered (non-streaming only); the
                # next delivery numbers its events from 0 again (accept() resets the order for a restart).
                box.accept(RestartEvent(request_id=rid, type="restart", d=item.deliveries + 1))
                box.streamed = False
                requeue.append(item)
            box.wake()
        self._requeue(requeue)

    def _requeue(self, items: list[QueueItem]) -> None:
        """Put leased items back at the head of the queue, in their order. Their wait starts again now: the
        time they spent leased (running on a replica that died or drained, the lease timeout) is no wait in
        the queue, and counted as one it made the oldest age (the LLM pool's `QueueAge` signal, the 429s'
        Retry-After, the waiting-long alert) jump by a drain timeout and the wait histogram count the first
        wait again, in the next take's sample."""
        now = time.monotonic()
        for item in reversed(items):
            item.enqueued_at = now
            self._items.appendleft(item)
            self._bytes += item.nbytes
        if items:
            self._item_available.set()

    def _fail_hole(self, rid: str, box: _Mailbox) -> None:
        """End an answer that lost an event; the LLM replica still generating it is told to stop."""
        box.fail_hole(rid)
        for c in self._consumers.values():
            if rid in c.leased:
                c.cancelled.add(rid)
        box.wake()

    # ---------------------------------------------------------------- hand-over
    def begin_handoff(self, role: str) -> None:
        """Another replica of this queue is alive: `role` "predecessor" if this one is older (it sends
        producers on and gives its state away when it stops), else "successor" (it adopts that state)."""
        if role not in ("predecessor", "successor"):
            raise ValueError(f"unknown hand-over role {role!r}")
        if self.handoff == role:
            return
        self.handoff = role
        if role == "predecessor":
            self._wake_producers()  # waiting producers go to the successor

    def holds_state(self) -> bool:
        """Whether a successor would have anything to carry on: queued items, leases or open answers."""
        return bool(self._items or self._mailboxes or any(c.leased for c in self._consumers.values()))

    def snapshot(self) -> QueueSnapshot:
        """Everything this replica holds that its successor must carry on: queued items (with their
        age), leases, undelivered events, and what it learnt about requests it did not know."""
        now = time.monotonic()
        return QueueSnapshot(
            items=[(it, now - it.enqueued_at) for it in self._items],
            mailboxes={rid: MailboxState(events=list(b.events), held=dict(b.held), next_index=b.next_index,
                                         streamed=b.streamed, orphan=b.orphan, delivery=b.delivery)
                       for rid, b in self._mailboxes.items()},
            leases={cid: (list(c.leased.values()), sorted(c.cancelled)) for cid, c in self._consumers.items()},
            ended=sorted(self._ended_unknown), cancelled=sorted(self._cancelled_unknown), lost=sorted(self._lost),
            takes={cid: (dict(c.takes), sorted(c.given_up)) for cid, c in self._consumers.items()
                   if c.takes or c.given_up})

    def adopt(self, snap: QueueSnapshot) -> dict[str, int]:
        """Merge a predecessor's snapshot and leave hand-over mode. Its items go ahead of this replica's
        (they are older); each answer's events from both replicas are put back in order. Returns counts."""
        now = time.monotonic()
        ended = self._ended_unknown | set(snap.ended)
        cancelled = self._cancelled_unknown | set(snap.cancelled)
        for rid, state in snap.mailboxes.items():
            box = self._mailboxes.get(rid)
            if box is None:
                if rid in ended:
                    continue  # its answer was handed out here
                box = self._mailboxes[rid] = _Mailbox(orphan=True)
            _merge_mailbox(box, state)
        dropped = cancelled | ended
        items = [(it, age) for it, age in snap.items if it.request_id not in dropped]
        for it, age in reversed(items):
            it.enqueued_at = now - age
            self._items.appendleft(it)
            self._bytes += it.nbytes
        leases = 0
        for cid in snap.lost:
            self._lost.setdefault(cid, now)
        takes = getattr(snap, "takes", None) or {}  # (none from a predecessor of an earlier release)
        for cid, (leased, cancelled_by_client) in snap.leases.items():
            c = self._consumers.setdefault(cid, _Consumer(cid, now))
            c.cancelled.update(cancelled_by_client)
            for it in leased:
                if it.request_id not in ended:
                    c.leased.setdefault(it.request_id, it)
                    leases += 1
            their_takes, their_given_up = takes.get(cid, ({}, []))
            for tid, rids in their_takes.items():
                c.takes.setdefault(tid, list(rids))
            for old in sorted(c.takes)[:-_TAKES_KEPT]:
                del c.takes[old]
            for tid in sorted(c.given_up & set(their_takes)):  # named here before its record came: give it back now
                c.given_up.discard(tid)
                self._give_back_take(c, tid)
            for tid in their_given_up:
                if tid not in c.takes:
                    c.given_up.add(tid)
            while len(c.given_up) > _TAKES_KEPT:
                c.given_up.discard(min(c.given_up))
            if cid in self._lost:  # declared lost here meanwhile: what it held goes to other replicas
                self._declare_dead(c, reason="the LLM replica stopped responding")
        for rid in cancelled:
            self.cancel(rid)
        self.counters["adopted"] += len(items) + leases
        self.end_handoff()
        return {"items": len(items), "leases": leases, "mailboxes": len(snap.mailboxes)}

    def end_handoff(self) -> None:
        """Leave hand-over mode: after `adopt`, or when the other replica is gone without a snapshot (a
        killed predecessor, or a successor gone before this predecessor stopped): then what only it knew is
        lost, and the usual recovery applies (the ingress enqueues those requests again, LLM replicas stop
        them)."""
        if self.handoff == "predecessor":
            # Its consumers heartbeated the successor meanwhile (`reap` spared them): give them a lease
            # timeout to find this replica again before they count as dead.
            now = time.monotonic()
            for c in self._consumers.values():
                c.last_seen = now
        self.handoff = None
        self._ended_unknown.clear()
        self._cancelled_unknown.clear()
        for rid, box in list(self._mailboxes.items()):
            if box.orphan:  # known to neither replica: unknown from now on
                del self._mailboxes[rid]
            elif box.held and not box.done:  # an event that went to the other replica was lost
                self._fail_hole(rid, box)
            box.wake()
        self._item_available.set()
        self._wake_producers()

    # ---------------------------------------------------------------- observability
    def oldest_age_s(self) -> float:
        """How long the longest-waiting item has waited since it (last) entered the queue. Not always the
        head's: items put back at the head (`_requeue`) start their wait again."""
        return time.monotonic() - min(it.enqueued_at for it in self._items) if self._items else 0.0

    def stats(self) -> dict[str, Any]:
        consumers = {cid: dict(c.stats, leased=len(c.leased)) for cid, c in self._consumers.items()}
        return {
            "depth": len(self._items),
            "bytes": self._bytes,
            "oldest_age_s": self.oldest_age_s(),
            "waiting_producers": sum(1 for f, _ in self._put_waiters if not f.done()),
            "leased": sum(len(c.leased) for c in self._consumers.values()),
            "consumers": consumers,
            "consumer_count": len(consumers),
            "max_items": self.max_items,
            "max_bytes": self.max_bytes,
            "counters": dict(self.counters),
        }
