"""When a Ray object is ready, without fetching it: one thread waits on every ref the process awaits.

The ingress must know when a request's embeddings exist (the vision replica has answered) without pulling
them to its own node: they go from the object store to the LLM replica. `ray.wait(fetch_local=False)` says
so, but it blocks; polled from the event loop (`timeout=0` every few ms per request), it cost ~0.1 ms of
the ingress's CPU per poll and request, a large part of the ingress's CPU per image under load. Here one
daemon thread calls `ray.wait` on all the refs awaited at the moment (it releases the GIL while it waits)
and wakes each waiter's event loop when its ref is ready.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import ray

# How long one wait of the thread lasts at most: a ref awaited meanwhile joins the next one, so this bounds
# the extra delay before a new ref that is ready at once is noticed.
WAIT_SLICE_S = 0.01


class RefWatcher:
    """`await watcher.ready(ref, timeout_s)` -> True once the object exists (or its task failed: fetching it
    then raises), False at the timeout. Safe for several event loops and threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiters: dict[Any, list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]]] = {}
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    async def ready(self, ref: Any, timeout_s: float) -> bool:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        entry = (loop, fut)
        with self._lock:
            self._waiters.setdefault(ref, []).append(entry)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="dotsvlm-ref-watch", daemon=True)
                self._thread.start()
        self._wake.set()
        try:
            await asyncio.wait_for(fut, max(0.0, timeout_s))
            return True
        except asyncio.TimeoutError:
            return False
        finally:
            self._forget(ref, entry)

    def waiting(self) -> int:
        """Refs awaited now (for tests and metrics)."""
        with self._lock:
            return len(self._waiters)

    def _forget(self, ref: Any, entry: tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]) -> None:
        with self._lock:
            entries = self._waiters.get(ref)
            if entries and entry in entries:
                entries.remove(entry)
                if not entries:
                    del self._waiters[ref]

    def _run(self) -> None:
        while True:
            with self._lock:
                refs = list(self._waiters)
            if not refs:
                self._wake.wait()
                self._wake.clear()
                continue
            self._wake.clear()
            try:
                ready, _ = ray.wait(refs, num_returns=len(refs), timeout=WAIT_SLICE_S, fetch_local=False)
            except Exception:  # (Ray shutting down, say): each waiter's own timeout ends its wait
                self._wake.wait(WAIT_SLICE_S)
                continue
            if not ready:
                continue
            with self._lock:
                done = [entry for ref in ready for entry in self._waiters.pop(ref, [])]
            for loop, fut in done:
                try:
                    loop.call_soon_threadsafe(_resolve, fut)
                except RuntimeError:  # that loop is closed: nobody waits any more
                    pass


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


_watcher = RefWatcher()


async def ready(ref: Any, timeout_s: float) -> bool:
    """The process's shared watcher (see RefWatcher.ready)."""
    return await _watcher.ready(ref, timeout_s)
