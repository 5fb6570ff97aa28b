"""The Serve application builder: `dotsvlm_serving.app:build_app` (the operator's import path).

    Ingress (OpenAI API) -> VisionEncoder [vision pool] -> TensorQueue -> LLMServer [llm pool]

`args` is a `ServeAppConfig` (validated here, once: each deployment receives the typed config, the
tensor queue its own `QueueConfig`). Each deployment states its own Serve options (name, concurrency,
graceful shutdown) next to its code in `deployments/`; this module adds what follows from the pool
config: replica counts or autoscaling, GPUs, the pool's Ray custom resource when `pool_resource` is
set (pool workers advertise it), the control resource for the Ingress and TensorQueue when
`control_resource` is set (the Ray head advertises it), and the LLM replica's placement group.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from ray.serve import Application

from .serve_config import AutoscalingTargets, LLMPoolConfig, ServeAppConfig, serve_deploy_body

# Replicas record their autoscaling stats every look_back_period_s * 0.2 s and push them to Serve's
# controller every RAY_SERVE_*_AUTOSCALING_METRIC_PUSH_INTERVAL_S (10 s by default: too slow for a pool
# that wakes from zero). dotsvlm's policy keeps its own windows, so Serve's delays are zero.
LOOK_BACK_PERIOD_S = 10.5  # > Serve's (deprecated) metrics_interval_s of 10 s; records every 2.1 s
METRICS_PUSH_ENV = {"RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1",
                    "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1"}
SINGLE = AutoscalingTargets(min_replicas=1, max_replicas=1)


def autoscaling(t: AutoscalingTargets) -> dict[str, Any]:
    """Serve's autoscaling config for a deployment that dotsvlm's application-level policy sizes: Serve
    applies the bounds; the policy (autoscaling/policy.py) applies the targets, windows and steps."""
    cfg: dict[str, Any] = {"min_replicas": t.min_replicas, "max_replicas": t.max_replicas,
                           "target_ongoing_requests": t.target_ongoing_requests,
                           "upscale_delay_s": 0.0, "downscale_delay_s": 0.0, "look_back_period_s": LOOK_BACK_PERIOD_S}
    if t.initial_replicas is not None:
        cfg["initial_replicas"] = t.initial_replicas
    return cfg


def replica_options(t: AutoscalingTargets, autoscaled: bool) -> dict[str, Any]:
    """With the policy on, every deployment gets an autoscaling config (fixed ones with min == max), so
    that each replica's `record_autoscaling_stats` reaches the policy; without it, a fixed count."""
    if not autoscaled:
        return {"num_replicas": t.max_replicas}
    return {"autoscaling_config": autoscaling(t)}


def with_metrics_env(opts: dict[str, Any], autoscaled: bool) -> dict[str, Any]:
    """Replica actor options that make the replicas report to the policy every second."""
    return {**opts, "runtime_env": {"env_vars": dict(METRICS_PUSH_ENV)}} if autoscaled else opts


def actor_options(*, num_gpus: float, pool_resource: str | None, num_cpus: float) -> dict[str, Any]:
    opts: dict[str, Any] = {"num_cpus": num_cpus}
    if num_gpus:
        opts["num_gpus"] = num_gpus
    if pool_resource:
        opts["resources"] = {pool_resource: 1}
    return opts


def control_options(opts: dict[str, Any] | None, control_resource: str | None) -> dict[str, Any]:
    """The Ingress's and TensorQueue's actor options, pinned (one unit of `control_resource`) to the nodes
    that advertise it, the Ray head, where GPU-pool churn (scale-down, rollout, node drain) cannot
    take them down; unpinned when None (a local Ray)."""
    out = dict(opts or {})
    if control_resource:
        out["resources"] = {**out.get("resources", {}), control_resource: 1}
    return out


