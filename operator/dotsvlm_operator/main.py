"""`dotsvlm operator`: run the kopf operator that reconciles DotsVLMDeployments."""

from __future__ import annotations

import argparse
import logging
import os
import random

import kopf

METRICS_PORT_ENV = "DOTSVLM_OPERATOR_METRICS_PORT"


class _QuietHandlers(logging.Filter):
    """Drop kopf's per-event "Handler 'child-pods' succeeded." lines: one per pod event is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not (record.levelno <= logging.INFO and msg.startswith("Handler '")
                    and (msg.startswith("Handler 'child-") or msg.startswith("Handler 'on_resource_event'")))


def cli_main(args: argparse.Namespace) -> int:
    from dotsvlm_operator import handlers  # registers the handlers
    from dotsvlm_operator import kube

    log_format = kopf.LogFormat.JSON if args.log_format == "json" else kopf.LogFormat.FULL
    kopf.configure(verbose=args.verbose, log_format=log_format, log_refkey="object" if args.log_format == "json" else None)
    if not args.verbose:
        logging.getLogger("kubernetes").setLevel(logging.WARNING)
        logging.getLogger("httpx").setLevel(logging.WARNING)

    logging.getLogger("kopf.objects").addFilter(_QuietHandlers())

    cfg = handlers.CONFIG
    if getattr(args, "ray_head_url_override", None):
        cfg.head_url_override = args.ray_head_url_override
    if getattr(args, "api_url_override", None):
        cfg.api_url_override = args.api_url_override
    if getattr(args, "operator_namespace", None):
        cfg.operator_namespace = args.operator_namespace
    cfg.resync_seconds = getattr(args, "resync_seconds", None) or cfg.resync_seconds
    cfg.pod_loop_seconds = getattr(args, "pod_loop_seconds", None) or cfg.pod_loop_seconds
    # Peered replicas need distinct priorities: the highest works, the others stand by (equal
    # priorities would make kopf pause all of them).
    cfg.priority = args.priority if getattr(args, "priority", None) is not None else random.randint(1, 1_000_000)
    if cfg.head_url_override:
        logging.getLogger(__name__).warning(
            f"test/dev setting: every deployment's Ray head is reached at {cfg.head_url_override}")
    if cfg.api_url_override:
        logging.getLogger(__name__).warning(
            f"test/dev setting: every deployment's autoscaler report is read at {cfg.api_url_override}")

    port = getattr(args, "metrics_port", None) or int(os.environ.get(METRICS_PORT_ENV) or 0)
    if port:
        from dotsvlm_operator.monitoring.operator_metrics import METRICS

        METRICS.serve(port)
        logging.getLogger(__name__).info(f"operator metrics on :{port}/metrics")

    kube.load_config()
    namespaces = list(args.namespace or [])
    liveness = getattr(args, "liveness", None)
    kopf.run(
        standalone=args.peering is None,
        peering_name=args.peering,
        priority=cfg.priority,
        namespaces=namespaces,
        clusterwide=not namespaces,
        liveness_endpoint=liveness,
        identity=os.environ.get("POD_NAME") or None,
    )
    return 0
