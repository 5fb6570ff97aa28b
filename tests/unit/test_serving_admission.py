"""Backpressure before the vision stage: the admission decisions (pure) and the small state behind them."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest

from dotsvlm_serving.admission import (DEFAULT_RETRY_AFTER_S, IMAGE_BYTES_FULL, MAX_RETRY_AFTER_S, VISION_BACKLOG_FULL,
                                       AmountGate, ByteBudget, DrainRate, admit_bytes, admit_pixels, retry_after_s,
                                       share)
from dotsvlm_serving.deployments.backpressure import (REPORT_STALE_S, IngressAdmission, ReportAges, rejection_error,
                                                      sum_reports)
from dotsvlm_serving.serve_config import ServeAppConfig, VisionPoolConfig

MPX = 1_000_000


def test_pixels_within_the_limit_go_in_and_beyond_it_get_429_with_the_wait_at_the_measured_rate() -> None:
    assert admit_pixels(request_pixels=10 * MPX, pending_pixels=80 * MPX, limit=100 * MPX, running_replicas=2,
                        drain_pixels_per_s=5 * MPX) is None
    r = admit_pixels(request_pixels=30 * MPX, pending_pixels=80 * MPX, limit=100 * MPX, running_replicas=2,
                     drain_pixels_per_s=5 * MPX)
    assert r is not None and r.reason == VISION_BACKLOG_FULL and r.stage == "vision"
    assert r.retry_after_s == 2  # 10 Mpx over the limit at 5 Mpx/s
    # The message says what happened, with the numbers, and what to do.
    assert "80.0 Mpx" in r.message and "100.0 Mpx" in r.message and "2 vision replicas" in r.message
    assert "retry after 2 s" in r.message and "vision.maxPendingPixelsPerReplica" in r.message


def test_a_request_alone_always_goes_in_so_a_pool_waking_from_zero_takes_the_first_image() -> None:
    # Nothing pending (the pool at zero has no backlog yet): even a request over the limit is admitted.
    assert admit_pixels(request_pixels=500 * MPX, pending_pixels=0, limit=100 * MPX, running_replicas=0,
                        drain_pixels_per_s=None) is None
    assert admit_bytes(request_bytes=10**9, held_bytes=0, limit=10**6, release_bytes_per_s=None) is None


def test_bytes_beyond_the_ingress_limit_get_429() -> None:
    r = admit_bytes(request_bytes=30 * MPX, held_bytes=90 * MPX, limit=100 * MPX, release_bytes_per_s=None)
    assert r is not None and r.reason == IMAGE_BYTES_FULL and r.stage == "ingress"
    assert r.retry_after_s == DEFAULT_RETRY_AFTER_S  # nothing measured yet
    assert "api.maxImageBytesInFlight" in r.message


def test_retry_after_is_whole_seconds_within_bounds() -> None:
    assert retry_after_s(1, 1e9) == 1
    assert retry_after_s(10, 4) == 3
    assert retry_after_s(1e12, 1) == MAX_RETRY_AFTER_S
    assert retry_after_s(5, None) == retry_after_s(5, 0.0) == DEFAULT_RETRY_AFTER_S


def test_each_ingress_replica_takes_its_share_so_the_stage_never_holds_more_than_the_limit() -> None:
    assert share(100, 1) == 100
    assert share(100, 3) == 34 and 3 * share(100, 3) - 100 < 3
    assert share(1, 4) == 1


def test_stage_limit_per_running_replica_and_in_all() -> None:
    v = VisionPoolConfig(max_pending_pixels_per_replica=10 * MPX,
                         autoscaling={"min_replicas": 0, "max_replicas": 4})
    assert v.pending_pixels_limit(0) == 10 * MPX  # a pool at zero counts as one: it is waking up
    assert v.pending_pixels_limit(2) == 20 * MPX
    assert v.pending_pixels_limit(9) == 40 * MPX  # in all: per replica x max_replicas by default
    v = v.model_copy(update={"max_pending_pixels": 25 * MPX})
    assert v.pending_pixels_limit(2) == 20 * MPX and v.pending_pixels_limit(3) == 25 * MPX


def test_drain_rate_counts_from_the_first_sample_in_the_window() -> None:
    rate = DrainRate(window_s=30)
    assert rate.rate(100.0) is None
    rate.add(100.0, 10.0)
    assert rate.rate(100.5) == 10.0  # at least one second
    rate.add(104.0, 30.0)
    assert rate.rate(105.0) == pytest.approx(40.0 / 5.0)
    assert rate.rate(200.0) is None  # forgotten after the window


def test_byte_budget_reserves_and_releases() -> None:
    b = ByteBudget(limit=100)
    assert b.reserve(60, 0.0) is None and b.held == 60
    r = b.reserve(50, 0.0)
    assert r is not None and b.held == 60  # nothing taken when refused
    # A request growing what it holds already (its images fetched after its body) is judged with it:
    assert b.reserve(20, 0.0, own=60) is None and b.held == 80
    b.release(80, 1.0)
    assert b.held == 0
    assert b.reserve(500, 1.0) is None  # alone: always


def test_ingress_admission_counts_rejections_by_reason_and_builds_the_429() -> None:
    cfg = ServeAppConfig.model_validate({"model_path": "/m", "api": {"ingress_replicas": 2},
                                         "vision": {"max_pending_pixels_per_replica": 10 * MPX,
                                                    "autoscaling": {"min_replicas": 1, "max_replicas": 4}}})
    adm = IngressAdmission(cfg.ingress_config())
    assert adm.pixel_limit() == 5 * MPX  # one running replica, two ingress replicas
    adm.vision_replicas = 3
    assert adm.pixel_limit() == 15 * MPX
    adm.check_pixels(4 * MPX, 10 * MPX, now=0.0)
    with pytest.raises(Exception) as info:
        adm.check_pixels(6 * MPX, 10 * MPX, now=0.0)
    err = info.value
    assert err.status == 429 and err.code == VISION_BACKLOG_FULL and int(err.headers["Retry-After"]) >= 1
    body = err.body()["error"]
    assert body["type"] == "rate_limit_exceeded" and body["code"] == VISION_BACKLOG_FULL
    assert adm.count(err) == "vision" and adm.rejected == {VISION_BACKLOG_FULL: 1}
    assert adm.count(rejection_error(admit_bytes(request_bytes=2, held_bytes=2, limit=3,
                                                 release_bytes_per_s=None))) == "ingress"
    figures = adm.figures(pending_pixels=7)
    assert figures["rejected"] == {VISION_BACKLOG_FULL: 1, IMAGE_BYTES_FULL: 1} and figures["pending_pixels"] == 7


def _ages(now: float) -> ReportAges:
    """A reader whose monotonic and wall clocks both read `now`."""
    return ReportAges(clock=lambda: now, wall_clock=lambda: now)


def test_report_sums_fresh_ingress_replicas_only() -> None:
    now = 1000.0
    records = {"a": {"time": now - 1, "vision_replicas": 2, "pending_pixels": 5, "pending_pixels_limit": 50,
                     "image_bytes": 7, "image_bytes_limit": 70, "rejected": {VISION_BACKLOG_FULL: 3}},
               "b": {"time": now - 2, "vision_replicas": 2, "pending_pixels": 1, "pending_pixels_limit": 50,
                     "image_bytes": 1, "image_bytes_limit": 70,
                     "rejected": {VISION_BACKLOG_FULL: 1, "queue_full": 2}},
               "gone": {"time": now - 600, "pending_pixels": 99, "rejected": {VISION_BACKLOG_FULL: 100}}}
    got = sum_reports(_ages(now).fresh(records))
    assert got["ingress_replicas"] == 2 and got["pending_pixels"] == 6 and got["pending_pixels_limit"] == 100
    assert got["rejected"] == {VISION_BACKLOG_FULL: 4, "queue_full": 2} and got["rejected_total"] == 6
    assert sum_reports([])["vision_replicas"] is None


class _Replica:
    """An ingress replica writing its report every 2 s on a wall clock `offset` s off the reader's."""

    def __init__(self, offset: float, rejected: int) -> None:
        self.offset, self.rejected, self.live = offset, rejected, True
        self.record: dict = {}

    def write(self, t: float) -> None:
        if self.live:
            self.record = {"time": t + self.offset, "vision_replicas": 1,
                           "rejected": {VISION_BACKLOG_FULL: self.rejected},
                           "p90_s": {"ttft_image_p90_s": float(self.rejected)}}


