"""The head pod's preStop (`dotsvlm drain-head`) on the shared local application (two ingress replicas):
a stream that is open when the drain starts runs to its end, new requests get 503 with Retry-After on
every ingress replica, and the drain returns once nothing is open (not at its deadline). The flag is
removed afterwards and the API serves again, so the other tests of the session are not affected."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from serving_support import Served
from test_serving_app import chat

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def _gcs():
    import ray
    from ray._raylet import GcsClient

    return GcsClient(address=ray.get_runtime_context().gcs_address)


def test_head_drain_finishes_open_streams_and_refuses_new_requests_with_retry_after(served: Served) -> None:
    from dotsvlm_serving.deployments.backpressure import KV_NAMESPACE, ReportAges
    from dotsvlm_serving.head_drain import DRAIN_KV_KEY, HeadDrain, _reports, drain_head, drain_state

    gcs = _gcs()
    stream_end: list[float] = []
    chunks: list[str] = []
    first_token = threading.Event()

    def stream() -> None:
        with served.client() as c, c.stream("POST", "/v1/chat/completions",
                                            json=chat(max_tokens=400, ignore_eos=True, stream=True)) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: "):
                    chunks.append(line)
                    if '"content":"' in line:
                        first_token.set()
        stream_end.append(time.monotonic())

    t = threading.Thread(target=stream, daemon=True)
    t.start()
    assert first_token.wait(120), "the stream did not start"
    result: list = []
    drainer = threading.Thread(target=lambda: result.append(
        (drain_head(gcs, deadline_s=180, retry_after_s=7), time.monotonic())), daemon=True)
    drainer.start()
    try:
        # Wait until every ingress replica reports it has seen the flag (its watcher polls every 0.5 s, its
        # report follows), then every new request and every health check is refused, whichever replica serves it.
        deadline = time.monotonic() + 60  # a report of a replica gone since counts for REPORT_STALE_S (30 s)
        ages = ReportAges()
        while True:
            flag = HeadDrain.from_json(gcs.internal_kv_get(DRAIN_KV_KEY.encode(), KV_NAMESPACE.encode()))
            fresh = ages.fresh(_reports(gcs))
            state = drain_state(fresh, flag.since) if flag and flag.since else None
            if state is not None and state.replicas >= 2 and state.draining == state.replicas:
                break
            assert time.monotonic() < deadline, f"the ingress replicas did not see the drain within 60 s: {state}"
            time.sleep(0.2)
        with served.client() as c:
            for _ in range(6):
                r = c.post("/v1/chat/completions", json=chat(max_tokens=2))
                assert r.status_code == 503, r.text
                assert r.headers["retry-after"] == "7", r.headers
                assert "restarting its Ray head" in r.json()["error"]["message"], r.text
                health = c.get("/health")
                assert health.status_code == 503 and health.json()["status"] == "draining", health.text
        t.join(240)
        drainer.join(240)
        assert stream_end and chunks[-1] == "data: [DONE]", chunks[-3:]
        assert '"finish_reason":"length"' in "".join(chunks[-3:]), chunks[-3:]
        assert result, "the drain did not return"
        res, returned_at = result[0]
        assert res.drained, res
        assert returned_at >= stream_end[0], "the drain returned while the stream was still open"
        assert res.seconds < 120, res  # it returned when nothing was open, not at its deadline
    finally:
        gcs.internal_kv_del(DRAIN_KV_KEY.encode(), False, KV_NAMESPACE.encode())
        deadline = time.monotonic() + 30
        with served.client() as c:
            ok = 0
            while ok < 4:  # both replicas serve again
                assert time.monotonic() < deadline, "the API did not serve again after the flag was removed"
                ok = ok + 1 if c.post("/v1/chat/completions", json=chat(max_tokens=2)).status_code == 200 else 0
