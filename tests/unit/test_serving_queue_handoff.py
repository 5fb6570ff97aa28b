"""The tensor queue's hand-over, without Ray: when Serve replaces the queue replica, the old one (predecessor)
and the new one (successor) both live for a while and each receives some of the calls; the old one then
gives its state to the new one. Nothing queued, leased or undelivered may be lost, no answer may be
reordered, and an LLM replica must not be told to stop work the other replica holds."""

from __future__ import annotations

import asyncio
import time

import pytest

from dotsvlm_serving.deployments.queue_peers import STALE_S, Peer, handoff_role
from dotsvlm_serving.tensor_queue import QueueItem, QueueMoved, TensorQueueCore


def item(rid: str, stream: bool = True) -> QueueItem:
    return QueueItem(request_id=rid, nbytes=10, reserved_tokens=10, payload={"id": rid}, stream=stream)


def tok(rid: str, i: int, text: str) -> dict:
    return {"request_id": rid, "type": "token", "text": text, "i": i}


def fin(rid: str, i: int) -> dict:
    return {"request_id": rid, "type": "finish", "finish_reason": "length", "text": "", "i": i,
            "usage": {"prompt_tokens": 1, "completion_tokens": i}}


def pair() -> tuple[TensorQueueCore, TensorQueueCore]:
    old, new = TensorQueueCore(max_items=8, max_bytes=10_000), TensorQueueCore(max_items=8, max_bytes=10_000)
    return old, new


async def drain_text(q: TensorQueueCore, rid: str) -> tuple[str, str | None]:
    """Everything the ingress can read of an answer right now: its text and how it ended."""
    text, end = [], None
    for ev in await q.next_events(rid, 0.01):
        text.append(ev.get("text", ""))
        end = ev["type"] if ev["type"] in ("finish", "error") else end
    return "".join(text), end


def test_an_answer_split_between_the_two_replicas_reaches_the_client_whole_and_in_order() -> None:
    async def main() -> None:
        old, new = pair()
        await old.put(item("a"), 1)
        assert [i.request_id for i in await old.take("llm1", max_items=1, token_budget=100, wait_s=0)] == ["a"]
        assert old.publish("llm1", [tok("a", 0, "He")]) == []
        assert await drain_text(old, "a") == ("He", None)  # the client saw the first token
        new.begin_handoff("successor")
        old.begin_handoff("predecessor")
        # The router alternates: token 1 to the new replica, token 2 to the old, then the end to the new.
        assert new.publish("llm1", [tok("a", 1, "ll")]) == []  # not "unknown": the LLM keeps generating
        assert old.publish("llm1", [tok("a", 2, "o")]) == []
        assert new.publish("llm1", [fin("a", 3)]) == []
        assert await drain_text(old, "a") == ("", None)  # token 2 waits for token 1
        assert await drain_text(new, "a") == ("", None)  # the new replica cannot hand out token 1 first either
        counts = new.adopt(old.snapshot())
        assert counts["leases"] == 0  # the request ended while the lease was still in the old state
        assert await drain_text(new, "a") == ("llo", "finish")
        assert new.handoff is None and new.stats()["leased"] == 0
    asyncio.run(main())


def test_queued_and_leased_work_moves_ahead_of_new_work_and_a_lost_lease_is_redelivered_later() -> None:
    async def main() -> None:
        old, new = pair()
        for rid in ("q1", "q2", "l1"):
            await old.put(item(rid), 1)
        await old.take("llm1", max_items=1, token_budget=10, wait_s=0)  # q1 leased
        new.begin_handoff("successor")
        old.begin_handoff("predecessor")
        with pytest.raises(QueueMoved):  # producers go to the successor
            await old.put(item("late"), 1)
        await new.put(item("n1"), 1)
        counts = new.adopt(old.snapshot())
        assert counts == {"items": 2, "leases": 1, "mailboxes": 3}
        got = await new.take("llm2", max_items=8, token_budget=1000, wait_s=0)
        assert [i.request_id for i in got] == ["q2", "l1", "n1"]  # older work first
        assert new.stats()["consumers"]["llm1"]["leased"] == 1  # the lease came along ...
        new.leave("llm1")  # ... and when llm1 leaves (or dies), q1 goes back to the queue as before
        assert [i.request_id for i in await new.take("llm2", max_items=8, token_budget=1000, wait_s=0)] == ["q1"]
    asyncio.run(main())


