"""The Helm chart (charts/dotsvlm-operator) on the real control plane: what it renders is accepted by
the API server, a wrong value is refused, and an installed release runs the operator with exactly its
RBAC, upgrades its CRD and uninstalls cleanly.

kwok pods run no container, so the operator runs here as a process with the chart's ServiceAccount
token and the arguments of the chart's Deployment (as tests/operator/test_operator_rbac.py does).
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from dvlm_support import CRD_FILE, REPO, condition, get_json, load_example, poll, write_sa_kubeconfig

from dotsvlm_operator import crd as crd_gen, naming
from support.cluster import build_binaries
from support.ports import free_port

pytestmark = [pytest.mark.slow]
cluster = pytest.mark.cluster

CHART = REPO / "charts" / "dotsvlm-operator"
CRD_NAME = "dotsvlmdeployments.dotsvlm.io"

# Minimal copies of the Prometheus Operator's CRDs: enough for the API server to accept (and validate
# the shape of) the chart's ServiceMonitor and PrometheusRule, and the operator's PodMonitors.
PROMETHEUS_OPERATOR_CRDS = """
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: podmonitors.monitoring.coreos.com}
spec:
  group: monitoring.coreos.com
  scope: Namespaced
  names: {kind: PodMonitor, plural: podmonitors, singular: podmonitor}
  versions:
  - name: v1
    served: true
    storage: true
    schema: {openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}}
---
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: servicemonitors.monitoring.coreos.com}
spec:
  group: monitoring.coreos.com
  scope: Namespaced
  names: {kind: ServiceMonitor, plural: servicemonitors, singular: servicemonitor}
  versions:
  - name: v1
    served: true
    storage: true
    schema: {openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}}
---
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: prometheusrules.monitoring.coreos.com}
spec:
  group: monitoring.coreos.com
  scope: Namespaced
  names: {kind: PrometheusRule, plural: prometheusrules, singular: prometheusrule}
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            required: [groups]
            properties:
              groups:
                type: array
                items:
                  type: object
                  required: [name, rules]
                  properties:
                    name: {type: string}
                    rules: {type: array, items: {type: object, x-kubernetes-preserve-unknown-fields: true}}
