"""The operator survives being killed, serves several namespaces, and peers without fighting."""

from __future__ import annotations

import json

import pytest
import yaml
from dvlm_support import condition, get_json, load_example, poll, release_namespace

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

KINDS = "deployments,services,configmaps,secrets,poddisruptionbudgets,networkpolicies"
EXPECTED = ["ConfigMap/{n}-serve-config", "Deployment/{n}-llm", "Deployment/{n}-ray-head", "Deployment/{n}-vision",
            "NetworkPolicy/{n}-ray", "PodDisruptionBudget/{n}-llm", "PodDisruptionBudget/{n}-vision",
            "Secret/{n}-ray-token", "Service/{n}-api", "Service/{n}-ray-head"]


def cpu_cr(name: str) -> dict:
    """A CPU-only resource (no GPUs), so many fit on the fake nodes next to other tests' pods."""
    cr = load_example("dotsvlm-small.yaml")
    cr["metadata"]["name"] = name
    cr["spec"]["model"]["quantization"] = "none"
    cr["spec"]["vision"]["gpusPerReplica"] = 0
    cr["spec"]["llm"].update(gpusPerReplica=0, tensorParallel=1)
    return cr


def children(kube, ns: str, name: str) -> list[str]:
    items = get_json(kube, KINDS, "-n", ns, "-l", f"dotsvlm.io/deployment={name}")["items"]
    return sorted(f"{i['kind']}/{i['metadata']['name']}" for i in items if not i["metadata"].get("deletionTimestamp"))


def _cleanup(kube, namespaces: list[str]) -> None:
    for ns in namespaces:
        release_namespace(kube, ns)


@pytest.fixture
def two_namespaces(kube, crd):
    names = [kube.create_namespace("multi"), kube.create_namespace("multi")]
    yield names
    _cleanup(kube, names)


def test_killed_mid_reconcile_then_restarted_converges_without_duplicates(kube, two_namespaces, operator_factory) -> None:
    crs = [(ns, f"dots-{i}") for ns in two_namespaces for i in range(2)]
    op = operator_factory(two_namespaces)
    for ns, name in crs:
        kube.apply(yaml.safe_dump(cpu_cr(name)), namespace=ns)

    # Kill it (SIGKILL, no cleanup) as soon as it has started creating children.
    poll(lambda: any(children(kube, ns, n) for ns, n in crs), 60, "the first child object", op.log_tail)
    op.kill()
    tokens = {k: get_json(kube, "secret", f"{k[1]}-ray-token", "-n", k[0]) for k in crs}

    op2 = operator_factory(two_namespaces)

    def converged():
        for ns, n in crs:
            if children(kube, ns, n) != [e.format(n=n) for e in EXPECTED]:
                return False
            cr = get_json(kube, "dvlm", n, "-n", ns)
            if condition(cr, "Progressing") is None or cr["status"].get("observedGeneration") != cr["metadata"]["generation"]:
                return False
        return True
    poll(converged, 120, "every resource in both namespaces to have exactly its children and a status", op2.log_tail)

    for ns, n in crs:
        # No duplicates: one ReplicaSet per Deployment (pod templates are deterministic), the desired pod
        # count, one finalizer, and a token created before the kill was kept.
        rs = get_json(kube, "replicasets", "-n", ns, "-l", f"dotsvlm.io/deployment={n}")["items"]
        assert len(rs) == 3, [r["metadata"]["name"] for r in rs]
        pods = poll(lambda: (p := [p for p in get_json(kube, "pods", "-n", ns, "-l", f"dotsvlm.io/deployment={n}")["items"]
                                   if not p["metadata"].get("deletionTimestamp")]) and len(p) == 3 and p,
                    60, f"3 pods for {ns}/{n}")
        assert len(pods) == 3
        cr = get_json(kube, "dvlm", n, "-n", ns)
        assert cr["metadata"]["finalizers"] == ["dotsvlm.io/operator"]
        if tokens[(ns, n)] is not None:
            now = get_json(kube, "secret", f"{n}-ray-token", "-n", ns)
            assert now["data"]["token"] == tokens[(ns, n)]["data"]["token"], "the Ray token changed across the restart"


@pytest.fixture
def peered_ns(kube, crd):
    ns = kube.create_namespace("peer")
    kube.apply(yaml.safe_dump({"apiVersion": "kopf.dev/v1", "kind": "KopfPeering",
                               "metadata": {"name": "dotsvlm", "namespace": ns}}))
    yield ns
    _cleanup(kube, [ns])


def test_two_peered_operators_do_not_fight_and_the_standby_takes_over(kube, peered_ns, operator_factory) -> None:
    ns = peered_ns
    leader = operator_factory([ns], peering="dotsvlm", priority=200)
    standby = operator_factory([ns], peering="dotsvlm", priority=100)
    # Both have announced themselves before any resource exists.
    poll(lambda: len((get_json(kube, "kopfpeering", "dotsvlm", "-n", ns) or {}).get("status") or {}) == 2, 60,
         "both operators in the KopfPeering", lambda: leader.log_tail() + "\n---\n" + standby.log_tail())
    # kopf starts paused and resumes once it sees no peer above it: only the leader may resume
    # (the standby either never resumes or pauses again as soon as it sees the leader).
    poll(lambda: "Resuming operations" in leader.log_path.read_text(), 60, "the leader to start working",
         lambda: leader.log_tail() + "\n--- standby ---\n" + standby.log_tail() + "\n--- peering ---\n"
         + json.dumps(get_json(kube, "kopfpeering", "dotsvlm", "-n", ns)))

    name = "dots-peer"
    kube.apply(yaml.safe_dump(cpu_cr(name)), namespace=ns)
    poll(lambda: children(kube, ns, name) == [e.format(n=name) for e in EXPECTED], 60, "children", leader.log_tail)
    poll(lambda: condition(get_json(kube, "dvlm", name, "-n", ns), "Progressing"), 60, "a status", leader.log_tail)
    # Only the leader reconciled: the standby logged no condition transitions (a new resource's first one is
    # Ready=False; the Progressing change beside it, with the same reason, is not told twice).
    # The leader logs the transition just after it writes the status: poll, not read once.
    poll(lambda: "Ready=False" in leader.log_path.read_text(), 30, "the leader to log Ready=False", leader.log_tail)
    standby_log = standby.log_path.read_text()
    assert "Ready=" not in standby_log and "Progressing=" not in standby_log
    assert ("Resuming operations" not in standby_log
            or standby_log.rfind("Pausing operations in favour of") > standby_log.rfind("Resuming operations"))
    rv = get_json(kube, "deployment", f"{name}-vision", "-n", ns)["metadata"]["resourceVersion"]

    # The leader dies; once its peering entry expires the standby carries on and applies a spec change.
    leader.kill()
    kube.kubectl("patch", "dvlm", name, "-n", ns, "--type=merge",
                 "-p", json.dumps({"spec": {"vision": {"resources": {"requests": {"cpu": "3"}}}}}))

    def applied():
        dep = get_json(kube, "deployment", f"{name}-vision", "-n", ns)
        c = dep["spec"]["template"]["spec"]["containers"][0]
        return c.get("resources", {}).get("requests", {}).get("cpu") == "3"
    poll(applied, 120, "the standby to take over and roll the vision pool", standby.log_tail)
    assert get_json(kube, "deployment", f"{name}-vision", "-n", ns)["metadata"]["resourceVersion"] != rv
