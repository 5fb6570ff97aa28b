"""`dotsvlm serve` waits for /health: a slow start-up shows progress, a timeout says what to do."""
from __future__ import annotations

import http.server
import json
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from dotsvlm_serving import embedded


@pytest.fixture(autouse=True)
def _environment_restored() -> Iterator[None]:
    """`cli_main` sets variables in this process's environment as `dotsvlm serve` would (RAY_AUTH_MODE=token with
    --detach): kept, they reached every local Ray the later tests of this pytest process started (its GCS then
    wanted a token the drivers, which had read the mode at import, never sent: 67 errors in a CI run)."""
    import os

    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


class _Health(http.server.BaseHTTPRequestHandler):
    ready_after = 0  # /health answers 503 this many times, then 200
    calls = 0

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        type(self).calls += 1
        ok = type(self).calls > type(self).ready_after
        body = json.dumps({"status": "ok"} if ok else
                          {"status": "unavailable", "reason": "no LLM replica is ready yet"}).encode()
        self.send_response(200 if ok else 503)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[tuple[str, type[_Health]]]:
    handler = type("Handler", (_Health,), {"calls": 0, "ready_after": 0})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_a_slow_start_reports_what_it_still_waits_for(health_server) -> None:
    url, handler = health_server
    handler.ready_after = 3
    said: list[str] = []
    embedded.wait_healthy(url, timeout_s=30, progress_every_s=0.0, report=said.append)
    assert handler.calls == 4
    assert said, "no progress was reported while the application was starting"
    assert all("still starting after" in s and "no LLM replica is ready yet" in s for s in said), said


def test_a_timeout_names_the_reason_and_the_flag_to_raise(health_server) -> None:
    url, handler = health_server
    handler.ready_after = 10**9
    with pytest.raises(TimeoutError) as err:
        embedded.wait_healthy(url, timeout_s=1.0, progress_every_s=60.0, report=lambda _m: None)
    assert "no LLM replica is ready yet" in str(err.value)
    assert "--ready-timeout" in str(err.value)


def test_serve_takes_a_ready_timeout() -> None:
    from dotsvlm_operator.cli import build_parser

    args = build_parser().parse_args(["serve", "--ready-timeout", "1200"])
    assert args.ready_timeout == 1200.0
    assert build_parser().parse_args(["serve"]).ready_timeout == 600.0


def _terminated() -> None:
    import signal

    signal.raise_signal(signal.SIGTERM)  # its Python handler runs as this call returns


@pytest.mark.parametrize("raised, code, said", [
    (KeyboardInterrupt(), 130, "interrupted while deploying: shutting down"),
    # SIGTERM (`kill`, `timeout`, a service manager): ray.init's handler raised SystemExit(15), "deployment failed: 15"
    (_terminated, 143, "stopped while deploying (signal 15): shutting down"),
    # a sys.exit() in what deploys is no signal: it was "stopped while deploying (signal 3)" / "(signal None)"
    (SystemExit(3), 3, "error: deployment failed: it called sys.exit(3)"),
    (SystemExit(None), 1, "error: deployment failed: it called sys.exit(None)"),
    (TimeoutError(), 1, "error: deployment failed: TimeoutError"),  # an exception without a message names its type
])
def test_deploy_that_stops_says_why_and_shuts_ray_down(monkeypatch, tmp_path, capsys, raised, code, said) -> None:
    import argparse
    import signal

    from dotsvlm_serving import app

    (tmp_path / "config.json").write_text("{}")
    shutdowns: list[bool] = []

    def ray_handler(signum, _frame):  # what ray.init installs
        sys.exit(signum)

    def deploy(*_a, **_k):
        if callable(raised):
            raised()
            pytest.fail("SIGTERM did not stop the deploy")
        raise raised

    monkeypatch.setattr(embedded, "_start_ray", lambda *a, **k: signal.signal(signal.SIGTERM, ray_handler))
    monkeypatch.setattr(embedded, "_shutdown", shutdowns.append)
    monkeypatch.setattr(app, "deploy_local", deploy)
    args = argparse.Namespace(detach=False, ready_timeout=5.0, model=str(tmp_path), config=None, host="127.0.0.1",
                              port=8000)
    before = signal.getsignal(signal.SIGTERM)
    try:
        assert embedded.cli_main(args) == code
        handler = signal.getsignal(signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, before)
    out = capsys.readouterr().out
    assert said in out, out
    assert "deployment failed: \n" not in out
    assert "signal" not in out or raised is _terminated, out
    assert shutdowns == [False]
    assert handler is ray_handler  # SIGTERM's handling after the deploy is Ray's again