"""


# --- helpers -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def helm_bin() -> Path:
    return build_binaries() / "helm"


def helm(helm_bin: Path, *args: str, kube=None, check: bool = True, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    env = kube.env if kube is not None else None
    proc = subprocess.run([str(helm_bin), *args], capture_output=True, text=True, env=env, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}{proc.stdout}")
    return proc


def render(helm_bin: Path, *args: str, chart: Path = CHART, release: str = "dvlm", namespace: str = "dotsvlm-system") -> list[dict]:
    out = helm(helm_bin, "template", release, str(chart), "--namespace", namespace, *args).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def of_kind(objs: list[dict], kind: str) -> list[dict]:
    return [o for o in objs if o["kind"] == kind]


def container(objs: list[dict]) -> dict:
    (deployment,) = of_kind(objs, "Deployment")
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    return c


def chart_copy_with_monitoring_files(tmp_path: Path) -> Path:
    """The chart with a placeholder dashboard and alert rule, as the observability code will ship them."""
    chart = tmp_path / "chart"
    shutil.copytree(CHART, chart)
    (chart / "files" / "dashboards").mkdir(exist_ok=True)
    (chart / "files" / "dashboards" / "test_placeholder.json").write_text(json.dumps({"title": "placeholder", "panels": []}))
    (chart / "files" / "alerts.yaml").write_text(yaml.safe_dump({"groups": [{"name": "dotsvlm-test", "rules": [
        {"alert": "DotsVLMTestAlert", "expr": "vector(1) > 2", "for": "5m",
         "labels": {"severity": "warning"},
         "annotations": {"summary": "placeholder", "description": "Check {{ $labels.namespace }}/{{ $labels.deployment }}."}}]}]}))
    return chart


@pytest.fixture(scope="module")
def prometheus_operator_crds(kube):
    kube.apply(PROMETHEUS_OPERATOR_CRDS)
    kube.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                 "crd/servicemonitors.monitoring.coreos.com", "crd/prometheusrules.monitoring.coreos.com",
                 "crd/podmonitors.monitoring.coreos.com")
    yield
    kube.kubectl("delete", "crd", "servicemonitors.monitoring.coreos.com", "prometheusrules.monitoring.coreos.com",
                 "podmonitors.monitoring.coreos.com",
                 "--ignore-not-found", "--wait=true", timeout=120)


# --- without a cluster: lint, render, schema ---------------------------------------------------------------

VALUE_SETS = {
    "defaults": [],
    "namespaced": ["--set", "watchNamespaces={NS1,NS2}"],
    "monitoring": ["--set", "metrics.serviceMonitor.enabled=true", "--set", "prometheusRule.enabled=true",
                   "--set", "grafanaDashboards.enabled=true"],
    "two-replicas": ["--set", "replicaCount=2"],
    # An image pinned by digest: the tag is no label value (before, every object's version label was refused).
    "digest-tag": ["--set", "image.tag=0.1.0@sha256:" + "0123456789abcdef" * 4],
}


def test_helm_lint_strict(helm_bin) -> None:
    for name, args in VALUE_SETS.items():
        args = [a.replace("NS1", "ml").replace("NS2", "ml-staging") for a in args]
        proc = helm(helm_bin, "lint", "--strict", str(CHART), *args, check=False)
        assert proc.returncode == 0 and "1 chart(s) linted, 0 chart(s) failed" in proc.stdout, f"{name}:\n{proc.stdout}{proc.stderr}"


def test_defaults_render_a_restricted_least_privilege_operator(helm_bin) -> None:
    objs = render(helm_bin)
    assert sorted(o["kind"] for o in objs) == sorted(
        ["ServiceAccount", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding", "Deployment", "Service"])
    # The operator's metrics are on (alerts and dashboards read them), scraped by annotation without a ServiceMonitor.
    (metrics_service,) = of_kind(objs, "Service")
    assert metrics_service["spec"]["ports"][0]["port"] == 9090
    # The CRD is the generated one, kept on uninstall.
    (crd,) = of_kind(objs, "CustomResourceDefinition")
    assert crd["spec"] == crd_gen.crd_manifest()["spec"]
    assert crd["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    (deployment,) = of_kind(objs, "Deployment")
    pod = deployment["spec"]["template"]
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == "9090"
    assert "--metrics-port=9090" in container(objs)["args"]
    # A pod annotation of the user's own overrides ours, key by key (not written twice: a duplicate YAML key).
    custom_args = ("--set", "podAnnotations.prometheus\\.io/path=/m", "--set", "podAnnotations.a=b")
    assert helm(helm_bin, "template", "dvlm", str(CHART), *custom_args).stdout.count("prometheus.io/path:") == 1
    (custom,) = of_kind(render(helm_bin, *custom_args), "Deployment")
    assert custom["spec"]["template"]["metadata"]["annotations"] == {
        "a": "b", "prometheus.io/path": "/m", "prometheus.io/port": "9090", "prometheus.io/scrape": "true"}
    # Every DotsVLMDeployment's NetworkPolicy lets the operator in by this label, from its own namespace,
    # which the operator learns from its pod.
    assert naming.OPERATOR_POD_LABELS.items() <= pod["metadata"]["labels"].items()
    assert {"name": naming.OPERATOR_NAMESPACE_ENV, "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}} \
        in container(objs)["env"]
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    c = container(objs)
    sc, psc = c["securityContext"], pod["spec"]["securityContext"]
    assert psc["runAsNonRoot"] and psc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"] and sc["capabilities"] == {"drop": ["ALL"]}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert "--liveness=http://0.0.0.0:8080/healthz" in c["args"]
    assert not any(a.startswith(("--namespace", "--peering")) for a in c["args"])
    assert c["resources"]["requests"] and c["resources"]["limits"]
    # No rule grants what the operator never does.
    (role,) = of_kind(objs, "ClusterRole")
    verbs = {v for rule in role["rules"] for v in rule["verbs"]}
    assert "*" not in verbs and "deletecollection" not in verbs
    # update only on the finalizers subresource (what blockOwnerDeletion needs), never on an object.
    assert all(rule["resources"] == ["dotsvlmdeployments/finalizers"] for rule in role["rules"] if "update" in rule["verbs"])
    assert not any("*" in rule["resources"] for rule in role["rules"])


class _NoDuplicateKeys(yaml.SafeLoader):
    """Refuses a mapping that writes a key twice, as kubectl and `helm install` do (PyYAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        keys = [self.construct_object(k, deep=deep) for k, _ in node.value]
        twice = {k for k in keys if keys.count(k) > 1}
        if twice:
            raise yaml.constructor.ConstructorError(None, None, f"key(s) written twice: {sorted(twice)}", node.start_mark)
        return super().construct_mapping(node, deep=deep)


def test_user_labels_that_repeat_the_charts_write_each_key_once_and_keep_the_selector(helm_bin) -> None:
    """podLabels, metrics.serviceMonitor.labels, prometheusRule.labels and grafanaDashboards.labels with a key the
    chart sets too: before, the key was written twice (kubectl and helm install refuse a duplicate key), and a
    podLabels app.kubernetes.io/instance would have left the Deployment's selector without its pods."""
    args = ["--set", "podLabels.app\\.kubernetes\\.io/instance=mine", "--set", "podLabels.app\\.kubernetes\\.io/name=x",
            "--set", "podLabels.app\\.kubernetes\\.io/version=custom", "--set", "podLabels.team=ml",
            *VALUE_SETS["monitoring"]]
    for key in ("metrics.serviceMonitor.labels", "prometheusRule.labels", "grafanaDashboards.labels"):
        args += ["--set", f"{key}.app\\.kubernetes\\.io/part-of=observability", "--set", f"{key}.release=kps"]
    out = helm(helm_bin, "template", "dvlm", str(CHART), *args).stdout
    objs = [d for d in yaml.load_all(out, Loader=_NoDuplicateKeys) if d]
    (deployment,) = of_kind(objs, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    # The selector (and the name the NetworkPolicies admit) stay the chart's; the other labels are the user's.
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert naming.OPERATOR_POD_LABELS.items() <= labels.items()
    assert labels["team"] == "ml" and labels["app.kubernetes.io/version"] == "custom"
    for obj in of_kind(objs, "ServiceMonitor") + of_kind(objs, "PrometheusRule") + of_kind(objs, "ConfigMap"):
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "observability", obj["metadata"]
        assert obj["metadata"]["labels"]["release"] == "kps"
    assert of_kind(objs, "ServiceMonitor") and of_kind(objs, "PrometheusRule") and of_kind(objs, "ConfigMap")


def test_a_long_release_name_still_gives_valid_object_names(helm_bin) -> None:
    """Helm admits release names of up to 53 characters (dots too); the object names are cut to 63 (the metrics
    Service's too: before, <fullname>-metrics had up to 71 characters, and a dotted release name made it no DNS
    label, so `helm install` failed on the Service). A Service name starts with a letter (Kubernetes refused
    others until its relaxed Service name validation), a release name may start with a digit."""
    for release in ("prod-eu-west4-ml-platform-serving-operators", "ml.prod-" + "a" * 45, "2026-ml-ops"):
        objs = render(helm_bin, "--set", "metrics.serviceMonitor.enabled=true", release=release)
        (service,) = of_kind(objs, "Service")
        assert re.fullmatch(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", service["metadata"]["name"]), service["metadata"]["name"]
        (monitor,) = of_kind(objs, "ServiceMonitor")
        assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
        assert all(len(o["metadata"]["name"]) <= 63 for o in objs if o["kind"] != "CustomResourceDefinition")


def test_a_long_release_name_gives_each_dashboard_its_own_configmap(helm_bin) -> None:
    """The dashboards' ConfigMaps were named <fullname>-dashboard-<name> cut at 63 characters: with a release name
    of about 35 characters or more, every dashboard got the same name and `helm install` failed on the second."""
    dashboards = sorted((CHART / "files" / "dashboards").glob("*.json"))
    assert len(dashboards) >= 2
    for release in ("prod-eu-west4-ml-platform-serving-operators", "ml.prod-" + "a" * 45, "dvlm"):
        objs = render(helm_bin, "--set", "grafanaDashboards.enabled=true", release=release)
        names = [o["metadata"]["name"] for o in of_kind(objs, "ConfigMap")]
        assert len(set(names)) == len(dashboards), names
        for name, path in zip(sorted(names, key=lambda n: n.rsplit("-dashboard-", 1)[1]), dashboards):
            assert name.endswith("-dashboard-" + path.stem.lower().replace("_", "-")), (name, path)
            assert len(name) <= 63 and re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*",
                                                     name), name


def test_an_image_tag_that_is_no_label_value_still_gives_valid_labels(helm_bin) -> None:
    """The version label was the image tag as it is: a tag pinned with its digest (0.1.0@sha256:...), or a long one
    cut at a '-' or '.', is no label value, and the API server refused every object of `helm install`."""
    digest = "sha256:" + "0123456789abcdef" * 4
    for tag, version in ((f"0.1.0@{digest}", "0.1.0"), ("v" * 62 + "-x", "v" * 62), ("dev+build.7", "dev_build.7")):
        objs = render(helm_bin, "--set", f"image.tag={tag}")
        assert {o["metadata"]["labels"]["app.kubernetes.io/version"] for o in objs} == {version}, tag
        assert container(objs)["image"] == f"ghcr.io/dotsvlm/dotsvlm-operator:{tag}"


def test_the_metrics_port_and_the_health_port_must_differ(helm_bin) -> None:
    """Both are the operator's own servers in one container: with the same port the second could not bind and the
    operator crashed at start, after an install that went through. Now the chart refuses it and says which to change."""
    proc = helm(helm_bin, "template", "dvlm", str(CHART), "--set", "metrics.port=8080", check=False)
    assert proc.returncode != 0 and "metrics.port and health.port are both 8080" in proc.stderr, proc.stderr
    proc = helm(helm_bin, "template", "dvlm", str(CHART), "--set", "health.port=9090", check=False)
    assert proc.returncode != 0 and "metrics.port and health.port are both 9090" in proc.stderr, proc.stderr
    # With the metrics off, nothing binds their port.
    helm(helm_bin, "template", "dvlm", str(CHART), "--set", "metrics.port=8080", "--set", "metrics.enabled=false")


def test_a_scrape_timeout_longer_than_the_interval_is_refused(helm_bin) -> None:
    """The Prometheus Operator skips a ServiceMonitor whose scrapeTimeout exceeds its interval (only its log says
    so): with interval 5s and the default 10s timeout the operator's metrics were never scraped."""
    on = ("--set", "metrics.serviceMonitor.enabled=true")
    proc = helm(helm_bin, "template", "dvlm", str(CHART), *on, "--set", "metrics.serviceMonitor.interval=5s",
                check=False)
    assert proc.returncode != 0, proc.stdout
    assert "metrics.serviceMonitor.scrapeTimeout (10s) is longer than metrics.serviceMonitor.interval (5s)" in proc.stderr
    proc = helm(helm_bin, "template", "dvlm", str(CHART), *on, "--set", "metrics.serviceMonitor.interval=1m",
                "--set", "metrics.serviceMonitor.scrapeTimeout=1m30s", check=False)
    assert proc.returncode != 0 and "(1m30s) is longer than" in proc.stderr, proc.stderr
    for interval, timeout in (("10s", "10s"), ("1m", "59s"), ("1m30s", "1m"), ("2s", "1500ms")):
        (monitor,) = of_kind(render(helm_bin, *on, "--set", f"metrics.serviceMonitor.interval={interval}",
                                    "--set", f"metrics.serviceMonitor.scrapeTimeout={timeout}"), "ServiceMonitor")
        assert monitor["spec"]["endpoints"][0]["scrapeTimeout"] == timeout
    # Without a ServiceMonitor there is nothing to skip.
    helm(helm_bin, "template", "dvlm", str(CHART), "--set", "metrics.serviceMonitor.interval=5s")


def test_namespaced_mode_renders_roles_in_each_namespace(helm_bin) -> None:
    objs = render(helm_bin, "--set", "watchNamespaces={ml,ml-staging}")
    assert {r["metadata"]["namespace"] for r in of_kind(objs, "Role")} == {"ml", "ml-staging"}
    assert {r["metadata"]["namespace"] for r in of_kind(objs, "RoleBinding")} == {"ml", "ml-staging"}
    # Only the read-only cluster-scoped reads stay a ClusterRole.
    (cluster_role,) = of_kind(objs, "ClusterRole")
    assert {v for rule in cluster_role["rules"] for v in rule["verbs"]} == {"get", "list", "watch"}
    assert [a for a in container(objs)["args"] if a.startswith("--namespace")] == ["--namespace=ml", "--namespace=ml-staging"]
    no_reads = render(helm_bin, "--set", "watchNamespaces={ml}", "--set", "rbac.clusterScopedReads=false")
    assert not of_kind(no_reads, "ClusterRole") and not of_kind(no_reads, "ClusterRoleBinding")


def test_two_replicas_peer(helm_bin) -> None:
    objs = render(helm_bin, "--set", "replicaCount=2")
    (peering,) = of_kind(objs, "ClusterKopfPeering")
    assert f"--peering={peering['metadata']['name']}" in container(objs)["args"]
    assert of_kind(objs, "Deployment")[0]["spec"]["strategy"]["type"] == "RollingUpdate"
    assert any("clusterkopfpeerings" in r["resources"] for r in of_kind(objs, "ClusterRole")[0]["rules"])
    namespaced = render(helm_bin, "--set", "replicaCount=2", "--set", "watchNamespaces={ml,ml-staging}")
    assert {p["metadata"]["namespace"] for p in of_kind(namespaced, "KopfPeering")} == {"ml", "ml-staging"}
    assert not of_kind(render(helm_bin), "ClusterKopfPeering")


def test_plain_install_manifest_grants_the_chart_rules(helm_bin) -> None:
    """examples/operator.yaml (installs without Helm) has no rules of its own: the same as the chart's."""
    example = [d for d in yaml.safe_load_all((REPO / "examples" / "operator.yaml").read_text()) if d]
    (example_role,) = of_kind(example, "ClusterRole")
    (chart_role,) = of_kind(render(helm_bin, "--set", "replicaCount=2"), "ClusterRole")
    assert example_role["rules"] == chart_role["rules"]


def test_monitoring_objects_render_from_the_shipped_files(helm_bin, tmp_path) -> None:
    on = VALUE_SETS["monitoring"]
    # The chart as it is: one ConfigMap per shipped dashboard, a PrometheusRule once alerts.yaml exists.
    objs = render(helm_bin, *on)
    shipped = sorted((CHART / "files" / "dashboards").glob("*.json")) if (CHART / "files" / "dashboards").exists() else []
    assert len(of_kind(objs, "ConfigMap")) == len(shipped)
    assert len(of_kind(objs, "PrometheusRule")) == int((CHART / "files" / "alerts.yaml").exists())
    (monitor,) = of_kind(objs, "ServiceMonitor")
    (service,) = of_kind(objs, "Service")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert "metrics" in [p["name"] for p in container(objs)["ports"]]
    # Scraped through the ServiceMonitor, never also by annotation (twice).
    (deployment,) = of_kind(objs, "Deployment")
    assert "prometheus.io/scrape" not in (deployment["spec"]["template"]["metadata"].get("annotations") or {})
    # With files present (a placeholder in a copy of the chart), they are wired through.
    objs = render(helm_bin, *on, chart=chart_copy_with_monitoring_files(tmp_path))
    (dashboard,) = [c for c in of_kind(objs, "ConfigMap") if "test_placeholder.json" in c["data"]]
    assert dashboard["metadata"]["name"].endswith("-dashboard-test-placeholder")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["test_placeholder.json"])["title"] == "placeholder"
    (rule,) = of_kind(objs, "PrometheusRule")
    assert rule["spec"]["groups"][0]["rules"][0]["alert"] == "DotsVLMTestAlert"
    # Prometheus's own templates reach Prometheus as written (Helm does not evaluate the file).
    assert rule["spec"]["groups"][0]["rules"][0]["annotations"]["description"] == \
        "Check {{ $labels.namespace }}/{{ $labels.deployment }}."
    # Switched off: nothing.
    assert not {"ServiceMonitor", "PrometheusRule", "ConfigMap", "Service"} & {
        o["kind"] for o in render(helm_bin, "--set", "metrics.enabled=false",
                                  chart=chart_copy_with_monitoring_files(tmp_path / "off"))}


@cluster
@pytest.mark.parametrize("value, message", [
    ("replicaCount=two", "at '/replicaCount': got string, want integer"),
    ("watchNamespaces={ML}", "at '/watchNamespaces/0': 'ML' does not match pattern"),
    ("operator.logFormat=xml", "at '/operator/logFormat': value must be one of 'json', 'plain'"),
    ("replicas=2", "additional properties 'replicas' not allowed"),
])
def test_helm_install_refuses_a_wrong_value_with_its_path(kube, helm_bin, value: str, message: str) -> None:
    proc = helm(helm_bin, "install", "dvlm-bad", str(CHART), "-n", "default", "--set", value, kube=kube, check=False)
    assert proc.returncode != 0
    assert "values don't meet the specifications of the schema" in proc.stderr and message in proc.stderr, proc.stderr
    assert helm(helm_bin, "status", "dvlm-bad", "-n", "default", kube=kube, check=False).returncode != 0  # nothing installed


# --- on the control plane ----------------------------------------------------------------------------------

@cluster
@pytest.mark.parametrize("value_set", list(VALUE_SETS))
def test_every_rendered_object_is_accepted_by_the_api_server(kube, crd, prometheus_operator_crds, helm_bin, tmp_path,
                                                              value_set: str) -> None:
    release_ns = kube.create_namespace("chart")
    # Pod Security admission warns on a pod template that breaks the restricted profile.
    kube.kubectl("label", "namespace", release_ns, "pod-security.kubernetes.io/warn=restricted",
                 "pod-security.kubernetes.io/enforce=restricted")
    watched = [kube.create_namespace("watched") for _ in range(2)] if value_set == "namespaced" else []
    try:
        args = [a.replace("NS1", watched[0]).replace("NS2", watched[1]) if watched else a for a in VALUE_SETS[value_set]]
        chart = chart_copy_with_monitoring_files(tmp_path) if value_set == "monitoring" else CHART
        objs = render(helm_bin, *args, chart=chart, release=f"dvlm-{value_set}", namespace=release_ns)
        manifest = tmp_path / "rendered.yaml"
        manifest.write_text(yaml.safe_dump_all(objs))
        proc = kube.kubectl("apply", "--dry-run=server", "--server-side", "--force-conflicts",
                            "--field-manager=chart-test", "-f", str(manifest), check=False)
        assert proc.returncode == 0, f"{value_set}: the API server refused:\n{proc.stderr}"
        assert "PodSecurity" not in proc.stderr, proc.stderr
        applied = [line for line in proc.stdout.splitlines() if "(server dry run)" in line]
        assert len(applied) == len(objs), proc.stdout
    finally:
        for ns in [release_ns, *watched]:
            kube.delete_namespace(ns, wait=False)


@cluster
def test_kind_e2e_sample_is_accepted_by_the_api_server(kube, crd) -> None:
    """scripts/kind-e2e.sh is not run here (kind needs privileged containers); its sample must stay valid."""
    script = (REPO / "scripts" / "kind-e2e.sh").read_text()
    sample = script[script.index("apiVersion: dotsvlm.io/"):script.index("EOF\nkubectl wait")]
    sample = sample.replace("$NAME", "tiny").replace("$TAG", "e2e")
    proc = kube.kubectl("apply", "--dry-run=server", "-n", "default", "-f", "-", input=sample, check=False)
    assert proc.returncode == 0, proc.stderr


def _helm_objects(kube, release: str) -> list[tuple[str, str, str]]:
    """(kind, namespace, name) of every object in the cluster that Helm marked as the release's."""
    kinds = kube.kubectl("api-resources", "--verbs=list", "-o", "name").stdout.split()
    got = json.loads(kube.kubectl("get", ",".join(kinds), "-A", "-o", "json", timeout=120).stdout)
    return sorted((o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"]) for o in got["items"]
                  if (o["metadata"].get("annotations") or {}).get("meta.helm.sh/release-name") == release)


def _operator_args(kube, namespace: str, deployment: str, health_port: int) -> list[str]:
    """The chart's container arguments, from the live Deployment; the liveness endpoint on a free local port."""
    live = kube.kubectl_json("get", "deployment", deployment, "-n", namespace)
    (c,) = live["spec"]["template"]["spec"]["containers"]
    args = [a for a in c["args"] if not a.startswith("--resync-seconds")]  # the test's faster resync stays
    return [f"--liveness=http://127.0.0.1:{health_port}/healthz" if a.startswith("--liveness") else a for a in args]


def _sample() -> dict:
    cr = copy.deepcopy(load_example("dotsvlm-small.yaml"))
    cr["spec"]["model"]["volume"] = {"hostPath": {"path": "/mnt/weights"}}
    return cr


def _reconciled(kube, ns: str, name: str, op) -> dict:
    """The sample reconciled to its children, with a full status."""
    got = poll(lambda: (c := get_json(kube, "dvlm", name, "-n", ns)) and condition(c, "Progressing")
               and c["status"]["vision"]["readyOfDesired"] == "1/1" and c, 90, "a full status", op.log_tail)
    for kind, child in [("deployment", f"{name}-ray-head"), ("deployment", f"{name}-vision"), ("deployment", f"{name}-llm"),
                        ("service", f"{name}-api"), ("configmap", f"{name}-serve-config"), ("secret", f"{name}-ray-token"),
                        ("poddisruptionbudget", f"{name}-llm"), ("networkpolicy", f"{name}-ray")]:
        assert get_json(kube, kind, child, "-n", ns), f"{kind} {child} missing\n{op.log_tail()}"
    assert condition(got, "Degraded")["reason"] == "AsExpected"
    return got


def _drop_finalizers(kube, ns: str) -> None:
    for cr in (get_json(kube, "dvlm", "-n", ns) or {}).get("items", []):
        kube.kubectl("patch", "dvlm", cr["metadata"]["name"], "-n", ns, "--type=merge",
                     "-p", '{"metadata":{"finalizers":null}}', check=False)


HELM_OWNERSHIP = ["meta.helm.sh/release-name", "meta.helm.sh/release-namespace"]


@cluster
def test_install_runs_the_operator_upgrades_the_crd_and_uninstalls_cleanly(kube, crd, helm_bin, operator_factory,
                                                                            tmp_path) -> None:
    release = f"dvlm-{uuid.uuid4().hex[:4]}"
    release_ns = kube.create_namespace("dotsvlm-system")
    kube.kubectl("label", "namespace", release_ns, "pod-security.kubernetes.io/enforce=restricted")
    work_ns = kube.create_namespace("ml")
    fullname = f"{release}-dotsvlm-operator"
    try:
        # The CRD is already there (applied with kubectl, as by users of the plain install): adopt it.
        kube.kubectl("label", "crd", CRD_NAME, "app.kubernetes.io/managed-by=Helm", "--overwrite")
        kube.kubectl("annotate", "crd", CRD_NAME, f"meta.helm.sh/release-name={release}",
                     f"meta.helm.sh/release-namespace={release_ns}", "--overwrite")
        helm(helm_bin, "install", release, str(CHART), "-n", release_ns, "--wait", "--timeout", "120s", kube=kube)
        # The pod was admitted under the restricted Pod Security profile and is Running (on a kwok node).
        pods = kube.kubectl_json("get", "pods", "-n", release_ns, "-l", f"app.kubernetes.io/instance={release}")["items"]
        assert [p["status"]["phase"] for p in pods] == ["Running"]

        # The operator, as the chart's ServiceAccount with the chart's arguments, reconciles a sample.
        health_port = free_port()
        kubeconfig = write_sa_kubeconfig(kube, release_ns, fullname, tmp_path / "sa.kubeconfig")
        op = operator_factory([], kubeconfig=kubeconfig, extra=_operator_args(kube, release_ns, fullname, health_port))
        cr = _sample()
        name = cr["metadata"]["name"]
        kube.apply(yaml.safe_dump(cr), namespace=work_ns)
        _reconciled(kube, work_ns, name, op)
        log = op.log_path.read_text()
        assert "forbidden" not in log.lower() and "reconcile failed" not in log, op.log_tail()
        # The probe the chart points at answers.
        with urllib.request.urlopen(f"http://127.0.0.1:{health_port}/healthz", timeout=10) as resp:
            assert resp.status == 200

        # helm upgrade carries a changed CRD to the API server (a new field), and back.
        changed = tmp_path / "chart-next"
        shutil.copytree(CHART, changed)
        crd_file = changed / "files" / "crds" / "dotsvlm.io_dotsvlmdeployments.yaml"
        new_crd = yaml.safe_load(crd_file.read_text())
        spec_schema = new_crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
        spec_schema["properties"]["chartUpgradeProbe"] = {"type": "string", "description": "Added by the upgrade test."}
        crd_file.write_text(yaml.safe_dump(new_crd))

        def served_spec_fields() -> set[str]:
            live = kube.kubectl_json("get", "crd", CRD_NAME)
            return set(live["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"])

        helm(helm_bin, "upgrade", release, str(changed), "-n", release_ns, "--wait", "--timeout", "120s", kube=kube)
        assert "chartUpgradeProbe" in served_spec_fields()
        helm(helm_bin, "upgrade", release, str(CHART), "-n", release_ns, "--wait", "--timeout", "120s", kube=kube)
        assert "chartUpgradeProbe" not in served_spec_fields()

        # The user's resource is deleted while the operator runs (its finalizer), then the chart is uninstalled.
        kube.kubectl("delete", "dvlm", name, "-n", work_ns, "--wait=true", timeout=60)
        op.stop()
        assert _helm_objects(kube, release)  # the check below can fail: it sees the release's objects
        helm(helm_bin, "uninstall", release, "-n", release_ns, "--wait", "--timeout", "120s", kube=kube)
        assert _helm_objects(kube, release) == [("CustomResourceDefinition", "", CRD_NAME)]
        assert "keep" in kube.kubectl("get", "crd", CRD_NAME, "-o", "jsonpath={.metadata.annotations}").stdout
    finally:
        _drop_finalizers(kube, work_ns)
        helm(helm_bin, "uninstall", release, "-n", release_ns, kube=kube, check=False)
        for ns in (work_ns, release_ns):
            kube.delete_namespace(ns, wait=False)
        # Hand the CRD back as the other tests know it: not Helm's, exactly as generated.
        kube.kubectl("annotate", "crd", CRD_NAME, *[f"{a}-" for a in [*HELM_OWNERSHIP, "helm.sh/resource-policy"]], check=False)
        kube.kubectl("label", "crd", CRD_NAME, "app.kubernetes.io/managed-by-", check=False)
        kube.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD_FILE), check=False)


