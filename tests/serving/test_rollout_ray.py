"""A change to one pool's settings replaces (or reconfigures) only that pool's replicas, under load.

A local `ray start --head` with its dashboard (its own process group and temp dir); the application is
deployed and changed the way the operator does it: `ServeAppConfig.deploy_body()` sent with
`PUT /api/serve/applications/` through the operator's own `RayHeadClient`. Replica ids come from
`GET /api/serve/applications/`. Streaming requests (text and images) run the whole time; every one
must end with its finish reason and `[DONE]`, none may fail.

- Vision batch budget: the VisionEncoder's slice is its `user_config`, so Serve calls its
  `reconfigure` (the replica says so in its log) and every replica keeps its id, the LLM's and the
  queue's included.
- LLM engine setting (max running requests): the LLM replicas are replaced (drained), vision and queue
  keep theirs; the ingress reconfigures in place (it checks requests against the LLM's limits).
- Turning autoscaling on (a pool's bounds apart), an LLM autoscaling knob, a pool's maxReplicas, the
  SLO, and turning autoscaling off again each restart no replica, and the policy's published decisions
  (`GET /-/autoscaler`) show it decides with the new value; the operator's drift check sees the head
  run each config.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from serving_support import free_port
from support.ray_head import stop_ray_head
from test_serving_app import image_part, png

pytestmark = [pytest.mark.slow, pytest.mark.ray]

VENV_BIN = Path(sys.executable).parent
DEPLOYMENTS = ("Ingress", "VisionEncoder", "TensorQueue", "LLMServer")


def _config(model: Path, port: int, **changes: dict) -> tuple[dict, object]:
    from dotsvlm_serving.serve_config import ServeAppConfig

    raw: dict = {"model_path": str(model),
                 "llm": {"context_length": 512, "max_running_requests": 4, "max_new_tokens_default": 16,
                         "autoscaling": {"min_replicas": 2, "max_replicas": 2}},
                 "vision": {"max_batch_pixels": 1_000_000, "max_batch_wait_ms": 5},
                 "queue": {"max_items": 64, "enqueue_timeout_s": 60},
                 "api": {"api_keys_env": None, "request_timeout_s": 240}}
    for section, values in changes.items():
        raw[section] = {**raw.get(section, {}), **values}
    cfg = ServeAppConfig.model_validate(raw)
    return cfg.deploy_body(http_port=port, http_host="127.0.0.1"), cfg


class Head:
    def __init__(self, dashboard: str, token: str, api: str, model: Path, api_port: int, temp_dir: Path) -> None:
        self.dashboard, self.token, self.api, self.model, self.api_port = dashboard, token, api, model, api_port
        self.logs = temp_dir / "session_latest" / "logs"  # replicas' log_file_path is relative to it

    def deploy(self, **changes: dict) -> None:
        """Through the operator's client, as the operator deploys a spec."""
        from dotsvlm_operator.ray_head import RayHeadClient

        body, _ = _config(self.model, self.api_port, **changes)

        async def go() -> None:
            async with RayHeadClient(self.dashboard, self.token, timeout=30) as client:
                await client.deploy(body)
        asyncio.run(go())

    def app(self) -> dict:
        r = httpx.get(self.dashboard + "/api/serve/applications/", headers=_auth(self.token), timeout=30)
        r.raise_for_status()
        return (r.json().get("applications") or {}).get("dotsvlm") or {}

    def replicas(self) -> dict[str, dict[str, dict]]:
        """deployment -> replica id -> its details (state, pid, log file)."""
        deps = self.app().get("deployments") or {}
        return {name: {r["replica_id"]: r for r in (deps.get(name) or {}).get("replicas") or []} for name in DEPLOYMENTS}

    def wait_for(self, what: str, check: Callable[[dict], bool], timeout_s: float) -> dict:
        deadline = time.monotonic() + timeout_s
        last: dict = {}
        while time.monotonic() < deadline:
            last = self.app()
            if last and check(last):
                return last
            time.sleep(1.0)
        raise AssertionError(f"{what}: not within {timeout_s} s; last: {str(last)[:3000]}")


def _all_running(app: dict, sizes: dict[str, int]) -> bool:
    deps = app.get("deployments") or {}
    return app.get("status") == "RUNNING" and all(
        [r["state"] for r in (deps.get(n) or {}).get("replicas") or []] == ["RUNNING"] * k for n, k in sizes.items())