@pytest.mark.parametrize("offset", [-120.0, 3600.0])
def test_a_replica_on_a_clock_off_the_readers_is_summed_while_it_writes_and_dropped_once_it_stops(
        offset: float) -> None:
    """With `spec.apiPool` the ingress replicas run on several nodes, and the one answering `GET /-/autoscaler`
    judged the others' reports by its own wall clock: a replica on a clock 30 s behind was never summed
    (status.backpressure and status.slo missed its refusals and latencies, and rejectedTotal went up and down
    with whichever replica answered), one on a clock ahead was summed for that long after it was gone. Now a
    report is fresh while it keeps changing, on the reader's monotonic clock."""
    from dotsvlm_serving.deployments.backpressure import worst_p90s

    t = 1000.0
    ages = ReportAges(clock=lambda: t, wall_clock=lambda: t)
    here, there = _Replica(0.0, 1), _Replica(offset, 10)
    totals = []
    for step in range(60):  # the reader answers every 2 s; both replicas write between
        t += 2.0
        there.live = step < 20  # `there` writes its last report at step 19
        here.write(t)
        there.write(t - 1.0)
        fresh = ages.fresh({"here": here.record, "there": there.record})
        totals.append((sum_reports(fresh)["rejected_total"], worst_p90s(fresh, {"ttft_image_p90_s": None})))
    summed = [n for n, _ in totals]
    # From its second report on (the first goes by the wall clocks), `there` counts until it has not written
    # for REPORT_STALE_S, then never again.
    assert summed[1:20] == [11] * 19, summed
    gone = 20 + int(REPORT_STALE_S / 2)  # silent for more than REPORT_STALE_S
    # (the read that drops it may come one earlier on the clock behind: a changed report is never taken as
    # younger than its wall age, so it goes once it was written more than REPORT_STALE_S before)
    assert summed[gone - 2] == 11 and set(summed[gone:]) == {1}, summed
    assert totals[10][1] == {"ttft_image_p90_s": 10.0} and totals[-1][1] == {"ttft_image_p90_s": 1.0}


