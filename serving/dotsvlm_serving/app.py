"""The Serve application builder: `dotsvlm_serving.app:build_app` (the operator's import path).

    Ingress (OpenAI API) -> VisionEncoder [vision pool] -> TensorQueue -> LLMServer [llm pool]

`args` is a `ServeAppConfig`, validated here once. Every deployment is bound to the model it serves
(`ServedModel`) and the handles it calls; its own slice of the config is its Serve `user_config`,
which its `reconfigure` validates and applies. The Serve options that follow from the config (slice,
replicas or autoscaling, GPUs, pool resource, the control resource of the Ingress and TensorQueue,
placement group) come from
`ServeAppConfig.deployment_options()`, the same options the operator's deploy body sends, so that Ray
versions each deployment by its own options (docs/serving.md, "What a change restarts"). Options about
a deployment's code (concurrency, graceful shutdown) are stated beside it in `deployments/`.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from ray.serve import Application

from .serve_config import (INGRESS_DEPLOYMENT, LLM_DEPLOYMENT, QUEUE_DEPLOYMENT, VISION_DEPLOYMENT, ServeAppConfig)


def parse_config(args: dict[str, Any]) -> ServeAppConfig:
    try:
        return ServeAppConfig.model_validate(args)
    except ValidationError as exc:
        raise ValueError(f"invalid dotsvlm serve config: {exc}") from None


def deploy_local(cfg: ServeAppConfig, *, host: str, port: int) -> None:
    """Deploy the application on the Ray this process is connected to the way the operator does: as a
    Serve config (what `PUT /api/serve/applications/` takes), so that dotsvlm's autoscaling policy is
    the application's policy (for fixed pools too; `serve.run` cannot install an application-level
    policy) and a later config changes only the deployments it concerns. Uses the Serve client call
    behind that REST endpoint: no dashboard needed."""
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    serve.start(http_options={"host": host, "port": port})
    body = cfg.deploy_body(http_port=port, http_host=host)
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(body))


def build_app(args: dict[str, Any]) -> Application:
    """The application for `args`: a whole `ServeAppConfig` (`serve.run`), or only its model fields (the
    deploy body's `args`; the deployments' options then come from the body)."""
    from .deployments.ingress import IngressDeployment
    from .deployments.llm import LLMServerDeployment
    from .deployments.queue import TensorQueueDeployment
    from .deployments.vision_encoder import VisionEncoderDeployment

    cfg = parse_config(args)
    model = cfg.served_model()
    opts = cfg.deployment_options()
    queue = TensorQueueDeployment.options(**opts[QUEUE_DEPLOYMENT]).bind()
    vision = VisionEncoderDeployment.options(**opts[VISION_DEPLOYMENT]).bind(model)
    llm = LLMServerDeployment.options(**opts[LLM_DEPLOYMENT]).bind(model, queue)
    return IngressDeployment.options(**opts[INGRESS_DEPLOYMENT]).bind(model, vision, queue, llm)
