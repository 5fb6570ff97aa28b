"""The spec -> `ServeAppConfig` mapping: what the operator deploys to the Ray head.

The Serve application's config is not in any pod template: the operator renders it here from the
DotsVLMDeployment's spec (into the contract, `dotsvlm_serving.serve_config`) and sends it through the
head's REST API; `builders` also writes it into a ConfigMap for people to read.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from dotsvlm_serving import serve_config

from dotsvlm_operator import models

# spec.queue.embeddingTransport -> the serving config's name for it
EMBEDDING_TRANSPORT: dict[str, serve_config.EmbeddingTransport] = {"ObjectStore": "object-store", "NIXL": "nixl"}


def _common(auto: models.Autoscaling, lo: int, hi: int) -> dict[str, Any]:
    out = dict(min_replicas=lo, max_replicas=hi, upscale_delay_s=auto.upscale_delay_seconds,
               downscale_delay_s=auto.downscale_delay_seconds, max_scale_up_step=auto.max_scale_up_step,
               max_scale_down_step=auto.max_scale_down_step, scale_down_interval_s=auto.scale_down_interval_seconds,
               metrics_stale_s=auto.metrics_stale_seconds, replica_startup_s=auto.replica_startup_seconds)
    if auto.target_ongoing_requests is not None:  # the LLM pool's default follows maxRunningRequests
        out["target_ongoing_requests"] = auto.target_ongoing_requests
    return out


def vision_autoscaling(pool: models.VisionPool) -> serve_config.VisionAutoscaling:
    a = pool.autoscaling
    return serve_config.VisionAutoscaling(**_common(a, pool.min_replicas, pool.max_replicas),
                                          encode_budget_fraction=a.encode_budget_fraction,
                                          encode_utilization=a.encode_utilization,
                                          idle_to_zero_s=a.idle_to_zero_seconds)


def llm_autoscaling(pool: models.LLMPool) -> serve_config.LLMAutoscaling:
    a = pool.autoscaling
    return serve_config.LLMAutoscaling(**_common(a, pool.min_replicas, pool.max_replicas),
                                       queue_age_fraction=a.queue_age_fraction, kv_cache_target=a.kv_cache_target,
                                       vision_lead_weight=a.vision_lead_weight)


def slo(spec: models.SLOSpec) -> serve_config.SLOConfig:
    return serve_config.SLOConfig(image_ttft_s=spec.image_ttft_seconds, text_ttft_s=spec.text_ttft_seconds,
                                  inter_token_s=spec.inter_token_seconds)


def encode_budget_seconds(spec: models.DotsVLMDeploymentSpec) -> float:
    """The vision stage's p90 budget the deployment's autoscaler scales against (its EncodeLatency rule), for the
    operator's metric and its alert rule: the same function of the same settings."""
    return vision_autoscaling(spec.vision).encode_budget_s(slo(spec.slo))


def app_config(spec: models.DotsVLMDeploymentSpec) -> serve_config.ServeAppConfig:
    """The application's args (the contract in dotsvlm_serving.serve_config), rendered from the spec."""
    gpu = spec.llm.gpus_per_replica > 0 or spec.vision.gpus_per_replica > 0
    return serve_config.ServeAppConfig(
        model_path=spec.model.path,
        served_model_name=spec.model.served_name,
        device="cuda" if gpu else "cpu",
        dtype=spec.model.dtype,
        vision=serve_config.VisionPoolConfig(
            gpus_per_replica=spec.vision.gpus_per_replica,
            pool_resource=serve_config.VISION_POOL_RESOURCE,
            max_batch_pixels=spec.vision.max_batch_pixels,
            max_batch_wait_ms=spec.vision.max_batch_wait_ms,
            max_pending_pixels_per_replica=spec.vision.max_pending_pixels_per_replica,
            max_pending_pixels=spec.vision.max_pending_pixels,
            autoscaling=vision_autoscaling(spec.vision),
        ),
        llm=serve_config.LLMPoolConfig(
            engine=spec.llm.engine,
            gpus_per_replica=spec.llm.gpus_per_replica,
            tensor_parallel=spec.llm.tensor_parallel,
            nodes_per_replica=spec.llm.nodes_per_replica,
            pool_resource=serve_config.LLM_POOL_RESOURCE,
            context_length=spec.llm.context_length,
            max_running_requests=spec.llm.max_running_requests,
            max_new_tokens_default=spec.llm.max_new_tokens_default,
            memory_fraction=spec.llm.memory_fraction,
            cuda_graph_max_batch_size=spec.llm.cuda_graph_max_batch_size,
            chunked_prefill=spec.llm.chunked_prefill,
            max_prefill_tokens=spec.llm.max_prefill_tokens,
            drain_timeout_s=spec.llm.drain_timeout_seconds,
            autoscaling=llm_autoscaling(spec.llm),
        ),
        queue=serve_config.QueueConfig(
            max_items=spec.queue.max_items, max_bytes=spec.queue.max_bytes,
            enqueue_timeout_s=spec.queue.enqueue_timeout_seconds, lease_timeout_s=spec.queue.lease_timeout_seconds,
            max_deliveries=spec.queue.max_deliveries,
            embedding_transport=EMBEDDING_TRANSPORT[spec.queue.embedding_transport]),
        api=serve_config.ApiConfig(
            api_keys_env=serve_config.API_KEYS_ENV if spec.api.api_key_secret_ref else None,
            request_timeout_s=spec.api.request_timeout_seconds,
            max_image_bytes_in_flight=spec.api.max_image_bytes_in_flight,
            # One Ingress replica per API pod (Serve spreads them over the pods), or one on the head.
            ingress_replicas=spec.api_pool.replicas if spec.api_pool is not None else 1),
        slo=slo(spec.slo),
        control_resource=serve_config.CONTROL_RESOURCE,
    )


def deploy_body(spec: models.DotsVLMDeploymentSpec) -> dict[str, Any]:
    """The body of `PUT /api/serve/applications/` for this spec: the model as the application's args and
    each deployment's own options (`ServeAppConfig.deploy_body`), so that Ray restarts only the
    deployments whose options a spec change touches (docs/operator.md, "What a change restarts")."""
    return app_config(spec).deploy_body(http_port=spec.api.port)


def body_hash(body: dict[str, Any]) -> str:
    """What status records as deployed (`serveApp.configHash`): the operator redeploys when it changes."""
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]
