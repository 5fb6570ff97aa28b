"""Fixtures for operator tests on the real control plane (see tests/support/cluster.py)."""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
from dvlm_support import CRD_FILE, PEERING_CRD_FILE, load_example, release_namespace


@pytest.fixture(scope="session")
def crd(kube) -> Iterator[None]:
    """The DotsVLMDeployment CRD (and kopf's peering CRDs) installed and established."""
    kube.kubectl("apply", "--server-side", "-f", str(CRD_FILE))
    kube.kubectl("apply", "--server-side", "-f", str(PEERING_CRD_FILE))
    kube.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                 "crd/dotsvlmdeployments.dotsvlm.io", "crd/kopfpeerings.kopf.dev", "crd/clusterkopfpeerings.kopf.dev")
    # Discovery in kubectl may lag the CRD by a moment.
    kube.wait_for(lambda: kube.kubectl("get", "dvlm", "-A", check=False).returncode == 0, 30, "kubectl to know 'dvlm'")
    yield


@pytest.fixture
def ns(kube, crd, request) -> Iterator[str]:
    """A fresh namespace per test (named after the module's NAMESPACE_PREFIX), deleted with what is in it."""
    name = kube.create_namespace(getattr(request.module, "NAMESPACE_PREFIX", "t"))
    yield name
    release_namespace(kube, name)


@pytest.fixture
def small_cr() -> dict:
    return copy.deepcopy(load_example("dotsvlm-small.yaml"))


@pytest.fixture
def operator_factory(kube, crd, tmp_path):
    """Start `dotsvlm operator` subprocesses; every one is stopped at the end of the test."""
    from dvlm_support import OperatorProcess

    started: list[OperatorProcess] = []

    def start(namespaces: list[str], **kw) -> OperatorProcess:
        op = OperatorProcess(kube, namespaces, tmp_path / f"operator-{len(started)}.log", **kw).start()
        started.append(op)
        return op

    yield start
    for op in started:
        op.stop()
