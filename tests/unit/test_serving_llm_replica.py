"""The LLM replica's loop without Ray or a model: a fake engine, and a queue handle backed by a real queue
core. A failed publish must not lose numbered events; a broken engine must fail the health check and stop
taking work."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest
from ray.exceptions import ActorUnavailableError

from dotsvlm_serving.deployments import llm as llm_mod
from dotsvlm_serving.deployments.llm import LLMServer
from dotsvlm_serving.engine.base import InferenceEngine
from dotsvlm_serving.tensor_queue import QueueItem, TensorQueueCore


class _Engine(InferenceEngine):
    """Holds one running request; `step` raises `fail` when set (a broken engine)."""

    name = "fake"

    def __init__(self, fail: Exception | None = None) -> None:
        self.fail, self.dead, self.running = fail, None, {"a"}

    def check_limits(self, prompt_tokens: int, max_tokens: int) -> None:
        pass

    def add(self, request) -> None:
        self.running.add(request.request_id)

    def cancel(self, request_id: str) -> None:
        self.running.discard(request_id)

    async def step(self) -> list:
        if self.fail is not None:
            raise self.fail
        return []

    def has_work(self) -> bool:
        return bool(self.running)

    def free_slots(self) -> int:
        return 4

    def free_tokens(self) -> int:
        return 1000

    def stats(self) -> dict[str, float]:
        return {"running": float(len(self.running)), "pending": 0.0, "kv_tokens_reserved": 0.0,
                "kv_tokens_capacity": 1000.0}

    def health_error(self) -> str | None:
        return self.dead


class _Queue:
    """The queue handle's methods the replica calls, backed by a real queue core. `fail_publish`: how many
    publish calls fail (ActorUnavailableError, a blip of the queue replica); with `reached`, the failed
    calls did arrive (only their reply was lost)."""

    def __init__(self, core: TensorQueueCore, fail_publish: int = 0, reached: bool = False) -> None:
        self.core, self.fail_publish, self.reached, self.takes = core, fail_publish, reached, 0

        async def publish(cid: str, events: list, stats: dict) -> list[str] | None:
            if self.fail_publish > 0:
                self.fail_publish -= 1
                if self.reached:
                    core.publish(cid, [dict(ev) for ev in events], stats)
                raise ActorUnavailableError("the connection to it was lost", None)
            return core.publish(cid, [dict(ev) for ev in events], stats)

        async def nothing() -> list[QueueItem]:
            return []

        def take(cid: str, max_items: int, token_budget: int, wait_s: float, *more):
            self.takes += 1  # (counted when the call is made)
            return nothing()
        self.publish, self.take = SimpleNamespace(remote=publish), SimpleNamespace(remote=take)


class _Replica(LLMServer):
    def __del__(self) -> None:  # Serve's stop hook (a coroutine): not run by the garbage collector here
        pass


async def _replica(monkeypatch, queue: _Queue, engine: _Engine) -> LLMServer:
    monkeypatch.setattr(llm_mod, "ReplicaMetrics", lambda source: None)  # no Ray here
    llm = object.__new__(_Replica)
    await LLMServer.__init__(llm, model=None, queue=queue)
    llm.engine = engine
    return llm


@pytest.fixture
def idle_replica(monkeypatch):
    """`await idle_replica(queue)` -> (the replica, its fake engine): the engine runs nothing yet, and the
    replica admits a taken item as it is (no embeddings to fetch, no sampling parameters to read)."""
    monkeypatch.setattr(llm_mod.LLMServer, "_admit", lambda self, item: self.engine.add(item) or None)

    async def build(queue: _Queue) -> tuple[LLMServer, _Engine]:
        engine = _Engine()
        engine.running = set()
        return await _replica(monkeypatch, queue, engine), engine
    return build


async def _leased(core: TensorQueueCore, llm: LLMServer) -> None:
    await core.put(QueueItem(request_id="a", nbytes=1, reserved_tokens=10, payload={}, stream=True), 1)
    await core.take(llm.consumer_id, max_items=1, token_budget=100, wait_s=0)


def _tok(text: str) -> dict:
    return {"request_id": "a", "type": "token", "text": text}


@pytest.mark.parametrize("reached", [False, True], ids=["call-lost", "reply-lost"])
def test_a_publish_that_failed_is_sent_again_so_the_answer_is_whole_and_in_order(monkeypatch, reached: bool) -> None:
    """Before, the failed call's numbered events were dropped: later events waited in the mailbox for the
    missing number until the request timed out (and a lost terminal event leaked the lease)."""
    async def main() -> None:
        core = TensorQueueCore(max_items=8, max_bytes=1000)
        llm = await _replica(monkeypatch, _Queue(core, fail_publish=1, reached=reached), _Engine())
        await _leased(core, llm)
        llm._outbox = [_tok("He")]
        with pytest.raises(ActorUnavailableError):  # the run loop logs it and goes on
            await llm._publish(wait=True)
        llm._outbox = [_tok("llo"), {"request_id": "a", "type": "finish", "finish_reason": "stop", "text": "",
                                     "usage": {"prompt_tokens": 1, "completion_tokens": 2}}]
        await llm._publish(wait=True)
        evs = await core.next_events("a", 0)
        assert [(ev["type"], ev["text"]) for ev in evs] == [("token", "He"), ("token", "llo"), ("finish", "")]
        assert core.stats()["leased"] == 0  # the terminal event arrived: the lease is released
    asyncio.run(main())


def test_an_engine_that_fails_every_step_fails_the_health_check_and_takes_no_more_work(monkeypatch) -> None:
    async def main() -> None:
        core = TensorQueueCore(max_items=8, max_bytes=1000)
        queue, engine = _Queue(core), _Engine(fail=RuntimeError("CUDA error: an illegal memory access"))
        llm = await _replica(monkeypatch, queue, engine)
        llm._run_task = asyncio.get_running_loop().create_future()  # the run loop: alive
        for _ in range(LLMServer.MAX_FAILED_STEPS - 1):
            with pytest.raises(RuntimeError):
                await llm._iteration()
        llm.check_health()  # a few failed steps can be bad batches
        with pytest.raises(RuntimeError):
            await llm._iteration()
        with pytest.raises(RuntimeError, match="engine is broken.*illegal memory access.*replaces it"):
            llm.check_health()
        await asyncio.sleep(0)  # the take sent by the first iteration answers ...
        takes, llm._last_take = queue.takes, 0.0  # ... and another would be due now
        with pytest.raises(RuntimeError):
            await llm._iteration()
        assert queue.takes == takes  # no new work for a broken engine
        engine.fail = None
        await llm._iteration()  # a step that works again resets the count
        llm.check_health()
        engine.dead = "vLLM's engine core has stopped (EngineDeadError)"  # the engine's own health hook
        with pytest.raises(RuntimeError, match="EngineDeadError"):
            llm.check_health()
    asyncio.run(main())


def test_publishes_that_keep_failing_fail_the_health_check_and_one_that_works_clears_it(monkeypatch) -> None:
    """A blip of the queue replica is re-sent and forgiven; answers that cannot be sent for a minute would
    never reach anyone, so the replica asks Serve to replace it instead of looking healthy."""
    async def main() -> None:
        core = TensorQueueCore(max_items=8, max_bytes=1000)
        queue = _Queue(core, fail_publish=10**6)
        llm = await _replica(monkeypatch, queue, _Engine())
        llm._run_task = asyncio.get_running_loop().create_future()
        await _leased(core, llm)
        llm._outbox = [_tok("He")]
        with pytest.raises(ActorUnavailableError):
            await llm._publish(wait=True)
        llm._publish_failing_since -= LLMServer.PUBLISH_FAILING_UNHEALTHY_S - 5  # (the first failure: 55 s ago)
        with pytest.raises(ActorUnavailableError):
            await llm._publish(wait=True)
        llm.check_health()  # failing for under a minute: a queue hand-over, say
        llm._publish_failing_since -= 6
        with pytest.raises(ActorUnavailableError):
            await llm._publish(wait=True)
        with pytest.raises(RuntimeError, match="could not be sent to the tensor queue for 61 s.*ActorUnavailable"):
            llm.check_health()
        queue.fail_publish = 0
        await llm._publish(wait=True)
        llm.check_health()
        assert [ev["text"] for ev in await core.next_events("a", 0)] == ["He"]
        # Failing sends followed by a rejoin (the queue declared the replica lost and gave its requests to
        # others): nothing is left to send, so an idle replica stays healthy however long it waits for work.
        queue.fail_publish = 10**6
        llm._outbox = [_tok("lo")]
        with pytest.raises(ActorUnavailableError):
            await llm._publish(wait=True)
        llm._rejoin()
        llm._publish_failing_since = (llm._publish_failing_since or 0.0) - 3600
        llm.check_health()
    asyncio.run(main())


class _LossyTakeQueue(_Queue):
    """Takes reach the real core; the first `lose_replies` of them lose their reply (the items are leased, the
    replica gets ActorUnavailableError)."""

    def __init__(self, core: TensorQueueCore, lose_replies: int) -> None:
        super().__init__(core)
        self.lose_replies = lose_replies

        async def take(cid: str, max_items: int, token_budget: int, wait_s: float, *more):
            items = await core.take(cid, max_items=max_items, token_budget=token_budget, wait_s=0, **dict(
                zip(("take_id", "lost_takes"), more)))
            if self.lose_replies > 0:
                self.lose_replies -= 1
                raise ActorUnavailableError("the connection to it was lost", None)
            return items
        self.take = SimpleNamespace(remote=take)


def test_items_of_a_take_whose_reply_was_lost_go_back_to_the_queue_and_run(idle_replica) -> None:
    """Before, a take that leased items but whose reply never came back (a blip of the queue replica) left
    them leased to a live replica that never ran them: their clients waited for the request timeout."""
    async def main() -> None:
        core = TensorQueueCore(max_items=8, max_bytes=1000)
        llm, engine = await idle_replica(_LossyTakeQueue(core, lose_replies=1))
        await core.put(QueueItem(request_id="b", nbytes=1, reserved_tokens=10, payload={}, stream=True), 1)
        with pytest.raises(ActorUnavailableError):  # the run loop logs it and goes on
            await llm._iteration()
        assert engine.running == set() and core.stats()["leased"] == 1
        await llm._iteration()
        assert engine.running == {"b"}  # it runs here after all, once
        assert core.stats()["leased"] == 1 and core.stats()["depth"] == 0
    asyncio.run(main())


def test_takes_that_keep_failing_name_one_lost_take_and_its_items_still_come_back(idle_replica) -> None:
    """Before, every failed take added its id to the list of lost takes, and every later take carried the whole
    list: while the queue replica stayed unreachable (minutes: 2 takes a second) it grew without bound. Now a
    take sent while some are lost only names them and leases nothing, so its own loss adds nothing; the item
    the first lost take leased still goes back to the queue and runs once takes get through again."""
    async def main() -> None:
        core = TensorQueueCore(max_items=8, max_bytes=1000)
        queue = _Queue(core)
        sent: list[tuple] = []
        state = {"failing": 1 + 50}  # the first reaches the queue (its reply is lost), then 50 never arrive

        async def take(cid: str, max_items: int, token_budget: int, wait_s: float, *more):
            sent.append(more)
            if state["failing"] == 51:
                await core.take(cid, max_items=max_items, token_budget=token_budget, wait_s=0,
                                **dict(zip(("take_id", "lost_takes"), more)))
            if state["failing"] > 0:
                state["failing"] -= 1
                raise ActorUnavailableError("the connection to it was lost", None)
            return await core.take(cid, max_items=max_items, token_budget=token_budget, wait_s=0,
                                   **dict(zip(("take_id", "lost_takes"), more)))
        queue.take = SimpleNamespace(remote=take)
        llm, engine = await idle_replica(queue)
        await core.put(QueueItem(request_id="b", nbytes=1, reserved_tokens=10, payload={}, stream=True), 1)
        for _ in range(51):
            with pytest.raises(ActorUnavailableError):  # the run loop logs it and goes on
                await llm._iteration()
        assert core.stats()["leased"] == 1 and engine.running == set()
        assert max(len(more[1]) for more in sent) <= 1, [len(more[1]) for more in sent]
        await llm._iteration()
        assert engine.running == {"b"}  # given back, then taken again: it runs here, once
        assert core.stats()["leased"] == 1 and core.stats()["depth"] == 0
        assert llm._lost_takes == ()
    asyncio.run(main())


def test_a_redelivered_request_s_events_carry_its_delivery(idle_replica) -> None:
    """The tensor queue tells a redelivery's events from the first delivery's, which reuse their numbers, by
    the delivery each carries (`d`): while the queue moves, the replica that did not redeliver a request may
    still hold the first delivery's events."""
    async def main() -> None:
        core = TensorQueueCore(max_items=8, max_bytes=1000)
        llm, engine = await idle_replica(_LossyTakeQueue(core, lose_replies=0))
        await core.put(QueueItem(request_id="b", nbytes=1, reserved_tokens=10, payload={}, stream=False), 1)
        await core.take("llm-gone", max_items=1, token_budget=100, wait_s=0)
        core.leave("llm-gone")  # its first delivery ends: the request goes back with a restart
        await llm._iteration()
        assert engine.running == {"b"}
        llm._outbox = [{"request_id": "b", "type": "token", "text": "x"}]
        await llm._publish(wait=True)
        evs = await core.next_events("b", 0)
        assert [(ev["type"], ev.get("d")) for ev in evs] == [("restart", 2), ("token", 2)]
    asyncio.run(main())