# --- RBAC: what the chart's ServiceAccount can and cannot do -----------------------------------------------

def _can(kube, sa: str, verb: str, resource: str, namespace: str | None) -> bool:
    args = ["auth", "can-i", verb, resource, f"--as={sa}"]
    args += ["-n", namespace] if namespace else []
    proc = kube.kubectl(*args, check=False)
    answer = proc.stdout.strip()
    assert answer in ("yes", "no"), f"kubectl {' '.join(args)}: {proc.stdout}{proc.stderr}"
    return answer == "yes"


CHILD_RESOURCES = ["services", "configmaps", "secrets", "deployments.apps", "poddisruptionbudgets.policy",
                   "networkpolicies.networking.k8s.io", "podmonitors.monitoring.coreos.com",
                   "prometheusrules.monitoring.coreos.com"]


def _needed(ns: str) -> list[tuple[str, str, str | None]]:
    """What the operator does in a namespace it serves."""
    checks = [(v, "dotsvlmdeployments.dotsvlm.io", ns) for v in ("list", "watch", "patch")]
    checks += [("patch", "dotsvlmdeployments.dotsvlm.io/status", ns), ("create", "events", ns)]
    checks += [(v, "pods", ns) for v in ("get", "list", "watch", "patch")]  # patch: the pod-deletion-cost annotation
    checks += [(v, r, ns) for r in CHILD_RESOURCES for v in ("get", "list", "watch", "create", "patch", "delete")]
    return checks