def test_a_producer_waiting_for_room_in_the_old_replica_is_sent_to_the_new_one_at_once() -> None:
    async def main() -> None:
        old = TensorQueueCore(max_items=1, max_bytes=1000)
        await old.put(item("a"), 1)
        waiting = asyncio.create_task(old.put(item("b"), 30))
        await asyncio.sleep(0.01)
        old.begin_handoff("predecessor")
        with pytest.raises(QueueMoved):
            await asyncio.wait_for(waiting, 1)  # not after its 30 s: the old replica must stop soon
        assert old.stats()["waiting_producers"] == 0 and old.counters["moved"] == 1
    asyncio.run(main())


def test_the_ingress_polling_the_new_replica_waits_for_the_adopted_answer_instead_of_enqueueing_again() -> None:
    async def main() -> None:
        old, new = pair()
        await old.put(item("a"), 1)
        new.begin_handoff("successor")
        poll = asyncio.create_task(new.next_events("a", 5.0))  # no KeyError: the old replica may hold it
        await asyncio.sleep(0.01)
        old.begin_handoff("predecessor")
        await old.take("llm1", max_items=1, token_budget=100, wait_s=0)
        old.publish("llm1", [tok("a", 0, "x")])
        new.adopt(old.snapshot())
        assert [ev["text"] for ev in await asyncio.wait_for(poll, 1)] == ["x"]
    asyncio.run(main())


def test_cancellations_and_answers_seen_by_either_replica_apply_after_the_merge() -> None:
    async def main() -> None:
        old, new = pair()
        await old.put(item("gone"), 1)
        await old.put(item("leased"), 1)
        await old.put(item("done"), 1)
        await old.take("llm1", max_items=2, token_budget=100, wait_s=0)  # gone + leased
        new.begin_handoff("successor")
        old.begin_handoff("predecessor")
        assert new.cancel("gone") is False  # the client left; the new replica did not know it yet
        assert new.publish("llm1", [fin("leased", 0)]) == []
        assert await drain_text(new, "leased") == ("", "finish")  # handed out by the new replica
        new.adopt(old.snapshot())
        assert new.publish("llm1", []) == ["gone"]  # the LLM replica is told to stop it
        assert [i.request_id for i in await new.take("llm2", max_items=8, token_budget=1000, wait_s=0)] == ["done"]
        assert new.stats()["consumers"]["llm1"]["leased"] == 1  # "gone" until llm1 stops it; "leased" ended
        with pytest.raises(KeyError):
            await new.next_events("leased", 0.01)  # the old copy of a finished answer is not revived
    asyncio.run(main())


def test_without_a_snapshot_the_new_replica_forgets_what_only_the_old_one_knew() -> None:
    async def main() -> None:
        new = TensorQueueCore(max_items=8, max_bytes=10_000)
        new.begin_handoff("successor")
        assert new.publish("llm1", [tok("x", 3, "?")]) == []
        new.end_handoff()  # the old replica was killed
        assert new.publish("llm1", [tok("x", 4, "?")]) == ["x"]  # now unknown: stop generating it
        with pytest.raises(KeyError):  # the ingress enqueues it again
            await new.next_events("x", 0.01)
    asyncio.run(main())


def test_an_event_lost_between_the_replicas_fails_the_answer_rather_than_leaving_a_hole() -> None:
    async def main() -> None:
        old, new = pair()
        await old.put(item("a"), 1)
        await old.take("llm1", max_items=1, token_budget=100, wait_s=0)
        old.publish("llm1", [tok("a", 0, "A")])
        old.publish("llm1", [tok("a", 2, "C")])  # event 1 never arrived anywhere
        new.begin_handoff("successor")
        new.adopt(old.snapshot())
        evs = await new.next_events("a", 0.01)
        assert [e["type"] for e in evs] == ["token", "error"] and evs[-1]["code"] == 503
    asyncio.run(main())


def test_the_older_live_replica_is_the_predecessor_and_a_silent_one_does_not_count() -> None:
    old, new = Peer("r-old", 100.0, 200.0, silent_s=1.0), Peer("r-new", 150.0, 200.0)
    assert handoff_role(old, [old, new]) == "predecessor"
    assert handoff_role(new, [old, new]) == "successor"
    assert handoff_role(new, [new]) is None
    assert handoff_role(new, [Peer("r-old", 100.0, 200.0, silent_s=STALE_S + 1), new]) is None


