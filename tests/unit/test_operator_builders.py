"""Builders are pure: spec -> objects. What each object must carry, and what must NOT change."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from dotsvlm_operator import builders, models, naming, serve_app
from dotsvlm_serving import serve_config

REPO = Path(__file__).resolve().parents[2]
OWNER = naming.Owner("dots", "ml", "uid-123")


def _spec(name: str = "dotsvlm.yaml", **patch) -> models.DotsVLMDeploymentSpec:
    raw = yaml.safe_load((REPO / "examples" / name).read_text())["spec"]
    for path, value in patch.items():
        cur = raw
        keys = path.split("__")
        for k in keys[:-1]:
            cur = cur.setdefault(k, {})
        cur[keys[-1]] = value
    return models.DotsVLMDeploymentSpec.model_validate(raw)


def _by_name(objs):
    return {(o["kind"], o["metadata"]["name"]): o for o in objs}


def _kids(spec, **kw):
    return _by_name(builders.children(OWNER, spec, vision_replicas=kw.get("v", 1), llm_replicas=kw.get("l", 1)))


def test_every_child_is_owned_labelled_and_namespaced() -> None:
    for obj in builders.children(OWNER, _spec(), vision_replicas=1, llm_replicas=1):
        meta = obj["metadata"]
        assert meta["namespace"] == "ml"
        assert meta["ownerReferences"] == [{"apiVersion": "dotsvlm.io/v1alpha1", "kind": "DotsVLMDeployment",
                                             "name": "dots", "uid": "uid-123", "controller": True,
                                             "blockOwnerDeletion": True}]
        assert meta["labels"][naming.LABEL_DEPLOYMENT] == "dots" and meta["labels"][naming.LABEL_MANAGED_BY] == naming.MANAGER


def test_every_child_name_of_the_longest_admitted_name_fits_63_characters() -> None:
    """The CRD admits names of up to naming.MAX_NAME_LENGTH characters; a child named over 63 is refused (a Service
    name is a DNS label, a Job's name is its pods' job-name label): before, the Job that empties a moved Redis state,
    <name>-redis-cleanup-previous, had 65 characters for a 42-character name (tests/operator: the API server's 422)."""
    owner = naming.Owner("d" * naming.MAX_NAME_LENGTH, "ml", "uid-123")
    spec = _spec(apiPool={"replicas": 2}, head__gcsFaultTolerance={"redisAddress": "redis.redis.svc:6379"},
                 monitoring__prometheusRule=True)
    previous = models.RedisStateStatus(redis_address="old.redis.svc:6379", storage_namespace="before")
    objs = builders.children(owner, spec, vision_replicas=1, llm_replicas=1, pod_monitor_supported=True,
                             prometheus_rule_supported=True)
    objs += [builders.token_secret(owner, "t"), builders.redis_cleanup_job(owner, spec),
             builders.redis_cleanup_job(owner, spec, previous=previous)]
    too_long = [f"{o['kind']} {o['metadata']['name']}" for o in objs if len(o["metadata"]["name"]) > 63]
    assert not too_long


def test_llm_pool_spans_nodes_with_per_pod_gpus_and_pool_resource() -> None:
    kids = _kids(_spec(), l=2)
    llm = kids[("Deployment", "dots-llm")]
    assert llm["spec"]["replicas"] == 4  # 2 replicas x 2 nodes per replica
    pod = llm["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "8" and c["resources"]["requests"]["cpu"] == "64"
    assert f'--resources={{"{serve_config.LLM_POOL_RESOURCE}": {serve_config.POOL_RESOURCE_CAPACITY}}}' in c["command"]
    assert "--address=dots-ray-head.ml.svc:6379" in c["command"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0]["topologyKey"] == "kubernetes.io/hostname"
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "128Gi"}} in pod["volumes"]
    assert {"name": "model", "persistentVolumeClaim": {"claimName": "dots-weights", "readOnly": True}} in pod["volumes"]
    # Never more GPUs than the pool holds during a rollout.
    assert llm["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0


def test_every_ray_pod_has_token_auth() -> None:
    kids = _kids(_spec())
    for name in ("dots-ray-head", "dots-vision", "dots-llm"):
        pod = kids[("Deployment", name)]["spec"]["template"]["spec"]
        env = {e["name"]: e for e in pod["containers"][0]["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert env["RAY_AUTH_TOKEN_PATH"]["value"] == naming.TOKEN_PATH
        assert any(v.get("secret", {}).get("secretName") == "dots-ray-token" for v in pod["volumes"])
        # The API keys only where the Ingress runs (here the head: no API pool).
        assert ("DOTSVLM_API_KEYS" in env) == (name == "dots-ray-head")
        if name == "dots-ray-head":
            assert env["DOTSVLM_API_KEYS"]["valueFrom"]["secretKeyRef"] == {"name": "dots-api-keys", "key": "api-keys"}


def test_token_secret_is_not_among_the_reapplied_children() -> None:
    assert ("Secret", "dots-ray-token") not in _kids(_spec())
    secret = builders.token_secret(OWNER, "abc")
    assert secret["stringData"] == {"token": "abc"}


def test_network_policy_limits_ray_ports_to_own_pods_and_operator() -> None:
    pol = _kids(_spec())[("NetworkPolicy", "dots-ray")]["spec"]
    assert pol["podSelector"]["matchLabels"][naming.LABEL_DEPLOYMENT] == "dots"
    peers, open_ports = pol["ingress"]
    assert {"podSelector": {"matchLabels": {naming.LABEL_DEPLOYMENT: "dots", naming.LABEL_MANAGED_BY: naming.MANAGER}}} in peers["from"]
    # The operator only from its own namespace (both selectors in one peer: pods with its label in that
    # namespace), and from the deployment's namespace when the operator's is unknown (not in a cluster).
    assert {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ml"}},
            "podSelector": {"matchLabels": naming.OPERATOR_POD_LABELS}} in peers["from"]
    assert not any(peer.get("namespaceSelector") == {} for peer in peers["from"])
    assert "from" not in open_ports and {p["port"] for p in open_ports["ports"]} == {8000, naming.METRICS_PORT}
    pol = _by_name(builders.children(OWNER, _spec(), vision_replicas=1, llm_replicas=1,
                                     operator_namespace="dotsvlm-system"))[("NetworkPolicy", "dots-ray")]["spec"]
    assert {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "dotsvlm-system"}},
            "podSelector": {"matchLabels": naming.OPERATOR_POD_LABELS}} in pol["ingress"][0]["from"]


def test_pool_pods_drain_their_ray_node_before_they_stop_within_a_grace_period_the_spec_sets() -> None:
    kids = _kids(_spec(vision__terminationGracePeriodSeconds=90, llm__terminationGracePeriodSeconds=900))
    for name, grace in (("dots-vision", 90), ("dots-llm", 900)):
        pod = kids[("Deployment", name)]["spec"]["template"]["spec"]
        (c,) = pod["containers"]
        assert pod["terminationGracePeriodSeconds"] == grace
        # preStop drains the node (Serve moves its replicas away and they finish their requests) until the
        # grace period less Ray's stop margin; nothing stops Ray before that.
        assert c["lifecycle"]["preStop"]["exec"]["command"] == [
            "dotsvlm", "drain-node", "--address=dots-ray-head.ml.svc:6379",
            f"--deadline-seconds={grace - naming.POD_STOP_MARGIN_S}"]
        env = {e["name"]: e for e in c["env"]}
        assert env[naming.POD_IP_ENV]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
        assert 0 < int(env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"]["value"]) < naming.POD_STOP_MARGIN_S
        assert f"--dashboard-agent-listen-port={naming.AGENT_PORT}" in c["command"]
    # The head drains the API first: new requests get 503 with Retry-After, the open ones (at most the
    # request timeout) finish; then SIGTERM stops Ray.
    kids = _kids(_spec(api__requestTimeoutSeconds=300))
    head_pod = kids[("Deployment", "dots-ray-head")]["spec"]["template"]["spec"]
    assert head_pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"] == [
        "dotsvlm", "drain-head", "--address=127.0.0.1:6379", "--deadline-seconds=300",
        f"--retry-after-seconds={naming.HEAD_RESTART_RETRY_AFTER_S}"]
    assert head_pod["terminationGracePeriodSeconds"] == 300 + naming.POD_STOP_MARGIN_S


def test_a_crashing_pool_pod_leaves_its_last_log_lines_for_the_status_and_the_head_template_stays_put() -> None:
    kids = _kids(_spec())
    for name in ("dots-vision", "dots-llm"):
        (c,) = kids[("Deployment", name)]["spec"]["template"]["spec"]["containers"]
        assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"  # status.crash_summary quotes it
    (head,) = kids[("Deployment", "dots-ray-head")]["spec"]["template"]["spec"]["containers"]
    assert "terminationMessagePolicy" not in head  # a changed head template restarts Ray on an operator upgrade


def test_llm_grace_period_must_hold_the_llm_replicas_graceful_shutdown() -> None:
    from dotsvlm_serving.serve_config import LLM_GRACEFUL_SHUTDOWN_TIMEOUT_S

    assert models.LLMPool().termination_grace_period_seconds - naming.POD_STOP_MARGIN_S > LLM_GRACEFUL_SHUTDOWN_TIMEOUT_S
    with pytest.raises(ValidationError, match=r"terminationGracePeriodSeconds must be at least "
                                              r"llm.drainTimeoutSeconds \+ 25 \(75; it is 60\)"):
        _spec(llm__terminationGracePeriodSeconds=60)
    # A longer drain needs a longer grace period; with it, Serve waits the drain plus its margin.
    with pytest.raises(ValidationError, match=r"\(625; it is 300\)"):
        _spec(llm__drainTimeoutSeconds=600)
    spec = _spec(llm__drainTimeoutSeconds=600, llm__terminationGracePeriodSeconds=625)
    opts = serve_app.app_config(spec).deployment_options()["LLMServer"]
    assert opts["graceful_shutdown_timeout_s"] == 610 and opts["user_config"]["drain_timeout_s"] == 600
    assert _kids(spec)[("Deployment", "dots-llm")]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 625


def test_startup_probe_allows_a_long_load_and_the_spec_sets_it() -> None:
    kids = _kids(_spec(llm__startupTimeoutSeconds=7200))
    llm = kids[("Deployment", "dots-llm")]["spec"]["template"]["spec"]["containers"][0]
    vision = kids[("Deployment", "dots-vision")]["spec"]["template"]["spec"]["containers"][0]
    for c in (llm, vision):
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert c[probe]["httpGet"] == {"path": "/api/local_raylet_healthz", "port": naming.AGENT_PORT}
    assert llm["startupProbe"]["periodSeconds"] * llm["startupProbe"]["failureThreshold"] >= 7200
    assert vision["startupProbe"]["periodSeconds"] * vision["startupProbe"]["failureThreshold"] >= 600  # its default
    assert llm["livenessProbe"]["failureThreshold"] * llm["livenessProbe"]["periodSeconds"] == 60


def test_head_service_ports_and_api_service() -> None:
    kids = _kids(_spec(api__port=9000, api__serviceType="LoadBalancer"))
    ports = {p["name"]: p["port"] for p in kids[("Service", "dots-ray-head")]["spec"]["ports"]}
    assert ports == {"gcs": 6379, "dashboard": 8265, "serve": 9000, "metrics": 8080}
    api = kids[("Service", "dots-api")]["spec"]
    assert api["type"] == "LoadBalancer" and api["ports"][0]["port"] == 9000
    assert api["selector"][naming.LABEL_COMPONENT] == naming.COMPONENT_HEAD


def test_vision_change_does_not_touch_llm_or_head_templates() -> None:
    before = _kids(_spec())
    after = _kids(_spec(vision__resources={"requests": {"cpu": "2"}}, vision__maxBatchPixels=4194304,
                        vision__nodeSelector={"x": "y"}, vision__autoscaling={"targetOngoingRequests": 2}))
    for name in ("dots-llm", "dots-ray-head"):
        assert after[("Deployment", name)] == before[("Deployment", name)]
    assert after[("Deployment", "dots-vision")] != before[("Deployment", "dots-vision")]
    ann = naming.ANNOTATION_SPEC_HASH
    assert (after[("Deployment", "dots-vision")]["spec"]["template"]["metadata"]["annotations"][ann]
            != before[("Deployment", "dots-vision")]["spec"]["template"]["metadata"]["annotations"][ann])
    # The Serve config (deployed through the head's REST API) does follow the change.
    assert after[("ConfigMap", "dots-serve-config")] != before[("ConfigMap", "dots-serve-config")]


def test_api_keys_reach_only_the_pods_that_run_the_api_and_changing_them_rolls_no_gpu_pool() -> None:
    """Only the Ingress reads the API keys, and it runs where the control resource is (the head, or the API pool).
    Before, every Ray pod had the variable, so setting or changing api.apiKeySecretRef rolled the vision pool and
    the LLM pool (whose replicas reload the model) for nothing, and a wrong Secret name stopped their pods too."""
    keys = {"name": "dots-api-keys", "key": "api-keys"}
    def key_env(dep):
        (c,) = dep["spec"]["template"]["spec"]["containers"]
        return [e for e in c.get("env", []) if e["name"] == serve_config.API_KEYS_ENV]
    for api_pool, api_dep in ((None, "dots-ray-head"), ({"replicas": 2}, "dots-api-pool")):
        before = _kids(_spec(apiPool=api_pool, api__apiKeySecretRef=None))
        after = _kids(_spec(apiPool=api_pool, api__apiKeySecretRef=keys))
        assert key_env(after[("Deployment", api_dep)]) == [
            {"name": serve_config.API_KEYS_ENV, "valueFrom": {"secretKeyRef": keys}}]
        for name in {"dots-ray-head", "dots-vision", "dots-llm", "dots-api-pool"} - {api_dep}:
            if ("Deployment", name) in after:
                assert after[("Deployment", name)] == before[("Deployment", name)], name
                assert not key_env(after[("Deployment", name)])


def test_llm_change_does_not_touch_vision_template() -> None:
    before = _kids(_spec())
    after = _kids(_spec(llm__contextLength=32768, llm__shmSize="200Gi"))
    assert after[("Deployment", "dots-vision")] == before[("Deployment", "dots-vision")]
    assert after[("Deployment", "dots-llm")] != before[("Deployment", "dots-llm")]


def test_builders_are_deterministic() -> None:
    a = builders.children(OWNER, _spec(), vision_replicas=2, llm_replicas=1)
    c = builders.children(OWNER, copy.deepcopy(_spec()), vision_replicas=2, llm_replicas=1)
    assert json.dumps(a, sort_keys=True) == json.dumps(c, sort_keys=True)


def test_serve_config_follows_the_contract() -> None:
    spec = _spec()
    app = serve_app.app_config(spec)
    assert app.model_path == "/models/dots.vlm1.inst" and app.device == "cuda" and app.dtype == "bfloat16"
    assert (app.llm.tensor_parallel, app.llm.nodes_per_replica, app.llm.gpus_per_replica) == (16, 2, 16)
    assert app.llm.pool_resource == serve_config.LLM_POOL_RESOURCE and app.vision.pool_resource == serve_config.VISION_POOL_RESOURCE
    assert (app.llm.context_length, app.llm.max_running_requests) == (65536, 64)
    assert app.vision.autoscaling.min_replicas == 1 and app.vision.autoscaling.max_replicas == 8
    assert app.llm.autoscaling.target_ongoing_requests == 48 and app.llm.autoscaling.downscale_delay_s == 600
    assert (app.queue.max_items, app.queue.max_bytes) == (512, 8589934592)
    assert app.api.api_keys_env == serve_config.API_KEYS_ENV
    body = serve_app.deploy_body(spec)
    assert body == app.deploy_body(http_port=8000)
    # Round trip through the contract (what the Serve app builder will validate).
    serve_config.ServeAppConfig.model_validate(body["applications"][0]["args"])
    small = serve_app.app_config(_spec("dotsvlm-small.yaml"))
    assert small.api.api_keys_env is None


def test_engine_follows_the_pool_and_its_options_reach_the_contract() -> None:
    # Default: the production engine when the pool has GPUs, transformers on CPU.
    assert serve_app.app_config(_spec()).llm.engine == "vllm"
    spec = _spec()
    spec.llm.memory_fraction, spec.llm.cuda_graph_max_batch_size, spec.llm.max_prefill_tokens = 0.85, 160, 8192
    llm = serve_app.app_config(spec).llm
    assert (llm.memory_fraction, llm.cuda_graph_max_batch_size, llm.max_prefill_tokens) == (0.85, 160, 8192)
    cpu = models.LLMPool(gpus_per_replica=0, tensor_parallel=1)
    assert serve_config.LLMPoolConfig(gpus_per_replica=cpu.gpus_per_replica, engine=cpu.engine).engine == "transformers"


def test_desired_replicas_stay_within_bounds() -> None:
    pool = models.VisionPool(min_replicas=2, max_replicas=5)
    assert builders.desired_replicas(pool, None) == 2
    assert builders.desired_replicas(pool, 9) == 5
    assert builders.desired_replicas(pool, 0) == 2
    assert builders.desired_replicas(pool, 3) == 3


def _ray_templates(objs):
    return {o["metadata"]["name"]: o["spec"]["template"] for o in objs if o["kind"] == "Deployment"}


def test_every_ray_pod_is_scraped_once_by_a_pod_monitor_or_by_annotations_never_both() -> None:
    spec = _spec()
    # No Prometheus Operator: annotations on every Ray pod, no PodMonitor.
    plain = builders.children(OWNER, spec, vision_replicas=1, llm_replicas=1)
    assert not any(o["kind"] == "PodMonitor" for o in plain)
    for name, tpl in _ray_templates(plain).items():
        ann = tpl["metadata"]["annotations"]
        assert ann["prometheus.io/scrape"] == "true" and ann["prometheus.io/port"] == str(naming.METRICS_PORT), name
    # With it: one PodMonitor that selects every Ray pod (head and both pools) on the metrics port; no annotations.
    objs = builders.children(OWNER, spec, vision_replicas=1, llm_replicas=1, pod_monitor_supported=True)
    pm = [o for o in objs if o["kind"] == "PodMonitor"]
    assert len(pm) == 1
    want = pm[0]["spec"]["selector"]["matchLabels"]
    endpoint = pm[0]["spec"]["podMetricsEndpoints"][0]
    assert endpoint["port"] == "metrics" and endpoint["interval"] == "30s" and endpoint["metricRelabelings"]
    templates = _ray_templates(objs)
    assert set(templates) == {"dots-ray-head", "dots-vision", "dots-llm"}
    for name, tpl in templates.items():
        labels = tpl["metadata"]["labels"]
        assert want.items() <= labels.items(), name
        assert any(p["name"] == "metrics" for p in tpl["spec"]["containers"][0]["ports"]), name
        assert "prometheus.io/scrape" not in tpl["metadata"]["annotations"], name
        env = {e["name"]: e.get("value") for e in tpl["spec"]["containers"][0]["env"]}
        assert env["DOTSVLM_NAMESPACE"] == "ml" and env["DOTSVLM_DEPLOYMENT"] == "dots"  # labels of every metric
    # Switched off in the spec: annotations again.
    off = builders.children(OWNER, _spec(monitoring__podMonitor=False), vision_replicas=1, llm_replicas=1,
                            pod_monitor_supported=True)
    assert not any(o["kind"] == "PodMonitor" for o in off)
    assert all("prometheus.io/scrape" in t["metadata"]["annotations"] for t in _ray_templates(off).values())
    # Monitoring off: neither.
    none = builders.children(OWNER, _spec(monitoring__enabled=False), vision_replicas=1, llm_replicas=1,
                             pod_monitor_supported=True)
    assert not any(o["kind"] == "PodMonitor" for o in none)
    assert not any("prometheus.io/scrape" in t["metadata"]["annotations"] for t in _ray_templates(none).values())


def test_prometheus_rule_only_when_asked_and_supported_and_narrowed_to_the_deployment() -> None:
    assert not any(o["kind"] == "PrometheusRule" for o in builders.children(
        OWNER, _spec(monitoring__prometheusRule=True), vision_replicas=1, llm_replicas=1))
    assert not any(o["kind"] == "PrometheusRule" for o in builders.children(
        OWNER, _spec(), vision_replicas=1, llm_replicas=1, prometheus_rule_supported=True))
    objs = builders.children(OWNER, _spec(monitoring__prometheusRule=True), vision_replicas=1, llm_replicas=1,
                             prometheus_rule_supported=True)
    (rule,) = [o for o in objs if o["kind"] == "PrometheusRule"]
    exprs = [r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]]
    assert exprs and all('dotsvlm_namespace="ml",dotsvlm_deployment="dots"' in e for e in exprs)
    # Its time-to-first-token alert holds the deployment to its own spec.slo (p90), as the autoscaler does.
    objs = builders.children(OWNER, _spec(monitoring__prometheusRule=True, slo__textTTFTSeconds=0.75,
                                          slo__imageTTFTSeconds=4), vision_replicas=1, llm_replicas=1,
                             prometheus_rule_supported=True)
    (rule,) = [o for o in objs if o["kind"] == "PrometheusRule"]
    (ttft,) = [r for g in rule["spec"]["groups"] for r in g["rules"] if r["alert"] == "DotsVLMTimeToFirstTokenHigh"]
    assert "histogram_quantile(0.9," in ttft["expr"] and "> 0.75" in ttft["expr"] and "> 4" in ttft["expr"]
    assert "text 0.75 s, image 4 s" in ttft["annotations"]["description"]