def test_a_gone_replicas_last_report_is_left_out_when_the_reader_had_not_read_for_a_while() -> None:
    """`GET /-/autoscaler` is answered by whichever ingress replica the request reaches, so one replica may not
    read the reports for minutes. A report that changed since its last read counted as written just now: a
    replica replaced half an hour ago had its figures summed again (one ingress replica too many, its refusals
    and held pixels counted twice) though every clock agreed it was gone. A changed report's age is its wall age,
    never more than the time since the last read."""
    t = [1000.0]
    ages = ReportAges(clock=lambda: t[0], wall_clock=lambda: t[0])
    live = {"time": 999.0, "vision_replicas": 1, "rejected": {VISION_BACKLOG_FULL: 1}}
    gone = {"time": 999.5, "vision_replicas": 1, "rejected": {VISION_BACKLOG_FULL: 10}}
    assert sum_reports(ages.fresh({"live": live, "gone": gone}))["ingress_replicas"] == 2
    t[0] = 3000.0  # the next read here, 2000 s later: `gone` wrote once more at 1001 s, then stopped
    got = sum_reports(ages.fresh({"live": {**live, "time": 2999.0}, "gone": {**gone, "time": 1001.0}}))
    assert got["ingress_replicas"] == 1 and got["rejected_total"] == 1, got


def test_status_slo_reports_the_worst_fresh_ingress_replica_as_the_policy_reads_it() -> None:
    """status.slo came from whichever ingress replica answered: with several it could say "met" while the
    policy, which takes the worst replica's p90, scaled up for a miss."""
    from dotsvlm_serving.deployments.backpressure import worst_p90s

    now = 1000.0
    own = {"ttft_text_p90_s": 0.5, "ttft_image_p90_s": None}
    records = {"a": {"time": now - 1, "p90_s": {"ttft_text_p90_s": 3.0, "ttft_image_p90_s": None}},
               "b": {"time": now - 2, "p90_s": {"ttft_text_p90_s": 0.4, "ttft_image_p90_s": 6.0}},
               "gone": {"time": now - 600, "p90_s": {"ttft_text_p90_s": 99.0}},  # a replica gone long ago
               "old": {"time": now - 1}}  # one from before this field
    assert worst_p90s(_ages(now).fresh(records), own) == {"ttft_text_p90_s": 3.0, "ttft_image_p90_s": 6.0}
    assert worst_p90s([], own) == own