class _KV:
    """Ray's internal KV (the GCS) as the peer registry uses it, in a dict."""

    def __init__(self, monkeypatch) -> None:
        from ray.experimental import internal_kv

        self.data: dict[bytes, bytes] = {}
        for name, fn in {"_internal_kv_put": lambda k, v, namespace=None: self.data.__setitem__(k.encode(), v),
                         "_internal_kv_get": lambda k, namespace=None: self.data.get(k),
                         "_internal_kv_list": lambda prefix, namespace=None: [
                             k for k in self.data if k.startswith(prefix.encode())],
                         "_internal_kv_del": lambda k, namespace=None: self.data.pop(
                             k if isinstance(k, bytes) else k.encode(), None)}.items():
            monkeypatch.setattr(internal_kv, name, fn)


class _Clocks:
    """One replica's clocks: monotonic, and a wall clock that NTP may step (`step`)."""

    def __init__(self, t: float) -> None:
        self.mono, self.offset = t, 0.0

    def wall(self) -> float:
        return self.mono + 1_000_000.0 + self.offset


@pytest.mark.parametrize("step_s", [60.0, 400.0, -3600.0])
def test_a_wall_clock_step_neither_kills_a_live_peer_nor_revives_a_dead_one(monkeypatch, step_s: float) -> None:
    """Heartbeats carry the writer's wall clock; before, the reader compared them with its own. A step forward
    made the live predecessor look silent (the successor gave up the hand-over: the predecessor's queued and
    leased requests were dropped), beyond FORGET_S its key was even deleted; a step back made a dead replica
    look alive (a predecessor then sent every put on to a successor that was gone). Now silence is measured on
    each reader's monotonic clock, from when the peer's heartbeat last changed."""
    from dotsvlm_serving.deployments.queue_peers import PeerRegistry

    kv = _KV(monkeypatch)
    old_c, new_c = _Clocks(0.0), _Clocks(0.0)
    old = PeerRegistry("app", "r-old", old_c.wall(), clock=lambda: old_c.mono, wall_clock=old_c.wall)
    old_c.mono = new_c.mono = 5.0
    new = PeerRegistry("app", "r-new", new_c.wall(), clock=lambda: new_c.mono, wall_clock=new_c.wall)

    def beat_both() -> tuple[str | None, str | None]:
        roles = []
        for reg in (old, new):
            me, peers = reg.beat()
            roles.append(handoff_role(me, peers))
        return roles[0], roles[1]

    new.beat()  # (its first heartbeat: the old one reads it in its next)
    assert beat_both() == ("predecessor", "successor")
    new_c.offset = step_s  # NTP steps the new replica's wall clock
    for _ in range(int(STALE_S) + 3):  # both keep beating, one a second
        old_c.mono += 1.0
        new_c.mono += 1.0
        assert beat_both() == ("predecessor", "successor")
    assert len(kv.data) == 2
    # The old replica is killed (no hand-over, and its actor cannot be looked up): it stops beating.
    for t in range(int(STALE_S) + 2):
        new_c.mono += 1.0
        me, peers = new.beat()
        assert handoff_role(me, peers) == ("successor" if t + 1 <= STALE_S else None), t  # silent for t + 1 s


def test_a_replica_that_adopted_its_predecessors_state_does_not_become_its_successor_again() -> None:
    """CI of 2026-12-06: the old replica still beat between its hand-over and its leaving; the new one took
    the successor role a second time, and when the old one left it logged a lost hand-over and would have
    failed the answers it held. After adopting, an older replica no longer counts; a younger one does."""
    old, new, newer = Peer("r-old", 100.0, 200.0), Peer("r-new", 150.0, 200.0), Peer("r-newer", 190.0, 200.0)
    assert handoff_role(new, [old, new], adopted=True) is None
    assert handoff_role(new, [old, new, newer], adopted=True) == "predecessor"
    assert handoff_role(old, [old, new], adopted=True) == "predecessor"  # only older ones drop