def test_the_latency_alerts_and_the_operators_metrics_hold_the_deployment_to_its_autoscalers_targets() -> None:
    """Inter-token latency and the vision stage had no alert (the autoscaler scaled against spec.slo's
    interTokenSeconds and imageTTFTSeconds x encodeBudgetFraction, and nothing told the SRE when it could not keep
    up). The operator's rule has the deployment's own targets written in, and its metrics export them for the
    chart's rules: the numbers the deployment's autoscaler compares its p90s with."""
    from prometheus_client import generate_latest

    from dotsvlm_operator import serve_app
    from dotsvlm_operator.monitoring.operator_metrics import OperatorMetrics
    from dotsvlm_serving.autoscaling.serve_policy import policy_spec

    spec = _spec(monitoring__prometheusRule=True, slo__interTokenSeconds=0.05, slo__imageTTFTSeconds=30,
                 vision__autoscaling__encodeBudgetFraction=0.4)
    # What the autoscaler compares with: the policy's spec from the settings the operator deploys.
    policy = policy_spec(serve_app.app_config(spec).policy_config(), {})
    itl_target, budget = policy.slo.inter_token_s, policy.vision.encode_budget_s(policy.slo)
    assert (itl_target, budget) == (0.05, 12.0)
    objs = builders.children(OWNER, spec, vision_replicas=1, llm_replicas=1, prometheus_rule_supported=True)
    (rule,) = [o for o in objs if o["kind"] == "PrometheusRule"]
    rules = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}
    itl, vision = rules["DotsVLMInterTokenLatencyHigh"], rules["DotsVLMVisionEncodeLatencyHigh"]
    assert "histogram_quantile(0.9," in itl["expr"] and itl["expr"].endswith(f"> {itl_target:g}"), itl["expr"]
    assert "ray_dotsvlm_inter_token_latency_seconds_bucket" in itl["expr"]
    assert "ray_dotsvlm_vision_request_seconds_bucket" in vision["expr"]
    assert vision["expr"].endswith(f"> {budget:g}"), vision["expr"]
    assert "0.05 s" in itl["annotations"]["description"] and "12 s" in vision["annotations"]["description"]
    metrics = OperatorMetrics()
    metrics.observe_status("ml", "dots", spec, models.DotsVLMDeploymentStatus(), {})
    text = generate_latest(metrics.registry).decode()
    assert 'dotsvlm_slo_inter_token_latency_seconds{dotsvlm_deployment="dots",dotsvlm_namespace="ml"} 0.05' in text
    assert 'dotsvlm_slo_vision_encode_budget_seconds{dotsvlm_deployment="dots",dotsvlm_namespace="ml"} 12.0' in text


