"""The tensor queue's semantics without Ray: bounds, FIFO, backpressure, leases, redelivery, cancellation."""

from __future__ import annotations

import asyncio

import pytest

from dotsvlm_serving.tensor_queue import ConsumerLost, ItemTooLarge, QueueFull, QueueItem, QueueMoved, TensorQueueCore


def item(rid: str, nbytes: int = 10, tokens: int = 10, stream: bool = False) -> QueueItem:
    return QueueItem(request_id=rid, nbytes=nbytes, reserved_tokens=tokens, payload={"id": rid}, stream=stream)


def run(coro):
    return asyncio.run(coro)


def test_fifo_and_item_bound_with_timeout_rejection() -> None:
    async def main() -> None:
        q = TensorQueueCore(max_items=2, max_bytes=1000)
        await q.put(item("a"), 1)
        await q.put(item("b"), 1)
        with pytest.raises(QueueFull) as ei:
            await q.put(item("c"), 0.05)
        assert ei.value.retry_after_s >= 1 and "retry" in str(ei.value)
        assert q.stats()["depth"] == 2 and q.counters["rejected_full"] == 1
        got = await q.take("r1", max_items=5, token_budget=1000, wait_s=0)
        assert [i.request_id for i in got] == ["a", "b"]
    run(main())


def test_byte_bound_and_too_large() -> None:
    async def main() -> None:
        q = TensorQueueCore(max_items=10, max_bytes=100)
        with pytest.raises(ItemTooLarge):
            await q.put(item("big", nbytes=101), 1)
        await q.put(item("a", nbytes=60), 1)
        with pytest.raises(QueueFull):
            await q.put(item("b", nbytes=50), 0.05)
        assert q.stats()["bytes"] == 60
    run(main())


def test_waiting_producers_are_admitted_in_order_when_a_consumer_takes() -> None:
    async def main() -> None:
        q = TensorQueueCore(max_items=1, max_bytes=1000)
        await q.put(item("a"), 1)
        p1 = asyncio.create_task(q.put(item("b"), 5))
        await asyncio.sleep(0.01)
        p2 = asyncio.create_task(q.put(item("c"), 5))
        await asyncio.sleep(0.01)
        assert q.stats()["waiting_producers"] == 2
        assert [i.request_id for i in await q.take("r", max_items=1, token_budget=100, wait_s=0)] == ["a"]
        await asyncio.wait_for(p1, 1)
        assert not p2.done()
        assert [i.request_id for i in await q.take("r", max_items=1, token_budget=100, wait_s=0)] == ["b"]
        await asyncio.wait_for(p2, 1)
        assert [i.request_id for i in await q.take("r", max_items=1, token_budget=100, wait_s=0)] == ["c"]
    run(main())


@pytest.mark.parametrize("wake", ["take", "moved"])
def test_a_producer_woken_in_the_turn_its_timeout_fires_keeps_the_wake(wake: str) -> None:
    """A zero enqueue timeout fires in the same loop turn in which a take reserves room for the producer
    (or the queue moves): the wake must count. Before, the put failed with UnboundLocalError and the
    reservation leaked, so a 1-slot queue refused everything from then on."""
    async def main() -> None:
        q = TensorQueueCore(max_items=1, max_bytes=1000)
        await q.put(item("a"), 1)
        producer = asyncio.create_task(q.put(item("b"), 0))
        # Runs after the producer has started waiting and before its timeout is delivered to it.
        if wake == "take":
            asyncio.create_task(q.take("r", max_items=1, token_budget=100, wait_s=0))
        else:
            asyncio.get_running_loop().call_soon(q.begin_handoff, "predecessor")
        if wake == "moved":
            with pytest.raises(QueueMoved):
                await producer
            return
        await producer  # admitted: the room the take made is its own
        assert [i.request_id for i in await q.take("r", max_items=1, token_budget=100, wait_s=0)] == ["b"]
        await q.put(item("c"), 0)  # nothing leaked: the slot is free again
        assert q.stats()["depth"] == 1
    run(main())


