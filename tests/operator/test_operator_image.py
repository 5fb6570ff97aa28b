"""The operator image (images/operator.Dockerfile), built and run here on a private unprivileged Docker
engine (tests/support/images.py): non-root, read-only, no torch, and its container reconciles a sample
on the test control plane as the chart's ServiceAccount."""

from __future__ import annotations

import json
import subprocess
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml
from dvlm_support import condition, get_json, load_example, poll, write_sa_kubeconfig

from support.cluster import REPO, build_binaries
from support.ports import free_port
from support.images import DockerEngine, build_image

pytestmark = [pytest.mark.slow, pytest.mark.docker]

OPERATOR_TAG = "dotsvlm-operator:test"
CHART = REPO / "charts" / "dotsvlm-operator"


@pytest.fixture(scope="module")
def operator_image(docker_engine: DockerEngine) -> str:
    build_image(docker_engine, "operator.Dockerfile", OPERATOR_TAG, "operator")
    return OPERATOR_TAG


def test_operator_image_is_non_root_read_only_and_has_no_torch(docker_engine: DockerEngine, operator_image: str) -> None:
    config = json.loads(docker_engine.docker("image", "inspect", "-f", "{{json .Config}}", operator_image).stdout)
    assert config["Entrypoint"] == ["dotsvlm", "operator"] and config["User"] == "65532:65532"
    # One run (vfs copies the image for every container): read-only root, no capabilities, no network.
    out = docker_engine.docker(
        "run", "--rm", "--network", "none", "--read-only", "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
        "--entrypoint", "python3", operator_image, "-c",
        "import os, subprocess, importlib.util as u; "
        "print(os.getuid(), u.find_spec('torch') is None, u.find_spec('kopf') is not None); "
        "print(subprocess.run(['dotsvlm', 'operator', '--help'], capture_output=True, text=True, check=True).stdout)").stdout
    first, help_text = out.split("\n", 1)
    assert first.split() == ["65532", "True", "True"]
    assert "--peering" in help_text and "--namespace" in help_text
    size_mb = int(docker_engine.docker("image", "inspect", "-f", "{{.Size}}", operator_image).stdout) / 1e6
    assert size_mb < 400, f"the operator image is {size_mb:.0f} MB"


@pytest.mark.cluster
def test_operator_container_reconciles_a_sample_as_the_chart_service_account(
        kube, crd, docker_engine: DockerEngine, operator_image: str, tmp_path: Path) -> None:
    helm_bin = build_binaries() / "helm"
    release = f"img-{uuid.uuid4().hex[:4]}"
    release_ns = kube.create_namespace("dotsvlm-system")
    work_ns = kube.create_namespace("ml")
    fullname = f"{release}-dotsvlm-operator"
    container = f"dotsvlm-operator-{uuid.uuid4().hex[:6]}"
    try:
        subprocess.run([str(helm_bin), "install", release, str(CHART), "-n", release_ns, "--set", "crds.install=false"],
                       env=kube.env, check=True, capture_output=True, timeout=120)
        live = kube.kubectl_json("get", "deployment", fullname, "-n", release_ns)
        (spec,) = live["spec"]["template"]["spec"]["containers"]
        kubeconfig = write_sa_kubeconfig(kube, release_ns, fullname, tmp_path / "sa.kubeconfig")
        kubeconfig.chmod(0o644)  # readable by the container's user
        health = free_port()
        args = [a for a in spec["args"] if not a.startswith(("--liveness", "--resync-seconds"))]
        args += [f"--liveness=http://127.0.0.1:{health}/healthz", "--resync-seconds=5",
                 "--ray-head-url-override=http://127.0.0.1:9/"]
        user = f"{live['spec']['template']['spec']['securityContext']['runAsUser']}"
        # As the chart runs it: its user, read-only root, a writable /tmp, no capabilities.
        docker_engine.docker("run", "-d", "--name", container, "--network", "host", "--user", user, "--read-only",
                             "--tmpfs", "/tmp", "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
                             "-v", f"{kubeconfig}:/etc/dotsvlm/kubeconfig:ro", "-e", "KUBECONFIG=/etc/dotsvlm/kubeconfig",
                             "-e", f"POD_NAME={container}", operator_image, *args)

        def logs() -> str:
            proc = docker_engine.docker("logs", "--tail", "30", container, check=False)
            return proc.stdout + proc.stderr

        cr = load_example("dotsvlm-small.yaml")
        cr["spec"]["model"]["volume"] = {"hostPath": {"path": "/mnt/weights"}}
        kube.apply(yaml.safe_dump(cr), namespace=work_ns)
        name = cr["metadata"]["name"]
        got = poll(lambda: (c := get_json(kube, "dvlm", name, "-n", work_ns)) and condition(c, "Progressing")
                   and c["status"]["vision"]["readyOfDesired"] == "1/1" and c, 120, "a full status", logs)
        assert condition(got, "Degraded")["reason"] == "AsExpected"
        for kind, child in [("deployment", f"{name}-ray-head"), ("deployment", f"{name}-llm"),
                            ("networkpolicy", f"{name}-ray"), ("secret", f"{name}-ray-token")]:
            assert get_json(kube, kind, child, "-n", work_ns), f"{kind} {child} missing\n{logs()}"
        assert "forbidden" not in logs().lower()
        with urllib.request.urlopen(f"http://127.0.0.1:{health}/healthz", timeout=10) as resp:
            assert resp.status == 200
        kube.kubectl("delete", "dvlm", name, "-n", work_ns, "--wait=true", timeout=60)
    finally:
        docker_engine.docker("rm", "-f", container, check=False)
        for cr in (get_json(kube, "dvlm", "-n", work_ns) or {}).get("items", []):
            kube.kubectl("patch", "dvlm", cr["metadata"]["name"], "-n", work_ns, "--type=merge",
                         "-p", '{"metadata":{"finalizers":null}}', check=False)
        subprocess.run([str(helm_bin), "uninstall", release, "-n", release_ns], env=kube.env, capture_output=True,
                       timeout=120)
        for ns in (work_ns, release_ns):
            kube.delete_namespace(ns, wait=False)