def test_monitoring_labels_reach_the_pod_monitor_and_the_rule_and_cannot_replace_the_operators() -> None:
    """kube-prometheus-stack selects PodMonitors and PrometheusRules by `release: <name>`: without a way to add
    it, it scraped none of the deployment's metrics and loaded none of its alerts."""
    objs = builders.children(OWNER, _spec(monitoring__prometheusRule=True, monitoring__labels={
        "release": "kube-prometheus-stack", naming.LABEL_DEPLOYMENT: "someone-else"}), vision_replicas=1,
        llm_replicas=1, pod_monitor_supported=True, prometheus_rule_supported=True)
    monitoring = [o for o in objs if o["kind"] in ("PodMonitor", "PrometheusRule")]
    assert len(monitoring) == 2
    for obj in monitoring:
        assert obj["metadata"]["labels"]["release"] == "kube-prometheus-stack"
        assert obj["metadata"]["labels"][naming.LABEL_DEPLOYMENT] == OWNER.name
    # The other children do not carry them.
    assert not any("release" in o["metadata"].get("labels", {}) for o in objs if o not in monitoring)



def test_a_monitoring_label_key_that_kubernetes_refuses_is_refused_in_the_spec() -> None:
    """A key like "my label" (or of 70 characters) passed admission, then every apply of the PodMonitor got a 422
    and blocked the whole reconcile: the spec refuses it, with the message of the CRD's own rule."""
    from dotsvlm_operator import crd

    for key in ("my label", "a" * 70, "/release", "Example.com/team", "a.b/c/d", "x" * 254 + "/team", "release\n", ""):
        with pytest.raises(ValidationError, match="every key of monitoring.labels must be a Kubernetes label key"):
            _spec(monitoring__labels={key: "kube-prometheus-stack"})
    ok = {"release": "kube-prometheus-stack", "a" * 63: "x", "example.com/team": "ml", "x" * 253 + "/a_b.c-d": ""}
    assert _spec(monitoring__labels=ok).monitoring.labels == ok
    # The CRD carries the same check (a CEL rule on the map's keys), with the same message.
    labels = crd.openapi_schema()["properties"]["spec"]["properties"]["monitoring"]["properties"]["labels"]
    (rule,) = labels["x-kubernetes-validations"]
    assert rule["rule"].startswith("self.all(k, ") and models.LABEL_KEY_PATTERN in rule["rule"]
    assert rule["message"] == models._label_key_message("monitoring.labels", models._MONITORING_LABELS_REFUSED)
    assert labels["maxProperties"] == 16


