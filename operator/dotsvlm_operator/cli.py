"""The `dotsvlm` command. Each subcommand's work lives in its own module, imported only when used,
so that the operator image (no torch) can run `dotsvlm operator` and `dotsvlm crd`."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable


def _lazy(module: str, func: str, extra: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name and (exc.name == module or module.startswith(exc.name + ".")):
                print(f"dotsvlm: '{args.command}' is not built yet in this version ({module} is missing).",
                      file=sys.stderr)
            else:
                print(f"dotsvlm: '{args.command}' needs the Python package '{exc.name}', which is not installed.\n"
                      f"Install the extra: pip install 'dotsvlm[{extra}]'", file=sys.stderr)
            return 2
        return int(getattr(mod, func)(args) or 0)

    return run


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dotsvlm", description="Serve dots.vlm1 on Kubernetes and Ray Serve.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    crd = sub.add_parser("crd", help="print the DotsVLMDeployment CustomResourceDefinition (YAML)")
    crd.set_defaults(func=_lazy("dotsvlm_operator.crd", "cli_main", "operator"))

    op = sub.add_parser("operator", help="run the Kubernetes operator (kopf)")
    op.add_argument("--namespace", action="append", default=[], help="watch only this namespace (repeatable); default: all")
    op.add_argument("--log-format", choices=["plain", "json"], default="plain")
    op.add_argument("--peering", default=None, help="kopf peering name, for several operator replicas")
    op.add_argument("--verbose", action="store_true")
    op.add_argument("--priority", type=int, default=None,
                    help="peering priority (default: random); with --peering, the replica with the highest priority works")
    op.add_argument("--resync-seconds", type=float, default=60.0,
                    help="re-check every resource at least this often (drift, pod states, Serve status)")
    op.add_argument("--ray-head-url-override", default=None,
                    help="TEST/DEV ONLY: reach every deployment's Ray dashboard at this URL ({name}, {namespace} "
                         "are filled in) instead of http://<name>-ray-head.<ns>.svc:8265; env DOTSVLM_RAY_HEAD_URL_OVERRIDE")
    op.add_argument("--pod-loop-seconds", type=float, default=5.0,
                    help="how often each resource's pod loop reads Serve's targets and sizes the pools' pods")
    op.add_argument("--api-url-override", default=None,
                    help="TEST/DEV ONLY: read the ingress's /-/autoscaler report at this base URL ({name}, {namespace} "
                         "are filled in) instead of http://<name>-api.<ns>.svc:<api.port>; env DOTSVLM_API_URL_OVERRIDE")
    op.add_argument("--operator-namespace", default=None,
                    help="the namespace the operator runs in (default: $POD_NAMESPACE, else its service account's); "
                         "each deployment's NetworkPolicy admits the operator's pods from this namespace only")
    op.add_argument("--liveness", default=None, help="kopf liveness endpoint, e.g. http://0.0.0.0:8080/healthz")
    op.add_argument("--metrics-port", type=int, default=None,
                    help="serve the operator's Prometheus metrics on this port at /metrics (default: "
                         "$DOTSVLM_OPERATOR_METRICS_PORT, else off)")
    op.set_defaults(func=_lazy("dotsvlm_operator.main", "cli_main", "operator"))

    serve = sub.add_parser("serve", help="run the serving stack on a local Ray with the tiny built-in model (CPU)")
    serve.add_argument("--model", default=None, help="checkpoint directory (default: write the tiny model to .tiny-model/)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--detach", action="store_true", help="deploy and return instead of waiting for Ctrl-C")
    serve.add_argument("--config", default=None, metavar="FILE",
                       help="YAML/JSON with Serve config fields merged over the local defaults, e.g. "
                            "{vision: {autoscaling: {min_replicas: 0, max_replicas: 2}}} (see docs/autoscaling.md)")
    serve.add_argument("--ready-timeout", type=float, default=600.0, metavar="SECONDS",
                       help="how long to wait for every deployment to be ready (default 600; a busy or slow "
                            "machine, or a large checkpoint, may need more)")
    serve.set_defaults(func=_lazy("dotsvlm_serving.embedded", "cli_main", "serving"))

    drain = sub.add_parser("drain-node", help=(
        "drain this Ray node before its pod stops (the pool pods' preStop hook): Ray Serve moves its replicas "
        "away and they finish their requests; waits until the node has left or the deadline"))
    _stop_hook_arguments(drain)
    drain.add_argument("--node-ip", default=None, help="the node's IP (default: $DOTSVLM_POD_IP, else this host's)")
    drain.add_argument("--node-id", default=None, help="the node's hex id (instead of --node-ip)")
    drain.add_argument("--reason", default=None, help="why, for Ray's logs")
    drain.set_defaults(func=_lazy("dotsvlm_serving.node_drain", "cli_main", "serving"))

    head = sub.add_parser("drain-head", help=(
        "drain the API before the Ray head stops (the head pod's preStop hook): new requests get 503 with "
        "Retry-After, the open ones finish; waits until none is open or the deadline"))
    _stop_hook_arguments(head)
    head.add_argument("--retry-after-seconds", type=int, default=60,
                      help="the Retry-After that refused requests get (about how long the head takes to come back)")
    head.set_defaults(func=_lazy("dotsvlm_serving.head_drain", "cli_main", "serving"))

    check = sub.add_parser("check-redis", help=(
        "check that the Ray head can use the external Redis of spec.head.gcsFaultTolerance (the head pod's init "
        "container); on failure the last line says what to fix. The password comes from $DOTSVLM_REDIS_PASSWORD"))
    check.add_argument("--address", default=None, help="Redis host:port (default: $RAY_REDIS_ADDRESS)")
    check.set_defaults(func=_lazy("dotsvlm_serving.redis_state", "check_main", "serving"))

    redis = sub.add_parser("cleanup-redis", help=(
        "remove a deleted deployment's Ray state from the external Redis of spec.head.gcsFaultTolerance (the "
        "operator runs it in a Job when the resource is deleted); the password comes from $DOTSVLM_REDIS_PASSWORD"))
    redis.add_argument("--address", default=None, help="Redis host:port (default: $RAY_REDIS_ADDRESS)")
    redis.add_argument("--storage-namespace", default=None,
                       help="the deployment's storage namespace (default: $RAY_external_storage_namespace)")
    redis.set_defaults(func=_lazy("dotsvlm_serving.redis_state", "cleanup_main", "serving"))

    model = sub.add_parser("model", help="model utilities")
    msub = model.add_subparsers(dest="model_command", required=True, metavar="MODEL_COMMAND")
    tiny = msub.add_parser("init-tiny", help="write a tiny dots.vlm1-architecture checkpoint with seeded random weights")
    tiny.add_argument("dir")
    tiny.add_argument("--seed", type=_seed, default=0, help="the weights' random seed (the same seed writes the same files)")
    tiny.add_argument("--fp8", action="store_true", help="store LLM linear weights as FP8 with 128x128 block scales")
    tiny.add_argument("--force", action="store_true", help="overwrite a non-empty directory")
    tiny.set_defaults(func=_lazy("dotsvlm_serving.model.tiny", "cli_main", "serving"))
    return p


def _seed(text: str) -> int:
    """A seed torch's generator takes (an unsigned 64-bit integer): a larger one was a traceback after the
    directory was made. A negative one is refused too, as the message says: torch takes -n as 2^64-n, so it
    wrote the same weights as that other seed."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 0 <= n < 2**64:
        raise argparse.ArgumentTypeError(f"{n} is out of range: a seed is a 64-bit integer (0 to {2**64 - 1})")
    return n


def _stop_hook_arguments(parser: argparse.ArgumentParser) -> None:
    """What both preStop hooks (drain-node, drain-head) need: the Ray head and when the pod is killed."""
    parser.add_argument("--address", default=None, help="the Ray head's GCS, host:port (default: $RAY_ADDRESS)")
    parser.add_argument("--deadline-seconds", type=float, required=True,
                        help="when the pod will be killed, from now (its termination grace period, less a margin)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
