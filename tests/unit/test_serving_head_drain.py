"""`dotsvlm drain-head` (the head pod's preStop): sets the flag every ingress replica follows, waits until
each has seen it and has nothing open, or the deadline; never keeps the pod from stopping. On a real
local Ray: tests/serving/test_head_drain_ray.py."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dotsvlm_serving.deployments.backpressure import REPORT_KV_PREFIX, REPORT_STALE_S
from dotsvlm_serving.head_drain import (DRAIN_KV_KEY, REPORT_SETTLE_S, FlagWatch, HeadDrain, drain_head,
                                        drain_state)

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
        """A report as an ingress replica from before `head_drain_since` wrote it."""
        self.kv[(REPORT_KV_PREFIX + replica).encode()] = json.dumps(
            {"time": t, "open_requests": open_requests, "head_draining": draining}).encode()

    def flag(self) -> HeadDrain | None:
        return HeadDrain.from_json(self.kv.get(DRAIN_KV_KEY.encode()))


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

    res = drain_head(gcs, deadline_s=60, retry_after_s=30, poll_s=1.0, clock=clock, wall_clock=clock, sleep=sleep)
    assert res.drained and "2 ingress replica(s) drained" in res.message, res
    assert len(polls) == 4  # not before the last open request ended
    flag = gcs.flag()
    assert flag == HeadDrain(until=1060.0, retry_after_s=30, since=1000.0)  # held until the deadline, never for ever
    assert "retry in 30 s" in flag.message()


class ReplicaClocks:
    """An ingress replica's clocks: monotonic, and a wall clock `offset` s off the hook's (another node)."""

    def __init__(self, t: float, offset: float = 0.0) -> None:
        self.mono, self.offset = t, offset

    def wall(self) -> float:
        return self.mono + self.offset


def _watch(c: ReplicaClocks) -> FlagWatch:
    return FlagWatch(c.wall(), clock=lambda: c.mono, wall_clock=c.wall)


def _follows_for(watch: FlagWatch, c: ReplicaClocks, flag: HeadDrain | None, seconds: int) -> int:
    """Seconds out of `seconds` that the replica refuses new requests, reading the flag every second."""
    n = 0
    for _ in range(seconds):
        watch.saw(flag)
        n += watch.current() is not None
        c.mono += 1.0
    return n


def test_a_replica_follows_a_drain_that_began_while_it_ran_for_the_drains_deadline() -> None:
    """The flag's end and start are the hook's wall clock. A replica that started before the drain follows it
    for the drain's deadline; one of the next head (GCS fault tolerance keeps the KV in Redis), started after
    it, does not; a flag from before `since` holds until its end."""
    flag = HeadDrain(until=1060.0, retry_after_s=30, since=1000.0)
    c = ReplicaClocks(900.0)
    watch = _watch(c)
    assert _follows_for(watch, c, None, 100) == 0  # no drain yet
    assert _follows_for(watch, c, flag, 100) == 60  # the drain appears at 1000: held its 60 s
    assert _follows_for(watch, c, None, 1) == 0  # the flag removed: serving again at once
    late = ReplicaClocks(1020.0)
    assert _follows_for(_watch(late), late, flag, 60) == 0  # the next head's replica
    old = HeadDrain.from_json(b'{"until": 1060.0, "retry_after_s": 30}')
    late = ReplicaClocks(1020.0)
    assert old is not None and _follows_for(_watch(late), late, old, 60) == 40, "a flag from before 'since'"


@pytest.mark.parametrize("offset", [-3600.0, -75.0, 75.0, 3600.0])
def test_a_replica_on_a_clock_off_the_hooks_follows_the_drain_for_its_deadline_and_no_longer(offset: float) -> None:
    """With `spec.apiPool` the ingress replicas run on other nodes than the hook. Before, a replica compared the
    flag's end (the hook's clock) with its own: ahead by more than the deadline it never refused a request (they
    were cut when the head stopped), behind it refused them long after; a replica started shortly before the
    drain on a clock ahead did not follow it at all, and the hook then waited for it until its deadline."""
    c = ReplicaClocks(990.0, offset)
    watch = _watch(c)
    assert _follows_for(watch, c, None, 10) == 0  # it started at 990 (the hook's clock), the drain begins at 1000
    assert _follows_for(watch, c, HeadDrain(until=1060.0, retry_after_s=30, since=1000.0), 300) == 60


@pytest.mark.parametrize("offset", [-3600.0, -600.0])
def test_the_next_heads_replica_on_a_clock_behind_the_old_heads_does_not_take_its_drain_for_its_own(
        offset: float) -> None:
    """With GCS fault tolerance the old head's flag stays in Redis. A replica of the next head, started 90 s
    after the drain began on a node whose clock is behind the old head's, took the flag for its own ("started
    before it") and refused every request until its clock reached the flag's end: an hour for an hour's offset."""
    c = ReplicaClocks(1090.0, offset)
    assert _follows_for(_watch(c), c, HeadDrain(until=1060.0, retry_after_s=30, since=1000.0), 4000) == 0