@pytest.mark.parametrize("pool", ["vision", "llm", "head", "apiPool"])
def test_a_node_selector_or_toleration_that_kubernetes_refuses_in_a_pod_is_refused_in_the_spec(pool: str) -> None:
    """A node label value over 63 characters, a key like "gpu type", a toleration key or value that is no label
    passed admission, then every apply of the pool's Deployment got a 422 (a new resource never got its pods):
    the CRD refuses them now, and so does the spec model, with the same messages."""
    from dotsvlm_operator import crd

    extra = {"apiPool": {"replicas": 2}} if pool == "apiPool" else {}
    def spec_with(**fields):
        return _spec(**extra, **{f"{pool}__{k}": v for k, v in fields.items()})
    for key in ("gpu type", "a" * 70, "/pool", "Example.com/gpu"):
        with pytest.raises(ValidationError, match=f"every key of {pool}.nodeSelector must be a Kubernetes label key"):
            spec_with(nodeSelector={key: "h100"})
    for value in ("v" * 64, "L40S only", "-x"):
        with pytest.raises(ValidationError, match="is not a Kubernetes label value"):
            spec_with(nodeSelector={"pool": value})
    ok = {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3", "pool": "", "a" * 63: "v" * 63}
    assert getattr(spec_with(nodeSelector=ok), {"apiPool": "api_pool"}.get(pool, pool)).node_selector == ok
    for toleration in ({"key": "gpu node", "operator": "Exists"}, {"key": "gpu", "value": "L40S only"},
                       {"key": "gpu", "value": "v" * 64}):
        with pytest.raises(ValidationError, match="should match pattern|at most 63 characters"):
            spec_with(tolerations=[toleration])
    spec_with(tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists"}, {"operator": "Exists"},
                           {"key": "pool", "value": "gpu-a"}])
    schema = crd.openapi_schema()["properties"]["spec"]["properties"][pool]["properties"]["nodeSelector"]
    (rule,) = schema["x-kubernetes-validations"]
    assert rule["message"] == models._label_key_message(f"{pool}.nodeSelector", models._NODE_SELECTOR_REFUSED)
    assert schema["additionalProperties"]["pattern"] == models.LABEL_VALUE_PATTERN

