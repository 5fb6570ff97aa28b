"""The ingress's shared long-poll for its streams: one tensor-queue call serves every open stream, each
stream still gets all its events in order, and a failed call reaches every stream that was waiting."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from dotsvlm_serving.deployments.relay import StreamPoller
from dotsvlm_serving.tensor_queue import QueueItem, TensorQueueCore


class _Queue:
    """The queue handle's one method the poller calls, backed by a real queue core (no Ray)."""

    def __init__(self, core: TensorQueueCore) -> None:
        self.polled: list[list[str]] = []

        def remote(rids: list[str], wait_s: float, linger_s: float):
            self.polled.append(list(rids))
            return core.next_events_many(rids, wait_s, linger_s=linger_s)
        self.next_events_many = SimpleNamespace(remote=remote)


def test_many_streams_share_each_poll_and_each_gets_its_whole_answer_in_order() -> None:
    async def main() -> None:
        core = TensorQueueCore(max_items=20, max_bytes=10_000)
        streams = [f"s{i}" for i in range(8)]
        for rid in streams:
            await core.put(QueueItem(request_id=rid, nbytes=1, reserved_tokens=10, payload={}, stream=True), 1)
        await core.take("llm", max_items=8, token_budget=1000, wait_s=0)
        queue = _Queue(core)
        poller = StreamPoller(queue)
        n_tokens = 30

        async def llm() -> None:  # a decode step every 2 ms, one token for every stream
            for i in range(n_tokens):
                await asyncio.sleep(0.002)
                core.publish("llm", [{"request_id": rid, "type": "token", "text": f"{i},", "i": i} for rid in streams])
            core.publish("llm", [{"request_id": rid, "type": "finish", "finish_reason": "length", "text": "",
                                  "usage": {"prompt_tokens": 1, "completion_tokens": n_tokens}, "i": n_tokens}
                                 for rid in streams])

        async def client(rid: str) -> tuple[str, int]:
            text, polls = "", 0
            while True:
                evs = await poller.next_events(rid)
                assert evs is not None
                polls += 1
                text += "".join(e.get("text", "") for e in evs)
                if evs and evs[-1]["type"] == "finish":
                    return text, polls

        producer = asyncio.create_task(llm())
        answers = await asyncio.wait_for(asyncio.gather(*(client(rid) for rid in streams)), 10)
        await producer
        expected = "".join(f"{i}," for i in range(n_tokens))
        assert [text for text, _ in answers] == [expected] * len(streams)
        # One call per cadence for all eight streams, not one per stream: the calls made are far fewer
        # than the answers the streams received, and most calls carried several streams.
        asked = sum(polls for _, polls in answers)
        assert poller.calls == len(queue.polled) and poller.calls * 3 <= asked, (poller.calls, asked)
        assert sum(len(p) > 1 for p in queue.polled) * 2 >= len(queue.polled), queue.polled
    asyncio.run(main())


def test_a_failed_poll_reaches_every_waiting_stream_and_the_next_one_starts_afresh() -> None:
    async def main() -> None:
        calls = 0

        async def failing(rids: list[str], wait_s: float, linger_s: float) -> dict:
            nonlocal calls
            calls += 1
            if calls == 1:
                await asyncio.sleep(0.01)
                raise asyncio.TimeoutError()
            return {rid: [{"request_id": rid, "type": "token", "text": "x"}] for rid in rids}

        poller = StreamPoller(SimpleNamespace(next_events_many=SimpleNamespace(remote=failing)))
        got = await asyncio.gather(*(poller.next_events(r) for r in ("a", "b")), return_exceptions=True)
        assert all(isinstance(g, asyncio.TimeoutError) for g in got), got
        assert await poller.next_events("a") == [{"request_id": "a", "type": "token", "text": "x"}]
    asyncio.run(main())


def test_a_stream_cancelled_while_waiting_is_not_polled_for() -> None:
    async def main() -> None:
        seen: list[list[str]] = []
        gate = asyncio.Event()

        async def slow(rids: list[str], wait_s: float, linger_s: float) -> dict:
            seen.append(list(rids))
            await gate.wait()
            return {rid: [] for rid in rids}

        poller = StreamPoller(SimpleNamespace(next_events_many=SimpleNamespace(remote=slow)))
        first = asyncio.create_task(poller.next_events("a"))
        await asyncio.sleep(0.01)  # "a" is in the call now; "b" waits for the next one, then goes away
        second = asyncio.create_task(poller.next_events("b"))
        await asyncio.sleep(0.01)
        second.cancel()
        with pytest.raises(asyncio.CancelledError):
            await second
        gate.set()
        assert await first == []
        await asyncio.sleep(0.01)
        assert seen == [["a"]]
    asyncio.run(main())