def llm_placement(llm: LLMPoolConfig, *, num_cpus: float) -> dict[str, Any]:
    """Serve options that reserve one LLM replica's GPUs.

    A replica on one device (the transformers engine, or vllm on one GPU) is a plain actor holding it.
    A vllm replica over several GPUs (tensor parallel 16 over two 8-GPU nodes) cannot be one actor
    asking for 16 GPUs: no node has them, and vLLM's Ray executor starts one worker per GPU in the
    placement group it runs in, taking only bundles of one GPU. So it is a placement group: a first
    bundle for the replica actor (CPU and the pool resource, no GPU: the engine's workers hold them),
    then one bundle per GPU, each with a unit of the pool resource so it lands in the pool; on one node
    packed strictly on it, over several nodes packed onto as few nodes as hold them.
    """
    gpus = int(llm.gpus_per_replica)
    if llm.engine != "vllm" or gpus <= 1:
        return {"ray_actor_options": actor_options(num_gpus=llm.gpus_per_replica, pool_resource=llm.pool_resource,
                                                   num_cpus=num_cpus)}
    pool = {llm.pool_resource: 1} if llm.pool_resource else {}
    first = {**({"CPU": num_cpus} if num_cpus else {}), **pool} or {"CPU": 0.001}
    return {"ray_actor_options": actor_options(num_gpus=0, pool_resource=llm.pool_resource, num_cpus=num_cpus),
            "placement_group_bundles": [first] + [{"GPU": 1, **pool} for _ in range(gpus)],
            "placement_group_strategy": "STRICT_PACK" if llm.nodes_per_replica == 1 else "PACK"}


def parse_config(args: dict[str, Any]) -> ServeAppConfig:
    try:
        return ServeAppConfig.model_validate(args)
    except ValidationError as exc:
        raise ValueError(f"invalid dotsvlm serve config: {exc}") from None


def deploy_local(cfg: ServeAppConfig, *, host: str, port: int) -> None:
    """Deploy the application on the Ray this process is connected to the way the operator does: as a
    Serve config (what `PUT /api/serve/applications/` takes), so that dotsvlm's autoscaling policy is
    the application's policy when a pool autoscales (`serve.run` cannot install an application-level
    policy). Uses the Serve client call behind that REST endpoint: no dashboard needed."""
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    serve.start(http_options={"host": host, "port": port})
    body = serve_deploy_body(cfg, http_port=port, http_host=host)
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(body))


def build_app(args: dict[str, Any]) -> Application:
    from .deployments.ingress import IngressDeployment
    from .deployments.llm import LLMServerDeployment
    from .deployments.queue import TensorQueueDeployment
    from .deployments.vision_encoder import VisionEncoderDeployment

    cfg = parse_config(args)
    cpu_share = 0.0 if cfg.device == "cpu" else 1.0  # on CPU, do not let Ray's CPU accounting block replicas
    auto = cfg.autoscaled()
    queue = TensorQueueDeployment.options(
        **replica_options(SINGLE, auto),
        ray_actor_options=with_metrics_env(control_options(TensorQueueDeployment.ray_actor_options,
                                                           cfg.control_resource), auto)).bind(cfg.queue)
    vision = VisionEncoderDeployment.options(
        **replica_options(cfg.vision.autoscaling, auto),
        ray_actor_options=with_metrics_env(actor_options(
            num_gpus=cfg.vision.gpus_per_replica, pool_resource=cfg.vision.pool_resource, num_cpus=cpu_share), auto)
    ).bind(cfg)
    llm_opts = llm_placement(cfg.llm, num_cpus=cpu_share)
    llm_opts["ray_actor_options"] = with_metrics_env(llm_opts["ray_actor_options"], auto)
    llm = LLMServerDeployment.options(**replica_options(cfg.llm.autoscaling, auto), **llm_opts).bind(cfg, queue)
    n = cfg.api.ingress_replicas
    ingress = IngressDeployment.options(
        **replica_options(AutoscalingTargets(min_replicas=n, max_replicas=n), auto),
        ray_actor_options=with_metrics_env(control_options(IngressDeployment.ray_actor_options,
                                                           cfg.control_resource), auto))
    return ingress.bind(cfg, vision, queue, llm)