def _not_needed(ns: str) -> list[tuple[str, str, str | None]]:
    return [("create", "dotsvlmdeployments.dotsvlm.io", ns), ("delete", "dotsvlmdeployments.dotsvlm.io", ns),
            ("update", "deployments.apps", ns), ("update", "events", ns), ("delete", "pods", ns), ("create", "pods", ns),
            ("create", "pods/exec", ns), ("deletecollection", "secrets", ns), ("create", "serviceaccounts", ns),
            ("create", "roles.rbac.authorization.k8s.io", ns), ("list", "nodes", None),
            ("create", "clusterrolebindings.rbac.authorization.k8s.io", None),
            ("create", "customresourcedefinitions.apiextensions.k8s.io", None),
            ("delete", "customresourcedefinitions.apiextensions.k8s.io", None)]


def _check_all(kube, sa: str, allowed: list, refused: list) -> None:
    with ThreadPoolExecutor(8) as pool:
        got_allowed = list(pool.map(lambda c: _can(kube, sa, *c), allowed))
        got_refused = list(pool.map(lambda c: _can(kube, sa, *c), refused))
    missing = [c for c, ok in zip(allowed, got_allowed) if not ok]
    extra = [c for c, ok in zip(refused, got_refused) if ok]
    assert not missing, f"the operator needs these and is refused: {missing}"
    assert not extra, f"the operator is granted what it never does: {extra}"