@pytest.mark.parametrize("offset", [0.0, 1.0, -1.0])
def test_a_drain_that_began_as_the_replica_started_is_its_own(offset: float) -> None:
    """The flag is already there at the replica's first read, but the drain began after the replica started.
    Only the wall clocks can tell, and those of two synced nodes differ a little: a replica 1 s ahead of the
    hook, started 0.5 s before the drain, "started after it" and ignored it (its new requests were cut)."""
    c = ReplicaClocks(999.5, offset)
    watch = _watch(c)
    c.mono = 1000.5  # its first read, after its set-up
    # held until the flag's end on its wall clock (so within its offset), at most for the drain's deadline
    assert 58 <= _follows_for(watch, c, HeadDrain(until=1060.0, retry_after_s=30, since=1000.0), 100) <= 60


def test_the_drain_gives_up_at_its_deadline_and_says_what_was_still_open() -> None:
    gcs, clock = FakeGcs(), Clock()

    def sleep(s: float) -> None:
        clock.t += s
        gcs.report("a", clock.t, 3, True)

    gcs.report("a", clock.t, 3, False)
    res = drain_head(gcs, deadline_s=10, retry_after_s=5, poll_s=1.0, clock=clock, wall_clock=clock, sleep=sleep)
    assert not res.drained and res.open_requests == 3 and "3 request(s) still open at the deadline" in res.message


def test_without_ingress_reports_there_is_nothing_to_drain() -> None:
    """A replica that stopped writing long ago does not count: once it has not written for REPORT_SETTLE_S
    (a live one writes every 2 s, whatever its clock says)."""
    gcs, clock = FakeGcs(), Clock()
    gcs.report("gone", clock.t - 120, 4, False)

    def sleep(s: float) -> None:
        clock.t += s

    res = drain_head(gcs, deadline_s=60, retry_after_s=5, clock=clock, wall_clock=clock, sleep=sleep)
    assert res.drained and "nothing to drain" in res.message and res.seconds <= REPORT_SETTLE_S + 1, res


def test_a_report_from_before_the_flag_does_not_count_as_draining() -> None:
    reports = [{"time": 99.0, "open_requests": 0, "head_draining": True}]  # an older drain's report (older ingress)
    assert not drain_state(reports, since=100.0).done
    assert drain_state([{"time": 100.5, "open_requests": 0, "head_draining": True}], 100.0).done
    # A report says which drain it follows: the hook needs no clock to tell
    assert drain_state([{"time": 50.0, "open_requests": 0, "head_draining": True, "head_drain_since": 100.0}],
                       100.0).done
    assert not drain_state([{"time": 500.0, "open_requests": 0, "head_draining": True, "head_drain_since": 40.0}],
                           100.0).done


class Ingress:
    """An ingress replica as the hook sees it: it reports every 2 s on a wall clock `offset` s off the hook's,
    follows the drain from its first report after the flag, and has `open` requests."""

    def __init__(self, gcs: FakeGcs, name: str, offset: float, open_requests: int) -> None:
        self.gcs, self.name, self.offset, self.open = gcs, name, offset, open_requests

    def report(self, t: float) -> None:
        flag = self.gcs.flag()
        self.gcs.kv[(REPORT_KV_PREFIX + self.name).encode()] = json.dumps(
            {"time": t + self.offset, "open_requests": self.open, "head_draining": flag is not None,
             "head_drain_since": flag.since if flag else None}).encode()


@pytest.mark.parametrize("offset", [-120.0, -3600.0, 45.0])
def test_ingress_replicas_on_a_clock_off_the_hooks_are_drained_not_cut(offset: float) -> None:
    """With `spec.apiPool` the ingress replicas run on other nodes than the hook, which judged their reports by
    its own wall clock: on a clock 30 s behind, every report looked stale and the hook returned at once
    ("nothing to drain"), so SIGTERM cut every open stream; behind by any amount, it waited that much longer for
    a report "written after the flag"."""
    gcs, clock = FakeGcs(), Clock()
    a, b = Ingress(gcs, "a", offset, 2), Ingress(gcs, "b", offset, 0)
    a.report(clock.t - 1)
    b.report(clock.t - 2)
    script = {3: lambda: setattr(a, "open", 1), 9: lambda: setattr(a, "open", 0)}  # a's streams end at 9 s
    ticks = []

    def sleep(s: float) -> None:
        clock.t += s
        ticks.append(clock.t)
        t = len(ticks) * s
        script.get(t, lambda: None)()
        if t % 2 == 0:
            a.report(clock.t)
        if t % 2 == 1:
            b.report(clock.t)

    res = drain_head(gcs, deadline_s=60, retry_after_s=30, poll_s=0.5, clock=clock, wall_clock=clock, sleep=sleep)
    assert res.drained and "2 ingress replica(s) drained" in res.message, res
    assert 9.0 <= res.seconds <= 11.0, res  # when a's last request ended


