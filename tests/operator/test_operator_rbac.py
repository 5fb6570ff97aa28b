"""The operator works with exactly the permissions examples/operator.yaml grants (a ServiceAccount token)."""

from __future__ import annotations

import pytest
import yaml
from dvlm_support import EXAMPLES, condition, get_json, load_example, poll, write_sa_kubeconfig

pytestmark = [pytest.mark.slow, pytest.mark.cluster]


@pytest.fixture
def operator_rbac(kube, crd):
    docs = [d for d in yaml.safe_load_all((EXAMPLES / "operator.yaml").read_text()) if d]
    rbac = [d for d in docs if d["kind"] != "Deployment"]  # no image to run in kwok: the operator runs here
    kube.apply("\n---\n".join(yaml.safe_dump(d) for d in rbac))
    yield
    kube.kubectl("delete", "clusterrolebinding,clusterrole", "dotsvlm-operator", "--ignore-not-found")
    kube.kubectl("delete", "namespace", "dotsvlm-system", "--ignore-not-found", "--wait=false")


def test_operator_runs_with_the_example_rbac(kube, operator_rbac, operator_factory, tmp_path) -> None:
    ns = kube.create_namespace("rbac")
    try:
        kubeconfig = write_sa_kubeconfig(kube, "dotsvlm-system", "dotsvlm-operator", tmp_path / "sa.kubeconfig")
        # Cluster-wide, as the example Deployment runs it.
        op = operator_factory([], kubeconfig=kubeconfig)
        cr = load_example("dotsvlm-small.yaml")
        cr["spec"]["monitoring"] = {"podMonitor": True, "prometheusRule": True}
        cr["spec"]["model"]["volume"] = {"hostPath": {"path": "/mnt/weights"}}
        kube.apply(yaml.safe_dump(cr), namespace=ns)
        name = cr["metadata"]["name"]
        got = poll(lambda: (c := get_json(kube, "dvlm", name, "-n", ns)) and condition(c, "Progressing")
                   and c["status"]["vision"]["readyOfDesired"] == "1/1" and c, 90, "a full status", op.log_tail)
        assert condition(got, "Degraded")["reason"] == "AsExpected"
        log = op.log_path.read_text()
        assert "forbidden" not in log.lower(), op.log_tail()
        assert "reconcile failed" not in log
        assert get_json(kube, "networkpolicy", f"{name}-ray", "-n", ns)
    finally:
        for cr in (get_json(kube, "dvlm", "-n", ns) or {}).get("items", []):
            kube.kubectl("patch", "dvlm", cr["metadata"]["name"], "-n", ns, "--type=merge",
                         "-p", '{"metadata":{"finalizers":null}}', check=False)
        kube.delete_namespace(ns, wait=True)