def test_a_take_given_up_before_it_ran_leases_nothing() -> None:
    """The lost take may still be on its way (or waiting for items) when the replica gives it up."""
    async def main() -> None:
        core = TensorQueueCore(max_items=8, max_bytes=1000)
        assert await core.take("llm1", max_items=1, token_budget=100, wait_s=0, take_id=2, lost_takes=[1]) == []
        await core.put(QueueItem(request_id="b", nbytes=1, reserved_tokens=10, payload={}), 1)
        assert await core.take("llm1", max_items=1, token_budget=100, wait_s=0, take_id=1) == []  # late
        assert [it.request_id for it in await core.take("llm1", max_items=1, token_budget=100, wait_s=0,
                                                        take_id=3)] == ["b"]
        # A lost take whose items already sent events (they run there after all) keeps them.
        core.publish("llm1", [{"request_id": "b", "type": "token", "text": "x", "i": 0}])
        assert await core.take("llm1", max_items=1, token_budget=100, wait_s=0, take_id=4, lost_takes=[3]) == []
        assert core.stats()["leased"] == 1 and core.stats()["depth"] == 0
    asyncio.run(main())



def _take_of_an_earlier_release(core: TensorQueueCore, sent: list[tuple] | None = None):
    """The take of a queue replica of an earlier release: four arguments; numbers make it raise TypeError as
    Ray raises it (when the call is awaited). `sent` records the arguments after the four."""
    async def old_take(cid: str, max_items: int, token_budget: int, wait_s: float):
        return await core.take(cid, max_items=max_items, token_budget=token_budget, wait_s=0)

    def take(*args):
        if sent is not None:
            sent.append(args[4:])
        try:
            return old_take(*args)
        except TypeError as exc:
            async def refused(err: TypeError = exc):
                raise err
            return refused()
    return take