SIZES = {"Ingress": 1, "VisionEncoder": 1, "TensorQueue": 1, "LLMServer": 2}


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _start_head(tmp: Path, token_file: Path) -> tuple[subprocess.Popen, Path, str]:
    """`ray start --head --block` with token authentication (as on the operator's pods), in its own
    process group and temp dir; tried again when Ray's fixed start-up window is missed on a busy machine."""
    for attempt in range(3):
        temp_dir = Path(tempfile.mkdtemp(prefix="rayroll-", dir="/tmp"))  # short: Ray's socket paths have a limit
        gcs, dash, client, agent = (free_port() for _ in range(4))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
               "RAY_AUTH_TOKEN_PATH": str(token_file)}
        env.pop("DOTSVLM_API_KEYS", None)
        log_path = tmp / f"ray-{attempt}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [str(VENV_BIN / "ray"), "start", "--head", f"--port={gcs}", "--dashboard-host=127.0.0.1",
                 f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
                 f"--dashboard-agent-listen-port={agent}", "--num-cpus=6", f"--temp-dir={temp_dir}",
                 "--disable-usage-stats", "--block"],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        dashboard = f"http://127.0.0.1:{dash}"
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                r = httpx.get(dashboard + "/api/serve/applications/", headers=_auth(token_file.read_text()), timeout=5)
                if r.status_code == 200:
                    return proc, temp_dir, dashboard
            except httpx.HTTPError:
                pass
            time.sleep(1)
        stop_ray_head(proc, temp_dir)
        text = log_path.read_text(errors="replace")
        if attempt == 2 or "timed out during startup" not in text:
            raise AssertionError(f"no Ray dashboard: {text[-3000:]}")
    raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Head]:
    from dotsvlm_serving.model.tiny import ensure_tiny_checkpoint

    tmp = tmp_path_factory.mktemp("rollout")
    model = ensure_tiny_checkpoint(tmp / "tiny")
    token = secrets.token_hex(16)
    token_file = tmp / "ray-token"
    token_file.write_text(token)
    proc, temp_dir, dashboard = _start_head(tmp, token_file)
    try:
        api_port = free_port()
        h = Head(dashboard, token, f"http://127.0.0.1:{api_port}", model, api_port, temp_dir)
        h.deploy()
        h.wait_for("the application running", lambda a: _all_running(a, SIZES), 420)
        # What the head reports running is the body as sent: the operator's drift check sees no drift.
        from dotsvlm_operator.serve_drift import config_drift

        assert config_drift(_config(model, api_port)[0], h.app().get("deployed_app_config")) is None
        yield h
    finally:
        stop_ray_head(proc, temp_dir)