def test_a_deployment_serve_gave_up_on_ends_the_wait_at_once_with_its_error(health_server, monkeypatch) -> None:
    """A replica whose constructor fails (a bad checkpoint) never makes /health answer 200: the wait ends as
    soon as Serve gives up, with the error, instead of after --ready-timeout with "not ready yet"."""
    url, handler = health_server
    handler.ready_after = 10**9
    monkeypatch.setattr(embedded, "FAILURE_POLL_S", 0.05)
    with pytest.raises(RuntimeError, match="could not start the application: LLMServer failed: CheckpointError: shard"):
        embedded.wait_healthy(url, timeout_s=60, progress_every_s=60.0, report=lambda _m: None,
                              failure=lambda: "LLMServer failed: CheckpointError: shard x cannot be read")


def test_a_port_or_host_the_api_cannot_listen_on_is_refused_before_ray_starts(monkeypatch, capsys) -> None:
    """Before, Ray started, deployed, and then printed the proxy actor's traceback."""
    import argparse
    import socket

    started: list[bool] = []
    monkeypatch.setattr(embedded, "_start_ray", lambda *a, **k: started.append(True))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cases = [("127.0.0.1", 99999, "--port must be between 1 and 65535 (got 99999)"),
                 ("127.0.0.1", port, f"port {port} on 127.0.0.1 is in use by another program"),
                 ("192.0.2.250", 8000, "--host 192.0.2.250 is not an address of this machine"),
                 ("no-such-host.invalid", 8000, "--host 'no-such-host.invalid' is not an address or a name")]
        for host, p, said in cases:
            args = argparse.Namespace(detach=False, ready_timeout=5.0, model=None, config=None, host=host, port=p)
            assert embedded.cli_main(args) == 2
            assert said in capsys.readouterr().out
    assert not started
    assert embedded.listen_error("127.0.0.1", port) is None  # free again once its holder closed


def test_the_listen_check_binds_as_serves_proxy_does_not_the_first_address_of_the_name(monkeypatch) -> None:
    """Serve's proxy binds a host that is not an IPv6 literal on IPv4 (`localhost` -> 127.0.0.1). The check bound
    the first address the name resolved to, which for `localhost` is ::1 on many hosts: with 127.0.0.1's port held
    by another program it said nothing (and the proxy then failed to bind), and on a host without IPv6 it refused
    `--host localhost` although the proxy would listen."""
    import socket

    real = socket.getaddrinfo

    def ipv6_first(host, *args, **kw):
        if host == "localhost":  # as with "::1 localhost" in /etc/hosts
            port = args[0] if args else kw.get("port")
            return [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", port, 0, 0))] + real("127.0.0.1", *args, **kw)
        return real(host, *args, **kw)

    monkeypatch.setattr(socket, "getaddrinfo", ipv6_first)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert f"port {port} on localhost is in use" in (embedded.listen_error("localhost", port) or "")
    assert embedded.listen_error("localhost", port) is None
    assert embedded.listen_error("", port) is None and embedded.listen_error("0.0.0.0", port) is None


def test_a_model_whose_config_json_does_not_read_is_refused_before_ray_starts(monkeypatch, tmp_path, capsys) -> None:
    """Before, Ray started and every replica's constructor failed the same way; the user saw, after the whole
    start-up, the last line of Serve's error: "ValueError: invalid literal for int() with base 10: 'abc'"."""
    import argparse
    import socket

    from dotsvlm_serving import app

    started: list[bool] = []
    monkeypatch.setattr(embedded, "_start_ray", lambda *a, **k: started.append(True))
    monkeypatch.setattr(embedded, "_shutdown", lambda _detached: None)
    monkeypatch.setattr(app, "deploy_local", lambda *a, **k: started.append(True))
    monkeypatch.setattr(embedded, "wait_healthy", lambda *a, **k: (_ for _ in ()).throw(TimeoutError("deployed")))
    with socket.socket() as s:  # a free port (8000 may be another local stack's)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for config, said in ((json.dumps({"image_token_id": "abc"}), "'image_token_id' must be a non-negative integer"),
                         (json.dumps({"num_hidden_layers": 2.5}), "field 'num_hidden_layers'")):
        (tmp_path / "config.json").write_text(config)
        args = argparse.Namespace(detach=False, ready_timeout=5.0, model=str(tmp_path), config=None,
                                  host="127.0.0.1", port=port)
        assert embedded.cli_main(args) == 2
        out = capsys.readouterr().out
        assert f"error: {tmp_path / 'config.json'}" in out or f"of {tmp_path / 'config.json'}" in out, out
        assert said in out, out
    assert not started