@cluster
@pytest.mark.parametrize("mode", ["cluster-wide", "namespaced"])
def test_rbac_grants_what_the_operator_needs_and_nothing_else(kube, crd, prometheus_operator_crds, helm_bin,
                                                              operator_factory, tmp_path, mode: str) -> None:
    release = f"rbac-{uuid.uuid4().hex[:4]}"
    release_ns = kube.create_namespace("dotsvlm-system")
    watched = kube.create_namespace("ml")
    other = kube.create_namespace("other")
    args = ["--set", "crds.install=false", "--set", "replicaCount=2"]  # with peering: its permissions too
    if mode == "namespaced":
        args += ["--set", f"watchNamespaces={{{watched}}}"]
    fullname = f"{release}-dotsvlm-operator"
    sa = f"system:serviceaccount:{release_ns}:{fullname}"
    try:
        helm(helm_bin, "install", release, str(CHART), "-n", release_ns, *args, kube=kube)
        if mode == "cluster-wide":
            _check_all(kube, sa,
                       allowed=_needed(watched) + _needed(other) + [
                           ("list", "customresourcedefinitions.apiextensions.k8s.io", None),
                           ("watch", "customresourcedefinitions.apiextensions.k8s.io", None),
                           ("patch", "clusterkopfpeerings.kopf.dev", None)],
                       refused=_not_needed(watched) + [("list", "namespaces", None)])
        else:
            _check_all(kube, sa,
                       allowed=_needed(watched) + [("patch", "kopfpeerings.kopf.dev", watched),
                                                   ("get", "customresourcedefinitions.apiextensions.k8s.io", None),
                                                   ("list", "namespaces", None)],
                       refused=_not_needed(watched) + _needed(other) + [("patch", "clusterkopfpeerings.kopf.dev", None)])
            # And the operator, started as the chart starts it, serves the watched namespace with these Roles.
            peering_name = fullname
            assert get_json(kube, "kopfpeering", peering_name, "-n", watched)
            kubeconfig = write_sa_kubeconfig(kube, release_ns, fullname, tmp_path / "sa.kubeconfig")
            op = operator_factory([], kubeconfig=kubeconfig, extra=_operator_args(kube, release_ns, fullname, free_port()))
            cr = _sample()
            kube.apply(yaml.safe_dump(cr), namespace=other)  # first, so it would be served first if it were
            kube.apply(yaml.safe_dump(cr), namespace=watched)
            _reconciled(kube, watched, cr["metadata"]["name"], op)
            assert "forbidden" not in op.log_path.read_text().lower(), op.log_tail()
            # The same resource in a namespace it does not watch is left alone.
            untouched = get_json(kube, "dvlm", cr["metadata"]["name"], "-n", other)
            assert not untouched.get("status") and not untouched["metadata"].get("finalizers")
            kube.kubectl("delete", "dvlm", cr["metadata"]["name"], "-n", watched, "--wait=true", timeout=60)
    finally:
        for ns in (watched, other):
            _drop_finalizers(kube, ns)
        helm(helm_bin, "uninstall", release, "-n", release_ns, kube=kube, check=False)
        for ns in (release_ns, watched, other):
            kube.delete_namespace(ns, wait=False)