def test_token_hash_is_in_every_ray_pod_template_and_changes_with_the_token() -> None:
    one = _by_name(builders.children(OWNER, _spec(), vision_replicas=1, llm_replicas=1, ray_token_hash=builders.token_hash("a")))
    two = _by_name(builders.children(OWNER, _spec(), vision_replicas=1, llm_replicas=1, ray_token_hash=builders.token_hash("b")))
    for name in ("dots-ray-head", "dots-vision", "dots-llm"):
        ann = one[("Deployment", name)]["spec"]["template"]["metadata"]["annotations"]
        assert ann[naming.ANNOTATION_TOKEN_HASH] == builders.token_hash("a") != builders.token_hash("b")
        assert two[("Deployment", name)] != one[("Deployment", name)]
    token = "f" * 64
    objs = builders.children(OWNER, _spec(), vision_replicas=1, llm_replicas=1, ray_token_hash=builders.token_hash(token))
    assert token not in json.dumps(objs)  # the token itself never lands in a pod template


def test_the_embedding_transport_reaches_the_vision_replicas_slice_and_a_wrong_one_is_refused() -> None:
    """queue.embeddingTransport: ObjectStore by default; NIXL makes the vision replicas answer by Ray's direct
    transport (their slice says so, applied in place); anything else is refused with the accepted values."""
    assert serve_app.app_config(_spec()).queue.embedding_transport == "object-store"
    spec = _spec(queue__embeddingTransport="NIXL")
    app = serve_app.app_config(spec)
    assert app.queue.embedding_transport == "nixl"
    vision = next(d for d in serve_app.deploy_body(spec)["applications"][0]["deployments"]
                  if d["name"] == serve_config.VISION_DEPLOYMENT)
    assert vision["user_config"]["embedding_transport"] == "nixl"
    with pytest.raises(ValidationError) as err:
        _spec(queue__embeddingTransport="RDMA")
    assert "ObjectStore" in str(err.value) and "NIXL" in str(err.value)


