"""Metrics end to end: a real Prometheus scrapes the real application (two ingress and two LLM replicas)
through Ray's metrics export, plus the operator's metrics endpoint; the dashboards' queries run on it.

The load is sent once (module fixture `load`): text and image requests, streaming and not, from many
clients at once (so both ingress replicas serve), and a few refused ones.

The shared application has fixed pool sizes (no autoscaling policy runs), so a second, small stack
(`autoscaled`: `dotsvlm serve --config` in its own process, deployed as the operator deploys, with the
application-level policy and a vision pool that starts at zero) feeds the autoscaler's panels; it
carries its own `dotsvlm_deployment` label. Every dashboard is also drawn from these results
(`dotsvlm_operator.monitoring.render`): into the test's temporary folder, or into
`docs/images/dashboards/` with `make dashboard-pictures` (DOTSVLM_DASHBOARD_PICTURES).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from serving_support import API_KEY, TEST_DEPLOYMENT, TEST_NAMESPACE, Served, free_port, wait_healthy
from support.cluster import wait_for
from support.prometheus import PrometheusServer, promtool

from dotsvlm_operator.monitoring import render, scrape
from dotsvlm_serving.metrics.catalog import AUTOSCALER_METRICS, DEPLOYMENT_ENV, NAMESPACE_ENV, SERVING_METRICS, prom

pytestmark = [pytest.mark.slow, pytest.mark.ray]

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = ROOT / "charts" / "dotsvlm-operator" / "files" / "dashboards"
SEL = f'dotsvlm_namespace="{TEST_NAMESPACE}",dotsvlm_deployment="{TEST_DEPLOYMENT}"'
REQUESTS = prom("dotsvlm_requests")
BURST = 30
# The autoscaled stack: the vision pool starts at zero (Serve itself wakes it on the first image request);
# a burst of text requests asks the policy for a second LLM replica (a decision "up", LLMDemand). The
# down windows are long, so nothing scales down during the module.
AUTOSCALED_DEPLOYMENT = "dots-autoscaled"
AUTOSCALED_CONFIG = {
    "llm": {"context_length": 1024, "max_running_requests": 2, "max_new_tokens_default": 8,
            "autoscaling": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2, "upscale_delay_s": 1,
                            "downscale_delay_s": 600, "replica_startup_s": 10}},
    "vision": {"max_batch_pixels": 1_000_000, "max_batch_wait_ms": 5,
               "autoscaling": {"min_replicas": 0, "max_replicas": 1, "upscale_delay_s": 1, "downscale_delay_s": 600,
                               "idle_to_zero_s": 600, "replica_startup_s": 10}},
    "api": {"request_timeout_s": 180},
    "slo": {"image_ttft_s": 120, "text_ttft_s": 60, "inter_token_s": 10},
}
AUTOSCALER_DASHBOARD = "autoscaler"
# Rendered pictures of the dashboards go here when set (make dashboard-pictures), else to a temporary folder.
PICTURES_ENV = "DOTSVLM_DASHBOARD_PICTURES"


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
    # More than the queue (6) and the replicas (2 x 4) hold within its 1 s enqueue timeout: some get 429. Long
    # answers, so the replicas cannot free that much room within the second (with 40 tokens, a faster engine
    # text path, 17e9342, drained the queue in time and the burst was never refused).
    for i in range(BURST):
        out.append(({"model": "dots.vlm1", "messages": [{"role": "user", "content": f"Burst {i}"}], "max_tokens": 160,
                     "ignore_eos": True}, ("200", "text")))
    return out


class Code(int):
    """A status code that keeps the answer's text (so a failed assertion says why the server refused)."""
    text: str = ""


def _code(status: int, text: str) -> Code:
    code = Code(status)
    code.text = text[:300]
    return code


def _unexpected(codes: list[int], items: list[tuple[dict, tuple[str, str]]]) -> list[tuple[int, int, str]]:
    """(index, code, answer) of each answer that is neither the expected code nor a 429 (a full queue)."""
    return [(i, int(c), getattr(c, "text", "")) for i, (c, (_, (code, _))) in enumerate(zip(codes, items))
            if str(c) != code and c != 429]


