"""One local Ray + the Serve application for the whole serving test session (CPU, tiny model).

Small limits on purpose, so that bursts and failures are cheap to provoke: a queue of 6 items with a
1 s enqueue timeout, 4 running requests per LLM replica, a 3 s lease. Two ingress and two LLM replicas,
so that the metrics test sees several replicas of each; Ray exports metrics on `metrics_port` and
reports them every second (10 s by default).
"""

from __future__ import annotations

import http.server
import os
import threading
from collections.abc import Iterator

import pytest
from serving_support import (API_KEY, IMAGE_HOST, KEYS_ENV, TEST_DEPLOYMENT, TEST_NAMESPACE, Served, free_port,
                             wait_healthy)


class _ImageHandler(http.server.BaseHTTPRequestHandler):
    png: bytes = b""

    def log_message(self, *a) -> None:
        pass

    def do_GET(self) -> None:
        if self.path == "/cat.png":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(self.png)))
            self.end_headers()
            self.wfile.write(self.png)
        else:
            self.send_response(404)
            self.end_headers()


@pytest.fixture(scope="session")
def image_server() -> Iterator[str]:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (120, 90), (30, 90, 200)).save(buf, "PNG")
    _ImageHandler.png = buf.getvalue()
    srv = http.server.ThreadingHTTPServer((IMAGE_HOST, 0), _ImageHandler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://{IMAGE_HOST}:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="session")
def served(tmp_path_factory: pytest.TempPathFactory, image_server: str) -> Iterator[Served]:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    import ray
    from ray import serve

    from dotsvlm_serving.app import build_app
    from dotsvlm_serving.model.tiny import ensure_tiny_checkpoint
    from dotsvlm_serving.serve_config import APP_NAME, ServeAppConfig

    model_dir = ensure_tiny_checkpoint(tmp_path_factory.mktemp("model") / "tiny")
    # fetch_timeout_s: the local image server answers at once, but a loaded CI machine (2 CPUs, Ray's processes
    # and the stack's) once took over 3 s to get its 404 (clean-clone CI of stop 39): no test waits on it.
    cfg = ServeAppConfig.model_validate({
        "model_path": str(model_dir),
        "llm": {"context_length": 1024, "max_running_requests": 4, "max_new_tokens_default": 16,
                "autoscaling": {"min_replicas": 2, "max_replicas": 2}},
        "queue": {"max_items": 6, "enqueue_timeout_s": 1.0, "lease_timeout_s": 3.0, "max_deliveries": 2},
        "vision": {"max_batch_pixels": 1_000_000, "max_batch_wait_ms": 5},
        "api": {"api_keys_env": KEYS_ENV, "request_timeout_s": 120, "ingress_replicas": 2,
                "images": {"max_images_per_request": 4, "max_image_bytes": 1_000_000, "max_image_pixels": 200_000,
                           "fetch_timeout_s": 10, "fetch_allow": [f"{IMAGE_HOST}/32"]}},
    })
    from dotsvlm_serving.metrics.catalog import DEPLOYMENT_ENV, NAMESPACE_ENV

    port, metrics_port = free_port(), free_port()
    for attempt in range(3):
        try:
            ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="WARNING",
                     log_to_driver=False, _metrics_export_port=metrics_port,
                     _system_config={"metrics_report_interval_ms": 1000},
                     runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", KEYS_ENV: API_KEY,
                                               NAMESPACE_ENV: TEST_NAMESPACE, DEPLOYMENT_ENV: TEST_DEPLOYMENT}})
            break
        except Exception as exc:  # Ray gives its raylet a fixed 30 s: a very busy machine can miss it
            ray.shutdown()
            if attempt == 2 or "timed out during startup" not in str(exc):
                raise
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(cfg.model_dump(mode="json")), name=APP_NAME, route_prefix="/", blocking=False)
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, 300)  # a busy 2-core machine has needed over 180 s (the first run of 2026-12-03)
        yield Served(url=url, model_dir=model_dir, config=cfg.model_dump(mode="json"), image_server=image_server,
                     metrics_port=metrics_port)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