def test_resource_defaults_are_the_contracts_defaults_field_by_field() -> None:
    """A field the resource leaves unset serves with the contract's default (queue, autoscaling, vision
    batching, tokens, request timeout); the resource's own production defaults (pool sizes, GPUs,
    context length) are the only ones that differ."""
    spec = models.DotsVLMDeploymentSpec.model_validate({
        "image": "img", "model": {"path": "/models/m", "volume": {"emptyDir": {}}, "quantization": "none"}})
    app = serve_app.app_config(spec)
    contract = serve_config.ServeAppConfig(model_path="/models/m")
    for field in serve_config.QueueConfig.model_fields:
        assert getattr(app.queue, field) == getattr(contract.queue, field), f"queue.{field}"
    for pool in ("vision", "llm"):
        for field in type(getattr(contract, pool).autoscaling).model_fields:
            if field in ("min_replicas", "max_replicas", "initial_replicas"):
                continue  # the resource's own pool sizes
            if pool == "llm" and field == "target_ongoing_requests":
                continue  # follows maxRunningRequests (below)
            got, want = getattr(getattr(app, pool).autoscaling, field), getattr(getattr(contract, pool).autoscaling, field)
            assert got == want, f"{pool}.autoscaling.{field}"
    assert app.llm.autoscaling.target_ongoing_requests == serve_config.LLM_TARGET_SHARE * spec.llm.max_running_requests
    assert contract.llm.autoscaling.target_ongoing_requests == serve_config.LLM_TARGET_SHARE * contract.llm.max_running_requests
    assert app.slo == contract.slo
    for field in ("max_batch_pixels", "max_batch_wait_ms", "max_pending_pixels_per_replica", "max_pending_pixels"):
        assert getattr(app.vision, field) == getattr(contract.vision, field), f"vision.{field}"
    assert app.api.max_image_bytes_in_flight == contract.api.max_image_bytes_in_flight
    assert app.llm.max_new_tokens_default == contract.llm.max_new_tokens_default
    assert app.api.request_timeout_s == contract.api.request_timeout_s