class _MovingQueue:
    """A queue handle whose replica answers "moved" `moves` times (or, with `lost`, whose call fails as when
    the replica is gone) before one takes the request."""

    def __init__(self, moves: int, lost: bool = False) -> None:
        self.moves, self.lost, self.puts, self.cancelled = moves, lost, [], []
        self.put = self  # queue.put.remote(...)
        self.cancel = self._Cancel(self.cancelled)  # queue.cancel.remote(rid)

    class _Cancel:
        def __init__(self, into: list) -> None:
            self.into = into

        async def remote(self, rid: str) -> None:
            self.into.append(rid)

    async def _answer(self, item: QueueItem) -> dict:
        self.puts.append(item.request_id)
        if len(self.puts) <= self.moves:
            if self.lost:
                raise asyncio.TimeoutError
            return {"ok": False, "reason": "moved", "message": "being replaced"}
        return {"ok": True}

    def remote(self, item: QueueItem, timeout: float):
        return self._answer(item)


def _relay(queue: _MovingQueue):
    from dotsvlm_serving.deployments.relay import Relay, _Held

    relay = object.__new__(Relay)
    relay.queue, relay.enqueue_timeout_s, relay._background = queue, 5.0, set()
    return relay, _Held(base_id="r", item=item("r"))


def test_the_ingress_puts_a_request_the_old_replica_sent_on_into_the_new_one_under_the_same_id() -> None:
    import time

    queue = _MovingQueue(moves=2)
    relay, req = _relay(queue)
    asyncio.run(relay._enqueue(req, time.monotonic() + 60))
    assert queue.puts == ["r", "r", "r"]  # the old replica did not take it: no fresh id, nothing to cancel


def test_a_lost_queue_replica_gets_the_request_again_under_a_fresh_id_and_the_old_one_cancelled() -> None:
    import time

    queue = _MovingQueue(moves=1, lost=True)
    relay, req = _relay(queue)

    async def main() -> None:
        await relay._enqueue(req, time.monotonic() + 60)
        await asyncio.gather(*relay._background)
    asyncio.run(main())
    assert queue.puts == ["r", "r-q1"]  # it may have arrived: a fresh id, and the first one cancelled
    assert queue.cancelled == ["r"]


class _SilentQueue(_MovingQueue):
    """A queue handle whose replica takes the put but whose answer has not come back yet."""

    def __init__(self) -> None:
        super().__init__(moves=0)
        self.arrived = asyncio.Event()

    async def _answer(self, item: QueueItem) -> dict:
        self.puts.append(item.request_id)
        self.arrived.set()
        await asyncio.Event().wait()  # the reply is still on its way
        return {"ok": True}


def test_a_client_that_goes_away_while_its_put_is_out_has_the_request_cancelled() -> None:
    """The queue may already hold the item when the client disconnects (the put's await is cancelled):
    without a cancel, an LLM replica would generate the whole answer for nobody."""
    import time

    async def main() -> None:
        queue = _SilentQueue()
        relay, req = _relay(queue)
        enqueue = asyncio.create_task(relay._enqueue(req, time.monotonic() + 60))
        await queue.arrived.wait()
        enqueue.cancel()  # the client went away
        with pytest.raises(asyncio.CancelledError):
            await enqueue
        await asyncio.gather(*relay._background)
        assert queue.cancelled == ["r"]
    asyncio.run(main())


def test_a_queue_that_keeps_moving_gives_a_503_that_says_to_retry(monkeypatch) -> None:
    import time

    from dotsvlm_serving.deployments import relay as relay_mod
    from dotsvlm_serving.api.errors import ApiError

    monkeypatch.setattr(relay_mod, "QUEUE_RECOVERY_S", 0.6)
    relay, req = _relay(_MovingQueue(moves=10**6))
    with pytest.raises(ApiError) as err:
        asyncio.run(relay._enqueue(req, time.monotonic() + 60))
    assert err.value.status == 503 and "retry" in str(err.value)


def test_a_stopping_replica_waits_for_a_successor_only_when_it_holds_work() -> None:
    """`holds_state` decides whether a stopping replica waits for its replacement (a rolling update of the
    queue's options stops it first): a queued item, a lease or an answer not yet read all count."""
    async def main() -> None:
        q = TensorQueueCore(max_items=8, max_bytes=10_000)
        assert not q.holds_state()  # an idle queue stops at once (e.g. the application is deleted)
        await q.put(item("a"), 1)
        assert q.holds_state()  # queued
        await q.take("llm1", max_items=1, token_budget=100, wait_s=0)
        assert q.holds_state()  # leased
        q.publish("llm1", [fin("a", 0)])
        assert q.holds_state()  # answered, not yet read by the ingress
        assert (await drain_text(q, "a"))[1] == "finish"
        assert not q.holds_state()
    asyncio.run(main())


