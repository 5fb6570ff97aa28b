"""`dotsvlm serve`: the whole serving stack on a local Ray, on CPU, with the tiny model by default.

Starts Ray (in-process, or as a background `ray start --head` with --detach so it outlives this
command), writes the tiny checkpoint to .tiny-model/ when no --model is given, deploys the same
application the operator deploys (`build_app(ServeAppConfig)`), waits until /health answers, and
prints the endpoint with a ready-to-paste curl.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .serve_config import CONTROL_RESOURCE, CONTROL_RESOURCE_CAPACITY, LLMPoolConfig, QueueConfig, ServeAppConfig

TINY_MODEL_DIR = ".tiny-model"
# Ray's own ports, outside the worker port range (10002-19999).
GCS_PORT = 6390
# Ray's metrics export (every dotsvlm metric, with a ray_ prefix; docs/observability.md); another free
# port when something else holds it (a second local stack).
METRICS_PORT = 6391
# The local node is the control node: the Ingress and TensorQueue replicas ask for this resource.
CONTROL_RESOURCES = {CONTROL_RESOURCE: CONTROL_RESOURCE_CAPACITY}


def metrics_port() -> int:
    import socket

    for port in (METRICS_PORT, 0):
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise OSError("no free port for Ray's metrics export")


def listen_error(host: str, port: int) -> str | None:
    """Why the API could not listen on host:port, found before Ray starts: Ray's own error comes from inside
    Serve's proxy actor, as a traceback, after the whole start-up. None: it can."""
    import errno
    import socket

    if not 1 <= port <= 65535:
        return f"--port must be between 1 and 65535 (got {port})"
    # Bound as Serve's proxy binds it (`ray.serve._private.http_util`): IPv6 for an IPv6 address only, else IPv4 with
    # the name resolved there (`localhost` is 127.0.0.1 to it, even where the name's first address is ::1).
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the proxy's server does
        try:
            s.bind((host, port))
        except (socket.gaierror, UnicodeError) as exc:
            return f"--host {host!r} is not an address or a name this machine can resolve ({exc})"
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return (f"port {port} on {host} is in use by another program (a `dotsvlm serve --detach` still "
                        f"running? `ray stop` stops it); choose another with --port")
            if exc.errno == errno.EADDRNOTAVAIL:
                return (f"--host {host} is not an address of this machine (127.0.0.1 for this machine only, "
                        f"0.0.0.0 for every interface, or one of its own addresses)")
            if exc.errno == errno.EACCES:
                return f"listening on port {port} needs privileges this user lacks; choose one from 1024 up"
            return f"cannot listen on {host}:{port}: {exc.strerror or exc}"
    return None


def chosen_model(flag: str | None, overrides: dict | None, config_path: str | None) -> str | None:
    """The checkpoint to serve: --model, else the --config file's `model_path` (a Serve config field like the
    others: it was silently replaced by the tiny model), else None (the tiny model). Both, naming different
    directories, is refused: which one the user meant cannot be told."""
    in_config = (overrides or {}).get("model_path")
    if in_config is None:
        return flag
    if not isinstance(in_config, str) or not in_config:
        raise ValueError(f"--config {config_path}: model_path must be a checkpoint directory (found {in_config!r})")
    in_config = config_relative(in_config, config_path)
    if flag is None:
        return in_config
    if Path(flag).expanduser().resolve() != Path(in_config).expanduser().resolve():
        raise ValueError(f"--model {flag} and the model_path of --config {config_path} ({in_config}) name different "
                         "checkpoints: give one of them")
    return flag


def config_relative(path: str, config_path: str | None) -> str:
    """A path written in the --config file, relative to that file's directory (as kubectl, helm and
    docker-compose read the paths in their files): resolved against the working directory instead, the same
    file named another checkpoint, or none, from another directory. `~` is expanded; an absolute path is kept."""
    expanded = Path(path).expanduser()
    if expanded.is_absolute() or not config_path:
        return str(expanded)
    return str(Path(config_path).expanduser().parent / expanded)


def plain_host(host: str) -> str:
    """--host as the sockets take it: `[::1]`, the bracketed form an IPv6 address has in a URL, is `::1` (the
    brackets were refused as an unknown name, and printed doubled in the endpoint)."""
    if len(host) > 2 and host.startswith("[") and host.endswith("]"):
        return host[1:-1]
    return host