async def _send(url: str, bodies: list[dict]) -> list[Code]:
    async def one(client: httpx.AsyncClient, body: dict) -> Code:
        if body.get("stream"):
            async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                await r.aread()
                return _code(r.status_code, r.text)
        r = await client.post("/v1/chat/completions", json=body)
        return _code(r.status_code, r.text)

    # The client waits longer than the stacks' own request timeouts (120 s and 180 s): a slow answer is the
    # server's to end (with its error), not the client's (a clean-clone CI run on 2026-12-02, load 9 on
    # 2 cores: the autoscaled stack's wave, waking its vision pool, passed the client's former 120 s).
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=240,
                                 limits=httpx.Limits(max_connections=len(bodies))) as client:
        return list(await asyncio.wait_for(asyncio.gather(*(one(client, b) for b in bodies)), timeout=420))


@pytest.fixture(scope="module")
def operator_endpoint():
    """The operator's metrics endpoint, fed with a status as the operator computes it, reconciling twice a second."""
    import threading

    from dotsvlm_operator import models as m
    from dotsvlm_operator.monitoring.operator_metrics import OperatorMetrics
    from serving_support import free_port

    metrics = OperatorMetrics()
    spec = m.DotsVLMDeploymentSpec.model_validate({"image": "x", "model": {"path": "/m", "volume": {
        "persistentVolumeClaim": {"claimName": "w"}}}, "llm": {"minReplicas": 2, "maxReplicas": 2}})
    status = m.DotsVLMDeploymentStatus(
        vision=m.PoolStatus(replicas=1, ready_replicas=1, desired_replicas=1, current_replicas=1),
        llm=m.PoolStatus(replicas=2, ready_replicas=1, desired_replicas=2, current_replicas=2))
    metrics.observe_status(TEST_NAMESPACE, TEST_DEPLOYMENT, spec, status, {"llm": 1})
    # The autoscaled stack's resource, as the operator would report it (its dashboards read both).
    auto_spec = m.DotsVLMDeploymentSpec.model_validate({"image": "x", "model": {"path": "/m", "volume": {
        "persistentVolumeClaim": {"claimName": "w"}}}, "vision": {"minReplicas": 0, "maxReplicas": 1}})
    auto_status = m.DotsVLMDeploymentStatus(
        vision=m.PoolStatus(replicas=1, ready_replicas=1, desired_replicas=1, current_replicas=1),
        llm=m.PoolStatus(replicas=1, ready_replicas=1, desired_replicas=1, current_replicas=1))
    metrics.observe_status(TEST_NAMESPACE, AUTOSCALED_DEPLOYMENT, auto_spec, auto_status, {})
    metrics.reconciled(TEST_NAMESPACE, TEST_DEPLOYMENT, 0.2, ok=True)
    metrics.reconciled(TEST_NAMESPACE, TEST_DEPLOYMENT, 0.05, ok=False)
    metrics.managed(1)
    port = free_port()
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


@dataclass
class Autoscaled:
    url: str
    metrics_port: int