def test_the_model_path_of_a_config_file_is_served_not_replaced_by_the_tiny_model(monkeypatch, tmp_path,
                                                                                  capsys) -> None:
    """`--config` merges Serve config fields over the local defaults; its `model_path` was silently dropped and the
    tiny model served instead. It is now the checkpoint (read before Ray starts); with a different --model, refused."""
    import argparse
    import socket

    from dotsvlm_serving import app
    from dotsvlm_serving.model import tiny

    monkeypatch.chdir(tmp_path)
    started: list[str] = []
    monkeypatch.setattr(embedded, "_start_ray", lambda *a, **k: started.append("ray"))
    monkeypatch.setattr(embedded, "_shutdown", lambda _detached: None)
    monkeypatch.setattr(app, "deploy_local", lambda *a, **k: started.append("deploy"))
    monkeypatch.setattr(embedded, "wait_healthy", lambda *a, **k: (_ for _ in ()).throw(TimeoutError("deployed")))
    monkeypatch.setattr(tiny, "ensure_tiny_checkpoint", lambda d, **k: started.append("tiny") or Path(d))
    ckpt = tmp_path / "mine"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"image_token_id": "abc"}))  # so that reading it shows
    conf = tmp_path / "serve.yaml"
    conf.write_text(f"model_path: {ckpt}\n")
    with socket.socket() as s:  # a free port (8000 may be another local stack's)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for model, said in ((None, f"error: {ckpt / 'config.json'}: 'image_token_id'"),
                        (str(tmp_path), f"--model {tmp_path} and the model_path of --config {conf} ({ckpt}) name "
                                        "different checkpoints")):
        args = argparse.Namespace(detach=False, ready_timeout=5.0, model=model, config=str(conf), host="127.0.0.1",
                                  port=port)
        assert embedded.cli_main(args) == 2
        out = capsys.readouterr().out
        assert said in out, out
    assert not started