class _Peers:
    """A `PeerRegistry` whose live replicas the test sets (`others`); every heartbeat is fresh."""

    def __init__(self, me: str, started_at: float) -> None:
        self.me, self.started_at, self.others = me, started_at, []

    def beat(self) -> tuple[Peer, list[Peer]]:
        import time

        now = time.time()
        me = Peer(self.me, self.started_at, now)
        return me, [me, *(Peer(rid, started, now) for rid, started in self.others)]


def test_a_predecessor_whose_successor_vanished_serves_again() -> None:
    """A younger replica heartbeated (this one became its predecessor), then crashed before this one
    stopped: this one must leave the role, else every put is "moved" to nobody (the API's retries end in
    503s) and `reap` never declares a dead LLM replica dead."""
    import time

    from dotsvlm_serving.deployments.queue import TensorQueue

    class Queue(TensorQueue):
        def __del__(self) -> None:  # Serve's stop hook (a coroutine): not run by the garbage collector here
            pass

    async def main() -> None:
        q = object.__new__(Queue)
        q.core, q.peers = TensorQueueCore(max_items=8, max_bytes=10_000), _Peers("r-old", 100.0)
        q._adopted, q._peers_checked = False, 0.0
        await q.put(item("a"), 1)
        await q.core.take("llm1", max_items=1, token_budget=100, wait_s=0)
        q.peers.others = [("r-new", 150.0)]
        await q._check_peers()
        assert q.core.handoff == "predecessor"
        assert (await q.put(item("b"), 1))["reason"] == "moved"
        q.core._consumers["llm1"].last_seen -= 60  # its heartbeats went to the successor meanwhile
        q.peers.others = []  # the successor crashed
        await q._check_peers()
        assert q.core.handoff is None
        assert await q.put(item("b"), 1) == {"ok": True}
        assert q.core.reap() == []  # llm1 gets a lease timeout to heartbeat this replica again ...
        lease = q.core.lease_timeout_s
        assert q.core.reap(now=time.monotonic() + lease + 1) == ["llm1"]  # ... a silent one is dead after it
    asyncio.run(main())


def test_a_hole_left_by_a_replica_that_vanished_mid_hand_over_fails_the_answer_instead_of_hanging() -> None:
    """The successor died during the hand-over with one event of a stream (it never gives its state back): the
    old replica serves again, and the LLM replica's later events, its last one included, come to it behind
    the hole. Nothing can fill the hole, so the answer must end with a 503 within the lease timeout, not
    hold its end back until the client's request timeout (the mailbox is then freed like any other)."""
    async def main() -> None:
        old, new = (TensorQueueCore(max_items=8, max_bytes=10_000, lease_timeout_s=0.4) for _ in range(2))
        await old.put(item("a"), 1)
        await old.put(item("b"), 1)
        await old.take("llm1", max_items=2, token_budget=100, wait_s=0)
        old.publish("llm1", [tok("a", 0, "A")])
        assert await drain_text(old, "a") == ("A", None)
        old.begin_handoff("predecessor")
        new.begin_handoff("successor")
        new.publish("llm1", [tok("a", 1, "B"), tok("b", 0, "x")])  # then the successor is killed
        old.end_handoff()  # its heartbeat went stale: the old replica is the queue again
        old.publish("llm1", [tok("a", 2, "C"), fin("a", 3), tok("b", 1, "y")])
        assert await drain_text(old, "a") == ("", None)  # held behind the hole
        await asyncio.sleep(0.2)
        assert old.heartbeat("llm1") == [] and old.reap() == []  # (the LLM replica is alive)
        assert await drain_text(old, "a") == ("", None)  # (a moment's hole is not yet a lost event)
        await asyncio.sleep(0.3)
        assert old.heartbeat("llm1") == [] and old.reap() == []
        evs = await old.next_events("a", 0.01)
        assert [e["type"] for e in evs] == ["error"] and evs[0]["code"] == 503
        assert "a" not in old._mailboxes
        # "b" is still being generated: it fails the same way, and its LLM replica is told to stop it.
        evs = await old.next_events("b", 0.01)
        assert [e["type"] for e in evs] == ["error"] and evs[0]["code"] == 503
        assert old.heartbeat("llm1") == ["b"]
    asyncio.run(main())