def test_ingress_and_queue_are_pinned_to_the_head_which_advertises_the_control_resource() -> None:
    """GPU-pool churn must not take the Ingress and TensorQueue down: the Serve config asks for the control
    resource, only the head advertises it."""
    kids = _kids(_spec())
    advertised = f'--resources={{"{serve_config.CONTROL_RESOURCE}": {serve_config.CONTROL_RESOURCE_CAPACITY}}}'
    assert advertised in kids[("Deployment", "dots-ray-head")]["spec"]["template"]["spec"]["containers"][0]["command"]
    for pool in ("dots-vision", "dots-llm"):
        command = kids[("Deployment", pool)]["spec"]["template"]["spec"]["containers"][0]["command"]
        assert not any(serve_config.CONTROL_RESOURCE in arg for arg in command), pool
    assert serve_app.app_config(_spec()).control_resource == serve_config.CONTROL_RESOURCE


def test_backpressure_limits_reach_the_contract() -> None:
    spec = _spec(vision__maxPendingPixelsPerReplica=50_000_000, vision__maxPendingPixels=200_000_000,
                 api__maxImageBytesInFlight=300_000_000)
    app = serve_app.app_config(spec)
    assert (app.vision.max_pending_pixels_per_replica, app.vision.max_pending_pixels) == (50_000_000, 200_000_000)
    assert app.api.max_image_bytes_in_flight == 300_000_000


def _env(dep: dict) -> dict[str, dict]:
    return {e["name"]: e for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}


def test_gcs_fault_tolerance_keeps_the_state_in_redis_and_the_pools_wait_for_a_new_head() -> None:
    plain = _kids(_spec())
    head_name, vision_name, llm_name = (naming.head_name("dots"), naming.pool_name("dots", naming.COMPONENT_VISION),
                                        naming.pool_name("dots", naming.COMPONENT_LLM))
    for name in (head_name, vision_name, llm_name):
        env = _env(plain[("Deployment", name)])
        assert not {"RAY_REDIS_ADDRESS", "RAY_gcs_rpc_server_reconnect_timeout_s"} & set(env), "off by default"
    kids = _kids(_spec(head__gcsFaultTolerance={"redisAddress": "redis.redis.svc:6379",
                                                "passwordSecretRef": {"name": "redis-auth"}}))
    head = kids[("Deployment", head_name)]
    env = _env(head)
    assert env["RAY_REDIS_ADDRESS"]["value"] == "redis.redis.svc:6379"
    assert env["RAY_external_storage_namespace"]["value"] == "uid-123", "the resource's UID by default"
    assert env[naming.REDIS_PASSWORD_ENV]["valueFrom"] == {"secretKeyRef": {"name": "redis-auth", "key": "password"}}
    cmd = head["spec"]["template"]["spec"]["containers"][0]["command"]
    assert f"--redis-password=$({naming.REDIS_PASSWORD_ENV})" in cmd and cmd[-1] == "--block"
    for name in (vision_name, llm_name):
        pool_env = _env(kids[("Deployment", name)])
        assert pool_env["RAY_gcs_rpc_server_reconnect_timeout_s"]["value"] == "600"
        assert "RAY_REDIS_ADDRESS" not in pool_env, "only the head's GCS talks to Redis"
    named = _kids(_spec(head__gcsFaultTolerance={"redisAddress": "10.0.0.5:6380", "storageNamespace": "prod-a",
                                                 "headRestartToleranceSeconds": 900}))
    assert _env(named[("Deployment", head_name)])["RAY_external_storage_namespace"]["value"] == "prod-a"
    assert "--redis-password" not in " ".join(named[("Deployment", head_name)]["spec"]["template"]["spec"]
                                              ["containers"][0]["command"])
    assert _env(named[("Deployment", vision_name)])["RAY_gcs_rpc_server_reconnect_timeout_s"]["value"] == "900"


@pytest.mark.parametrize("ft, field", [
    ({"redisAddress": "redis"}, "redisAddress"),
    ({"redisAddress": "redis://redis:6379"}, "redisAddress"),
    ({"redisAddress": "redis:6379", "storageNamespace": "a/b"}, "storageNamespace"),
    ({"redisAddress": "redis:6379", "headRestartToleranceSeconds": 5}, "headRestartToleranceSeconds"),
])
def test_a_bad_gcs_fault_tolerance_setting_names_its_field(ft: dict, field: str) -> None:
    with pytest.raises(ValidationError) as err:
        _spec(head__gcsFaultTolerance=ft)
    assert field in str(err.value)


