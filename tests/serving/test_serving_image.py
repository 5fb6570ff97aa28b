"""The serving image (images/serving.Dockerfile), built and run here on a private unprivileged Docker engine
(tests/support/images.py): FROM the local debootstrap base with the host's wheelhouse, its container runs
as a non-root user on a read-only root filesystem, starts Ray, serves the tiny built-in model
(`dotsvlm serve`), and answers a chat request with an image."""

from __future__ import annotations

import base64
import io
import json
import uuid

import httpx
import pytest

from support.cluster import wait_for
from support.ports import free_port
from support.images import DockerEngine, build_image

pytestmark = [pytest.mark.slow, pytest.mark.docker]

SERVING_TAG = "dotsvlm-serving:test"
USER = "1000:1000"  # the image's own user (images/serving.Dockerfile)
HOME = "/home/dotsvlm"


@pytest.fixture(scope="module")
def serving_image(docker_engine: DockerEngine) -> str:
    build_image(docker_engine, "serving.Dockerfile", SERVING_TAG, "serving")
    return SERVING_TAG


def _png_data_url() -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 120, 40)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_serving_image_runs_ray_as_its_non_root_user(docker_engine: DockerEngine, serving_image: str) -> None:
    config = json.loads(docker_engine.docker("image", "inspect", "-f", "{{json .Config}}", serving_image).stdout)
    assert config["User"] == USER and config["WorkingDir"] == HOME
    assert config["Cmd"][:3] == ["ray", "start", "--head"]


def test_serving_container_serves_the_tiny_model_and_a_chat_request_with_an_image(
        docker_engine: DockerEngine, serving_image: str) -> None:
    port = free_port()
    container = f"dotsvlm-serving-{uuid.uuid4().hex[:6]}"
    url = f"http://127.0.0.1:{port}"
    try:
        # As a pod would run it, less the GPUs: the image's user, read-only root, no capabilities; Ray's
        # temp dir (/tmp/ray) and the home (where `dotsvlm serve` writes the tiny model) in memory; the
        # object store in /dev/shm (Ray falls back to /tmp when /dev/shm is smaller than the store).
        docker_engine.docker(
            "run", "-d", "--name", container, "--network", "host", "--user", USER, "--read-only",
            "--tmpfs", "/tmp:rw,exec,mode=1777", "--tmpfs", f"{HOME}:rw,exec,mode=0755,uid=1000,gid=1000",
            "--shm-size", "1g", "-e", "RAY_DEFAULT_OBJECT_STORE_MEMORY_PROPORTION=0.02", "-e", "OMP_NUM_THREADS=1",
            "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
            serving_image, "dotsvlm", "serve", "--host", "127.0.0.1", "--port", str(port))

        def logs() -> str:
            proc = docker_engine.docker("logs", "--tail", "60", container, check=False)
            return proc.stdout + proc.stderr

        def healthy() -> bool:
            state = json.loads(docker_engine.docker("inspect", "-f", "{{json .State}}", container).stdout)
            if not state["Running"]:
                raise AssertionError(f"the container exited ({state['ExitCode']}):\n{logs()}")
            try:
                return httpx.get(url + "/health", timeout=5).status_code == 200
            except httpx.HTTPError:
                return False

        try:
            wait_for(healthy, 600, "the container's application to answer /health", interval=2)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{logs()}") from None
        body = {"model": "dots.vlm1", "max_tokens": 8, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": _png_data_url()}},
            {"type": "text", "text": "What is in this picture?"}]}]}
        resp = httpx.post(url + "/v1/chat/completions", json=body, timeout=300)
        assert resp.status_code == 200, resp.text
        answer = resp.json()
        assert answer["choices"][0]["message"]["role"] == "assistant"
        assert answer["usage"]["completion_tokens"] >= 1
        # The image's tokens are in the prompt: far more than the text's few.
        text_only = httpx.post(url + "/v1/chat/completions", timeout=300, json={
            "model": "dots.vlm1", "max_tokens": 1, "messages": [{"role": "user", "content": "What is in this picture?"}]})
        assert text_only.status_code == 200, text_only.text
        assert answer["usage"]["prompt_tokens"] > text_only.json()["usage"]["prompt_tokens"]
        # Everything ran as the image's user, and nothing outside the tmpfs mounts was writable.
        out = docker_engine.docker("exec", container, "sh", "-c",
                                   "id -u; stat -c %u /proc/[0-9]*/ | sort -u; touch /var/tmp/x 2>/dev/null || echo read-only").stdout
        uid, *process_uids, read_only = out.split()
        assert uid == "1000" and set(process_uids) == {"1000"} and read_only == "read-only", out
    finally:
        docker_engine.docker("rm", "-f", container, check=False)
