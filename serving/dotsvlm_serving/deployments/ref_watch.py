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
import logging
import threading
import time
from typing import Any

import ray

log = logging.getLogger("ray.serve")

# How long one wait of the thread lasts at most: a ref awaited meanwhile joins the next one, so this bounds
# the extra delay before a new ref that is ready at once is noticed.
WAIT_SLICE_S = 0.01
# ray.wait failing this many times in a row fails the refs awaited then (a clear error at once, not a 504 at
# the request's deadline); its warning is logged at most every LOG_EVERY_S.
MAX_ERRORS = 3
LOG_EVERY_S = 60.0


class RefWatcher:
    """`await watcher.ready(ref, timeout_s)` -> True once the object exists (or its task failed: fetching it
    then raises), False at the timeout (a ref already ready is found even at a timeout of 0); raises when Ray
    cannot say (`ray.wait` failing). Safe for several event loops and threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiters: dict[Any, list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]]] = {}
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._errors = 0
        self._logged_at = float("-inf")

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
            # (at least two slices: the thread looks at the ref once even when the deadline has come)
            await asyncio.wait_for(fut, max(2 * WAIT_SLICE_S, timeout_s))
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
            except Exception as exc:
                self._failed(refs, exc)
                continue
            self._errors = 0
            if not ready:
                continue
            with self._lock:
                done = [entry for ref in ready for entry in self._waiters.pop(ref, [])]
            _wake_all(done, None)

    def _failed(self, refs: list[Any], exc: Exception) -> None:
        self._errors += 1
        now = time.monotonic()
        if now - self._logged_at >= LOG_EVERY_S:
            self._logged_at = now
            log.warning("ray.wait failed while waiting for %d embedding reference(s)", len(refs), exc_info=True)
        if self._errors < MAX_ERRORS:
            self._wake.wait(WAIT_SLICE_S)
            return
        self._errors = 0
        with self._lock:
            done = [entry for ref in refs for entry in self._waiters.pop(ref, [])]
        _wake_all(done, RuntimeError(f"Ray could not say whether the embeddings are ready "
                                     f"({type(exc).__name__}: {exc})"))


def _wake_all(entries: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]], exc: Exception | None) -> None:
    for loop, fut in entries:
        try:
            loop.call_soon_threadsafe(_resolve, fut, exc)
        except RuntimeError:  # that loop is closed: nobody waits any more
            pass


def _resolve(fut: asyncio.Future[None], exc: Exception | None) -> None:
    if fut.done():
        return
    if exc is None:
        fut.set_result(None)
    else:
        fut.set_exception(exc)


_watcher = RefWatcher()


async def ready(ref: Any, timeout_s: float) -> bool:
    """The process's shared watcher (see RefWatcher.ready)."""
    return await _watcher.ready(ref, timeout_s)
