"""Drift: the operator compares the config the Ray head runs with the spec's and deploys again when they
differ (someone deployed by hand), naming the difference; Ray's own additions are no drift."""

from __future__ import annotations

import asyncio
import copy
import json
import logging

import httpx

from dotsvlm_operator import handlers, models, naming, serve_app
from dotsvlm_operator.serve_drift import config_drift


def spec() -> models.DotsVLMDeploymentSpec:
    return models.DotsVLMDeploymentSpec.model_validate({
        "image": "img", "model": {"path": "/models/x", "quantization": "none",
                                  "volume": {"persistentVolumeClaim": {"claimName": "w"}}},
        "vision": {"gpusPerReplica": 0, "minReplicas": 1, "maxReplicas": 3},
        "llm": {"gpusPerReplica": 0, "tensorParallel": 1, "minReplicas": 1, "maxReplicas": 2}})


def as_serve_echoes(body: dict) -> dict:
    """The application as Serve reports it in deployed_app_config: what was sent, plus defaults."""
    app = copy.deepcopy(body["applications"][0])
    app.update(external_scaler_enabled=False, logging_config=None, runtime_env={})
    for d in app["deployments"]:
        d.setdefault("max_ongoing_requests", 5)
    return app


def slice_of(app: dict, deployment: str) -> dict:
    """A deployment's slice of the config (its Serve user_config) in an application config."""
    return next(d for d in app["deployments"] if d["name"] == deployment)["user_config"]


def index_of(app: dict, deployment: str) -> int:
    return [d["name"] for d in app["deployments"]].index(deployment)


def test_the_config_as_deployed_is_no_drift_even_with_serves_defaults() -> None:
    body = serve_app.deploy_body(spec())
    assert config_drift(body, as_serve_echoes(body)) is None
    # JSON numbers: 20 and 20.0 are the same setting.
    echoed = as_serve_echoes(body)
    slice_of(echoed, "VisionEncoder")["max_batch_wait_ms"] = int(slice_of(echoed, "VisionEncoder")["max_batch_wait_ms"])
    assert config_drift(body, echoed) is None


def test_a_changed_or_missing_setting_is_drift_and_named() -> None:
    body = serve_app.deploy_body(spec())
    echoed = as_serve_echoes(body)
    slice_of(echoed, "VisionEncoder")["max_batch_pixels"] = 12345
    want = slice_of(body["applications"][0], "VisionEncoder")["max_batch_pixels"]
    i = index_of(echoed, "VisionEncoder")
    assert config_drift(body, echoed) == (f"deployments[{i}].user_config.max_batch_pixels: the head runs 12345, "
                                          f"the spec wants {want}")
    echoed = as_serve_echoes(body)
    del echoed["args"]["dtype"]
    assert config_drift(body, echoed).startswith("args.dtype: the head runs (absent)")
    echoed = as_serve_echoes(body)
    echoed["import_path"] = "someone.else:app"
    assert "import_path: the head runs 'someone.else:app'" in config_drift(body, echoed)
    # Deployed with serve.run (no config recorded): not the spec's either.
    assert "not deployed from a config" in config_drift(body, None)


def test_observe_serve_deploys_again_on_drift_once_per_interval_and_says_why(monkeypatch) -> None:
    s = spec()
    body = serve_app.deploy_body(s)
    running = {"app": as_serve_echoes(body)}
    puts = []

    def handler(req: httpx.Request) -> httpx.Response:
        if req.method == "PUT":
            puts.append(json.loads(req.content))
            running["app"] = as_serve_echoes(puts[-1])
            return httpx.Response(200)
        return httpx.Response(200, json={"applications": {"dotsvlm": {
            "status": "RUNNING", "message": "", "deployments": {}, "deployed_app_config": running["app"]}}})

    owner = naming.Owner("d", "ns", "uid")
    monkeypatch.setattr(handlers, "_http", {("ns", "d"): httpx.AsyncClient(transport=httpx.MockTransport(handler))})
    digest = serve_app.body_hash(body)
    old = models.DotsVLMDeploymentStatus(serve_app=models.ServeAppStatus(status="RUNNING", config_hash=digest))
    state = handlers.ResourceState()
    log = logging.getLogger("test")

    def observe():
        return asyncio.run(handlers.observe_serve(owner, s, "tok", old, log, state))

    assert observe().drift is None and puts == []  # the head runs the spec's config: nothing to do
    slice_of(running["app"], "LLMServer")["max_running_requests"] = 1  # someone deploys by hand
    seen = observe()
    assert seen.drift and "user_config.max_running_requests: the head runs 1" in seen.drift
    assert len(puts) == 1 and puts[0] == body  # the spec's config, deployed again
    slice_of(running["app"], "LLMServer")["max_running_requests"] = 2  # and again, at once: wait the interval
    assert observe().drift is None and len(puts) == 1
    state.drift_deployed_at -= handlers.DRIFT_REDEPLOY_INTERVAL_S
    assert observe().drift and len(puts) == 2


def test_an_autoscaling_change_reaches_the_head_once() -> None:
    """A knob, a bound or the SLO travels in the deploy body (Serve's autoscaling_config, the Ingress's
    slice), not in the policy: the body's hash changes (the operator deploys it), the config the head ran
    before is drift at the knob's own place, and the new config as the head echoes it is none (no
    redeploy loop). The policy itself stays the same."""
    raw = spec().model_dump(by_alias=True)
    before = serve_app.deploy_body(spec())
    for path, value, where in ((("llm", "autoscaling", "targetOngoingRequests"), 9.0, "autoscaling_config"),
                               (("llm", "autoscaling", "downscaleDelaySeconds"), 33.0, "user_config.autoscaling.llm"),
                               # the first difference: the ingress's vision backlog limit follows maxReplicas
                               (("vision", "maxReplicas"), 5, "user_config.vision.max_pending_pixels"),
                               (("slo", "textTTFTSeconds"), 1.5, "user_config.autoscaling.slo")):
        changed = copy.deepcopy(raw)
        node = changed
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
        after = serve_app.deploy_body(models.DotsVLMDeploymentSpec.model_validate(changed))
        assert serve_app.body_hash(after) != serve_app.body_hash(before), path
        assert after["applications"][0]["autoscaling_policy"] == before["applications"][0]["autoscaling_policy"]
        drift = config_drift(after, as_serve_echoes(before))
        assert drift is not None and where in drift, (path, drift)
        assert config_drift(after, as_serve_echoes(after)) is None, path