def test_gate_holds_decoded_pixels_under_the_limit_in_arrival_order() -> None:
    async def scenario() -> None:
        gate = AmountGate(limit=10)
        order: list[str] = []
        await gate.acquire(6)

        async def take(name: str, n: int) -> None:
            await gate.acquire(n)
            order.append(name)

        big = asyncio.create_task(take("big", 8))
        await asyncio.sleep(0)
        small = asyncio.create_task(take("small", 2))  # would fit now, but waits behind the earlier one
        await asyncio.sleep(0)
        assert order == [] and gate.waiting == 10
        gate.release(6)
        await asyncio.gather(big, small)
        assert order == ["big", "small"] and gate.held == 10
        # A waiter that goes away gives its turn to the next one.
        gone = asyncio.create_task(gate.acquire(5))
        await asyncio.sleep(0)
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        assert gate.waiting == 0
        gate.release(10)
        await gate.acquire(50)  # alone: larger than the limit still runs
        assert gate.held == 50

    asyncio.run(scenario())


class _NeverAssigned:
    """A vision handle's response while the pool has no replica that can run: Serve never hands out the
    reference (it waits to assign the call to a replica)."""

    def __init__(self) -> None:
        self.cancelled = False
        self.encode = self  # vision.encode.remote(...)

    def remote(self, images: list[bytes], pixels: int) -> "_NeverAssigned":
        return self

    async def _to_object_ref(self) -> None:
        await asyncio.Event().wait()

    def cancel(self) -> None:
        self.cancelled = True


class _NoMetrics:
    def inc(self, *_: object) -> None: ...

    def observe(self, *_: object) -> None: ...



def _bare_relay(vision, config: dict | None = None):
    """A Relay with only what `encode` needs: the given vision handle, no metrics, fresh signals and admission."""
    from dotsvlm_serving.autoscaling.signals import IngressSignals
    from dotsvlm_serving.deployments.relay import Relay

    cfg = ServeAppConfig.model_validate({"model_path": "/m", **(config or {})})
    relay = object.__new__(Relay)
    relay.vision, relay.metrics, relay.signals = vision, _NoMetrics(), IngressSignals()
    relay.admission = IngressAdmission(cfg.ingress_config())
    relay.pixels_per_token, relay.hidden_size, relay.embed_dtype = 196, 8, "float32"
    return relay

def test_an_image_request_gets_a_504_at_its_deadline_while_no_vision_replica_can_take_it() -> None:
    """The vision pool at zero waking a replica that never starts (no free GPU): the request must end at its
    deadline with a 504 that says what to do, not wait forever; its call is cancelled and its pixels leave
    the backlog the autoscaler and the admission read."""
    import time

    from dotsvlm_serving.api.errors import ApiError

    relay = _bare_relay(_NeverAssigned(), {"vision": {"autoscaling": {"min_replicas": 0}}})
    started = time.monotonic()
    with pytest.raises(ApiError) as err:
        asyncio.run(asyncio.wait_for(relay.encode([b"png"], [4], started + 0.3), 10))
    assert time.monotonic() - started < 5
    assert err.value.status == 504 and "vision.minReplicas" in str(err.value) and "retry" in str(err.value)
    assert relay.vision.cancelled
    assert relay.signals.pending_pixels == 0 and relay.signals.pending_requests == 0


class _NeverEncoded(_NeverAssigned):
    """A vision call a replica took (its reference is out) whose embeddings never come (a stuck replica)."""

    async def _to_object_ref(self) -> str:
        return "never-ready-ref"