def test_a_wall_clock_step_on_the_head_neither_ends_the_drain_early_nor_keeps_it_going() -> None:
    """The hook timed its deadline on the wall clock: NTP stepping it forward by more than the deadline ended
    the drain at once (SIGTERM cut the open streams). The deadline is timed on the monotonic clock now; the
    wall clock only stamps the flag."""
    gcs, mono, wall = FakeGcs(), Clock(), Clock()
    wall.t = 5000.0
    a = Ingress(gcs, "a", 0.0, 1)
    a.report(wall.t)

    def sleep(s: float) -> None:
        mono.t += s
        wall.t += s + (120.0 if mono.t == 1002.0 else 0.0)  # NTP steps the head's clock 2 min forward
        if mono.t == 1020.0:
            a.open = 0
        a.report(wall.t)

    res = drain_head(gcs, deadline_s=60, retry_after_s=30, poll_s=1.0, clock=mono, wall_clock=wall, sleep=sleep)
    assert res.drained and 20.0 <= res.seconds <= 21.0, res


def test_drain_head_with_the_head_gone_gives_up_at_its_deadline_and_exits_0() -> None:
    started = time.monotonic()
    proc = subprocess.run([str(DOTSVLM), "drain-head", "--address=127.0.0.1:9", "--deadline-seconds=3"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "gave up at the deadline (3 s)" in proc.stderr or "drain failed" in proc.stderr, proc.stderr
    assert time.monotonic() - started < 30


def test_an_ingress_replica_on_a_clock_ahead_refuses_new_requests_and_reports_the_drain_it_follows() -> None:
    """The ingress replica's side, wired: its clock is an hour ahead of the hook's (another node). Before, it
    judged the flag ended already: `/health` said ok, new requests were admitted (and cut when the head
    stopped), and its report never said draining, so the hook waited for it until its deadline."""
    import asyncio

    from dotsvlm_serving.autoscaling.signals import IngressSignals
    from dotsvlm_serving.deployments.ingress import Ingress

    c = ReplicaClocks(990.0, offset=3600.0)
    ing = object.__new__(Ingress)
    ing._open, ing.signals, ing._head_drain = 2, IngressSignals(), _watch(c)
    ing._head_drain.saw(None)
    c.mono = 1000.5
    ing._head_drain.saw(HeadDrain(until=1060.0, retry_after_s=30, since=1000.0))
    health = asyncio.run(ing.health())
    assert health.status_code == 503 and health.headers["retry-after"] == "30", health.body
    report = {"time": c.wall(), **ing._report_extra()}
    assert report["head_draining"] and report["head_drain_since"] == 1000.0
    state = drain_state([json.loads(json.dumps(report))], since=1000.0)  # as the hook reads it back
    assert state.draining == state.replicas == 1 and state.open_requests == 2 and not state.done
    ing._open = 0
    assert drain_state([{"time": c.wall(), **ing._report_extra()}], since=1000.0).done


def test_an_ingress_replica_serve_stops_takes_its_report_away_so_the_next_drain_does_not_wait_for_it(
        monkeypatch) -> None:
    """Reports were never removed: every ingress replica Serve replaced (a rollout of the API pool, a Serve config
    change) left its last one in the KV, and since the hook cannot tell a report it has not seen change from a
    live replica's on a clock far behind, each head drain then waited REPORT_SETTLE_S for those before returning
    (more 503s and a later restart, with nothing open). A replica Serve stops now deletes its report, and writes
    none after."""
    import asyncio

    from ray.experimental import internal_kv

    from dotsvlm_serving.deployments.backpressure import IngressAdmission
    from dotsvlm_serving.deployments.ingress import Ingress
    from dotsvlm_serving.serve_config import ServeAppConfig

    gcs, clock = FakeGcs(), Clock()
    monkeypatch.setattr(internal_kv, "_internal_kv_put",
                        lambda key, value, overwrite=True, namespace=None: gcs.kv.__setitem__(key.encode(), value))
    monkeypatch.setattr(internal_kv, "_internal_kv_del",
                        lambda key, namespace=None: gcs.kv.pop(key.encode(), None))

    async def scenario() -> None:
        ing = object.__new__(Ingress)
        ing.admission = IngressAdmission(ServeAppConfig.model_validate({"model_path": "/m"}).ingress_config())
        ing._report_key = "r1"
        ing._reporting = asyncio.get_running_loop().create_task(ing.admission.publish_forever(
            "r1", lambda: 0, interval_s=0.01, extra=lambda: {"open_requests": 0, "head_draining": False}))
        deadline = time.monotonic() + 5
        while (REPORT_KV_PREFIX + "r1").encode() not in gcs.kv:
            assert time.monotonic() < deadline, "the replica never wrote its report"
            await asyncio.sleep(0.01)
        await ing.__del__()  # Serve stops the replica
        await asyncio.wait_for(asyncio.gather(ing._reporting, return_exceptions=True), 5)
        assert (REPORT_KV_PREFIX + "r1").encode() not in gcs.kv

    asyncio.run(scenario())

    def sleep(s: float) -> None:
        clock.t += s

    res = drain_head(gcs, deadline_s=60, retry_after_s=5, clock=clock, wall_clock=clock, sleep=sleep)
    assert res.drained and "nothing to drain" in res.message and res.seconds == 0, res
