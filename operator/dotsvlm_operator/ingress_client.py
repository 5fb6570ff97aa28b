"""Client for the ingress's `GET /-/autoscaler`: the autoscaling policy's latest decision per pool, the
tensor queue, the observed latencies and the backpressure before the queue, which the operator writes
into the resource's status.

The endpoint is on the API port, behind the same API keys as /v1 (`Authorization: Bearer <key>`) when
`api.apiKeySecretRef` is set. Any failure is an `AutoscalerReport` with `error` set, never an exception:
an unreachable ingress must not fail the reconcile, the status says so instead.
"""

from __future__ import annotations

from typing import Literal

import httpx
from pydantic import BaseModel, ConfigDict, ValidationError

AUTOSCALER_PATH = "/-/autoscaler"


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class LastChange(_Lenient):
    reason: str | None = None
    message: str | None = None
    time: float | None = None


class PoolDecision(_Lenient):
    """The policy's latest decision for one pool (serving/dotsvlm_serving/autoscaling/serve_policy.publish)."""

    desired: int
    current: int
    raw: int
    reason: str
    signal: str | None = None  # the rule that set raw (absent from serving before 2026-12-06)
    message: str = ""
    direction: Literal["up", "down", "hold"] = "hold"
    time: float | None = None
    last_change: LastChange | None = None


class QueueReport(_Lenient):
    depth: int = 0
    bytes: int = 0
    oldest_age_s: float = 0.0
    waiting_producers: int = 0
    max_items: int | None = None
    leased: int | None = None  # absent from serving before 2026-12-06
    rejected_total: int = 0
    redelivered_total: int = 0


class AdmissionReport(_Lenient):
    """Backpressure before the tensor queue, summed over the ingress replicas
    (serving/dotsvlm_serving/deployments/backpressure.sum_reports)."""

    ingress_replicas: int = 0
    vision_replicas: int | None = None
    pending_pixels: int = 0
    pending_pixels_limit: int = 0
    image_bytes: int = 0
    image_bytes_limit: int = 0
    rejected: dict[str, int] = {}
    rejected_total: int = 0


class SLOReport(_Lenient):
    """Observed p90s (seconds); None: no data in the window."""

    ttft_image_p90_s: float | None = None
    ttft_text_p90_s: float | None = None
    inter_token_p90_s: float | None = None
    encode_latency_p90_s: float | None = None


class AutoscalerReport(_Lenient):
    decisions: dict[str, PoolDecision] | None = None  # None: no decision yet
    queue: QueueReport | None = None
    slo: SLOReport | None = None
    admission: AdmissionReport | None = None
    url: str = ""
    error: str | None = None  # why the report could not be read; everything else is then empty


def parse_report(data: object, url: str = "") -> AutoscalerReport:
    if not isinstance(data, dict):
        return AutoscalerReport(url=url, error=f"{url} answered something that is not a JSON object")
    try:
        return AutoscalerReport.model_validate({**data, "url": url, "error": None})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        return AutoscalerReport(url=url, error=f"{url} answered an unexpected document ({where}: {first['msg']})")


async def fetch_report(base_url: str, api_key: str | None, *, timeout: float = 5.0,
                       transport: httpx.AsyncBaseTransport | None = None,
                       http: httpx.AsyncClient | None = None) -> AutoscalerReport:
    """`GET <base_url>/-/autoscaler`; failures come back as `error` in words a person can act on. `http`:
    a shared client (reuses connections); without one, a client is made for this call."""
    url = base_url.rstrip("/") + AUTOSCALER_PATH
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        if http is not None:
            resp = await http.get(url, headers=headers, timeout=timeout)
        else:
            async with httpx.AsyncClient(timeout=timeout, transport=transport) as client:
                resp = await client.get(url, headers=headers)
    except httpx.TimeoutException:
        return AutoscalerReport(url=url, error=f"the API at {url} did not answer within {timeout:g} s")
    except httpx.TransportError as exc:
        return AutoscalerReport(url=url, error=f"cannot reach the API at {url} ({type(exc).__name__})")
    if resp.status_code in (401, 403):
        return AutoscalerReport(url=url, error=f"the API at {url} refused the operator's API key (HTTP {resp.status_code}); "
                                               "check api.apiKeySecretRef")
    if resp.status_code >= 400:
        return AutoscalerReport(url=url, error=f"the API at {url} answered HTTP {resp.status_code}: {resp.text[:200]}")
    try:
        data = resp.json()
    except ValueError:
        return AutoscalerReport(url=url, error=f"{url} answered something that is not JSON")
    return parse_report(data, url)
