"""The autoscaler report from the ingress: parsed, and every failure is a readable error, never an exception."""

from __future__ import annotations

import asyncio

import httpx

from dotsvlm_operator.ingress_client import fetch_report


def _fetch(handler, key=None):
    return asyncio.run(fetch_report("http://api:8000/", key, transport=httpx.MockTransport(handler)))


def test_report_is_read_with_the_api_key() -> None:
    seen = {}

    def handler(req: httpx.Request) -> httpx.Response:
        seen["auth"], seen["path"] = req.headers.get("authorization"), req.url.path
        return httpx.Response(200, json={"decisions": None, "queue": {"depth": 3, "bytes": 10, "oldest_age_s": 0.5,
                                                                      "waiting_producers": 0, "max_items": 64,
                                                                      "rejected_total": 0, "redelivered_total": 1},
                                         "slo": {"ttft_image_p90_s": None}})
    rep = _fetch(handler, "k1")
    assert seen == {"auth": "Bearer k1", "path": "/-/autoscaler"}
    assert rep.error is None and rep.decisions is None and rep.queue.depth == 3 and rep.slo.ttft_image_p90_s is None


def test_refused_key_and_bad_answers_are_errors_in_words() -> None:
    assert "refused the operator's API key" in _fetch(lambda r: httpx.Response(401)).error
    assert "HTTP 503" in _fetch(lambda r: httpx.Response(503, text="tensor queue not reachable")).error
    assert "not JSON" in _fetch(lambda r: httpx.Response(200, text="<html>")).error
    assert "unexpected document" in _fetch(lambda r: httpx.Response(200, json={"decisions": {"vision": {"x": 1}}})).error


def test_unreachable_ingress_is_an_error_not_an_exception() -> None:
    rep = asyncio.run(fetch_report("http://127.0.0.1:9", None, timeout=2))
    assert rep.error and "cannot reach the API at http://127.0.0.1:9/-/autoscaler" in rep.error
