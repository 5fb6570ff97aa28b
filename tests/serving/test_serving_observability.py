"""Metrics end to end: a real Prometheus scrapes the real application (two ingress and two LLM replicas)
through Ray's metrics export, plus the operator's metrics endpoint; the dashboards' queries run on it.

The load is sent once (module fixture `load`): text and image requests, streaming and not, from many
clients at once (so both ingress replicas serve), and a few refused ones.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from serving_support import API_KEY, TEST_DEPLOYMENT, TEST_NAMESPACE, Served
from support.prometheus import PrometheusServer, promtool

from dotsvlm_operator.monitoring import scrape
from dotsvlm_serving.metrics.catalog import AUTOSCALER_METRICS, SERVING_METRICS, prom

pytestmark = [pytest.mark.slow, pytest.mark.ray]

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = ROOT / "charts" / "dotsvlm-operator" / "files" / "dashboards"
SEL = f'dotsvlm_namespace="{TEST_NAMESPACE}",dotsvlm_deployment="{TEST_DEPLOYMENT}"'
REQUESTS = prom("dotsvlm_requests")
BURST = 30


def _png(w: int, h: int) -> str:
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (w, h), (w % 256, h % 256, 90)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _bodies() -> list[tuple[dict, tuple[str, str]]]:
    """(request body, (expected code, modality)) for the load."""
    out: list[tuple[dict, tuple[str, str]]] = []
    for i in range(24):
        msgs: list[dict] = [{"role": "user", "content": f"Tell me about {i}."}]
        modality = "text"
        if i % 3 == 0:
            msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _png(40 + i, 36)}},
                                                 {"type": "text", "text": "What is this?"}]}]
            modality = "image"
        out.append(({"model": "dots.vlm1", "messages": msgs, "max_tokens": 6, "ignore_eos": True,
                     "stream": i % 2 == 1}, ("200", modality)))
    for i in range(3):  # refused before the messages are read
        out.append(({"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]}, ("404", "none")))
    for i in range(BURST):  # more than the queue (6) and the replicas (2 x 4) hold within 1 s: some get 429
        out.append(({"model": "dots.vlm1", "messages": [{"role": "user", "content": f"Burst {i}"}], "max_tokens": 40,
                     "ignore_eos": True}, ("200", "text")))
    return out


async def _send(url: str, bodies: list[dict]) -> list[int]:
    async def one(client: httpx.AsyncClient, body: dict) -> int:
        if body.get("stream"):
            async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                await r.aread()
                return r.status_code
        return (await client.post("/v1/chat/completions", json=body)).status_code

    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120,
                                 limits=httpx.Limits(max_connections=len(bodies))) as client:
        return list(await asyncio.wait_for(asyncio.gather(*(one(client, b) for b in bodies)), timeout=240))


@pytest.fixture(scope="module")
def operator_endpoint():
    """The operator's metrics endpoint, fed with a status as the operator computes it, reconciling twice a second."""
    import threading

    from dotsvlm_operator import models as m
    from dotsvlm_operator.monitoring.operator_metrics import OperatorMetrics
    from serving_support import _free_port

    metrics = OperatorMetrics()
    spec = m.DotsVLMDeploymentSpec.model_validate({"image": "x", "model": {"path": "/m", "volume": {
        "persistentVolumeClaim": {"claimName": "w"}}}, "llm": {"minReplicas": 2, "maxReplicas": 2}})
    status = m.DotsVLMDeploymentStatus(
        vision=m.PoolStatus(replicas=1, ready_replicas=1, desired_replicas=1, current_replicas=1),
        llm=m.PoolStatus(replicas=2, ready_replicas=1, desired_replicas=2, current_replicas=2))
    metrics.observe_status(TEST_NAMESPACE, TEST_DEPLOYMENT, spec, status, {"llm": 1})
    metrics.reconciled(TEST_NAMESPACE, TEST_DEPLOYMENT, 0.2, ok=True)
    metrics.reconciled(TEST_NAMESPACE, TEST_DEPLOYMENT, 0.05, ok=False)
    metrics.managed(1)
    port = _free_port()
    metrics.serve(port, addr="127.0.0.1")
    stop = threading.Event()

    def reconcile_forever() -> None:
        while not stop.wait(0.5):
            metrics.reconciled(TEST_NAMESPACE, TEST_DEPLOYMENT, 0.1, ok=True)

    ticker = threading.Thread(target=reconcile_forever, daemon=True)
    ticker.start()
    yield f"127.0.0.1:{port}"
    stop.set()
    ticker.join(timeout=5)


