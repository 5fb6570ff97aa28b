"""`dotsvlm drain-head` (the head pod's preStop): sets the flag every ingress replica follows, waits until
each has seen it and has nothing open, or the deadline; never keeps the pod from stopping. On a real
local Ray: tests/serving/test_head_drain_ray.py."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from dotsvlm_serving.deployments.backpressure import REPORT_KV_PREFIX
from dotsvlm_serving.head_drain import DRAIN_KV_KEY, HeadDrain, drain_head, drain_state

DOTSVLM = Path(sys.executable).parent / "dotsvlm"


class FakeGcs:
    """Ray's GcsClient KV calls, over a dict; `on_poll` plays the ingress replicas between polls."""

    def __init__(self) -> None:
        self.kv: dict[bytes, bytes] = {}

    def internal_kv_put(self, key: bytes, value: bytes, overwrite: bool, namespace: bytes) -> int:
        self.kv[key] = value
        return 0

    def internal_kv_get(self, key: bytes, namespace: bytes) -> bytes | None:
        return self.kv.get(key)

    def internal_kv_keys(self, prefix: bytes, namespace: bytes) -> list[bytes]:
        return [k for k in self.kv if k.startswith(prefix)]

    def report(self, replica: str, t: float, open_requests: int, draining: bool) -> None:
        self.kv[(REPORT_KV_PREFIX + replica).encode()] = json.dumps(
            {"time": t, "open_requests": open_requests, "head_draining": draining}).encode()


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_the_drain_waits_for_every_replica_to_see_the_flag_and_finish_its_open_requests() -> None:
    gcs, clock = FakeGcs(), Clock()
    gcs.report("a", 999.0, 2, False)
    gcs.report("b", 999.0, 0, False)
    script = iter([
        lambda: gcs.report("a", clock.t, 2, True),  # a saw the flag; b has not written since
        lambda: gcs.report("b", clock.t, 0, True),  # b too; a's two requests still run
        lambda: gcs.report("a", clock.t, 1, True),
        lambda: gcs.report("a", clock.t, 0, True),  # nothing open anywhere
    ])
    polls = []

    def sleep(s: float) -> None:
        clock.t += s
        polls.append(clock.t)
        next(script)()

    res = drain_head(gcs, deadline_s=60, retry_after_s=30, poll_s=1.0, clock=clock, sleep=sleep)
    assert res.drained and "2 ingress replica(s) drained" in res.message, res
    assert len(polls) == 4  # not before the last open request ended
    flag = HeadDrain.from_json(gcs.kv[DRAIN_KV_KEY.encode()])
    assert flag == HeadDrain(until=1060.0, retry_after_s=30, since=1000.0)  # held until the deadline, never for ever
    assert flag.active(1059.0) and not flag.active(1060.0)
    # A replica of the next head (GCS fault tolerance keeps the KV in Redis) started after the drain began:
    # the flag is not its own; a replica that ran when it began follows it.
    assert flag.applies_to(replica_started_at=900.0, now=1030.0)
    assert not flag.applies_to(replica_started_at=1020.0, now=1030.0)
    assert not flag.applies_to(replica_started_at=900.0, now=1060.0)
    old = HeadDrain.from_json(b'{"until": 1060.0, "retry_after_s": 30}')
    assert old is not None and old.applies_to(replica_started_at=1020.0, now=1030.0), "a flag from before 'since'"
    assert "retry in 30 s" in flag.message()


def test_the_drain_gives_up_at_its_deadline_and_says_what_was_still_open() -> None:
    gcs, clock = FakeGcs(), Clock()

    def sleep(s: float) -> None:
        clock.t += s
        gcs.report("a", clock.t, 3, True)

    gcs.report("a", clock.t, 3, False)
    res = drain_head(gcs, deadline_s=10, retry_after_s=5, poll_s=1.0, clock=clock, sleep=sleep)
    assert not res.drained and res.open_requests == 3 and "3 request(s) still open at the deadline" in res.message


def test_without_ingress_reports_there_is_nothing_to_drain() -> None:
    gcs, clock = FakeGcs(), Clock()
    gcs.report("gone", clock.t - 120, 4, False)  # a replica that stopped writing long ago does not count
    res = drain_head(gcs, deadline_s=60, retry_after_s=5, clock=clock, sleep=lambda s: None)
    assert res.drained and "nothing to drain" in res.message


def test_a_report_from_before_the_flag_does_not_count_as_draining() -> None:
    reports = [{"time": 99.0, "open_requests": 0, "head_draining": True}]  # an older drain's report
    assert not drain_state(reports, since=100.0, now=101.0).done
    assert drain_state([{"time": 100.5, "open_requests": 0, "head_draining": True}], 100.0, 101.0).done


def test_drain_head_with_the_head_gone_gives_up_at_its_deadline_and_exits_0() -> None:
    started = time.monotonic()
    proc = subprocess.run([str(DOTSVLM), "drain-head", "--address=127.0.0.1:9", "--deadline-seconds=3"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "gave up at the deadline (3 s)" in proc.stderr or "drain failed" in proc.stderr, proc.stderr
    assert time.monotonic() - started < 30