def test_take_respects_token_budget_and_waits_for_items() -> None:
    async def main() -> None:
        q = TensorQueueCore(max_items=10, max_bytes=1000)
        waiter = asyncio.create_task(q.take("r", max_items=4, token_budget=25, wait_s=2))
        await asyncio.sleep(0.01)
        for rid in "abc":
            await q.put(item(rid, tokens=10), 1)
        got = await asyncio.wait_for(waiter, 1)
        assert [i.request_id for i in got] == ["a", "b"]  # c would exceed the budget
        assert q.stats()["depth"] == 1 and q.stats()["leased"] == 2
        assert await q.take("r2", max_items=1, token_budget=100, wait_s=0.01) != []
        assert await q.take("r2", max_items=1, token_budget=100, wait_s=0.01) == []
    run(main())


def test_events_flow_to_mailbox_and_terminal_event_releases_lease() -> None:
    async def main() -> None:
        q = TensorQueueCore(max_items=10, max_bytes=1000)
        await q.put(item("a"), 1)
        await q.take("r", max_items=1, token_budget=100, wait_s=0)
        poll = asyncio.create_task(q.next_events("a", wait_s=2))
        await asyncio.sleep(0.01)
        q.publish("r", [{"request_id": "a", "type": "token", "text": "hi"}])
        assert [e["text"] for e in await asyncio.wait_for(poll, 1)] == ["hi"]
        assert await q.next_events("a", wait_s=0.01) == []
        q.publish("r", [{"request_id": "a", "type": "finish", "finish_reason": "stop"}])
        assert (await q.next_events("a", wait_s=1))[-1]["type"] == "finish"
        assert q.stats()["leased"] == 0
        with pytest.raises(KeyError):
            await q.next_events("a", wait_s=0)
    run(main())


def test_dead_consumer_items_are_redelivered_or_failed() -> None:
    async def main() -> None:
        q = TensorQueueCore(max_items=10, max_bytes=1000, lease_timeout_s=0.05, max_deliveries=2)
        await q.put(item("quiet"), 1)
        await q.put(item("streamed", stream=True), 1)
        await q.put(item("later"), 1)
        await q.take("dead", max_items=2, token_budget=100, wait_s=0)
        q.publish("dead", [{"request_id": "streamed", "type": "token", "text": "x"}])
        await asyncio.sleep(0.1)
        assert q.reap() == ["dead"]
        # The quiet one goes back to the head, before "later"; the streamed one fails clearly.
        got = await q.take("alive", max_items=5, token_budget=100, wait_s=0)
        assert [i.request_id for i in got] == ["quiet", "later"]
        assert got[0].deliveries == 2
        ev = await q.next_events("streamed", wait_s=1)
        assert ev[-1]["type"] == "error" and ev[-1]["code"] == 503 and "retry" in ev[-1]["message"]
        assert (await q.next_events("quiet", wait_s=1))[-1]["type"] == "restart"
        # A second death exhausts the delivery budget: the request fails instead of looping.
        await asyncio.sleep(0.1)
        q.reap()
        ev = await q.next_events("quiet", wait_s=1)
        assert ev[-1]["type"] == "error"
    run(main())


