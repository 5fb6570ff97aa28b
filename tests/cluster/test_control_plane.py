"""Proof that the test control plane is a real Kubernetes: scheduling against GPU capacity, the
scheduler's reasons, garbage collection through ownerReferences, and CRD schema validation."""

from __future__ import annotations

import json
import subprocess
import textwrap

import pytest

from support.cluster import H100, KUBE_VERSION, KubeCluster

pytestmark = [pytest.mark.slow, pytest.mark.cluster]


def test_binaries_report_pinned_versions(kube: KubeCluster) -> None:
    client = json.loads(kube.kubectl("version", "-o", "json").stdout)
    assert client["clientVersion"]["gitVersion"] == KUBE_VERSION
    assert client["serverVersion"]["gitVersion"] == KUBE_VERSION
    etcd = subprocess.run([str(kube.bin_dir / "etcd"), "--version"], capture_output=True, text=True, check=True)
    assert "etcd Version: 3.6.8" in etcd.stdout
    helm = subprocess.run([str(kube.bin_dir / "helm"), "version", "--short"], capture_output=True, text=True,
                          check=True)
    assert helm.stdout.startswith("v3.22.0")


def test_control_plane_listens_on_loopback_only(kube: KubeCluster) -> None:
    import psutil

    server = kube.kubectl("config", "view", "--minify", "-o", "jsonpath={.clusters[0].cluster.server}").stdout
    assert server.startswith("https://127.0.0.1:")
    listeners: dict[str, set[str]] = {}
    for pidfile in (kube.cluster_dir / "pids").glob("*.pid"):
        conns = psutil.Process(int(pidfile.read_text())).net_connections(kind="inet")
        listeners[pidfile.stem] = {c.laddr.ip for c in conns if c.status == psutil.CONN_LISTEN}
    assert set(listeners) == {"etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler",
                              "kwok-controller"}
    for component, ips in listeners.items():
        assert ips and ips <= {"127.0.0.1", "::1"}, f"{component} listens on {ips}"


def _gpu_deployment(name: str, replicas: int, gpus: int, product: str) -> str:
    return textwrap.dedent(f"""\
        apiVersion: apps/v1
        kind: Deployment
        metadata: {{name: {name}}}
        spec:
          replicas: {replicas}
          selector: {{matchLabels: {{app: {name}}}}}
          template:
            metadata: {{labels: {{app: {name}}}}}
            spec:
              nodeSelector: {{nvidia.com/gpu.product: {product}}}
              containers:
              - name: main
                image: example.invalid/gpu-job:1
                resources:
                  limits: {{nvidia.com/gpu: "{gpus}"}}
        """)


@pytest.fixture(scope="module")
def gpu_overcommit(kube: KubeCluster):
    """Five pods of 8 GPUs each pinned to H100 nodes; the cluster has four 8-GPU H100 nodes."""
    ns = kube.create_namespace("gpu")
    kube.apply(_gpu_deployment("trainer", replicas=5, gpus=8, product=H100), namespace=ns)

    def settled():
        pods = kube.kubectl_json("get", "pods", "-n", ns)["items"]
        running = [p for p in pods if p["status"].get("phase") == "Running"]
        unschedulable = [p for p in pods if any(c["type"] == "PodScheduled" and c.get("reason") == "Unschedulable"
                                                for c in p["status"].get("conditions", []))]
        return (running, unschedulable) if len(running) == 4 and len(unschedulable) == 1 else None

    running, pending = kube.wait_for(settled, 120, "4 Running pods and 1 unschedulable pod")
    yield running, pending
    kube.discard_namespace(ns)


def test_gpu_pods_are_scheduled_onto_gpu_nodes_and_run(kube: KubeCluster, gpu_overcommit) -> None:
    running, _ = gpu_overcommit
    nodes = {p["spec"]["nodeName"] for p in running}
    h100_nodes = {n.name for n in kube.nodes if n.gpu_product == H100}
    assert nodes == h100_nodes, "each 8-GPU pod must take a whole H100 node of its own"
    for p in running:
        assert any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"]["conditions"])


