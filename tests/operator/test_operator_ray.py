"""Operator + a real local Ray head: token auth, Serve deploy through the REST API, status RUNNING, and
a config deployed to the head by hand replaced by the spec's (drift).

kwok pods run no containers, so the Ray head is a local `ray start --head` with token authentication,
the deployment's pool and control resources and the tiny model; the operator reaches it through the documented
test setting `--ray-head-url-override`. The Ray token is put in the deployment's Secret beforehand,
which also checks that the operator uses an existing token instead of generating a new one.
"""

from __future__ import annotations

import copy
import json
import os
import secrets
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import pytest
import yaml
from dvlm_support import condition, get_json, load_example, poll
from support.ray_head import stop_ray_head

from dotsvlm_operator import models, serve_app
from dotsvlm_operator.serve_drift import config_drift
from support.ports import free_port

pytestmark = [pytest.mark.slow, pytest.mark.cluster, pytest.mark.ray]

VENV_BIN = Path(sys.executable).parent


@pytest.fixture
def ray_head(tmp_path):
    """`ray start --head --block` with token auth in its own process group; killed at the end."""
    token = secrets.token_hex(16)
    token_file = tmp_path / "ray-token"
    token_file.write_text(token)
    temp_dir = Path(tempfile.mkdtemp(prefix="rayop-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    gcs, dash, client, agent = (free_port() for _ in range(4))
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file), OMP_NUM_THREADS="1",
               RAY_USAGE_STATS_ENABLED="0")
    log = open(tmp_path / "ray.log", "wb")
    proc = subprocess.Popen(
        [str(VENV_BIN / "ray"), "start", "--head", f"--port={gcs}", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dash}", f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
         "--num-cpus=6", '--resources={"dotsvlm_pool_vision": 1000, "dotsvlm_pool_llm": 1000, "dotsvlm_control": 1000}',
         f"--temp-dir={temp_dir}", "--disable-usage-stats", "--block"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    try:
        def up():
            if proc.poll() is not None:
                raise AssertionError("ray start exited:\n" + (tmp_path / "ray.log").read_text()[-3000:])
            return httpx.get(f"{url}/api/serve/applications/", headers={"Authorization": f"Bearer {token}"},
                             timeout=5).status_code == 200
        poll(up, 120, "the Ray dashboard", lambda: (tmp_path / "ray.log").read_text()[-3000:])
        yield url, token
    finally:
        stop_ray_head(proc, temp_dir)
        log.close()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from dotsvlm_serving.model.tiny import ensure_tiny_checkpoint
    return ensure_tiny_checkpoint(tmp_path_factory.mktemp("models") / "tiny")


NAMESPACE_PREFIX = "ray"  # the `ns` fixture (conftest.py) names test namespaces after it


def test_operator_deploys_the_serve_app_to_a_token_protected_ray_head(kube, ns, operator_factory, ray_head,
                                                                      tiny_model) -> None:
    url, token = ray_head
    # Token authentication is on: without the token the dashboard refuses.
    assert httpx.get(f"{url}/api/serve/applications/", timeout=5).status_code in (401, 403)

    name = "dots-ray"
    kube.apply(yaml.safe_dump({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": f"{name}-ray-token"},
                               "stringData": {"token": token}}), namespace=ns)
    api_port = free_port()
    cr = load_example("dotsvlm-small.yaml")
    cr["metadata"]["name"] = name
    cr["spec"]["model"] = {"path": str(tiny_model), "mountPath": str(tiny_model.parent), "quantization": "none",
                           "dtype": "float32", "volume": {"hostPath": {"path": str(tiny_model.parent)}}}
    # The vision pool autoscales (so dotsvlm's policy runs) but never grows under this test's text requests.
    cr["spec"]["vision"] = {"gpusPerReplica": 0, "minReplicas": 1, "maxReplicas": 2,
                            "autoscaling": {"targetOngoingRequests": 1000}}
    cr["spec"]["llm"] = {"gpusPerReplica": 0, "tensorParallel": 1, "contextLength": 1024, "maxRunningRequests": 4,
                         "maxNewTokensDefault": 8}
    cr["spec"]["api"] = {"port": api_port}
    op = operator_factory([ns], head_url=url, extra=["--api-url-override", f"http://127.0.0.1:{api_port}"])
    kube.apply(yaml.safe_dump(cr), namespace=ns)

    def running():
        got = get_json(kube, "dvlm", name, "-n", ns)
        ready = condition(got, "Ready")
        return got if ready and ready["status"] == "True" else None

    def diag() -> str:
        got = get_json(kube, "dvlm", name, "-n", ns) or {}
        return f"status: {(got.get('status') or {})}\n--- operator ---\n{op.log_tail()}"

    got = poll(running, 420, "Ready=True with the Serve application RUNNING", diag)
    assert got["status"]["serveApp"]["status"] == "RUNNING" and got["status"]["serveApp"]["configHash"]
    assert condition(got, "Progressing")["reason"] == "UpToDate"
    # The head got exactly the config the operator rendered (also in the ConfigMap).
    apps = httpx.get(f"{url}/api/serve/applications/", headers={"Authorization": f"Bearer {token}"}, timeout=10).json()
    deployed = apps["applications"]["dotsvlm"]["deployed_app_config"]
    llm_deployment = next(d for d in deployed["deployments"] if d["name"] == "LLMServer")
    assert deployed["args"]["model_path"] == str(tiny_model)
    assert llm_deployment["ray_actor_options"]["resources"] == {"dotsvlm_pool_llm": 1}
    # The token in the Secret was used, not replaced.
    assert get_json(kube, "secret", f"{name}-ray-token", "-n", ns)["data"]["token"]
    # And the API answers on the Serve HTTP port that the spec set.
    r = httpx.post(f"http://127.0.0.1:{api_port}/v1/chat/completions", timeout=120,
                   json={"model": "dots.vlm1", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] is not None
    # The pools as the real Serve reports them (its target and RUNNING replicas), and the ingress's report
    # (queue, latencies) in the status: the operator reads the installed Ray's schema correctly.
    st = poll(lambda: (s := (get_json(kube, "dvlm", name, "-n", ns) or {}).get("status") or {})
              and s.get("vision", {}).get("currentReplicas") == 1 and s.get("llm", {}).get("currentReplicas") == 1
              and (s.get("autoscaler") or {}).get("reachable") and s, 60, "Serve's replicas and the report in status", diag)
    assert st["vision"]["desiredReplicas"] == 1 and st["llm"]["desiredReplicas"] == 1
    assert st["queue"]["depth"] == 0 and st["queue"]["maxItems"] > 0
    assert st["slo"]["textTTFT"]["targetSeconds"] > 0

    # Drift: someone deploys another config to the head by hand (a vision batch wait of 7 ms). The operator
    # sees it in the head's deployed_app_config, deploys the spec's config again, and says so.
    headers = {"Authorization": f"Bearer {token}"}
    wanted = httpx.get(f"{url}/api/serve/applications/", headers=headers, timeout=10).json()
    wanted_app = wanted["applications"]["dotsvlm"]["deployed_app_config"]

    def vision_slice(app: dict) -> dict:  # the VisionEncoder's slice of the config: its Serve user_config
        return next(d for d in app["deployments"] if d["name"] == "VisionEncoder")["user_config"]

    by_hand_app = copy.deepcopy(wanted_app)
    vision_slice(by_hand_app)["max_batch_wait_ms"] = 7.0
    by_hand = {"http_options": {"host": "0.0.0.0", "port": api_port}, "applications": [by_hand_app]}
    assert vision_slice(wanted_app)["max_batch_wait_ms"] != 7.0
    r = httpx.put(f"{url}/api/serve/applications/", headers=headers, json=by_hand, timeout=30)
    assert r.status_code == 200, r.text

    def vision_wait() -> float:
        apps = httpx.get(f"{url}/api/serve/applications/", headers=headers, timeout=10).json()
        return vision_slice(apps["applications"]["dotsvlm"]["deployed_app_config"])["max_batch_wait_ms"]

    poll(lambda: vision_wait() == vision_slice(wanted_app)["max_batch_wait_ms"], 90,
         "the spec's Serve config back on the head", diag)
    st = poll(lambda: (s := (get_json(kube, "dvlm", name, "-n", ns) or {}).get("status") or {})
              and (s.get("serveApp") or {}).get("lastDrift") and s, 60, "the drift in the status", diag)
    assert "user_config.max_batch_wait_ms: the head runs 7.0" in st["serveApp"]["lastDrift"]
    events = [e for e in get_json(kube, "events", "-n", ns)["items"] if e["reason"] == "ServeConfigDrift"]
    assert events and "deployed the spec's config again" in events[0]["message"], events
    # And the application serves again.
    poll(lambda: condition(get_json(kube, "dvlm", name, "-n", ns), "Ready")["status"] == "True", 300,
         "Ready=True after the drift was corrected", diag)
    r = httpx.post(f"http://127.0.0.1:{api_port}/v1/chat/completions", timeout=120,
                   json={"model": "dots.vlm1", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200, r.text

    # An autoscaling change (the SLO, an LLM window) reaches the head, once, and restarts no replica: it
    # travels in the Ingress's slice (reconfigured in place), and the policy decides with it.
    def replica_ids() -> dict[str, set[str]]:
        app = httpx.get(f"{url}/api/serve/applications/", headers=headers, timeout=10).json()["applications"]["dotsvlm"]
        return {n: {r["replica_id"] for r in d.get("replicas") or []} for n, d in app["deployments"].items()}

    def ingress_settings() -> dict:
        apps = httpx.get(f"{url}/api/serve/applications/", headers=headers, timeout=10).json()
        app = apps["applications"]["dotsvlm"]["deployed_app_config"]
        return next(d for d in app["deployments"] if d["name"] == "Ingress")["user_config"]["autoscaling"]

    ids = replica_ids()
    hash_before = get_json(kube, "dvlm", name, "-n", ns)["status"]["serveApp"]["configHash"]
    kube.kubectl("patch", "dvlm", name, "-n", ns, "--type=merge", "-p", json.dumps(
        {"spec": {"slo": {"textTTFTSeconds": 1.5}, "llm": {"autoscaling": {"downscaleDelaySeconds": 45}}}}))
    poll(lambda: (lambda a: a["slo"]["text_ttft_s"] == 1.5 and a["llm"]["downscale_delay_s"] == 45)(ingress_settings()),
         120, "the new SLO and LLM window in the head's config", diag)

    def decided_with() -> dict | None:
        decisions = httpx.get(f"http://127.0.0.1:{api_port}/-/autoscaler", timeout=10).json().get("decisions") or {}
        llm = decisions.get("llm") or {}
        return llm if (llm.get("slo") or {}).get("text_ttft_s") == 1.5 and (
            llm.get("settings") or {}).get("downscale_delay_s") == 45 else None
    poll(decided_with, 60, "the policy deciding with the new SLO and window (/-/autoscaler)", diag)
    got = poll(lambda: (s := get_json(kube, "dvlm", name, "-n", ns)["status"]["serveApp"])["configHash"] != hash_before
               and s, 60, "the new config's hash in the status", diag)
    app = httpx.get(f"{url}/api/serve/applications/", headers=headers, timeout=10).json()["applications"]["dotsvlm"]
    assert config_drift(serve_app.deploy_body(models.DotsVLMDeploymentSpec.model_validate(
        get_json(kube, "dvlm", name, "-n", ns)["spec"])), app["deployed_app_config"]) is None, "no drift: no loop"
    assert got["configHash"] and replica_ids() == ids, "no replica restarted"
    drifts = [e for e in get_json(kube, "events", "-n", ns)["items"] if e["reason"] == "ServeConfigDrift"]
    assert not any("autoscaling" in e["message"] for e in drifts), drifts