@pytest.mark.parametrize("how", ["drained", "died"])
def test_a_redelivered_item_s_queue_wait_starts_again_when_it_goes_back(monkeypatch, how: str) -> None:
    """An LLM replica that drains (a scale-down: it runs its requests for up to its drain timeout) or dies hands
    its unfinished requests back. Before, they kept their first enqueue time: the queue's oldest age (the LLM
    pool's QueueAge signal, the 429s' Retry-After) jumped by the time they had run, and their next take's
    wait sample counted that time and their first wait again. Now their wait starts again when they go back,
    and the oldest age is the longest-waiting item's, wherever it stands."""
    from types import SimpleNamespace

    from dotsvlm_serving.autoscaling.signals import QUEUE_OLDEST_AGE, queue_stats
    from dotsvlm_serving.tensor_queue import core as core_mod

    clock = [1000.0]
    monkeypatch.setattr(core_mod, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    waits: list[float] = []

    async def main() -> None:
        q = TensorQueueCore(max_items=10, max_bytes=1000, lease_timeout_s=10, observe_wait=waits.append)
        await q.put(item("a"), 1)
        clock[0] = 1005.0
        await q.take("llm1", max_items=1, token_budget=100, wait_s=0)  # waited 5 s
        clock[0] = 1040.0
        await q.put(item("b"), 1)
        clock[0] = 1055.0  # "a" ran on llm1 for 50 s
        if how == "drained":
            q.leave("llm1")
        else:
            assert q.reap() == ["llm1"]
        assert [it.request_id for it in q._items] == ["a", "b"]  # back at the head
        assert q.stats()["oldest_age_s"] == 15.0 == queue_stats(q.stats())[QUEUE_OLDEST_AGE]  # "b"'s wait
        assert q.retry_after_hint() == 15.0
        clock[0] = 1056.0
        await q.take("llm2", max_items=2, token_budget=100, wait_s=0)
        assert waits == [5.0, 1.0, 16.0]  # each wait once; none of the time "a" ran
    run(main())


def test_cancel_removes_queued_item_and_flags_leased_one() -> None:
    async def main() -> None:
        q = TensorQueueCore(max_items=1, max_bytes=1000)
        await q.put(item("a"), 1)
        assert q.cancel("a") and q.stats()["depth"] == 0
        await q.put(item("b"), 1)  # room again
        await q.take("r", max_items=1, token_budget=100, wait_s=0)
        q.cancel("b")
        assert q.heartbeat("r") == ["b"]
        q.publish("r", [{"request_id": "b", "type": "finish", "finish_reason": "cancelled"}])
        assert q.heartbeat("r") == [] and q.stats()["leased"] == 0
    run(main())


def test_until_done_returns_the_whole_answer_at_once() -> None:
    async def main() -> None:
        q = TensorQueueCore(max_items=10, max_bytes=1000)
        await q.put(item("a"), 1)
        await q.take("r", max_items=1, token_budget=100, wait_s=0)
        poll = asyncio.create_task(q.next_events("a", wait_s=2, until_done=True))
        for t in "xyz":
            q.publish("r", [{"request_id": "a", "type": "token", "text": t}])
            await asyncio.sleep(0.01)
        assert not poll.done()
        q.publish("r", [{"request_id": "a", "type": "finish", "finish_reason": "length"}])
        evs = await asyncio.wait_for(poll, 1)
        assert [e.get("text") for e in evs[:3]] == ["x", "y", "z"] and evs[-1]["type"] == "finish"
        # on timeout it returns what it has (the caller loops), never loses events
        await q.put(item("b"), 1)
        await q.take("r", max_items=1, token_budget=100, wait_s=0)
        q.publish("r", [{"request_id": "b", "type": "token", "text": "p"}])
        assert [e["text"] for e in await q.next_events("b", wait_s=0.05, until_done=True)] == ["p"]
    run(main())


def test_a_replacement_queue_tells_consumers_to_stop_requests_it_does_not_know() -> None:
    """After the queue replica is replaced, LLM replicas still generate requests leased from the old one;
    the ingress has enqueued them again under new ids, so the new queue asks for them to be stopped."""
    async def main() -> None:
        q = TensorQueueCore(max_items=4, max_bytes=1000)
        await q.put(item("known"), 1)
        await q.take("r1", max_items=1, token_budget=100, wait_s=0)
        stop = q.publish("r1", [{"request_id": "orphan", "type": "token", "text": "x"},
                                {"request_id": "known", "type": "token", "text": "y"}])
        assert stop == ["orphan"]
        assert q.heartbeat("r1") == []  # told once, not forever
        assert await q.next_events("known", 0) == [{"request_id": "known", "type": "token", "text": "y"}]
    run(main())


def test_a_replica_declared_lost_that_comes_back_is_refused_and_the_redelivered_answer_is_whole() -> None:
    """A stalled LLM replica (no heartbeat for the lease timeout) is declared lost and its request goes to
    another; when the stalled one calls again it must not publish into that answer (two copies of one
    answer) and must rejoin under a new id; the new delivery, numbered from 0, reaches the client whole."""
    def tok(i: int, text: str) -> dict:
        return {"request_id": "a", "type": "token", "text": text, "i": i}

    async def main() -> None:
        q = TensorQueueCore(max_items=10, max_bytes=1000, lease_timeout_s=0.05, max_deliveries=3)
        await q.put(item("a"), 1)
        await q.take("slow", max_items=1, token_budget=100, wait_s=0)
        q.publish("slow", [tok(0, "x"), tok(1, "y")])
        await asyncio.sleep(0.1)
        assert q.reap() == ["slow"]
        (again,) = await q.take("other", max_items=1, token_budget=100, wait_s=0)
        assert again.request_id == "a" and again.deliveries == 2
        # The stalled replica wakes up: every call it makes is refused, its late events are dropped.
        with pytest.raises(ConsumerLost):
            q.publish("slow", [tok(2, "STALE")])
        with pytest.raises(ConsumerLost):
            q.heartbeat("slow")
        with pytest.raises(ConsumerLost):
            await q.take("slow", max_items=1, token_budget=100, wait_s=0)
        assert "slow" not in q.stats()["consumers"]
        q.publish("other", [tok(0, "x"), tok(1, "y"), tok(2, "z"),
                            {"request_id": "a", "type": "finish", "finish_reason": "length", "text": "", "i": 3,
                             "usage": {"prompt_tokens": 1, "completion_tokens": 3}}])
        events = await q.next_events("a", wait_s=1, until_done=True)
        after_restart = events[[e["type"] for e in events].index("restart") + 1:]
        assert "".join(e.get("text", "") for e in after_restart) == "xyz", events
        assert after_restart[-1]["type"] == "finish"
        # Under a new id the replica is a consumer like any other.
        await q.put(item("b"), 1)
        assert [i.request_id for i in await q.take("slow-2", max_items=1, token_budget=100, wait_s=0)] == ["b"]
    run(main())


def test_a_successor_refuses_the_replicas_its_predecessor_declared_lost() -> None:
    async def main() -> None:
        old = TensorQueueCore(max_items=10, max_bytes=1000, lease_timeout_s=0.05)
        new = TensorQueueCore(max_items=10, max_bytes=1000, lease_timeout_s=0.05)
        await old.put(item("a"), 1)
        await old.take("slow", max_items=1, token_budget=100, wait_s=0)
        await asyncio.sleep(0.1)
        old.reap()
        new.begin_handoff("successor")
        old.begin_handoff("predecessor")
        new.adopt(old.snapshot())
        with pytest.raises(ConsumerLost):
            new.heartbeat("slow")
        assert [i.request_id for i in await new.take("other", max_items=1, token_budget=100, wait_s=0)] == ["a"]
    run(main())


def test_one_long_poll_for_many_streams_returns_every_streams_events_once_and_in_order() -> None:
    async def main() -> None:
        q = TensorQueueCore(max_items=10, max_bytes=1000)
        for rid in ("a", "b", "c"):
            await q.put(item(rid, stream=True), 1)
        await q.take("r", max_items=3, token_budget=100, wait_s=0)
        # Nothing yet: the poll waits, then wakes when any one of them has events.
        t = asyncio.get_running_loop().time()
        assert await q.next_events_many(["a", "b", "c"], 0.05) == {"a": [], "b": [], "c": []}
        assert asyncio.get_running_loop().time() - t >= 0.04
        poll = asyncio.create_task(q.next_events_many(["a", "b", "c"], 5.0, linger_s=0.05))
        await asyncio.sleep(0.01)
        q.publish("r", [{"request_id": "b", "type": "token", "text": "b1", "i": 0}])
        await asyncio.sleep(0.01)  # within the linger: travels in the same answer
        q.publish("r", [{"request_id": "c", "type": "token", "text": "c1", "i": 0},
                        {"request_id": "b", "type": "token", "text": "b2", "i": 1}])
        got = await asyncio.wait_for(poll, 1)
        assert {rid: [e["text"] for e in evs] for rid, evs in got.items()} == {"a": [], "b": ["b1", "b2"], "c": ["c1"]}
        # A stream that finishes ends the linger at once, and its mailbox goes; another one unknown is None.
        q.publish("r", [{"request_id": "a", "type": "finish", "finish_reason": "stop", "text": "", "i": 0}])
        t = asyncio.get_running_loop().time()
        got = await q.next_events_many(["a", "b"], 5.0, linger_s=2.0)
        assert asyncio.get_running_loop().time() - t < 1.0
        assert [e["type"] for e in got["a"]] == ["finish"] and got["b"] == []
        got = await q.next_events_many(["a", "b"], 5.0)
        assert got == {"a": None, "b": []}  # answered at once: "a" is news
    run(main())


def test_a_direct_transport_the_image_cannot_run_is_refused_with_what_to_change(monkeypatch) -> None:
    """queue.embeddingTransport NIXL on an image without NIXL: the vision replica's reconfigure refuses it
    with the fix (install nixl, or go back to ObjectStore); the object store needs nothing."""
    import sys

    from dotsvlm_serving.tensor_queue import check_direct_transport

    check_direct_transport("object-store")
    monkeypatch.setitem(sys.modules, "nixl", None)  # import nixl -> ImportError
    with pytest.raises(ValueError) as err:
        check_direct_transport("nixl")
    assert "pip install nixl" in str(err.value) and "ObjectStore" in str(err.value)