def test_an_image_request_whose_embeddings_never_come_gets_a_504_at_its_deadline(monkeypatch) -> None:
    """The wait for the embeddings (one thread for all requests, `ref_watch`) ends at the request's deadline:
    504, the vision call cancelled, the backlog the autoscaler reads emptied."""
    import time

    from dotsvlm_serving.api.errors import ApiError
    from dotsvlm_serving.deployments import ref_watch

    def never_ready(refs, *, num_returns, timeout, fetch_local):
        time.sleep(timeout)
        return [], list(refs)

    monkeypatch.setattr(ref_watch.ray, "wait", never_ready)
    relay = _bare_relay(_NeverEncoded())
    started = time.monotonic()
    with pytest.raises(ApiError) as err:
        asyncio.run(asyncio.wait_for(relay.encode([b"png"], [4], started + 0.3), 10))
    assert 0.3 <= time.monotonic() - started < 5
    assert err.value.status == 504 and relay.vision.cancelled
    assert relay.signals.pending_pixels == 0 and relay.signals.pending_requests == 0


def test_http_images_count_at_their_largest_size_while_they_download() -> None:
    """An http(s) image's size is known only once it is in: while it downloads it is counted at
    api.images.max_image_bytes, so concurrent downloads cannot exceed the ingress's image bytes; a
    request alone still goes in, and what it held is released when it ends."""
    import json
    from types import SimpleNamespace

    from dotsvlm_serving.api.auth import ApiKeyAuth
    from dotsvlm_serving.api.errors import ApiError
    from dotsvlm_serving.api.images import FetchPolicy
    from dotsvlm_serving.deployments.ingress import Ingress

    mib = 1024 * 1024
    cfg = ServeAppConfig.model_validate({"model_path": "/m", "api": {
        "api_keys_env": None, "max_image_bytes_in_flight": 48 * mib, "images": {"max_image_bytes": 20 * mib}}}
    ).ingress_config()
    ing = object.__new__(Ingress)
    ing.cfg, ing.admission, ing.auth = cfg, IngressAdmission(cfg), ApiKeyAuth.from_env(None)
    ing.fetch_policy = FetchPolicy.from_config(max_bytes=20 * mib, timeout_s=5, fetch_allow=[])
    ing.model = SimpleNamespace(served_model_name="dots.vlm1")
    downloading, finish = asyncio.Event(), asyncio.Event()
    held_while_downloading: list[int] = []

    async def download(urls: list[str]):
        held_while_downloading.append(ing.admission.bytes.held)
        downloading.set()
        await finish.wait()
        raise ApiError(400, "stop here")  # the rest of the request is not under test

    ing._load_images = download

    def request(n_images: int) -> SimpleNamespace:
        parts = [{"type": "image_url", "image_url": {"url": f"https://images.example/{i}.png"}} for i in range(n_images)]
        body = json.dumps({"model": "dots.vlm1", "messages": [{"role": "user", "content": parts}]}).encode()

        async def stream():
            yield body
        return SimpleNamespace(headers={"content-length": str(len(body))}, stream=stream)

    async def main() -> None:
        first = asyncio.create_task(ing._chat(request(2), time.monotonic(), {}))
        await downloading.wait()
        assert held_while_downloading == [40 * mib]  # two images at 20 MiB each
        with pytest.raises(ApiError) as err:  # 40 + 20 MiB > 48 MiB: refused before it downloads
            await ing._chat(request(1), time.monotonic(), {})
        assert err.value.status == 429 and err.value.code == IMAGE_BYTES_FULL
        finish.set()
        with pytest.raises(ApiError):
            await first
        assert ing.admission.bytes.held == 0
        downloading.clear()
        finish.clear()
        alone = asyncio.create_task(ing._chat(request(3), time.monotonic(), {}))  # 60 MiB > 48, but alone: admitted
        await downloading.wait()
        assert held_while_downloading[-1] == 60 * mib
        finish.set()
        with pytest.raises(ApiError):
            await alone
        assert ing.admission.bytes.held == 0
        # Too many images: the 400 that says so, before anything is held or downloaded.
        with pytest.raises(ApiError) as err:
            await ing._chat(request(cfg.api.images.max_images_per_request + 1), time.monotonic(), {})
        assert err.value.status == 400 and err.value.code == "too_many_images"
        assert len(held_while_downloading) == 2 and ing.admission.bytes.held == 0

    asyncio.run(main())