def test_a_hole_is_not_called_lost_while_the_hand_over_runs() -> None:
    """During the hand-over the other replica holds the missing event: the answer waits for the merge."""
    async def main() -> None:
        old, new = pair()
        await old.put(item("a"), 1)
        await old.take("llm1", max_items=1, token_budget=100, wait_s=0)
        old.begin_handoff("predecessor")
        new.begin_handoff("successor")
        new.publish("llm1", [tok("a", 0, "A")])
        old.publish("llm1", [tok("a", 1, "B"), fin("a", 2)])
        for q in (old, new):
            q.reap(now=time.monotonic() + q.lease_timeout_s + 1)
        new.adopt(old.snapshot())
        assert await drain_text(new, "a") == ("AB", "finish")
    asyncio.run(main())


def test_a_take_whose_answer_the_predecessor_never_sent_is_given_back_by_the_successor() -> None:
    """The likeliest lost take is one the old replica leased as it stopped: the LLM replica names it in its next
    take, which reaches the new replica. The numbered takes travel with the leases; before, the new replica did
    not know what that take leased, so its items stayed leased to a live replica that never ran them (their
    clients waited for the request timeout)."""
    async def main() -> None:
        old, new = pair()
        await old.put(item("a"), 1)
        new.begin_handoff("successor")
        old.begin_handoff("predecessor")
        taken = await old.take("llm1", max_items=1, token_budget=100, wait_s=0, take_id=7)
        assert [i.request_id for i in taken] == ["a"]  # ... and the answer never reached llm1
        new.adopt(old.snapshot())
        again = await new.take("llm1", max_items=1, token_budget=100, wait_s=0, take_id=8, lost_takes=[7])
        assert [i.request_id for i in again] == ["a"] and again[0].deliveries == 1
        assert new.stats()["leased"] == 1 and new.stats()["depth"] == 0
    asyncio.run(main())


def test_a_lost_take_named_to_the_successor_before_it_adopted_is_given_back_when_it_does() -> None:
    async def main() -> None:
        old, new = pair()
        await old.put(item("a"), 1)
        new.begin_handoff("successor")
        old.begin_handoff("predecessor")
        assert [i.request_id for i in await old.take("llm1", max_items=1, token_budget=100, wait_s=0, take_id=7)] \
            == ["a"]
        # The LLM replica's next take names it, and reaches the new replica before the old one stopped.
        assert await new.take("llm1", max_items=1, token_budget=100, wait_s=0, take_id=8, lost_takes=[7]) == []
        new.adopt(old.snapshot())
        assert new.stats()["leased"] == 0 and new.stats()["depth"] == 1  # back at the head, for the next take
        again = await new.take("llm1", max_items=1, token_budget=100, wait_s=0, take_id=9)
        assert [i.request_id for i in again] == ["a"] and again[0].deliveries == 1
    asyncio.run(main())


def _answer_after_the_last_restart(events: list[dict]) -> tuple[str, str | None]:
    """What a non-streaming client ends with: the text after the last restart (it drops what came before)."""
    text, end = [], None
    for ev in events:
        if ev["type"] == "restart":
            text = []
        else:
            text.append(ev.get("text", ""))
            end = ev["type"] if ev["type"] in ("finish", "error") else end
    return "".join(text), end


def test_a_redelivered_answer_in_the_adopted_state_is_not_mixed_with_its_first_delivery() -> None:
    """The old replica's mailbox holds an unread non-streaming answer's first tokens, then the restart of its
    redelivery (its LLM replica left during the hand-over). Before, the merge put the restart first and the first
    delivery's tokens after it, as if they were the new delivery's: the new delivery's tokens with those numbers
    were then dropped as repeats, and the client got the old delivery's text with the new one's end."""
    async def main() -> None:
        old, new = pair()
        await old.put(item("a", stream=False), 1)
        await old.take("llm1", max_items=1, token_budget=100, wait_s=0)
        old.publish("llm1", [tok("a", 0, "old-0 "), tok("a", 1, "old-1 ")])  # not read yet (non-streaming)
        new.begin_handoff("successor")
        old.begin_handoff("predecessor")
        old.leave("llm1")  # the LLM replica shuts down: the request goes back to the queue, with a restart
        new.adopt(old.snapshot())
        assert [i.request_id for i in await new.take("llm2", max_items=1, token_budget=100, wait_s=0)] == ["a"]
        new.publish("llm2", [tok("a", 0, "new-0 "), tok("a", 1, "new-1 "), fin("a", 2)])
        assert _answer_after_the_last_restart(await new.next_events("a", 0.01)) == ("new-0 new-1 ", "finish")
    asyncio.run(main())