def test_pod_beyond_gpu_capacity_stays_pending_with_scheduler_reason(kube: KubeCluster, gpu_overcommit) -> None:
    _, (pending,) = gpu_overcommit
    assert pending["status"]["phase"] == "Pending"
    cond = next(c for c in pending["status"]["conditions"] if c["type"] == "PodScheduled")
    assert cond["status"] == "False"
    assert "Insufficient nvidia.com/gpu" in cond["message"]
    assert "0/6 nodes are available" in cond["message"]
    # The same reason reaches users through events, as `kubectl describe` shows it.
    events = kube.kubectl("get", "events", "-n", pending["metadata"]["namespace"],
                          "--field-selector", f"involvedObject.name={pending['metadata']['name']}").stdout
    assert "FailedScheduling" in events


def test_deleting_owner_garbage_collects_dependents(kube: KubeCluster) -> None:
    ns = kube.create_namespace("gc")
    try:
        kube.kubectl("create", "configmap", "owner", "-n", ns, "--from-literal=a=b")
        uid = kube.kubectl("get", "configmap", "owner", "-n", ns, "-o", "jsonpath={.metadata.uid}").stdout
        owner_ref = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": uid}
        for kind, name in (("ConfigMap", "child-cm"), ("Secret", "child-secret")):
            kube.apply(json.dumps({"apiVersion": "v1", "kind": kind,
                                   "metadata": {"name": name, "ownerReferences": [owner_ref]}}), namespace=ns)
        kube.kubectl("wait", "-n", ns, "--for=create", "configmap/child-cm", "secret/child-secret", "--timeout=30s")
        kube.kubectl("delete", "configmap", "owner", "-n", ns)
        kube.wait_for(lambda: not kube.kubectl("get", "configmap,secret", "-n", ns, "-o", "name",
                                               "--field-selector", "metadata.name!=kube-root-ca.crt").stdout.strip(),
                      60, "the garbage collector to delete the owner's dependents")
    finally:
        kube.delete_namespace(ns, wait=False)


WIDGET_CRD = textwrap.dedent("""\
    apiVersion: apiextensions.k8s.io/v1
    kind: CustomResourceDefinition
    metadata: {name: widgets.test.dotsvlm.io}
    spec:
      group: test.dotsvlm.io
      scope: Namespaced
      names: {plural: widgets, singular: widget, kind: Widget}
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
                description: What the widget should look like.
                required: [size]
                properties:
                  size: {type: integer, minimum: 1, maximum: 10, description: Size of the widget in units.}
                  color: {type: string, enum: [red, blue]}
                x-kubernetes-validations:
                - rule: "!has(self.color) || self.color != 'red' || self.size <= 5"
                  message: red widgets must have size <= 5
    """)


def test_api_server_refuses_objects_that_violate_crd_schema(kube: KubeCluster) -> None:
    kube.apply(WIDGET_CRD)
    try:
        kube.kubectl("wait", "--for=condition=Established", "crd/widgets.test.dotsvlm.io", "--timeout=30s")
        assert "Size of the widget in units." in kube.wait_for(
            lambda: kube.kubectl("explain", "widget.spec.size", check=False).stdout, 30, "kubectl explain")
        ns = kube.create_namespace("crd")
        ok = "apiVersion: test.dotsvlm.io/v1\nkind: Widget\nmetadata: {name: fine}\nspec: {size: 3, color: red}\n"
        kube.apply(ok, namespace=ns)
        cases = {
            "spec: {size: 0}": "spec.size: Invalid value: 0: spec.size in body should be greater than or equal to 1",
            "spec: {size: many}": 'spec.size: Invalid value: "string": spec.size in body must be of type integer',
            "spec: {color: blue}": "spec.size: Required value",
            "spec: {size: 2, color: green}": 'spec.color: Unsupported value: "green"',
            "spec: {size: 7, color: red}": "red widgets must have size <= 5",
        }
        for spec, message in cases.items():
            bad = f"apiVersion: test.dotsvlm.io/v1\nkind: Widget\nmetadata: {{name: bad}}\n{spec}\n"
            proc = kube.kubectl("apply", "-n", ns, "-f", "-", input=bad, check=False)
            assert proc.returncode != 0, f"the API server accepted an invalid widget: {spec}"
            assert message in proc.stderr, f"{spec}: {proc.stderr}"
        kube.delete_namespace(ns, wait=False)
    finally:
        kube.kubectl("delete", "crd", "widgets.test.dotsvlm.io", "--ignore-not-found")