def checkpoint_config_error(model: Path) -> str | None:
    """What is wrong with the --model directory's config.json / preprocessor_config.json (read as every replica
    reads them), found before Ray starts: otherwise each replica's constructor fails the same way and Serve
    reports it after the whole start-up. None: it reads."""
    from .model.config import load_config

    try:
        load_config(model).llm_config()
    except (OSError, ValueError) as exc:
        return str(exc)
    return None


def endpoint_url(host: str, port: int) -> str:
    """The URL this machine reaches the API at, as printed for curl and the OpenAI client: an IPv6 address in
    brackets (`http://::1:8000` is no URL curl takes), the any-address as the loopback of its family."""
    host = plain_host(host)
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


def say(msg: str) -> None:
    print(f"dotsvlm: {msg}", flush=True)


def local_config(model_path: str, overrides: dict | None = None) -> ServeAppConfig:
    """The embedded default: the contract's defaults (one replica per pool, CPU, float32), with smaller
    limits that suit a laptop CPU; `overrides` (from --config) are merged over it, key by key."""
    base = ServeAppConfig(
        model_path=model_path, device="cpu", dtype="float32",
        llm=LLMPoolConfig(max_running_requests=8, max_new_tokens_default=64),
        queue=QueueConfig(max_items=64, enqueue_timeout_s=10),
        control_resource=CONTROL_RESOURCE,  # the local Ray node advertises it, as the operator's head does
    ).model_dump(mode="json")
    return ServeAppConfig.model_validate(_merge(base, {**(overrides or {}), "model_path": model_path}))


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def read_overrides(path: str) -> dict:
    """A --config file: YAML or JSON, a part of the Serve config (serving/dotsvlm_serving/serve_config.py)."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"cannot read --config {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config {path} must hold a mapping of Serve config fields, e.g. "
                         "{vision: {autoscaling: {min_replicas: 0, max_replicas: 2}}}")
    return data


def config_errors(exc: Any, path: str | None) -> str:
    """A pydantic ValidationError of the Serve config as a person reads it: one line per field, the field's
    path, what is wrong; a camelCase name (the custom resource's spelling) gets its snake_case one."""
    where = f"--config {path}" if path else "the serving config"
    lines = [f"{where} does not fit the Serve config (its names: serving/dotsvlm_serving/serve_config.py; an "
             "example: examples/serve-autoscaling.yaml):"]
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            name = str(err["loc"][-1]) if err["loc"] else ""
            snake = re.sub(r"(?<!^)([A-Z])", r"_\1", name).lower()
            msg = "not a field here" + (f" (names are snake_case here: {snake}, not {name})" if snake != name else "")
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def wait_healthy(url: str, timeout_s: float, progress_every_s: float = 30.0,
                 report=None, failure=None) -> None:
    """Polls /health until it answers 200. Every `progress_every_s` it reports what the application
    still waits for (the health body names it), so a slow start-up is visibly alive. `failure()` (every
    FAILURE_POLL_S): why Serve gave up deploying, or None; it ends the wait at once with that reason (a
    replica whose constructor fails, on a bad checkpoint say, would otherwise wait out the whole timeout)."""
    report = report or say
    start = time.monotonic()
    deadline = start + timeout_s
    next_report = start + progress_every_s
    next_failure_check = start + FAILURE_POLL_S
    last = ""
    while time.monotonic() < deadline:
        if failure is not None and time.monotonic() >= next_failure_check:
            next_failure_check = time.monotonic() + FAILURE_POLL_S
            why = failure()
            if why:
                raise RuntimeError(f"Ray Serve could not start the application: {why}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as r:
                if r.status == 200:
                    return
        except urllib.error.HTTPError as exc:
            last = _health_reason(exc.read().decode(errors="replace"))
        except OSError as exc:
            last = f"the HTTP proxy does not answer yet ({exc})"
        now = time.monotonic()
        if now >= next_report:
            report(f"still starting after {now - start:.0f} s: {last or 'no answer yet'}")
            next_report = now + progress_every_s
        time.sleep(0.5)
    raise TimeoutError(f"the application did not become healthy within {timeout_s:g} s: {last or 'no answer'}. "
                       "On a busy or slow machine, or with a large checkpoint, replicas can take longer to start: "
                       "try again with a larger --ready-timeout")


FAILURE_POLL_S = 2.0


def serve_failure() -> str | None:
    """Why Serve gave up deploying the application (DEPLOY_FAILED: a deployment whose replicas fail to start,
    for example on a bad checkpoint), with the error's last line; None while it deploys or runs."""
    from ray import serve

    from .serve_config import APP_NAME

    try:
        app = serve.status().applications.get(APP_NAME)
    except Exception:  # the controller is busy or restarting: ask again later
        return None
    if app is None:
        return None
    failed = [(name, d.message) for name, d in app.deployments.items() if str(d.status).endswith("DEPLOY_FAILED")]
    if not failed and not str(app.status).endswith("DEPLOY_FAILED"):
        return None
    name, message = failed[0] if failed else ("the application", app.message)
    lines = [ln.strip() for ln in (message or "").splitlines() if ln.strip()]
    error = lines[-1] if lines else "no message"
    return f"{name} failed: {error} (the whole error is in Ray's logs, /tmp/ray/session_latest/logs/serve/)"


def _health_reason(body: str) -> str:
    try:
        data = json.loads(body)
    except ValueError:
        return body.strip()[:300]
    return str(data.get("reason") or data.get("status") or body)[:300] if isinstance(data, dict) else body[:300]


def curl_example(url: str, model: str, with_key: bool) -> str:
    body = {"model": model, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 16}
    auth = ' -H "Authorization: Bearer $KEY"' if with_key else ""
    return f"curl -s {url}/v1/chat/completions -H 'Content-Type: application/json'{auth} -d '{json.dumps(body)}'"


def _start_ray(detach: bool, num_cpus: int, env_vars: dict[str, str], metrics: int) -> None:
    import ray

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if detach:
        ray_bin = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))
        say(f"starting a background Ray head (GCS port {GCS_PORT}) ...")
        subprocess.run([ray_bin, "start", "--head", f"--port={GCS_PORT}", f"--num-cpus={num_cpus}",
                        f"--resources={json.dumps(CONTROL_RESOURCES)}",
                        f"--metrics-export-port={metrics}", "--include-dashboard=false", "--disable-usage-stats"], check=True,
                       stdout=subprocess.DEVNULL)
        ray.init(address=f"127.0.0.1:{GCS_PORT}", logging_level="WARNING", log_to_driver=False)
    else:
        say("starting a local Ray on CPU ...")
        ray.init(address="local", num_cpus=num_cpus, resources=CONTROL_RESOURCES, include_dashboard=False,
                 logging_level="WARNING", log_to_driver=False,
                 _metrics_export_port=metrics,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": os.environ["OMP_NUM_THREADS"], **env_vars}})


def cli_main(args: argparse.Namespace) -> int:
    if args.detach:
        # `ray start --head` enables token authentication; this driver must then send the token too
        # (read by Ray at import time, hence before importing it).
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    from pydantic import ValidationError

    from .app import deploy_local

    args.host = plain_host(args.host)
    if not args.ready_timeout > 0:  # NaN too
        say(f"error: --ready-timeout must be a positive number of seconds (got {args.ready_timeout:g})")
        return 2
    if problem := listen_error(args.host, args.port):
        say(f"error: {problem}")
        return 2
    try:
        overrides = read_overrides(args.config) if args.config else None
        model_arg = chosen_model(args.model, overrides, args.config)
    except ValueError as exc:
        say(f"error: {exc}")
        return 2
    if model_arg:
        model = Path(model_arg).expanduser()  # (`--model=~/ckpt` and a YAML `model_path: ~/ckpt` reach us unexpanded)
        if problem := checkpoint_config_error(model):
            say(f"error: {problem}")
            return 2
    else:
        from .model.tiny import ensure_tiny_checkpoint

        say(f"using the tiny built-in model in {TINY_MODEL_DIR}/ (written if missing)")
        try:
            model = ensure_tiny_checkpoint(TINY_MODEL_DIR)
        except OSError as exc:  # a read-only or full working directory (was a traceback)
            say(f"error: cannot write the tiny model to {Path(TINY_MODEL_DIR).resolve()}: {exc.strerror or exc}; "
                "run `dotsvlm serve` from a directory you can write to, or serve a checkpoint with --model DIR")
            return 1
    try:
        cfg = local_config(str(model.resolve()), overrides)
    except ValidationError as exc:
        say(f"error: {config_errors(exc, args.config)}")
        return 2
    except ValueError as exc:
        say(f"error: {exc}")
        return 2
    keys_env = cfg.api.api_keys_env
    with_key = bool(keys_env and os.environ.get(keys_env, "").strip())
    metrics = metrics_port()
    try:
        _start_ray(args.detach, metrics=metrics, num_cpus=max(4, os.cpu_count() or 1),
                   env_vars={keys_env: os.environ[keys_env]} if with_key and keys_env else {})
    except KeyboardInterrupt:  # (was a traceback; a `ray start --head` cut short may have left a head running)
        say("interrupted while Ray was starting: shutting down ...")
        _shutdown(args.detach)
        return 130
    except Exception as exc:  # noqa: BLE001 - Ray's own start-up errors, said plainly
        say(f"error: Ray did not start: {exc} (a very busy machine can make Ray's start-up time out: "
            "try again; with --detach, `ray stop` clears a half-started head)")
        return 1
    url = endpoint_url(args.host, args.port)
    try:
        with _terminate_raises_stopped():
            say(f"deploying the application (Ingress, VisionEncoder, TensorQueue, LLMServer) on "
                f"{args.host}:{args.port} ...")
            deploy_local(cfg, host=args.host, port=args.port)
            wait_healthy(url, timeout_s=args.ready_timeout, failure=serve_failure)
    except KeyboardInterrupt:
        say("interrupted while deploying: shutting down ...")
        _shutdown(args.detach)
        return 130
    except _Stopped as exc:  # SIGTERM (`kill`, `timeout`, a service manager); was "deployment failed: 15"
        say(f"stopped while deploying (signal {exc.signum}): shutting down ...")
        _shutdown(args.detach)
        return 128 + exc.signum
    except SystemExit as exc:  # a sys.exit() in what deploys, not a signal (it was reported as "signal <code>")
        code = exc.code if isinstance(exc.code, int) and exc.code != 0 else 1
        say(f"error: deployment failed: it called sys.exit({exc.code!r}): shutting down ...")
        _shutdown(args.detach)
        return code
    except BaseException as exc:
        say(f"error: deployment failed: {str(exc) or type(exc).__name__}")
        _shutdown(args.detach)
        return 1
    say(f"ready: OpenAI-compatible endpoint {url}/v1 (model {cfg.served_model_name!r})")
    if cfg.autoscaled():
        v, m = cfg.vision.autoscaling, cfg.llm.autoscaling
        say(f"autoscaling: vision {v.min_replicas}-{v.max_replicas} replicas, LLM {m.min_replicas}-{m.max_replicas}; "
            f"decisions at {url}/-/autoscaler")
    print(f"\n  {curl_example(url, cfg.served_model_name, with_key)}\n", flush=True)
    print(f"  Python: OpenAI(base_url='{url}/v1', api_key={'KEY' if with_key else repr('none')})\n", flush=True)
    say(f"metrics (Prometheus format): http://127.0.0.1:{metrics}/metrics (dotsvlm's are named ray_dotsvlm_*)")
    if with_key:
        say(f"API keys are on: KEY is one of the keys in ${keys_env}")
    if args.detach:
        say("running in the background; stop it with: ray stop")
        return 0
    say("press Ctrl-C to stop")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass
    say("shutting down ...")
    _shutdown(False)
    say("stopped")
    return 0


class _Stopped(BaseException):
    """SIGTERM arrived while deploying (a BaseException, as the SystemExit that Ray's handler raised)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"signal {signum}")
        self.signum = signum


@contextlib.contextmanager
def _terminate_raises_stopped() -> Iterator[None]:
    """While deploying, SIGTERM raises _Stopped instead of ray.init's sys.exit(15): only then is "stopped by a
    signal" what happened (a SystemExit alone cannot tell a signal from a sys.exit). The previous handler is put
    back after. Outside the main thread no handler can be set: SIGTERM keeps Ray's handling."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_stopped(signum: int, _frame: Any) -> None:
        raise _Stopped(signum)

    previous = signal.signal(signal.SIGTERM, raise_stopped)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _shutdown(detached: bool) -> None:
    """Stopping the local Ray stops every replica with it; a detached head is left running."""
    import ray

    ray.shutdown()
    if detached:
        say("the background Ray head is still running: stop it with `ray stop`")