class _Router:
    """A queue handle whose long-polls go to one replica and then to the other (Serve's router during a
    hand-over)."""

    def __init__(self, *replicas: TensorQueueCore) -> None:
        self.replicas, self.calls = list(replicas), 0
        router = self

        class _Call:
            def __init__(self, method: str) -> None:
                self.method = method

            def remote(self, *args):
                core = router.replicas[min(router.calls, len(router.replicas) - 1)]
                router.calls += 1
                if self.method == "next_events":  # (the deployment's until_done is positional)
                    return core.next_events(*args[:2], until_done=args[2])
                return core.next_events_many(*args)
        self.next_events, self.next_events_many = _Call("next_events"), _Call("next_events_many")


def test_events_both_replicas_hand_out_reach_the_stream_once() -> None:
    """An LLM replica's publish reached the old replica, but its reply was lost; the old replica handed those
    tokens to the ingress, and the LLM replica sent them again, with the next ones, to the new replica, which
    handed them all out: before, the stream carried those tokens twice."""
    import time

    from dotsvlm_serving.deployments.relay import Relay, StreamPoller, _Held

    async def main() -> None:
        old, new = pair()
        await old.put(item("a"), 1)
        await old.take("llm1", max_items=1, token_budget=100, wait_s=0)
        new.begin_handoff("successor")
        old.begin_handoff("predecessor")
        old.publish("llm1", [tok("a", 0, "He"), tok("a", 1, "ll")])  # its reply is lost
        new.publish("llm1", [tok("a", 0, "He"), tok("a", 1, "ll"), tok("a", 2, "o"), fin("a", 3)])
        router = _Router(old, new)
        relay = object.__new__(Relay)
        relay.queue, relay._background, relay.request_timeout_s = router, set(), 60.0
        relay.streams = StreamPoller(router)
        req = _Held(base_id="a", item=item("a"))
        text = []
        async for batch in relay._events(req, time.monotonic() + 10):
            text += [ev.get("text", "") for ev in batch]
            if batch[-1]["type"] in ("finish", "error"):
                break
        assert "".join(text) == "Hello"
    asyncio.run(main())


def test_a_stream_whose_tokens_came_from_the_other_replica_is_not_continued_by_a_redelivery() -> None:
    """The old replica holds the lease; the new one got (and streamed) the first token. The LLM replica then
    leaves through the old replica, which saw no token and so redelivers the request with a restart: before,
    the stream went on with the new delivery's text after the first one's token (a stream cannot take back
    text); now it ends with a 503 that says to retry."""
    import time

    from dotsvlm_serving.api.errors import ApiError
    from dotsvlm_serving.deployments.relay import Relay, StreamPoller, _Held

    async def main() -> None:
        old, new = pair()
        await old.put(item("a"), 1)
        await old.take("llm1", max_items=1, token_budget=100, wait_s=0)
        new.begin_handoff("successor")
        old.begin_handoff("predecessor")
        new.publish("llm1", [tok("a", 0, "He")])
        router = _Router(new, old)
        relay = object.__new__(Relay)
        relay.queue, relay._background, relay.request_timeout_s = router, set(), 60.0
        relay.streams = StreamPoller(router)
        req = _Held(base_id="a", item=item("a"))
        events = relay._events(req, time.monotonic() + 10)
        assert [ev["text"] for ev in await events.__anext__()] == ["He"]
        old.leave("llm1")
        assert [i.request_id for i in await old.take("llm2", max_items=1, token_budget=100, wait_s=0)] == ["a"]
        old.publish("llm2", [tok("a", 0, "Hi"), tok("a", 1, "!"), fin("a", 2)])
        with pytest.raises(ApiError) as err:
            await events.__anext__()
        assert err.value.status == 503 and "retry" in str(err.value)
    asyncio.run(main())


def _d(ev: dict, d: int) -> dict:
    return {**ev, "d": d}


async def _first_delivery_split_then_left(old: TensorQueueCore, new: TensorQueueCore) -> None:
    """A non-streaming request "a" leased by llm1 from the old replica; both replicas go into hand-over mode,
    the first delivery's events go one to each, and llm1 leaves through the old replica, which redelivers
    the request (a restart): its next take is the second delivery."""
    await old.put(item("a", stream=False), 1)
    await old.take("llm1", max_items=1, token_budget=100, wait_s=0)
    new.begin_handoff("successor")
    old.begin_handoff("predecessor")
    old.publish("llm1", [_d(tok("a", 0, "old-0 "), 1)])
    new.publish("llm1", [_d(tok("a", 1, "old-1 "), 1)])
    old.leave("llm1")  # redelivered, with a restart, by the old replica