def test_a_queue_replica_of_an_earlier_release_gets_plain_takes(idle_replica) -> None:
    """An image rollout rolls the LLM pool before the queue's replica: its take refuses the numbers."""
    async def main() -> None:
        core = TensorQueueCore(max_items=8, max_bytes=1000)
        queue = _Queue(core)
        queue.take = SimpleNamespace(remote=_take_of_an_earlier_release(core))
        llm, engine = await idle_replica(queue)
        await core.put(QueueItem(request_id="b", nbytes=1, reserved_tokens=10, payload={}), 1)
        with pytest.raises(TypeError, match="positional argument"):
            await llm._iteration()
        await llm._iteration()
        assert engine.running == {"b"}
    asyncio.run(main())


def test_running_streams_keep_decoding_while_a_taken_requests_embeddings_arrive(monkeypatch) -> None:
    """Before, the embeddings of a taken image request were fetched inside the run loop: every running stream
    paused for as long as they took to arrive (megabytes from another node). Now they come with the take, whose
    future overlaps the decode steps."""
    import threading
    import time

    class _Stepping(_Engine):
        def __init__(self) -> None:
            super().__init__()
            self.steps: list[float] = []
            self.added: dict[str, object] = {}

        def add(self, request) -> None:
            super().add(request)
            self.added[request.request_id] = request.image_embeds

        async def step(self) -> list:
            self.steps.append(time.monotonic())
            await asyncio.sleep(0.01)
            return []

    fetch: dict[str, float] = {}

    class _SlowTransport:
        def get(self, handle, *, timeout_s=None):
            fetch["start"] = time.monotonic()
            threading.Event().wait(0.4)  # the embeddings on their way
            fetch["end"] = time.monotonic()
            return f"rows of {handle}"

    async def main() -> None:
        core = TensorQueueCore(max_items=8, max_bytes=1000)
        queue = _Queue(core)

        def take(cid: str, max_items: int, token_budget: int, wait_s: float, *more):
            return core.take(cid, max_items=max_items, token_budget=token_budget, wait_s=0)
        queue.take = SimpleNamespace(remote=take)
        engine = _Stepping()
        llm = await _replica(monkeypatch, queue, engine)
        llm.transport = _SlowTransport()
        llm.cfg = SimpleNamespace(lease_timeout_s=10.0)
        await core.put(QueueItem(request_id="b", nbytes=1, reserved_tokens=10, stream=True,
                                 payload={"ids": [1, 2], "params": {"max_tokens": 4}, "embeds": "handle-b"}), 1)
        deadline = time.monotonic() + 5
        while "b" not in engine.added and time.monotonic() < deadline:
            await llm._iteration()
        assert engine.added.get("b") == "rows of handle-b"
        during = [t for t in engine.steps if fetch["start"] < t < fetch["end"]]
        assert len(during) >= 5, (len(during), len(engine.steps))  # "a" decoded on meanwhile
    asyncio.run(main())