class Load:
    """Streaming requests from a few workers until stopped; every outcome counted."""

    def __init__(self, url: str, workers: int = 3) -> None:
        self.url, self.workers = url, workers
        self.outcomes: Counter = Counter()
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(workers)]

    def __enter__(self) -> "Load":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(300)

    def _run(self, worker: int) -> None:
        n = 0
        with httpx.Client(base_url=self.url, timeout=240) as client:
            while not self._stop.is_set():
                n += 1
                content: list | str = f"worker {worker} request {n}: tell a story"
                if n % 2:
                    content = [image_part(png(96 + 8 * worker, 80)), {"type": "text", "text": f"image {n}"}]
                body = {"model": "dots.vlm1", "messages": [{"role": "user", "content": content}], "max_tokens": 24,
                        "ignore_eos": True, "stream": True}
                try:
                    with client.stream("POST", "/v1/chat/completions", json=body) as r:
                        text = "".join(r.iter_text())
                    ok = (r.status_code == 200 and text.rstrip().endswith("data: [DONE]")
                          and '"finish_reason":"length"' in text and '"error"' not in text)
                except httpx.HTTPError as exc:
                    ok, text = False, repr(exc)
                    r = None  # type: ignore[assignment]
                self.outcomes["ok" if ok else "failed"] += 1
                if not ok:
                    self.failures.append(f"{getattr(r, 'status_code', None)}: {text[-400:]}")

    def wait_for_requests(self, n: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        start = self.outcomes["ok"]
        while self.outcomes["ok"] < start + n:
            assert time.monotonic() < deadline, f"fewer than {n} requests in {timeout_s} s: {self.outcomes}"
            assert not self.failures, self.failures
            time.sleep(0.5)


def _ids(replicas: dict[str, dict[str, dict]], name: str) -> set[str]:
    return set(replicas[name])


def test_vision_batch_budget_reconfigures_vision_in_place_and_restarts_nothing(head: Head) -> None:
    before = head.replicas()
    assert all(len(before[n]) == k for n, k in SIZES.items()), before
    with Load(head.api) as load:
        load.wait_for_requests(3, 180)
        head.deploy(vision={"max_batch_pixels": 600_000})

        def applied(app: dict) -> bool:
            dep = (app.get("deployments") or {}).get("VisionEncoder") or {}
            return ((dep.get("deployment_config") or {}).get("user_config") or {}).get("max_batch_pixels") == 600_000
        head.wait_for("the new vision budget in Serve's target", lambda a: applied(a) and _all_running(a, SIZES), 180)
        vision_logs = [head.logs / r["log_file_path"].lstrip("/") for r in before["VisionEncoder"].values()]

        def logged() -> bool:
            return any("batch budget 600000 pixels" in _read_log(p) for p in vision_logs)
        deadline = time.monotonic() + 60
        while not logged():
            assert time.monotonic() < deadline, (f"the vision replica did not log the new budget (reconfigure): "
                                                 f"{[(str(p), _read_log(p)[-1500:]) for p in vision_logs]}")
            time.sleep(0.5)
        load.wait_for_requests(3, 180)  # still serving after the change
    after = head.replicas()
    assert load.outcomes["failed"] == 0, load.failures
    print(f"vision change under load: {dict(load.outcomes)}")
    for name in DEPLOYMENTS:  # the vision replicas reconfigured in place; nothing restarted
        assert _ids(after, name) == _ids(before, name), name
        assert {r["pid"] for r in after[name].values()} == {r["pid"] for r in before[name].values()}, name


def test_llm_engine_change_replaces_only_the_llm_replicas(head: Head) -> None:
    before = head.replicas()
    with Load(head.api) as load:
        load.wait_for_requests(3, 180)
        head.deploy(vision={"max_batch_pixels": 600_000}, llm={"max_running_requests": 3})
        old = _ids(before, "LLMServer")
        head.wait_for("new LLM replicas, the old ones gone",
                      lambda a: _all_running(a, SIZES) and not old & set(
                          r["replica_id"] for r in ((a.get("deployments") or {}).get("LLMServer") or {}).get("replicas")
                          or []), 420)
        load.wait_for_requests(3, 180)
    after = head.replicas()
    assert load.outcomes["failed"] == 0, load.failures
    print(f"LLM change under load: {dict(load.outcomes)}")
    assert not _ids(after, "LLMServer") & old and len(after["LLMServer"]) == 2
    for name in ("Ingress", "VisionEncoder", "TensorQueue"):
        assert _ids(after, name) == _ids(before, name), name


def _read_log(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


# Autoscaled, but so that nothing scales under the test's load: the vision pool may grow (1-2) and the
# LLM pool is fixed at 2 until (b) lets it grow; targets and SLO far above what the load reaches. The LLM
# engine settings are those the engine-change test leaves (max_running_requests 3).
QUIET_AUTOSCALING = {
    "vision": {"max_batch_pixels": 1_000_000, "max_batch_wait_ms": 5,
               "autoscaling": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1000}},
    "llm": {"context_length": 512, "max_running_requests": 3, "max_new_tokens_default": 16,
            "autoscaling": {"min_replicas": 2, "max_replicas": 2, "target_ongoing_requests": 1000,
                            "downscale_delay_s": 120}},
    "slo": {"image_ttft_s": 120, "text_ttft_s": 60, "inter_token_s": 30}}


def _with(base: dict, **changes: dict) -> dict:
    """`base` with some fields of its sections (and their `autoscaling`) changed."""
    out = {k: {**v, "autoscaling": {**v.get("autoscaling", {})}} if "autoscaling" in v else dict(v)
           for k, v in base.items()}
    for section, values in changes.items():
        for key, value in values.items():
            if key == "autoscaling":
                out[section]["autoscaling"].update(value)
            else:
                out[section][key] = value
    return out


# The same with both pools fixed (equal bounds): autoscaling off.
QUIET_FIXED = _with(QUIET_AUTOSCALING, vision={"autoscaling": {"max_replicas": 1}})


def _autoscaler(head: Head) -> dict:
    r = httpx.get(head.api + "/-/autoscaler", timeout=30)
    r.raise_for_status()
    return r.json().get("decisions") or {}


def _published(head: Head, check: Callable[[dict], bool], what: str) -> dict:
    """The policy's published decisions once `check` holds for them (90 s at most)."""
    deadline = time.monotonic() + 90
    last: dict = {}
    while time.monotonic() < deadline:
        try:
            last = _autoscaler(head)
        except httpx.HTTPError as exc:
            last = {"error": repr(exc)}
        try:
            if check(last):
                return last
        except (KeyError, TypeError):  # no decision yet, or one published before the settings
            pass
        time.sleep(1.0)
    raise AssertionError(f"the policy's decisions do not show {what} within 90 s: {last}")


def test_autoscaling_on_off_knob_bound_and_slo_changes_restart_no_replica(head: Head) -> None:
    from dotsvlm_operator.serve_drift import config_drift

    # First the engine settings the previous test left, with both pools fixed (equal bounds): nothing restarts
    # after that test (run alone, the LLM replicas restart once here for the new engine settings).
    head.deploy(**QUIET_FIXED)
    fixed_body = _config(head.model, head.api_port, **QUIET_FIXED)[0]
    head.wait_for("the fixed config running", lambda a: config_drift(
        fixed_body, a.get("deployed_app_config")) is None and _all_running(a, SIZES), 420)

    # The policy runs for fixed pools too (between equal bounds): that is what makes turning it on cheap.
    _published(head, lambda d: (d["vision"]["settings"]["max_replicas"], d["llm"]["settings"]["target_ongoing_requests"])
               == (1, 1000), "the fixed config's settings")
    before = head.replicas()
    steps = [
        ("(0) turning autoscaling on", QUIET_AUTOSCALING,
         lambda d: (d["vision"]["settings"]["max_replicas"], d["vision"]["settings"]["min_replicas"]) == (2, 1)),
        ("(a) an LLM autoscaling knob", _with(QUIET_AUTOSCALING, llm={"autoscaling": {
            "target_ongoing_requests": 900, "downscale_delay_s": 45}}),
         lambda d: (d["llm"]["settings"]["target_ongoing_requests"], d["llm"]["settings"]["downscale_delay_s"]) == (900, 45)),
        ("(b) the LLM pool's maxReplicas", _with(QUIET_AUTOSCALING, llm={"autoscaling": {
            "target_ongoing_requests": 900, "downscale_delay_s": 45, "max_replicas": 3}}),
         lambda d: d["llm"]["settings"]["max_replicas"] == 3 and d["llm"]["desired"] <= 3),
        ("(c) the SLO", _with(QUIET_AUTOSCALING, llm={"autoscaling": {
            "target_ongoing_requests": 900, "downscale_delay_s": 45, "max_replicas": 3}},
            slo={"text_ttft_s": 50, "image_ttft_s": 100}),
         lambda d: (d["llm"]["slo"]["text_ttft_s"], d["vision"]["slo"]["image_ttft_s"]) == (50, 100)),
        ("(d) turning autoscaling off", _with(QUIET_FIXED, slo={"text_ttft_s": 50, "image_ttft_s": 100}),
         lambda d: (d["vision"]["settings"]["max_replicas"], d["llm"]["settings"]["max_replicas"]) == (1, 2)),
    ]
    with Load(head.api) as load:
        load.wait_for_requests(3, 180)
        for what, changes, took_effect in steps:
            head.deploy(**changes)
            body = _config(head.model, head.api_port, **changes)[0]
            head.wait_for(f"{what}: the head runs the new config", lambda a: config_drift(
                body, a.get("deployed_app_config")) is None and _all_running(a, SIZES), 120)
            decisions = _published(head, took_effect, f"{what} in effect")
            print(f"{what}: llm {decisions['llm']['settings']} slo {decisions['llm']['slo']}")
            load.wait_for_requests(2, 180)  # still serving after the change
    after = head.replicas()
    assert load.outcomes["failed"] == 0, load.failures
    print(f"autoscaling changes under load: {dict(load.outcomes)}")
    for name in DEPLOYMENTS:  # nothing restarted: every replica kept its id and process
        assert _ids(after, name) == _ids(before, name), name
        assert {r["pid"] for r in after[name].values()} == {r["pid"] for r in before[name].values()}, name


def test_a_queue_options_change_hands_the_queue_over_and_fails_no_request(head: Head) -> None:
    """Serve replaces the tensor queue's replica when the queue's own options change (a dotsvlm upgrade that
    changes its actor options, the control resource). The old replica hands its state to the new one as it
    stops (docs/serving.md, "When the queue moves"): no stream open across the change ends, no request is
    enqueued again or fails, and nothing else restarts."""
    from dotsvlm_operator.serve_drift import config_drift

    base = _with(QUIET_FIXED, slo={"text_ttft_s": 50, "image_ttft_s": 100})  # what the previous test left
    head.deploy(**base)
    base_body = _config(head.model, head.api_port, **base)[0]
    head.wait_for("the base config running", lambda a: config_drift(
        base_body, a.get("deployed_app_config")) is None and _all_running(a, SIZES), 420)
    changed = _config(head.model, head.api_port, **base)[0]
    for dep in changed["applications"][0]["deployments"]:
        if dep["name"] == "TensorQueue":  # one more env var: a new actor-options version of the queue only
            dep["ray_actor_options"]["runtime_env"]["env_vars"]["DOTSVLM_TEST_QUEUE_GENERATION"] = "2"
    before = head.replicas()
    old_queue = _ids(before, "TensorQueue")

    async def deploy_changed() -> None:
        from dotsvlm_operator.ray_head import RayHeadClient

        async with RayHeadClient(head.dashboard, head.token, timeout=30) as client:
            await client.deploy(changed)

    # A long stream open across the change: the old replica holds its lease and mailbox when it stops (the load's
    # short requests alone may all have ended while Serve drained the old replica's calls), so it must hand over.
    long: dict = {}
    streaming = threading.Event()

    def long_stream() -> None:
        body = {"model": "dots.vlm1", "messages": [{"role": "user", "content": "a long story, please"}],
                "max_tokens": 400, "ignore_eos": True, "stream": True}
        with httpx.Client(base_url=head.api, timeout=240) as client, \
                client.stream("POST", "/v1/chat/completions", json=body) as r:
            chunks = []
            for chunk in r.iter_text():
                chunks.append(chunk)
                streaming.set()
            long.update(status=r.status_code, text="".join(chunks))
        streaming.set()

    with Load(head.api, workers=3) as load:
        load.wait_for_requests(3, 180)
        streamer = threading.Thread(target=long_stream, daemon=True)
        streamer.start()
        assert streaming.wait(120), "the long stream did not start"
        asyncio.run(deploy_changed())
        head.wait_for("a new queue replica running, the old one gone", lambda a: _all_running(a, SIZES) and not old_queue & {
            r["replica_id"] for r in ((a.get("deployments") or {}).get("TensorQueue") or {}).get("replicas") or []}, 240)
        load.wait_for_requests(6, 180)  # served through the new replica
        streamer.join(240)
    after = head.replicas()
    assert load.outcomes["failed"] == 0, load.failures
    text = long.get("text", "")
    assert long.get("status") == 200 and '"finish_reason":"length"' in text and '"error"' not in text, text[-600:]
    print(f"queue options change under load: {dict(load.outcomes)}")
    for name in ("Ingress", "VisionEncoder", "LLMServer"):
        assert _ids(after, name) == _ids(before, name), name
    old_log = _read_log(head.logs / next(iter(before["TensorQueue"].values()))["log_file_path"].lstrip("/"))
    new_log = _read_log(head.logs / next(iter(after["TensorQueue"].values()))["log_file_path"].lstrip("/"))
    print("queue hand-over:", [line.split("TensorQueue: ", 1)[1][:160] for line in (old_log + new_log).splitlines()
                               if "TensorQueue: " in line and "config applied" not in line])
    assert "handed its state to the replica that replaces it" in old_log, old_log[-3000:]
    assert "adopted the previous replica's state" in new_log, new_log[-3000:]
    assert "stopped without handing over" not in new_log, new_log[-3000:]


def _queue(head: Head) -> dict:
    r = httpx.get(head.api + "/-/autoscaler", timeout=30)
    r.raise_for_status()
    return r.json()["queue"]


def _wait(what: str, check: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s} s"
        time.sleep(0.2)


def test_an_llm_replica_that_stops_hands_back_what_outlasts_its_drain(head: Head) -> None:
    """llm.drain_timeout_s on a real Ray: one request per LLM replica (max_running_requests 1), each far
    longer than the 1-s drain; the pool goes from two replicas to one. The stopping replica finishes
    nothing in time and hands its request back to the queue: a non-streaming request starts over on the
    other replica and is answered in full (its client sees nothing of it; the queue counts one
    redelivery); a stream that has sent tokens ends with an error event (503, retry), not silently. The
    other replica's request is untouched."""
    # ~15-30 s on this machine's CPU: far over the 1-s drain, and over the 5-15 s that applying the scale-down
    # takes under the suite's load (at 1200 tokens a stream sometimes finished before its replica was stopped)
    tokens = 3000
    llm = {"context_length": tokens + 256, "max_running_requests": 1, "max_new_tokens_default": 16, "drain_timeout_s": 1}

    def deploy(replicas: int) -> None:
        head.deploy(llm={**llm, "autoscaling": {"min_replicas": replicas, "max_replicas": replicas}})

        def ready(a: dict) -> bool:
            dep = (a.get("deployments") or {}).get("LLMServer") or {}
            cfg = dep.get("deployment_config") or {}
            return (cfg.get("user_config") or {}).get("drain_timeout_s") == 1 and cfg.get(
                "graceful_shutdown_timeout_s") == 11 and _all_running(a, {**SIZES, "LLMServer": replicas})
        head.wait_for(f"{replicas} LLM replica(s) with the 1-s drain running", ready, 420)

    def body(i: int, stream: bool) -> dict:
        return {"model": "dots.vlm1", "messages": [{"role": "user", "content": f"long answer {i}"}],
                "max_tokens": tokens, "ignore_eos": True, "stream": stream}

    # Non-streaming: the handed-back request starts over on the other replica.
    deploy(2)
    redelivered = _queue(head)["redelivered_total"]
    with httpx.Client(base_url=head.api, timeout=240) as client, ThreadPoolExecutor(2) as pool:
        answers = [pool.submit(client.post, "/v1/chat/completions", json=body(i, False)) for i in range(2)]
        _wait("both requests generating, one on each LLM replica", lambda: _queue(head)["leased"] == 2, 60)
        t0 = time.monotonic()
        deploy(1)
        results = [a.result(timeout=240) for a in answers]
    for r in results:
        assert r.status_code == 200, r.text[-500:]
        assert r.json()["usage"]["completion_tokens"] == tokens and r.json()["choices"][0]["finish_reason"] == "length"
    assert _queue(head)["redelivered_total"] == redelivered + 1, "the stopping replica did not hand its request back"
    print(f"drain timeout, non-streaming: both answered in full {time.monotonic() - t0:.1f} s after the scale-down")

    # Streaming: a stream that has sent tokens cannot start over; it ends with a clear error.
    deploy(2)
    first_token = [threading.Event(), threading.Event()]
    texts = ["", ""]
    ended = [0.0, 0.0]

    def stream(i: int) -> None:
        with httpx.stream("POST", head.api + "/v1/chat/completions", json=body(10 + i, True), timeout=240) as r:
            assert r.status_code == 200, r.read()
            for piece in r.iter_text():
                texts[i] += piece
                if re.search(r'"content":"[^"]', texts[i]):  # a token (the first chunk's content is empty)
                    first_token[i].set()
        ended[i] = time.monotonic()

    threads = [threading.Thread(target=stream, args=(i,), daemon=True) for i in range(2)]
    for t in threads:
        t.start()
    _wait("both streams sending tokens", lambda: all(e.is_set() for e in first_token), 60)
    assert _queue(head)["leased"] == 2
    t0 = time.monotonic()
    deploy(1)
    applied = time.monotonic() - t0
    for t in threads:
        t.join(240)
    ends = sorted("finish" if '"finish_reason":"length"' in x else "error" if '"error"' in x else "other" for x in texts)
    assert ends == ["error", "finish"], (f"scale-down applied {applied:.1f} s after it was asked for; streams ended "
                                         f"{[round(e - t0, 1) for e in ended]} s after", [x[-400:] for x in texts])
    cut = next(x for x in texts if '"error"' in x)
    assert '"service_unavailable"' in cut and "shut down while generating this answer; please retry" in cut, cut[-400:]
    assert all(x.rstrip().endswith("data: [DONE]") for x in texts), [x[-200:] for x in texts]