@pytest.fixture(scope="module")
def autoscaled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Autoscaled]:
    """`dotsvlm serve --config` in its own process and Ray: the application with dotsvlm's autoscaling policy."""
    from dotsvlm_serving.model.tiny import ensure_tiny_checkpoint

    tmp = tmp_path_factory.mktemp("autoscaled")
    model = ensure_tiny_checkpoint(tmp / "tiny")
    cfg = tmp / "serve.yaml"
    cfg.write_text(yaml.safe_dump(AUTOSCALED_CONFIG))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0",
           NAMESPACE_ENV: TEST_NAMESPACE, DEPLOYMENT_ENV: AUTOSCALED_DEPLOYMENT}
    env.pop("DOTSVLM_API_KEYS", None)
    attempts = 4
    for attempt in range(attempts):  # Ray gives its raylet a fixed 30 s (and its agent less): a busy machine can miss it
        port = free_port()
        log_path = tmp / f"serve-{attempt}.log"
        with log_path.open("w") as log:
            proc = subprocess.Popen([str(Path(sys.executable).with_name("dotsvlm")), "serve", "--model", str(model),
                                     "--config", str(cfg), "--port", str(port)],
                                    stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 300
            while proc.poll() is None:  # healthy, or the command ended (its log says why), or the deadline
                try:
                    wait_healthy(url, 5)
                    break
                except AssertionError:
                    assert time.monotonic() < deadline, f"not healthy in 300 s: {log_path.read_text()[-2000:]}"
            if proc.poll() is not None:
                if attempt < attempts - 1 and "timed out during startup" in log_path.read_text():
                    continue
                raise AssertionError(f"dotsvlm serve exited: {log_path.read_text()[-2000:]}")
            metrics_line = re.compile(r"metrics \(Prometheus format\): http://127\.0\.0\.1:(\d+)/metrics")
            found = wait_for(lambda: metrics_line.search(log_path.read_text()), 60,
                             "dotsvlm serve to print its metrics URL")
            yield Autoscaled(url=url, metrics_port=int(found.group(1)))
            return
        finally:  # the command's process group: Ray's processes too, also after a failed start
            _kill_group(proc)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(10)


@pytest.fixture(scope="module")
def prometheus(autoscaled: Autoscaled, served: Served, operator_endpoint: str,
               tmp_path_factory: pytest.TempPathFactory):
    jobs = {
        "ray": {"static_configs": [{"targets": [f"127.0.0.1:{served.metrics_port}"]}],
                "metric_relabel_configs": scrape.prometheus_metric_relabel_configs()},
        "ray-autoscaled": {"static_configs": [{"targets": [f"127.0.0.1:{autoscaled.metrics_port}"]}],
                           "metric_relabel_configs": scrape.prometheus_metric_relabel_configs()},
        "dotsvlm-operator": {"static_configs": [{"targets": [operator_endpoint]}]},
    }
    with PrometheusServer(tmp_path_factory.mktemp("prometheus"), jobs) as server:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            up = server.targets_up()
            if len(up) == 3 and all(up.values()):
                break
            time.sleep(0.5)
        else:
            raise AssertionError(f"Prometheus targets not up: {server.targets_up()}")
        yield server


def _by_replica(server: PrometheusServer) -> dict[tuple[str, str, str], float]:
    """Each ingress replica's request counts by (replica, code, modality)."""
    res = server.query(f"sum by (replica, code, modality) ({REQUESTS}{{{SEL}}})")
    return {(r["metric"].get("replica", ""), r["metric"]["code"], r["metric"]["modality"]): float(r["value"][1])
            for r in res}


def _growth(old: dict[tuple[str, str, str], float], new: dict[tuple[str, str, str], float]) -> dict[tuple[str, str], float]:
    """What the replicas alive now counted since `old`, by (code, modality). A replica that is gone (an
    earlier test's, whose series Ray's metrics agent drops a while after it died) is not summed: the plain
    sum over replicas falls when that happens (CI run of stop 20: it never settled on start + first wave)."""
    out: Counter = Counter()
    for (replica, code, modality), value in new.items():
        grew = value - old.get((replica, code, modality), 0.0)
        if grew:
            out[(code, modality)] += grew
    return dict(out)


def _settled(read, ready=lambda value: True, timeout_s: float = 60, waits_for: Any = None):
    """The value once it is `ready` and three reads 1.5 s apart agree (Ray reports every second, Prometheus
    scrapes every second). `ready` matters when Prometheus has just started: an empty answer is stable too.
    `waits_for(value)` says, in the failure, what `ready` still lacked."""
    deadline = time.monotonic() + timeout_s
    last, same, changes = None, 0, 0
    while time.monotonic() < deadline:
        now = read()
        changes += last is not None and now != last
        same = same + 1 if now == last and ready(now) else 0
        if same >= 2:
            return now
        last = now
        time.sleep(1.5)
    lacking = f"; ready: {ready(last)}, waiting for {waits_for(last)}" if waits_for is not None else ""
    raise AssertionError(f"never settled ({changes} changes in {timeout_s} s){lacking}; last {last}")


def _by_code(counts: dict[tuple[str, str], float]) -> Counter:
    """Counts by (code, modality) summed by code."""
    out: Counter = Counter()
    for (code, _), n in counts.items():
        out[code] += n
    return out


@pytest.fixture(scope="module")
def load(autoscaled: Autoscaled, served: Served, prometheus: PrometheusServer) -> dict:
    # The autoscaled stack: image requests wake its vision pool from zero (the policy decides "up").
    auto_codes = asyncio.run(_send(autoscaled.url, [b for b, _ in _bodies()[:12]] + [
        {"model": "dots.vlm1", "messages": [{"role": "user", "content": f"Demand {i}"}], "max_tokens": 24,
         "ignore_eos": True} for i in range(16)]))
    assert set(auto_codes) == {200}, [(i, int(c), c.text) for i, c in enumerate(auto_codes) if c != 200]
    # A first wave creates every series (Ray exports a histogram or counter from its first observation,
    # and a rate needs a later sample that grew), then the measured load.
    # Other modules may have used `served` first, so the counts start where they left them; read them once
    # Prometheus has scraped Ray a few times (CI run of stop 19: just started, it answered empty three times,
    # and the counts already there were then taken for this load's).
    def scraped() -> bool:
        return any(float(r["value"][1]) >= 3 for r in prometheus.query('count_over_time(up{job="ray"}[1m])'))
    start = _settled(lambda: _by_replica(prometheus), ready=lambda v: scraped())
    items = _bodies()
    first = asyncio.run(_send(served.url, [b for b, _ in items[:6]]))
    first_counts = dict(Counter((str(c), modality) for c, (_, (_, modality)) in zip(first, items)))
    # Every first-wave answer counted (more is an earlier module's answer that landed late: tolerated here,
    # the measured load below is compared exactly).
    # By code only: an answer refused before its body was read counts with modality "none" (CI run of stop 38:
    # the first wave after test_serving_app never matched by modality, and never settled).
    first_by_code = _by_code(first_counts)

    def lacking(v: dict) -> dict:
        grew = _by_code(_growth(start, v))
        return {code: f"{grew.get(code, 0):g} of {n}" for code, n in first_by_code.items() if grew.get(code, 0) < n}

    before = _settled(lambda: _by_replica(prometheus), ready=lambda v: not lacking(v),
                      waits_for=lambda v: f"first-wave answers {first_counts} counted: {lacking(v)}")
    # The mixed load first, then the burst that overflows the queue (so it cannot starve the image requests).
    codes = asyncio.run(_send(served.url, [b for b, _ in items[:-BURST]]))
    codes += asyncio.run(_send(served.url, [b for b, _ in items[-BURST:]]))
    sent = Counter((str(c), modality) for c, (_, (_, modality)) in zip(codes, items))
    # The queue may refuse some of the burst (429); whatever was answered is what must be counted.
    assert not _unexpected(codes, items), f"unexpected answers (index, code, body): {_unexpected(codes, items)}"
    assert sent[("200", "image")] and sent[("200", "text")], sent
    # The rejection panels and metrics below need some: say so here, where the cause is.
    assert sent[("429", "text")], f"the burst overflowed no queue (no 429): make it longer; {sent}"
    return {"before": before, "sent": dict(sent), "items": items}


def test_counters_summed_over_replicas_equal_the_requests_sent(prometheus: PrometheusServer, load: dict) -> None:
    deadline = time.monotonic() + 60
    got: dict = {}
    while time.monotonic() < deadline:
        got = _growth(load["before"], _by_replica(prometheus))
        if got == load["sent"]:
            break
        time.sleep(1)
    assert got == load["sent"], f"Prometheus counted {got} since the first wave; the test sent {load['sent']}"
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


# What promtool says about a family whose series carry Ray's own label names (Component, NodeAddress,
# SessionName, Version, WorkerId: Ray's fixed tag keys; the scrape relabelings rename or drop them).
CAMEL_CASE = "label names should be written in 'snake_case' not 'camelCase'"
# What promtool says about Ray's own families with Ray 2.60 (names like ray_..._ms, ray_gcs_actors_count,
# ray_..._counter_total), besides the camelCase labels every Ray series carries.
RAY_KNOWN_PROBLEMS = {CAMEL_CASE, "metric names should not contain abbreviated units",
                      'non-histogram and non-summary metrics should not have "_count" suffix',
                      'non-counter metrics should not have "_total" suffix', "metric name should not include type 'counter'"}


def _promtool_problems(text: str) -> dict[str, set[str]]:
    """`promtool check metrics` on an exposition: its complaints by metric family."""
    done = promtool("check", "metrics", stdin=text)
    problems: dict[str, set[str]] = {}
    for line in (done.stdout + done.stderr).splitlines():
        name, _, problem = line.strip().partition(" ")
        assert problem and not line.startswith("error"), f"promtool could not read the exposition: {line}"
        problems.setdefault(name, set()).add(problem)
    assert (done.returncode == 0) == (not problems), done.stdout + done.stderr
    return problems


def test_promtool_check_metrics_on_every_endpoint(served: Served, autoscaled: Autoscaled, operator_endpoint: str,
                                                  load: dict) -> None:
    """Every endpoint: the operator's strictly; each Ray node's (the shared application's and the autoscaled
    stack's, where the policy's metrics are) strictly for dotsvlm's families as Prometheus stores them
    (after the scrape relabelings), and Ray's own families' failures reported by name."""
    for url in (served.url, autoscaled.url):
        assert httpx.get(url + "/metrics", timeout=10).status_code == 404  # not on the public API port
    operator_text = httpx.get(f"http://{operator_endpoint}/metrics", timeout=10).text
    assert "dotsvlm_operator_reconciles_total" in operator_text
    assert _promtool_problems(operator_text) == {}
    ray_failures: dict[str, set[str]] = {}
    for port, family in ((served.metrics_port, "ray_dotsvlm_requests_total"),
                         (autoscaled.metrics_port, "ray_dotsvlm_autoscaler_desired_replicas")):
        exported = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
        assert family in exported
        scraped = "\n".join(_relabel(line) for line in exported.splitlines()) + "\n"
        as_exported, as_scraped = _promtool_problems(exported), _promtool_problems(scraped)
        ours = {name: problems for name, problems in as_exported.items() if name.startswith("ray_dotsvlm_")}
        # As exported, the only complaint about ours is the label spelling Ray adds; as scraped, none.
        assert all(problems == {CAMEL_CASE} for problems in ours.values()), ours
        assert not [name for name in as_scraped if name.startswith("ray_dotsvlm_")], as_scraped
        for name, problems in as_exported.items():
            if not name.startswith("ray_dotsvlm_"):
                ray_failures.setdefault(name, set()).update(problems)
    # Ray's own families (Ray's code, not ours; docs/observability.md says why each kind fails): reported by
    # name. A new kind of complaint fails the test, so that the page stays true.
    assert ray_failures, "Ray's own families are expected to carry Ray's camelCase labels"
    unknown = {name: problems - RAY_KNOWN_PROBLEMS for name, problems in ray_failures.items()
               if problems - RAY_KNOWN_PROBLEMS}
    assert not unknown, f"promtool complains about Ray's families in a way docs/observability.md does not list: {unknown}"
    warnings.warn(f"promtool check metrics refuses {len(ray_failures)} of Ray's own metric families (outside "
                  "dotsvlm's code): " + "; ".join(f"{name}: {', '.join(sorted(problems))}"
                                                   for name, problems in sorted(ray_failures.items())))


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


def _variables(dashboard: str) -> dict[str, str]:
    """The dashboard variables a panel is checked with: the autoscaler's dashboard shows the stack that runs
    the policy; the others the shared application."""
    deployment = AUTOSCALED_DEPLOYMENT if dashboard == AUTOSCALER_DASHBOARD else TEST_DEPLOYMENT
    return {"namespace": TEST_NAMESPACE, "deployment": deployment}


def _expand(expr: str, variables: dict[str, str]) -> str:
    return (expr.replace("$namespace", variables["namespace"]).replace("$deployment", variables["deployment"])
            .replace("$__rate_interval", "5m").replace("$__interval", "15s").replace("$__range", "5m"))


def _has_data(result: list[dict]) -> bool:
    return any(v not in ("NaN", "+Inf", "-Inf") for r in result for _, v in r["values"])


def test_every_dashboard_panel_returns_data(prometheus: PrometheusServer, load: dict,
                                            tmp_path_factory: pytest.TempPathFactory) -> None:
    files = sorted(DASHBOARDS.glob("*.json"))
    assert files, f"no dashboards in {DASHBOARDS}"
    autoscaler_names = tuple(m.prometheus_name for m in AUTOSCALER_METRICS)
    # The decisions counter's series exist at 0 before the first action (the policy creates every pool's
    # (direction, reason) pair when it starts), so increase() sees each series' first decision too.
    decisions = prom("dotsvlm_autoscaler_decisions")
    idle = f'{decisions}{{dotsvlm_deployment="{AUTOSCALED_DEPLOYMENT}",pool="vision",direction="down",reason="IdleToZero"}}'
    deadline = time.monotonic() + 90
    while not prometheus.query(idle):
        assert time.monotonic() < deadline, f"no {idle} series: the decisions counter is not created at 0"
        time.sleep(1)
    assert prometheus.query(f'{prom("dotsvlm_autoscaler_desired_replicas")}{{dotsvlm_deployment="{AUTOSCALED_DEPLOYMENT}"}}')
    empty, checked, autoscaler_checked = [], 0, 0
    for f in files:
        dash = json.loads(f.read_text())
        variables = _variables(f.stem)
        for panel in render.panels(dash):
            for target in panel.get("targets", []):
                expr = _expand(target["expr"], variables)
                checked += 1
                autoscaler_checked += any(n in expr for n in autoscaler_names)
                if not _has_data(prometheus.query_range(expr, 120)):
                    empty.append(f"{f.stem}: {panel['title']!r}: {expr}")
    assert not empty, "panels whose query returns nothing:\n" + "\n".join(empty)
    assert checked >= 30 and autoscaler_checked >= 1, (checked, autoscaler_checked)
    # The same results drawn as pictures (docs/images/dashboards/ with make dashboard-pictures).
    out = Path(os.environ.get(PICTURES_ENV) or tmp_path_factory.mktemp("dashboards"))
    for f in files:
        variables = _variables(f.stem)
        no_data = render.render_dashboard(
            json.loads(f.read_text()), lambda expr, v=variables: prometheus.query_range(_expand(expr, v), 300),
            out / f"{f.stem}.png", note=f"namespace={variables['namespace']}, deployment={variables['deployment']}, "
                                       "the last 5 minutes of a test run (tests/serving/test_serving_observability.py).")
        assert not no_data, f"{f.stem}: drawn with no data: {no_data}"
        assert (out / f"{f.stem}.png").stat().st_size > 20_000


def test_catalogued_serving_metrics_are_all_exported(prometheus: PrometheusServer, load: dict) -> None:
    """Every metric the catalogue promises exists in Prometheus (the retries counter only after a retry)."""
    optional = {"dotsvlm_vision_retries"}
    missing = [m.prometheus_name for m in SERVING_METRICS if m.name not in optional
               and not prometheus.query(f"last_over_time({m.prometheus_name}{'_count' if m.kind == 'histogram' else ''}"
                                        f"{{{SEL}}}[1m])")]
    assert not missing, missing