@pytest.mark.parametrize("detach", [False, True])
def test_ctrl_c_while_ray_starts_shuts_down_and_says_so(monkeypatch, tmp_path, capsys, detach) -> None:
    """Before: a KeyboardInterrupt traceback, and with --detach no word of the head `ray start` may have left."""
    import argparse
    import socket

    (tmp_path / "config.json").write_text("{}")
    shutdowns: list[bool] = []
    monkeypatch.setattr(embedded, "_start_ray", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    monkeypatch.setattr(embedded, "_shutdown", shutdowns.append)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = argparse.Namespace(detach=detach, ready_timeout=5.0, model=str(tmp_path), config=None, host="127.0.0.1",
                              port=port)
    assert embedded.cli_main(args) == 130
    assert "interrupted while Ray was starting" in capsys.readouterr().out
    assert shutdowns == [detach]  # (with --detach, _shutdown says `ray stop` stops the background head)


def test_an_ipv6_host_given_in_brackets_as_in_a_url_listens_and_prints_one_pair(monkeypatch, capsys) -> None:
    """`--host [::1]` (as an IPv6 address is written in a URL) was refused as "not an address or a name", and
    endpoint_url printed http://[[::1]]:8000. It is ::1: checked, deployed and printed as such."""
    import argparse
    import socket

    from dotsvlm_serving import app

    assert embedded.endpoint_url("[::1]", 8000) == "http://[::1]:8000"
    assert embedded.plain_host("[::1]") == "::1" and embedded.plain_host("127.0.0.1") == "127.0.0.1"
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    deployed: list[str] = []
    monkeypatch.setattr(embedded, "_start_ray", lambda *a, **k: None)
    monkeypatch.setattr(embedded, "_shutdown", lambda _detached: None)
    monkeypatch.setattr(embedded, "checkpoint_config_error", lambda _m: None)
    monkeypatch.setattr(app, "deploy_local", lambda _cfg, host, port: deployed.append(host))
    monkeypatch.setattr(embedded, "wait_healthy", lambda *a, **k: (_ for _ in ()).throw(TimeoutError("deployed")))
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
            port = s.getsockname()[1]
    except OSError:
        pytest.skip("::1 is not an address of this machine")
    args = argparse.Namespace(detach=False, ready_timeout=5.0, model="/ckpt", config=None, host="[::1]", port=port)
    assert embedded.cli_main(args) == 1  # (the health wait is cut short here)
    out = capsys.readouterr().out
    assert deployed == ["::1"], out
    assert f"on ::1:{port}" in out and "[[" not in out, out


def test_a_relative_model_path_in_a_config_file_is_relative_to_that_file(monkeypatch, tmp_path) -> None:
    """`model_path: ckpt` in conf/serve.yaml named ./ckpt of wherever `dotsvlm serve` ran, as kubectl, helm and
    docker-compose do not: it is conf/ckpt, whatever the working directory."""
    conf_dir = tmp_path / "conf"
    (conf_dir / "ckpt").mkdir(parents=True)
    conf = conf_dir / "serve.yaml"
    conf.write_text("model_path: ckpt\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    overrides = embedded.read_overrides(str(conf))
    assert Path(embedded.chosen_model(None, overrides, str(conf))).resolve() == conf_dir / "ckpt"
    # a config file named by a relative path: relative to its directory too
    monkeypatch.chdir(tmp_path)
    assert Path(embedded.chosen_model(None, overrides, "conf/serve.yaml")).resolve() == conf_dir / "ckpt"
    # --model (relative to the working directory) naming the same checkpoint is no conflict
    assert embedded.chosen_model("conf/ckpt", overrides, "conf/serve.yaml") == "conf/ckpt"
    with pytest.raises(ValueError, match="name different checkpoints"):
        embedded.chosen_model("ckpt", overrides, "conf/serve.yaml")
    # an absolute path and ~ are kept as they are
    monkeypatch.setenv("HOME", str(tmp_path))
    assert embedded.chosen_model(None, {"model_path": "~/x"}, "conf/serve.yaml") == str(tmp_path / "x")
    assert embedded.chosen_model(None, {"model_path": "/abs/x"}, "conf/serve.yaml") == "/abs/x"


def test_the_printed_endpoint_of_an_ipv6_host_is_a_url_curl_takes() -> None:
    """`--host ::1` listens (the listen check binds IPv6 for an IPv6 address) but the endpoint, curl line and
    OpenAI base_url were printed as http://::1:8000, which curl and browsers refuse."""
    assert embedded.endpoint_url("::1", 8000) == "http://[::1]:8000"
    assert embedded.endpoint_url("::", 8000) == "http://[::1]:8000"
    assert embedded.endpoint_url("0.0.0.0", 8000) == "http://127.0.0.1:8000"
    assert embedded.endpoint_url("localhost", 8000) == "http://localhost:8000"


def test_a_working_directory_the_tiny_model_cannot_be_written_to_says_what_to_do(monkeypatch, tmp_path,
                                                                                 capsys) -> None:
    """`dotsvlm serve` from a read-only directory (`/` in a container, say) was a PermissionError traceback."""
    import argparse
    import socket

    from dotsvlm_serving.model import tiny

    def cannot(_d, **_k):
        raise PermissionError(13, "Permission denied", ".tiny-model")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tiny, "ensure_tiny_checkpoint", cannot)
    monkeypatch.setattr(embedded, "_start_ray", lambda *a, **k: pytest.fail("Ray must not start"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = argparse.Namespace(detach=False, ready_timeout=5.0, model=None, config=None, host="127.0.0.1", port=port)
    assert embedded.cli_main(args) == 1
    out = capsys.readouterr().out
    assert f"cannot write the tiny model to {tmp_path / '.tiny-model'}: Permission denied" in out and "--model" in out


def test_a_model_path_under_the_home_directory_written_with_a_tilde_is_found(monkeypatch, tmp_path, capsys) -> None:
    """The shell leaves `--model=~/ckpt` alone and YAML never expands `model_path: ~/ckpt`: it was "~/ckpt is not
    a checkpoint directory (no config.json)"."""
    import argparse
    import socket

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps({"image_token_id": "abc"}))  # so that reading it shows
    monkeypatch.setattr(embedded, "_start_ray", lambda *a, **k: pytest.fail("Ray must not start"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = argparse.Namespace(detach=False, ready_timeout=5.0, model="~/ckpt", config=None, host="127.0.0.1", port=port)
    assert embedded.cli_main(args) == 2
    out = capsys.readouterr().out
    assert f"{tmp_path / 'ckpt' / 'config.json'}: 'image_token_id'" in out, out
    assert embedded.chosen_model("~/ckpt", {"model_path": str(tmp_path / "ckpt")}, "c.yaml") == "~/ckpt"  # the same


def test_serve_of_a_hugging_face_cache_folder_names_the_snapshot_to_serve(monkeypatch, tmp_path, capsys) -> None:
    import argparse
    import socket

    snapshot = tmp_path / "models--rednote-hilab--dots.vlm1" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    monkeypatch.setattr(embedded, "_start_ray", lambda *a, **k: pytest.fail("Ray must not start"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = argparse.Namespace(detach=False, ready_timeout=5.0, model=str(snapshot.parent.parent), config=None,
                              host="127.0.0.1", port=port)
    assert embedded.cli_main(args) == 2
    assert f"it is in {snapshot}: give that directory as the model path" in capsys.readouterr().out