def test_the_first_bad_image_of_a_request_stops_its_other_downloads(monkeypatch) -> None:
    """A request with a slow image URL and a bad one ends with the bad one's 400 at once, and the slow
    download stops with it rather than running on after its bytes were released."""
    from dotsvlm_serving.api.errors import ApiError
    from dotsvlm_serving.api.images import FetchPolicy
    from dotsvlm_serving.deployments import ingress as ingress_module

    cancelled = asyncio.Event()

    async def fake_load(url: str, policy) -> bytes:
        if "slow" in url:
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                cancelled.set()
                raise
        raise ApiError(400, "fetching the image URL returned HTTP 404", code="invalid_image_url")

    monkeypatch.setattr(ingress_module, "load_image_bytes", fake_load)
    ing = object.__new__(ingress_module.Ingress)
    ing.cfg = ServeAppConfig.model_validate({"model_path": "/m", "api": {"api_keys_env": None}}).ingress_config()
    ing.fetch_policy = FetchPolicy.from_config(max_bytes=1 << 20, timeout_s=5, fetch_allow=[])

    async def main() -> None:
        with pytest.raises(ApiError) as err:
            await asyncio.wait_for(ing._load_images(["https://a.example/slow.png", "https://a.example/bad.png"]), 10)
        assert err.value.status == 400
        await asyncio.wait_for(cancelled.wait(), 5)

    asyncio.run(main())


def _bare_ingress(api: dict):
    from dotsvlm_serving.api.auth import ApiKeyAuth
    from dotsvlm_serving.deployments.ingress import Ingress

    cfg = ServeAppConfig.model_validate({"model_path": "/m", "api": {"api_keys_env": None, **api}}).ingress_config()
    ing = object.__new__(Ingress)
    ing.cfg, ing.admission, ing.auth = cfg, IngressAdmission(cfg), ApiKeyAuth.from_env(None)
    return ing


@pytest.mark.parametrize("endpoint", ["_chat", "_completion"])
def test_a_body_that_does_not_arrive_within_the_request_timeout_is_refused_and_releases_its_bytes(endpoint) -> None:
    """A client that declares a large body and sends it slowly holds image-byte budget while it does; a few of
    them would refuse every image request. The body must arrive within the request's time: 408, all released.
    A /v1/completions body is counted too (a prompt may be up to the body limit, ~200 MB: before, any number of
    them were held beyond the budget)."""
    from types import SimpleNamespace

    from dotsvlm_serving.api.errors import ApiError

    mib = 1024 * 1024
    ing = _bare_ingress({"request_timeout_s": 0.3, "max_image_bytes_in_flight": 12 * mib})

    async def trickle():
        yield b'{"model": "dots.vlm1", '
        await asyncio.Event().wait()  # the rest never comes

    async def main() -> None:
        slow = SimpleNamespace(headers={"content-length": str(8 * mib)}, stream=trickle)
        reading = asyncio.create_task(getattr(ing, endpoint)(slow, time.monotonic(), {}))
        await asyncio.sleep(0.05)
        assert ing.admission.bytes.held == 8 * mib
        other = SimpleNamespace(headers={"content-length": str(8 * mib)}, stream=trickle)
        with pytest.raises(ApiError) as err:  # 8 + 8 MiB > 12 MiB
            await getattr(ing, endpoint)(other, time.monotonic(), {})
        assert err.value.status == 429 and err.value.code == IMAGE_BYTES_FULL
        with pytest.raises(ApiError) as err:
            await asyncio.wait_for(reading, 10)
        assert err.value.status == 408 and "request timeout" in err.value.message
        assert ing.admission.bytes.held == 0

    asyncio.run(main())


