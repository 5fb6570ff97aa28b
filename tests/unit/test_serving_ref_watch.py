"""The ingress learns that a request's embeddings exist from one thread waiting on all of them (`ref_watch`),
not from each request polling Ray: every waiter is woken once its ref is ready, a ref that never is ends at its
timeout and is forgotten, and the number of Ray calls does not grow with the number of waiters."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from dotsvlm_serving.deployments import ref_watch


class _FakeRay:
    """ray.wait over refs made ready by the test (fetch_local must be False: the bytes are not for here)."""

    def __init__(self) -> None:
        self.ready: set[str] = set()
        self.calls = 0
        self.lock = threading.Lock()

    def wait(self, refs, *, num_returns, timeout, fetch_local):
        assert not fetch_local and num_returns == len(refs)
        self.calls += 1
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                done = [r for r in refs if r in self.ready]
            if len(done) == len(refs) or time.monotonic() >= deadline:
                return done, [r for r in refs if r not in done]
            time.sleep(0.001)


@pytest.fixture
def fake(monkeypatch) -> _FakeRay:
    """ref_watch's ray.wait replaced by a `_FakeRay`."""
    f = _FakeRay()
    monkeypatch.setattr(ref_watch.ray, "wait", f.wait)
    return f


def test_each_waiter_wakes_when_its_ref_is_ready_and_ray_is_not_polled_per_waiter(fake: _FakeRay) -> None:
    watcher = ref_watch.RefWatcher()

    async def main() -> None:
        refs = [f"ref-{i}" for i in range(40)]
        waits = [asyncio.ensure_future(watcher.ready(r, 10.0)) for r in refs]
        twice = asyncio.ensure_future(watcher.ready("ref-0", 10.0))  # two requests on one ref
        never = asyncio.ensure_future(watcher.ready("never", 0.3))
        await asyncio.sleep(0.05)
        assert not any(w.done() for w in waits)
        started, calls = time.monotonic(), fake.calls
        for r in refs:
            with fake.lock:
                fake.ready.add(r)
            await asyncio.sleep(0.002)
        assert await asyncio.wait_for(asyncio.gather(*waits, twice), 5) == [True] * 41
        assert await never is False
        elapsed = time.monotonic() - started
        # One wait per slice for all 40 waiters (polling each would be ~40 calls per slice).
        assert fake.calls - calls <= elapsed / ref_watch.WAIT_SLICE_S + 3, (fake.calls - calls, elapsed)
        assert watcher.waiting() == 0  # the timed-out one is forgotten too
    asyncio.run(main())


def test_a_cancelled_waiter_is_forgotten(fake: _FakeRay) -> None:
    """A client that goes away cancels its request: its ref is no longer waited on."""
    watcher = ref_watch.RefWatcher()

    async def main() -> None:
        w = asyncio.ensure_future(watcher.ready("r", 10.0))
        await asyncio.sleep(0.02)
        assert watcher.waiting() == 1
        w.cancel()
        await asyncio.gather(w, return_exceptions=True)
        assert watcher.waiting() == 0
    asyncio.run(main())


def test_a_ref_ready_at_the_deadline_is_found_and_a_failing_ray_wait_is_an_error_not_a_silent_timeout(fake: _FakeRay, monkeypatch) -> None:
    watcher = ref_watch.RefWatcher()

    async def main() -> None:
        fake.ready.add("done")
        assert await watcher.ready("done", 0.0) is True  # the deadline came as it was answered: not a 504

        def broken(refs, **_):
            raise TypeError("wait() got an unexpected keyword argument")
        monkeypatch.setattr(ref_watch.ray, "wait", broken)
        started = time.monotonic()
        try:
            await watcher.ready("r", 30.0)
            raise AssertionError("no error")
        except RuntimeError as exc:
            assert "could not say whether the embeddings are ready" in str(exc) and "TypeError" in str(exc)
        assert time.monotonic() - started < 5  # at once, not at the request's deadline
        assert watcher.waiting() == 0
    asyncio.run(main())
