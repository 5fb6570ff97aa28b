"""The Serve application builder: `dotsvlm_serving.app:build_app` (the operator's import path).

    Ingress (OpenAI API) -> VisionEncoder [vision pool] -> TensorQueue -> LLMServer [llm pool]

`args` is a `ServeAppConfig` (validated here, once: each deployment receives the typed config, the
tensor queue its own `QueueConfig`). Each deployment states its own Serve options (name, concurrency,
graceful shutdown) next to its code in `deployments/`; this module adds what follows from the pool
config: replica counts or autoscaling, GPUs, the pool's Ray custom resource when `pool_resource` is
set (pool workers advertise it), and the LLM replica's placement group; locally nothing is pinned.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from ray.serve import Application

from .serve_config import AutoscalingTargets, LLMPoolConfig, ServeAppConfig


def autoscaling(t: AutoscalingTargets) -> dict[str, Any]:
    cfg: dict[str, Any] = {"min_replicas": t.min_replicas, "max_replicas": t.max_replicas,
                           "target_ongoing_requests": t.target_ongoing_requests,
                           "upscale_delay_s": t.upscale_delay_s, "downscale_delay_s": t.downscale_delay_s}
    if t.initial_replicas is not None:
        cfg["initial_replicas"] = t.initial_replicas
    return cfg


def replica_options(t: AutoscalingTargets) -> dict[str, Any]:
    """A fixed count when min == max (no autoscaler needed), else Serve autoscaling."""
    if t.min_replicas == t.max_replicas:
        return {"num_replicas": t.max_replicas}
    return {"autoscaling_config": autoscaling(t)}


def actor_options(*, num_gpus: float, pool_resource: str | None, num_cpus: float) -> dict[str, Any]:
    opts: dict[str, Any] = {"num_cpus": num_cpus}
    if num_gpus:
        opts["num_gpus"] = num_gpus
    if pool_resource:
        opts["resources"] = {pool_resource: 1}
    return opts


def llm_placement(llm: LLMPoolConfig, *, num_cpus: float) -> dict[str, Any]:
    """Serve options that reserve one LLM replica's GPUs.

    A replica that spans several nodes (tensor parallel 16 over two 8-GPU nodes) cannot be one actor
    asking for 16 GPUs: no node has them. It is a placement group of one bundle per node, spread over
    distinct nodes, each holding that node's GPUs and one unit of the pool resource; the replica actor
    itself runs in the first bundle, and the other bundles hold the GPUs its other tensor-parallel ranks use.
    """
    if llm.nodes_per_replica == 1 or not llm.gpus_per_replica:
        return {"ray_actor_options": actor_options(num_gpus=llm.gpus_per_replica, pool_resource=llm.pool_resource,
                                                   num_cpus=num_cpus)}
    per_node = llm.gpus_per_replica / llm.nodes_per_replica
    first = actor_options(num_gpus=per_node, pool_resource=llm.pool_resource, num_cpus=num_cpus)
    bundle = {"GPU": per_node, **({llm.pool_resource: 1} if llm.pool_resource else {})}
    first_bundle = {**bundle, **({"CPU": num_cpus} if num_cpus else {})}
    return {"ray_actor_options": first,
            "placement_group_bundles": [first_bundle] + [dict(bundle) for _ in range(llm.nodes_per_replica - 1)],
            "placement_group_strategy": "STRICT_SPREAD"}


def parse_config(args: dict[str, Any]) -> ServeAppConfig:
    try:
        return ServeAppConfig.model_validate(args)
    except ValidationError as exc:
        raise ValueError(f"invalid dotsvlm serve config: {exc}") from None


def build_app(args: dict[str, Any]) -> Application:
    from .deployments.ingress import IngressDeployment
    from .deployments.llm import LLMServerDeployment
    from .deployments.queue import TensorQueueDeployment
    from .deployments.vision_encoder import VisionEncoderDeployment

    cfg = parse_config(args)
    cpu_share = 0.0 if cfg.device == "cpu" else 1.0  # on CPU, do not let Ray's CPU accounting block replicas
    queue = TensorQueueDeployment.bind(cfg.queue)
    vision = VisionEncoderDeployment.options(
        **replica_options(cfg.vision.autoscaling),
        ray_actor_options=actor_options(num_gpus=cfg.vision.gpus_per_replica, pool_resource=cfg.vision.pool_resource,
                                        num_cpus=cpu_share)).bind(cfg)
    llm = LLMServerDeployment.options(**replica_options(cfg.llm.autoscaling),
                                      **llm_placement(cfg.llm, num_cpus=cpu_share)).bind(cfg, queue)
    return IngressDeployment.bind(cfg, vision, queue, llm)