def test_a_client_that_leaves_is_counted_499_and_a_ray_failure_503_never_500() -> None:
    """DotsVLMHighErrorRate pages on 5xx: a client that disconnects (Serve cancels the call) is not a server
    error, and a Ray failure is answered 503 (retry), so it is counted as one."""
    import ray

    ing = _bare_ingress({})
    counted: list[str] = []
    ing.metrics = SimpleNamespace(inc=lambda name, **labels: counted.append(labels.get("code")))
    ing._in_flight = ing._open = 0
    ing._draining_head = lambda: None

    async def leaves(request, t0, info):
        raise asyncio.CancelledError

    async def ray_fails(request, t0, info):
        raise ray.exceptions.ActorDiedError()

    async def main() -> None:
        with pytest.raises(asyncio.CancelledError):
            await ing._counted(leaves, None)
        with pytest.raises(ray.exceptions.RayError):
            await ing._counted(ray_fails, None)

    asyncio.run(main())
    assert counted == ["499", "503"] and ing._in_flight == 0 and ing._open == 0


def test_a_text_too_long_for_the_context_is_refused_before_it_is_tokenized() -> None:
    """Tokenizing megabytes takes seconds (on the ingress's event loop, every other request stalled) and
    gigabytes, only to find the prompt too long: a text no tokenization can fit is refused from its length."""
    from dotsvlm_serving.api.errors import ApiError

    ing = _bare_ingress({})
    ing.tokenizer = SimpleNamespace(get_vocab=lambda: {"a": 0, "abc": 1, "<|longest|>": 2})
    ing._max_token_chars = None
    longest = len("<|longest|>")
    assert ing._check_text_fits(ing.cfg.context_length * longest, "prompt") == ing.cfg.context_length * longest
    with pytest.raises(ApiError) as err:
        ing._check_text_fits(ing.cfg.context_length * longest + 1, "messages")
    assert err.value.status == 400 and err.value.code == "context_length_exceeded" and "shorten the messages" in \
        err.value.message


def test_retry_after_counts_only_the_wait_until_the_request_goes_in_alone() -> None:
    """A request larger than the limit goes in as soon as nothing else waits (alone), so its Retry-After is the
    time the work ahead needs to drain, not the time its own excess over the limit would: 1 Mpx pending at
    10 Mpx/s said "retry after 40 s" to a 500 Mpx request that would go in within a second."""
    r = admit_pixels(request_pixels=500 * MPX, pending_pixels=1 * MPX, limit=100 * MPX, running_replicas=1,
                     drain_pixels_per_s=10 * MPX)
    assert r is not None and r.retry_after_s == 1 and "retry after 1 s" in r.message
    r = admit_bytes(request_bytes=500 * MPX, held_bytes=30 * MPX, limit=100 * MPX, release_bytes_per_s=10 * MPX)
    assert r is not None and r.retry_after_s == 3
    # Within the limit the excess still decides: 10 Mpx over at 5 Mpx/s.
    r = admit_pixels(request_pixels=30 * MPX, pending_pixels=80 * MPX, limit=100 * MPX, running_replicas=2,
                     drain_pixels_per_s=5 * MPX)
    assert r is not None and r.retry_after_s == 2


def _flow(adm: IngressAdmission, *, big: int, small: int, drain_per_s: float, seconds: float) -> dict:
    """A steady flow of small image requests (one every 0.2 s, each encoded in 0.5 s) and one large request
    whose client retries after each Retry-After; when (if ever) the large one goes in."""
    from dotsvlm_serving.api.errors import ApiError

    pending: list[tuple[float, int]] = []  # (done at, pixels)
    t, next_big, out = 0.0, 2.0, {"big_in_at": None, "small_in": 0, "small_refused": 0}
    while t < seconds and out["big_in_at"] is None:
        for done in [p for p in pending if p[0] <= t]:
            pending.remove(done)
            adm.pixels_drained.add(t, done[1])
        held = sum(p for _, p in pending)
        if t >= next_big:
            try:
                adm.check_pixels(big, held, t)
                out["big_in_at"] = t
                break
            except ApiError as exc:
                next_big = t + int(exc.headers["Retry-After"])
        try:
            adm.check_pixels(small, held, t)
            pending.append((t + max(0.5, (held + small) / drain_per_s), small))
            out["small_in"] += 1
        except ApiError:
            out["small_refused"] += 1
        t = round(t + 0.2, 6)
    return out