def test_a_redelivery_while_the_first_delivery_s_events_sit_in_the_other_replica_gives_the_new_answer_only() -> None:
    """The old replica holds the lease of a non-streaming request; its first delivery's events went to both
    replicas. Its LLM replica leaves through the old replica, which redelivers it (a restart) to another LLM
    replica, whose events use the same numbers again. Before, the new replica kept the first delivery's event
    in the place of the new one's (dropping the new one as a repeat): the client got a mix of both answers."""
    async def main() -> None:
        old, new = pair()
        await _first_delivery_split_then_left(old, new)
        [again] = await old.take("llm2", max_items=1, token_budget=100, wait_s=0)
        assert again.deliveries == 2
        new.publish("llm2", [_d(tok("a", 0, "new-0 "), 2), _d(tok("a", 1, "new-1 "), 2)])
        old.publish("llm2", [_d(fin("a", 2), 2)])
        new.adopt(old.snapshot())
        assert _answer_after_the_last_restart(await new.next_events("a", 0.01)) == ("new-0 new-1 ", "finish")
    asyncio.run(main())


def test_the_ingress_keeps_one_restart_and_only_the_new_delivery_when_both_replicas_hand_them_out() -> None:
    """The old replica hands out the first delivery's tokens and the restart it made; the new replica, which
    saw neither the restart nor the first tokens, hands out a first delivery's token, then restarts on its own
    when the new delivery's events come, which the old one partly handed out already."""
    import time

    from dotsvlm_serving.deployments.relay import Relay, StreamPoller, _Held

    async def main() -> None:
        old, new = pair()
        await _first_delivery_split_then_left(old, new)
        await old.take("llm2", max_items=1, token_budget=100, wait_s=0)
        old.publish("llm2", [_d(tok("a", 0, "new-0 "), 2)])
        new.publish("llm2", [_d(tok("a", 0, "new-0 "), 2), _d(tok("a", 1, "new-1 "), 2), _d(fin("a", 2), 2)])
        router = _Router(old, new)
        relay = object.__new__(Relay)
        relay.queue, relay._background, relay.request_timeout_s = router, set(), 60.0
        relay.streams = StreamPoller(router)
        req = _Held(base_id="a", item=item("a", stream=False))
        got: list[dict] = []
        async for batch in relay._events(req, time.monotonic() + 10, until_done=True):
            got += batch
            if batch[-1]["type"] in ("finish", "error"):
                break
        assert _answer_after_the_last_restart(got) == ("new-0 new-1 ", "finish"), got
    asyncio.run(main())


def test_a_restart_the_client_already_had_is_not_handed_out_again_after_the_hand_over() -> None:
    """A request redelivered before the hand-over (its LLM replica died a while ago): the old replica handed
    out the restart and the new delivery's first tokens; the new replica, which never saw that restart,
    makes its own when the new delivery's next events reach it. After the merge that second restart came
    out after the tokens the client already had, and an ingress of the previous release (which does not
    drop a repeated restart: a rolling update) threw them away: the answer lost its beginning."""
    async def main() -> None:
        old, new = pair()
        await old.put(item("a", stream=False), 1)
        await old.take("llm1", max_items=1, token_budget=100, wait_s=0)
        old.publish("llm1", [_d(tok("a", 0, "old-0 "), 1)])
        old.leave("llm1")  # redelivered, with a restart
        await old.take("llm2", max_items=1, token_budget=100, wait_s=0)
        old.publish("llm2", [_d(tok("a", 0, "new-0 "), 2)])
        got = await old.next_events("a", 0.01)  # the client: old-0, the restart, new-0
        assert _answer_after_the_last_restart(got) == ("new-0 ", None)
        new.begin_handoff("successor")
        old.begin_handoff("predecessor")
        new.publish("llm2", [_d(tok("a", 1, "new-1 "), 2), _d(fin("a", 2), 2)])
        new.adopt(old.snapshot())
        got += await new.next_events("a", 0.01)
        assert _answer_after_the_last_restart(got) == ("new-0 new-1 ", "finish"), got
        assert [ev["type"] for ev in got].count("restart") == 1, got
    asyncio.run(main())