@pytest.fixture(scope="module")
def prometheus(served: Served, operator_endpoint: str, tmp_path_factory: pytest.TempPathFactory):
    jobs = {
        "ray": {"static_configs": [{"targets": [f"127.0.0.1:{served.metrics_port}"]}],
                "metric_relabel_configs": scrape.prometheus_metric_relabel_configs()},
        "dotsvlm-operator": {"static_configs": [{"targets": [operator_endpoint]}]},
    }
    with PrometheusServer(tmp_path_factory.mktemp("prometheus"), jobs) as server:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            up = server.targets_up()
            if len(up) == 2 and all(up.values()):
                break
            time.sleep(0.5)
        else:
            raise AssertionError(f"Prometheus targets not up: {server.targets_up()}")
        yield server


def _by_code_modality(server: PrometheusServer) -> dict[tuple[str, str], float]:
    res = server.query(f"sum by (code, modality) ({REQUESTS}{{{SEL}}})")
    return {(r["metric"]["code"], r["metric"]["modality"]): float(r["value"][1]) for r in res}


def _settled(read, timeout_s: float = 60):
    """The value once three reads 1.5 s apart agree (Ray reports every second, Prometheus scrapes every second)."""
    deadline = time.monotonic() + timeout_s
    last, same = None, 0
    while time.monotonic() < deadline:
        now = read()
        same = same + 1 if now == last else 0
        if same >= 2:
            return now
        last = now
        time.sleep(1.5)
    raise AssertionError(f"never settled; last {last}")


@pytest.fixture(scope="module")
def load(served: Served, prometheus: PrometheusServer) -> dict:
    # A first wave creates every series (Ray exports a histogram or counter from its first observation,
    # and a rate needs a later sample that grew), then the measured load.
    items = _bodies()
    asyncio.run(_send(served.url, [b for b, _ in items[:6]]))
    before = _settled(lambda: _by_code_modality(prometheus))
    # The mixed load first, then the burst that overflows the queue (so it cannot starve the image requests).
    codes = asyncio.run(_send(served.url, [b for b, _ in items[:-BURST]]))
    codes += asyncio.run(_send(served.url, [b for b, _ in items[-BURST:]]))
    sent = Counter((str(c), modality) for c, (_, (_, modality)) in zip(codes, items))
    # The queue may refuse some of the burst (429); whatever was answered is what must be counted.
    assert all(str(c) == code or c == 429 for c, (_, (code, _)) in zip(codes, items)), codes
    assert sent[("200", "image")] and sent[("200", "text")], sent
    return {"before": before, "sent": dict(sent), "items": items}


def test_counters_summed_over_replicas_equal_the_requests_sent(prometheus: PrometheusServer, load: dict) -> None:
    want = Counter(load["before"])
    want.update(load["sent"])
    deadline = time.monotonic() + 60
    got: dict = {}
    while time.monotonic() < deadline:
        got = _by_code_modality(prometheus)
        if got == dict(want):
            break
        time.sleep(1)
    assert got == dict(want), f"Prometheus has {got}, the test sent {load['sent']} on top of {load['before']}"
    # Both ingress replicas answered (so the sum above really is over replicas), and each LLM replica
    # reports its own engine while the single queue replica reports the queue once.
    replicas = prometheus.query(f'count by (replica) ({REQUESTS}{{{SEL},deployment="Ingress"}})')
    assert len(replicas) == 2, replicas
    # (over the last 30 s: under load a gauge's report can miss a scrape). Each comes from the component
    # that owns the number, never from the ingress replicas (as the old /metrics did).
    llm = prometheus.query(f"count by (deployment) (max_over_time({prom('dotsvlm_llm_kv_cache_capacity_tokens')}"
                           f"{{{SEL}}}[30s]))")
    assert {r["metric"]["deployment"]: float(r["value"][1]) for r in llm} == {"LLMServer": 2.0}, llm
    queue = prometheus.query(f"count by (deployment) (max_over_time({prom('dotsvlm_queue_max_items')}{{{SEL}}}[30s]))")
    assert [r["metric"]["deployment"] for r in queue] == ["TensorQueue"], queue  # (a replaced replica may linger)
    # Histograms count each completed request once, per modality.
    ttft = prometheus.query(f"sum by (modality) ({prom('dotsvlm_time_to_first_token_seconds')}_count{{{SEL}}})")
    assert {r["metric"]["modality"] for r in ttft} == {"text", "image"}


def test_no_series_is_reported_twice(prometheus: PrometheusServer, load: dict) -> None:
    """The same series from two targets, or one replica's series from two processes, would show here."""
    series = [r["metric"] for r in prometheus.query('{__name__=~"ray_dotsvlm_.+"}')]
    assert len(series) > 100, len(series)
    for ignored in (("instance", "job"), ("instance", "job", "ray_worker_id", "ray_node_address", "ray_component")):
        seen = Counter(tuple(sorted((k, v) for k, v in m.items() if k not in ignored)) for m in series)
        dups = [dict(k) for k, n in seen.items() if n > 1]
        assert not dups, f"{len(dups)} series reported more than once (ignoring {ignored}), e.g. {dups[:3]}"