def test_an_api_pool_takes_the_api_and_the_queue_off_the_head() -> None:
    """spec.apiPool: CPU pods advertise the control resource (the head no longer does), the API Service sends
    requests to their Serve proxies, one Ingress replica per pod, and each pod drains its Ray node as it
    stops, once a new one is up (maxSurge 1, maxUnavailable 0), within a grace period that holds a request's
    whole timeout."""
    spec = _spec(apiPool={"replicas": 3, "resources": {"requests": {"cpu": "8", "memory": "16Gi"}},
                          "nodeSelector": {"pool": "cpu"}})
    kids = _kids(spec)
    advertised = f'--resources={{"{serve_config.CONTROL_RESOURCE}": {serve_config.CONTROL_RESOURCE_CAPACITY}}}'
    api = kids[("Deployment", "dots-api-pool")]
    assert api["spec"]["replicas"] == 3
    assert api["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    pod = api["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert advertised in c["command"] and "--num-gpus=0" in c["command"] and "--address=dots-ray-head.ml.svc:6379" in c["command"]
    assert {"name": "serve", "containerPort": 8000} in c["ports"]
    assert c["resources"]["requests"] == {"cpu": "8", "memory": "16Gi"} and "nvidia.com/gpu" not in str(c["resources"])
    assert pod["nodeSelector"] == {"pool": "cpu"}
    assert c["lifecycle"]["preStop"]["exec"]["command"][:2] == ["dotsvlm", "drain-node"]
    assert pod["terminationGracePeriodSeconds"] == 600 + 2 * naming.POD_STOP_MARGIN_S  # api.requestTimeoutSeconds 600
    assert kids[("PodDisruptionBudget", "dots-api-pool")]["spec"]["maxUnavailable"] == 1
    head = kids[("Deployment", "dots-ray-head")]["spec"]["template"]["spec"]["containers"][0]
    assert not any(serve_config.CONTROL_RESOURCE in arg for arg in head["command"])
    assert kids[("Service", "dots-api")]["spec"]["selector"] == naming.selector(OWNER, naming.COMPONENT_API_POOL)
    # Without GCS fault tolerance a head restart restarts every Ray process, the API pool's too: the head
    # still drains the API first. With it the API outlives the head: no drain.
    assert head["lifecycle"]["preStop"]["exec"]["command"][:2] == ["dotsvlm", "drain-head"]
    ft = _spec(apiPool={"replicas": 2}, head={"gcsFaultTolerance": {"redisAddress": "redis:6379"}})
    ft_head = _kids(ft)[("Deployment", "dots-ray-head")]["spec"]["template"]["spec"]
    assert "lifecycle" not in ft_head["containers"][0] and ft_head["terminationGracePeriodSeconds"] <= 60
    # The Serve config: one Ingress replica per API pod, each finishing its open requests when it stops.
    opts = serve_app.app_config(spec).deployment_options()[serve_config.INGRESS_DEPLOYMENT]
    assert opts["autoscaling_config"]["min_replicas"] == opts["autoscaling_config"]["max_replicas"] == 3
    assert opts["graceful_shutdown_timeout_s"] == 600
    assert opts["ray_actor_options"]["resources"] == {serve_config.CONTROL_RESOURCE: 1}
    # Without an API pool: nothing of it, and the head keeps the API.
    plain = _kids(_spec())
    assert ("Deployment", "dots-api-pool") not in plain and ("PodDisruptionBudget", "dots-api-pool") not in plain
    assert plain[("Service", "dots-api")]["spec"]["selector"] == naming.selector(OWNER, naming.COMPONENT_HEAD)
    assert serve_app.app_config(_spec()).api.ingress_replicas == 1


def test_an_api_pool_grace_period_below_a_minute_is_refused() -> None:
    with pytest.raises(ValidationError, match="terminationGracePeriodSeconds|termination_grace_period_seconds"):
        _spec(apiPool={"terminationGracePeriodSeconds": 10})
    assert builders.api_pool_grace_seconds(_spec(apiPool={"terminationGracePeriodSeconds": 90})) == 90


def test_an_api_pods_grace_period_leaves_room_for_the_tensor_queues_hand_over() -> None:
    """With a short request timeout the API pod still lives long enough for its queue replica to wait for its
    replacement and hand its state over (serve_config.QUEUE_GRACEFUL_SHUTDOWN_TIMEOUT_S) after the drain."""
    from dotsvlm_serving.serve_config import QUEUE_GRACEFUL_SHUTDOWN_TIMEOUT_S

    short = _spec(apiPool={"replicas": 2}, api__requestTimeoutSeconds=5)
    grace = builders.api_pool_grace_seconds(short)
    assert grace - 2 * naming.POD_STOP_MARGIN_S >= QUEUE_GRACEFUL_SHUTDOWN_TIMEOUT_S
    long = _spec(apiPool={"replicas": 2}, api__requestTimeoutSeconds=900)
    assert builders.api_pool_grace_seconds(long) == 900 + 2 * naming.POD_STOP_MARGIN_S


def test_a_resource_name_kubernetes_does_not_know_is_refused_in_the_spec() -> None:
    """resources: {requests: {memroy: 200Gi}} (or gpu: 1) passed admission, then every apply of the pool's
    Deployment got a 422; the CRD refuses it now (tests/operator), and so does the spec model, with its message."""
    for res in ({"requests": {"memroy": "200Gi"}}, {"limits": {"gpu": 1}}, {"requests": {"CPU": "2"}}):
        with pytest.raises(ValidationError, match="every key of resources.requests and resources.limits must be"):
            _spec(llm__resources=res)
    ok = {"requests": {"cpu": 16, "memory": "200Gi", "ephemeral-storage": "50Gi", "hugepages-2Mi": "1Gi"},
          "limits": {"memory": "400Gi", "example.com/fpga": 1, "hugepages-2Mi": "1Gi"}}
    assert _spec(llm__resources=ok).llm.resources.requests == ok["requests"]