def test_a_request_larger_than_the_share_is_not_starved_by_a_steady_flow_of_small_ones() -> None:
    """Before, the 8 Mpx request (its share is 5 Mpx: it goes in only when nothing is pending) was refused for
    the whole minute, every retry, while small requests kept the backlog from ever emptying. Now it takes the
    next turn: small requests wait until it went in, and then flow again."""
    cfg = ServeAppConfig.model_validate({"model_path": "/m", "api": {"ingress_replicas": 1},
                                         "vision": {"max_pending_pixels_per_replica": 5 * MPX,
                                                    "autoscaling": {"min_replicas": 1, "max_replicas": 1}}})
    adm = IngressAdmission(cfg.ingress_config())
    adm.pixels_drained.add(0.0, 4 * MPX)  # measured: ~4 Mpx/s
    out = _flow(adm, big=8 * MPX, small=1 * MPX, drain_per_s=4 * MPX, seconds=60.0)
    assert out["big_in_at"] is not None and out["big_in_at"] <= 8.0, out
    assert out["small_in"] >= 1, out  # the flow was there: small ones went in before the large one was refused
    assert adm.turn[0] == 0  # the turn was taken: the next small request goes in as before
    adm.check_pixels(1 * MPX, 2 * MPX, out["big_in_at"] + 0.1)


def test_a_turn_nobody_takes_expires_and_keeps_only_the_room_it_needs() -> None:
    cfg = ServeAppConfig.model_validate({"model_path": "/m", "api": {"ingress_replicas": 1},
                                         "vision": {"max_pending_pixels_per_replica": 10 * MPX,
                                                    "autoscaling": {"min_replicas": 1, "max_replicas": 1}}})
    adm = IngressAdmission(cfg.ingress_config())
    with pytest.raises(Exception) as info:
        adm.check_pixels(6 * MPX, 5 * MPX, 0.0)  # refused: it takes the next turn for 6 Mpx
    wait = int(info.value.headers["Retry-After"])
    adm.check_pixels(1 * MPX, 2 * MPX, 1.0)  # 2 + 1 + the turn's 6 fit in 10: it goes in
    with pytest.raises(Exception) as info:
        adm.check_pixels(2 * MPX, 3 * MPX, 1.0)  # 3 + 2 + 6 do not: before, 3 + 2 <= 10 went in
    assert "has the next turn for 6.0 Mpx" in info.value.message
    assert 1 <= int(info.value.headers["Retry-After"]) <= wait + 10
    adm.check_pixels(2 * MPX, 3 * MPX, wait + 11.0)  # the client never came back: the turn ended
    assert adm.turn == (0, 0.0)


def test_an_image_that_cannot_be_loaded_is_named_by_its_number_and_url(monkeypatch) -> None:
    """With several images, "fetching the image URL returned HTTP 404" did not say which one; the probe's errors
    already said "image N". Loading errors now do too (with the URL for http(s) images, not a data: payload)."""
    from dotsvlm_serving.api.errors import ApiError
    from dotsvlm_serving.api.images import FetchPolicy
    from dotsvlm_serving.deployments import ingress as ingress_module

    async def fake_load(url: str, policy) -> bytes:
        if "bad" in url:
            raise ApiError(400, "fetching the image URL returned HTTP 404", param="messages", code="invalid_image_url")
        return b"fine"

    monkeypatch.setattr(ingress_module, "load_image_bytes", fake_load)
    ing = object.__new__(ingress_module.Ingress)
    ing.cfg = ServeAppConfig.model_validate({"model_path": "/m", "api": {"api_keys_env": None}}).ingress_config()
    ing.fetch_policy = FetchPolicy.from_config(max_bytes=1 << 20, timeout_s=5, fetch_allow=[])
    with pytest.raises(ApiError) as err:
        asyncio.run(ing._load_images(["https://a.example/ok.png", "https://a.example/bad.png"]))
    assert err.value.status == 400 and err.value.code == "invalid_image_url"
    assert err.value.message == "image 2 (https://a.example/bad.png): fetching the image URL returned HTTP 404"
    with pytest.raises(ApiError) as err:
        asyncio.run(ing._load_images(["https://a.example/ok.png", "data:image/png;base64,!!!"]))
    assert err.value.message.startswith("image 2: data: URL payload is not valid base64"), err.value.message