def test_takes_are_numbered_again_once_the_queue_replica_of_an_earlier_release_is_replaced(idle_replica) -> None:
    """Plain takes are for the queue replica of an earlier release, while an image rollout has not reached it yet.
    Before, an LLM replica that met one took without numbers for the rest of its life (so a lost take's items
    stayed leased again), also when its TypeError had another cause; now it tries numbers again a while later."""
    async def main() -> None:
        core = TensorQueueCore(max_items=8, max_bytes=1000)
        queue = _Queue(core)
        sent: list[tuple] = []
        take_of_old_release = _take_of_an_earlier_release(core, sent)

        async def take_of_this_release(cid: str, max_items: int, token_budget: int, wait_s: float, *more):
            sent.append(more)
            return await core.take(cid, max_items=max_items, token_budget=token_budget, wait_s=0,
                                   **dict(zip(("take_id", "lost_takes"), more)))

        queue.take = SimpleNamespace(remote=take_of_old_release)
        llm, engine = await idle_replica(queue)
        with pytest.raises(TypeError, match="positional argument"):
            await llm._iteration()
        await llm._iteration()
        assert sent[-1] == ()  # plain, to the old replica
        queue.take = SimpleNamespace(remote=lambda *args: take_of_this_release(*args))  # the queue rolled
        llm._plain_takes_until = time.monotonic() - 1  # a while later
        await core.put(QueueItem(request_id="b", nbytes=1, reserved_tokens=10, payload={}), 1)
        await llm._iteration()
        assert sent[-1] and sent[-1][0] == llm._take_seq  # numbered again
        assert engine.running == {"b"}
    asyncio.run(main())