def _families(text: str, prefix: str) -> str:
    """The exposition text of the metric families whose names start with prefix."""
    keep, out = False, []
    for line in text.splitlines():
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            keep = line.split()[2].startswith(prefix)
        elif line and not line.startswith("#"):
            keep = line.startswith(prefix)
        if keep:
            out.append(line)
    return "\n".join(out) + "\n"


def test_promtool_check_metrics_on_every_endpoint(served: Served, operator_endpoint: str, load: dict) -> None:
    assert httpx.get(served.url + "/metrics", timeout=10).status_code == 404  # not on the public API port
    operator_text = httpx.get(f"http://{operator_endpoint}/metrics", timeout=10).text
    done = promtool("check", "metrics", stdin=operator_text)
    assert done.returncode == 0, done.stdout + done.stderr
    ray_text = httpx.get(f"http://127.0.0.1:{served.metrics_port}/metrics", timeout=30).text
    ours = _families(ray_text, "ray_dotsvlm_")
    assert "ray_dotsvlm_requests_total" in ours
    # Ray adds camelCase labels to every series; the scrape relabelings rename them (the same rules here).
    renamed = "\n".join(_relabel(line) for line in ours.splitlines()) + "\n"
    done = promtool("check", "metrics", stdin=renamed)
    assert done.returncode == 0, (done.stdout + done.stderr)[:3000]
    # As exported, the only complaint promtool may have about ours is Ray's own label spelling.
    done = promtool("check", "metrics", stdin=ours)
    problems = {line.split(" ", 1)[1] for line in (done.stdout + done.stderr).splitlines() if " " in line}
    assert problems <= {"label names should be written in 'snake_case' not 'camelCase'"}, problems


_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def _relabel(line: str) -> str:
    """A sample line with Ray's labels renamed or dropped as `scrape.RAY_LABELS` says."""
    if line.startswith("#") or "{" not in line:
        return line
    name, rest = line.split("{", 1)
    labels, value = rest.rsplit("}", 1)
    pairs = []
    for key, val in _LABEL.findall(labels):
        new = scrape.RAY_LABELS.get(key, key)
        if new is not None:
            pairs.append(f'{new}="{val}"')
    return f"{name}{{{','.join(pairs)}}}{value}"


def _expand(expr: str) -> str:
    return (expr.replace("$namespace", TEST_NAMESPACE).replace("$deployment", TEST_DEPLOYMENT)
            .replace("$__rate_interval", "5m").replace("$__interval", "15s").replace("$__range", "5m"))


def test_every_dashboard_panel_returns_data(prometheus: PrometheusServer, load: dict) -> None:
    files = sorted(DASHBOARDS.glob("*.json"))
    assert files, f"no dashboards in {DASHBOARDS}"
    autoscaler_names = tuple(m.prometheus_name for m in AUTOSCALER_METRICS)
    # The pool autoscaler publishes only when Serve runs it (a pool with min < max); its series must then
    # carry dotsvlm_namespace/dotsvlm_deployment like every other (the panels filter by them).
    autoscaler_live = any(prometheus.query(n) for n in autoscaler_names)
    empty, checked, skipped = [], 0, []
    for f in files:
        dash = json.loads(f.read_text())
        for panel in _panels(dash):
            for target in panel.get("targets", []):
                expr = _expand(target["expr"])
                if not autoscaler_live and any(n in expr for n in autoscaler_names):
                    skipped.append(panel["title"])  # the autoscaler does not publish yet
                    continue
                res = prometheus.query_range(expr, 120)
                checked += 1
                if not [v for r in res for _, v in r["values"] if v not in ("NaN", "+Inf", "-Inf")]:
                    empty.append(f"{f.stem}: {panel['title']!r}: {expr}")
    assert not empty, "panels whose query returns nothing:\n" + "\n".join(empty)
    assert checked >= 30, checked
    if skipped:
        print(f"autoscaler panels not checked (no autoscaler series yet): {sorted(set(skipped))}")


def _panels(dash: dict):
    for p in dash.get("panels", []):
        if p.get("type") == "row":
            yield from p.get("panels", [])
        else:
            yield p


def test_catalogued_serving_metrics_are_all_exported(prometheus: PrometheusServer, load: dict) -> None:
    """Every metric the catalogue promises exists in Prometheus (the retries counter only after a retry)."""
    optional = {"dotsvlm_vision_retries"}
    missing = [m.prometheus_name for m in SERVING_METRICS if m.name not in optional
               and not prometheus.query(f"last_over_time({m.prometheus_name}{'_count' if m.kind == 'histogram' else ''}"
                                        f"{{{SEL}}}[1m])")]
    assert not missing, missing
