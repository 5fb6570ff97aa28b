"""A tiny stand-in for a Ray head and the dotsvlm ingress, for operator tests and the operator benchmark.

It answers what the operator asks:
- `GET /api/serve/applications/`: the Serve application with each deployment's `target_num_replicas`
  and `replicas` (state, node_ip), shaped like ray.serve.schema.ServeInstanceDetails;
- `PUT /api/serve/applications/`: a deploy (counted; the application then exists, and its config is
  echoed back as `deployed_app_config`, as Serve does);
- `GET /-/autoscaler`: the autoscaler's report (decisions, queue, slo), as the ingress serves it.
The test sets targets, replicas and decisions with `set_deployment` / `set_decision`. One server serves
every resource (the operator's URL overrides have no {name} in them here); `requests` counts calls.

As a separate process (the operator benchmark: the fake must not take the measuring process's CPU):
`python tests/support/fake_ray_head.py` prints its URL; `POST /-/fake/decision` (JSON: the arguments of
`set_decision`) and `GET /-/fake/requests` control and read it.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

APP = "dotsvlm"
VISION = "VisionEncoder"
LLM = "LLMServer"


class FakeRayHead:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        # A working head: one running replica per pool (on no pod the operator knows: node_ip None).
        self.deployments: dict[str, dict[str, Any]] = {
            VISION: {"target": 1, "replicas": [("RUNNING", None)]}, LLM: {"target": 1, "replicas": [("RUNNING", None)]}}
        self.decisions: dict[str, dict[str, Any]] | None = None
        self.queue = {"depth": 0, "bytes": 0, "oldest_age_s": 0.0, "waiting_producers": 0, "max_items": 64,
                      "rejected_total": 0, "redelivered_total": 0}
        self.slo: dict[str, float | None] = {"ttft_image_p90_s": None, "ttft_text_p90_s": None,
                                             "inter_token_p90_s": None, "encode_latency_p90_s": None}
        self.deployed = 0
        self.deployed_body: dict[str, Any] | None = None  # the last PUT, as Serve echoes it (deployed_app_config)
        self.requests: dict[str, int] = {}
        self.autoscaler_up = True
        self._server: ThreadingHTTPServer | None = None

    # --- what the test controls ---------------------------------------------------------------------

    def set_deployment(self, name: str, target: int, replicas: list[tuple[str, str | None]] | None = None) -> None:
        """Serve's target for a deployment and its replicas as (state, node_ip)."""
        with self.lock:
            self.deployments[name] = {"target": target, "replicas": list(replicas or [])}

    def set_decision(self, pool: str, desired: int, current: int, raw: int, reason: str, message: str) -> None:
        now = time.time()
        with self.lock:
            self.decisions = dict(self.decisions or {})
            self.decisions[pool] = {
                "desired": desired, "current": current, "raw": raw, "reason": reason, "message": message,
                "direction": "up" if desired > current else "down" if desired < current else "hold", "time": now,
                "last_change": {"reason": reason, "message": message, "time": now} if desired != current else
                (self.decisions.get(pool) or {}).get("last_change") or {"reason": None, "message": None, "time": None}}

    # --- the answers --------------------------------------------------------------------------------

    def applications(self) -> dict[str, Any]:
        with self.lock:
            if not self.deployed:
                return {"applications": {}}
            deps = {}
            for name, d in self.deployments.items():
                deps[name] = {"name": name, "status": "HEALTHY", "message": "", "target_num_replicas": d["target"],
                              "replicas": [{"replica_id": f"{name}-{i}", "state": state, "node_ip": ip,
                                            "start_time_s": 0.0} for i, (state, ip) in enumerate(d["replicas"])]}
            config = next((a for a in (self.deployed_body or {}).get("applications") or [] if a.get("name") == APP), None)
            return {"applications": {APP: {"name": APP, "status": "RUNNING", "message": "", "deployments": deps,
                                           "deployed_app_config": config}}}

    def report(self) -> dict[str, Any]:
        with self.lock:
            decisions = None
            if self.decisions:
                # The policy publishes every 2 s: the report's decisions are always fresh.
                decisions = {pool: dict(d, time=time.time()) for pool, d in self.decisions.items()}
            return {"decisions": decisions, "queue": dict(self.queue), "slo": dict(self.slo)}

    # --- the server ---------------------------------------------------------------------------------

    def start(self) -> str:
        head = self

        class Handler(BaseHTTPRequestHandler):
            # Keep-alive, as the Ray dashboard and Serve's proxy: a connection per call would make the
            # operator's client look costlier than it is (bench/operator_bench.py measures it).
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _send(self, code: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _count(self) -> None:
                with head.lock:
                    key = f"{self.command} {self.path}"
                    head.requests[key] = head.requests.get(key, 0) + 1

            def do_GET(self) -> None:  # noqa: N802
                self._count()
                if self.path == "/-/fake/requests":
                    with head.lock:
                        self._send(200, dict(head.requests))
                elif self.path.startswith("/api/serve/applications"):
                    self._send(200, head.applications())
                elif self.path.startswith("/-/autoscaler"):
                    if head.autoscaler_up:
                        self._send(200, head.report())
                    else:
                        self._send(503, {"error": {"message": "tensor queue not reachable"}})
                else:
                    self._send(404, {"error": "not found"})

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                if self.path == "/-/fake/decision":
                    head.set_decision(**body)
                    self._send(200, {})
                else:
                    self._send(404, {"error": "not found"})

            def do_PUT(self) -> None:  # noqa: N802
                self._count()
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                with head.lock:
                    head.deployed += 1
                    head.deployed_body = body
                self._send(200, {})

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


if __name__ == "__main__":
    import signal
    import sys

    fake = FakeRayHead()
    print(fake.start(), flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    threading.Event().wait()
