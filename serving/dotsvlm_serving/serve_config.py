"""The contract between the operator and the serving application.

The operator renders a `ServeAppConfig` from a DotsVLMDeployment's spec and deploys it through the
Ray head's REST API (`PUT /api/serve/applications/`) as the application's `args`; the Serve app
builder validates the same model. This module must not import torch or ray, so that the operator
image (no torch) can import it.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Ray custom resources advertised by the pool workers; Serve replicas ask for one unit so they land in
# their own pool. Workers advertise POOL_RESOURCE_CAPACITY units so the custom resource never limits
# how many replicas fit on a node (GPUs do that).
VISION_POOL_RESOURCE = "dotsvlm_pool_vision"
LLM_POOL_RESOURCE = "dotsvlm_pool_llm"
POOL_RESOURCE_CAPACITY = 1000
# Ray custom resource of the nodes that GPU-pool churn cannot take down (the Ray head; `dotsvlm serve`'s
# local Ray): the Ingress and TensorQueue replicas ask for one unit each, so Ray places them there and
# never on a pool pod that a scale-down, rollout or node drain removes. Capacity as for the pools.
CONTROL_RESOURCE = "dotsvlm_control"
CONTROL_RESOURCE_CAPACITY = 1000

APP_NAME = "dotsvlm"
APP_IMPORT_PATH = "dotsvlm_serving.app:build_app"
# The application's Serve deployments (the operator reads their replica targets from the head).
INGRESS_DEPLOYMENT = "Ingress"
VISION_DEPLOYMENT = "VisionEncoder"
QUEUE_DEPLOYMENT = "TensorQueue"
LLM_DEPLOYMENT = "LLMServer"
# dotsvlm's autoscaling policy, installed as the application's Serve autoscaling policy.
AUTOSCALING_POLICY_PATH = "dotsvlm_serving.autoscaling.serve_policy:DotsVLMAutoscalingPolicy"
# Environment variable that holds the comma-separated API keys (the operator fills it from a Secret).
API_KEYS_ENV = "DOTSVLM_API_KEYS"
# An LLM replica told to stop (scale-down, rollout, its node draining) finishes its running requests for
# up to its drain timeout (`LLMPoolConfig.drain_timeout_s`, default LLM_DRAIN_TIMEOUT_S) and hands the rest
# back to the queue; Serve waits LLM_SHUTDOWN_MARGIN_S longer for it (time to deliver the last events and
# leave the queue). The operator keeps the LLM pods' termination grace period above that.
LLM_DRAIN_TIMEOUT_S = 50.0
LLM_SHUTDOWN_MARGIN_S = 10.0
LLM_GRACEFUL_SHUTDOWN_TIMEOUT_S = LLM_DRAIN_TIMEOUT_S + LLM_SHUTDOWN_MARGIN_S
# The tensor queue's replica, stopping, may wait for its replacement and hand its state over
# (deployments/queue.py): Serve must not kill it before, nor an API pod's grace period end.
QUEUE_GRACEFUL_SHUTDOWN_TIMEOUT_S = 45.0


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SLOConfig(_Strict):
    """Service levels per modality: the autoscaling policy scales against them, the status reports on them."""

    image_ttft_s: float = Field(10.0, gt=0, description="time to first token of a request with images")
    text_ttft_s: float = Field(2.0, gt=0, description="time to first token of a text-only request")
    inter_token_s: float = Field(0.2, gt=0, description="time between two generated tokens")


# The pool fields that Serve's own per-deployment AutoscalingConfig has, with the same meaning: they travel
# in the deployment's `autoscaling_config` (Serve applies the bounds; the policy reads them all from its
# context's `ctx.config`). Every other knob, and the SLO, travel in the Ingress's slice
# (`AutoscalingPolicyConfig`). Why the split: "Where the autoscaling settings travel" in docs/autoscaling.md.
SERVE_AUTOSCALING_FIELDS = frozenset({"min_replicas", "max_replicas", "initial_replicas", "target_ongoing_requests"})


class AutoscalingTargets(_Strict):
    """One pool's replica bounds (Ray Serve applies them) and the knobs of dotsvlm's autoscaling policy
    (`dotsvlm_serving.autoscaling.policy`), which Serve calls as the application's autoscaling policy."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    initial_replicas: int | None = Field(None, ge=0)
    # vision: image requests in the vision stage per replica (until an encode rate is measured); llm: running +
    # waiting + queued requests per replica.
    target_ongoing_requests: float = Field(4.0, gt=0)
    upscale_delay_s: float = Field(10.0, ge=0)
    downscale_delay_s: float = Field(120.0, ge=0)
    max_scale_up_step: int = Field(4, ge=1)
    max_scale_down_step: int = Field(1, ge=1)
    scale_down_interval_s: float = Field(30.0, ge=0)
    # Signals older than this hold the pool at its size (the status says so).
    metrics_stale_s: float = Field(30.0, gt=0)
    # How long a new replica takes to serve (start, load weights). The LLM pool scales for the demand
    # its recent trend predicts this far ahead; no pool cancels replicas asked for less than this ago
    # that are still starting.
    replica_startup_s: float = Field(60.0, ge=0)

    @model_validator(mode="after")
    def _bounds(self) -> "AutoscalingTargets":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) must be <= max_replicas ({self.max_replicas})")
        if self.initial_replicas is not None and not (self.min_replicas <= self.initial_replicas <= self.max_replicas):
            raise ValueError("initial_replicas must lie between min_replicas and max_replicas")
        return self

    def policy_knobs(self) -> dict[str, Any]:
        """The knobs only dotsvlm's policy reads (windows, steps, signal weights): all but Serve's fields."""
        return self.model_dump(mode="json", exclude=set(SERVE_AUTOSCALING_FIELDS))

    @classmethod
    def from_serve(cls, knobs: dict[str, Any], serve_autoscaling: Any | None) -> "AutoscalingTargets":
        """The pool's targets again, on the policy's side: its knobs (`policy_knobs`) and the Serve fields
        from the AutoscalingConfig that Serve holds for its deployment now (`ctx.config`; None: unknown,
        the defaults)."""
        serve = {} if serve_autoscaling is None else {f: getattr(serve_autoscaling, f) for f in SERVE_AUTOSCALING_FIELDS}
        return cls.model_validate({**knobs, **serve})


class VisionAutoscaling(AutoscalingTargets):
    # No up window by default, as Kubernetes' HPA scales up: the encode backlog is a measurement, not a
    # guess, a vision replica is one GPU and starts within a minute, and every second an image burst waits on a
    # small pool also idles the LLM pool behind it (bench/results/autoscale_frontier.md: the image burst
    # reaches 99.7% instead of 95.7% at the same GPU-hours). Scale-down keeps its window.
    upscale_delay_s: float = Field(0.0, ge=0)
    # Share of the image-TTFT target that encoding (queueing included) may take.
    encode_budget_fraction: float = Field(0.5, gt=0, le=1)
    # Share of a replica's measured encode rate that the arriving images may take; the rest absorbs their
    # bursts (images of 0.1 to 4 MP arrive unevenly). bench/results/autoscale_sim.md: at 1.0 the image burst
    # with an LLM floor of 4 reached 99.67%, at 0.6 99.95%, for 0.3% more GPU-hours.
    encode_utilization: float = Field(0.6, gt=0, le=1)
    # With min_replicas 0: no image work for this long scales the pool to zero.
    idle_to_zero_s: float = Field(300.0, ge=0)

    def encode_budget_s(self, slo: SLOConfig) -> float:
        """The p90 time a request's images may take in the vision stage: the autoscaler's EncodeLatency rule
        scales against it and the operator exports it for DotsVLMVisionEncodeLatencyHigh (one number for both)."""
        return slo.image_ttft_s * self.encode_budget_fraction


class LLMAutoscaling(AutoscalingTargets):
    # A DeepSeek-V3 replica over two nodes loads for minutes.
    replica_startup_s: float = Field(180.0, ge=0)
    # Share of the text-TTFT target that waiting in the tensor queue may take.
    queue_age_fraction: float = Field(0.5, gt=0, le=1)
    kv_cache_target: float = Field(0.85, gt=0, le=1)
    # Image requests in the vision stage count as this much LLM demand (0: no coupling).
    vision_lead_weight: float = Field(1.0, ge=0, le=4)


class VisionStageLimits(_Strict):
    """The vision stage's backlog limits, as the ingress admits image requests against them (its slice
    carries them; `VisionPoolConfig.stage_limits()` fills them in)."""

    max_pending_pixels_per_replica: int
    max_pending_pixels: int  # in all
    min_replicas: int  # the pool's size until Serve's status was read

    def pending_pixels_limit(self, running_replicas: int) -> int:
        """Pixels the whole vision stage may hold with `running_replicas` replicas up (a pool at zero
        counts as one: it is waking up); each ingress replica takes its share."""
        return min(self.max_pending_pixels, self.max_pending_pixels_per_replica * max(1, running_replicas))


class VisionPoolConfig(_Strict):
    gpus_per_replica: float = Field(0, ge=0, description="0 on CPU (the embedded default)")
    # None: no pool pinning (local Ray without pool workers).
    pool_resource: str | None = None
    max_batch_pixels: int = Field(16 * 1024 * 1024, ge=3136, description="pixel budget of one encode batch")
    max_batch_wait_ms: float = Field(5.0, ge=0)
    # Backpressure: pixels (after resize) sent to the vision stage and not yet encoded, the backlog the
    # autoscaler reads (signals.VISION_PENDING_PIXELS). Beyond the limit an image request gets 429.
    # Per running replica (a pool at zero counts as one: it is waking up), and in all (None: the per-replica
    # limit x max_replicas). A vision replica also decodes no more than its per-replica limit at once.
    max_pending_pixels_per_replica: int = Field(128 * 1024 * 1024, ge=3136)
    max_pending_pixels: int | None = Field(None, ge=3136)
    autoscaling: VisionAutoscaling = VisionAutoscaling()

    def stage_limits(self) -> VisionStageLimits:
        total = (self.max_pending_pixels if self.max_pending_pixels is not None
                 else self.max_pending_pixels_per_replica * self.autoscaling.max_replicas)
        return VisionStageLimits(max_pending_pixels_per_replica=self.max_pending_pixels_per_replica,
                                 max_pending_pixels=total, min_replicas=self.autoscaling.min_replicas)

    def pending_pixels_limit(self, running_replicas: int) -> int:
        """Pixels the whole vision stage may hold with `running_replicas` replicas up; the ingress admits
        image requests against it (each ingress replica takes its share)."""
        return self.stage_limits().pending_pixels_limit(running_replicas)


# The LLM replica's engines (docs/engine.md): our transformers loop on one device (CPU, tests, the
# embedded default) and vLLM, the production engine (tensor parallel over the replica's GPUs and nodes).
ENGINES = ("transformers", "vllm")
EngineName = Literal["transformers", "vllm"]
# Options only the production engine has; the transformers engine refuses them rather than ignore them.
VLLM_ONLY_OPTIONS = ("memory_fraction", "cuda_graph_max_batch_size", "chunked_prefill", "max_prefill_tokens")
LLM_TARGET_SHARE = 0.75


class LLMPoolConfig(_Strict):
    # None: vllm when the pool has GPUs, transformers otherwise (filled in on validation).
    engine: EngineName | None = None
    gpus_per_replica: float = Field(0, ge=0)
    tensor_parallel: int = Field(1, ge=1)
    nodes_per_replica: int = Field(1, ge=1)
    pool_resource: str | None = None
    context_length: int = Field(4096, ge=16)
    max_running_requests: int = Field(16, ge=1)
    max_new_tokens_default: int = Field(256, ge=1)
    # KV-cache budget of one replica in tokens (prompt + max_tokens of its running requests);
    # None = context_length * max_running_requests.
    kv_cache_tokens: int | None = Field(None, ge=16)
    # Production-engine options (None: the engine's default). memory_fraction: share of each GPU's
    # memory the engine may take for weights and KV cache (vLLM gpu_memory_utilization, SGLang
    # mem_fraction_static); cuda_graph_max_batch_size: largest decode batch captured as a CUDA graph;
    # chunked_prefill: split long prompts into chunks of max_prefill_tokens between decode steps.
    memory_fraction: float | None = Field(None, gt=0, le=1)
    cuda_graph_max_batch_size: int | None = Field(None, ge=1, le=4096)
    chunked_prefill: bool | None = None
    max_prefill_tokens: int | None = Field(None, ge=16)
    # How long a stopping replica finishes its running requests before it hands the rest back to the queue.
    drain_timeout_s: float = Field(LLM_DRAIN_TIMEOUT_S, ge=1, le=86400)
    autoscaling: LLMAutoscaling = LLMAutoscaling()

    def graceful_shutdown_timeout_s(self) -> float:
        """How long Serve lets a stopping LLM replica run before it kills it: the drain, then the margin to
        send the last events and leave the queue."""
        return self.drain_timeout_s + LLM_SHUTDOWN_MARGIN_S

    @model_validator(mode="after")
    def _engine_options(self) -> "LLMPoolConfig":
        if self.engine is None:
            self.engine = "vllm" if self.gpus_per_replica > 0 else "transformers"
        if self.engine == "transformers":
            if self.gpus_per_replica > 1 or self.nodes_per_replica > 1:
                raise ValueError(
                    f"llm.engine transformers runs a replica on one device, but the pool asks for "
                    f"{self.gpus_per_replica:g} GPUs on {self.nodes_per_replica} node(s) per replica: set "
                    f"llm.engine to vllm to shard the model over them, or give a replica at most one GPU")
            bad = [k for k in VLLM_ONLY_OPTIONS if getattr(self, k) is not None]
            if bad:
                raise ValueError(f"llm.{', llm.'.join(bad)} only apply to the vllm engine: set llm.engine to vllm "
                                 f"or remove them")
        if self.max_prefill_tokens is not None and self.chunked_prefill is False:
            raise ValueError("llm.max_prefill_tokens is the chunk size of chunked prefill, which is off: set "
                             "llm.chunked_prefill to true or remove llm.max_prefill_tokens")
        return self

    @model_validator(mode="after")
    def _target_from_batch(self) -> "LLMPoolConfig":
        """Unless set, an LLM replica aims at 3/4 of the requests it can run at once (running + waiting +
        queued per replica): a replica of 64 running requests and a target of 4 would waste most of it."""
        if "target_ongoing_requests" not in self.autoscaling.model_fields_set:
            self.autoscaling = self.autoscaling.model_copy(
                update={"target_ongoing_requests": max(1.0, LLM_TARGET_SHARE * self.max_running_requests)})
        return self

    def kv_cache_budget(self) -> int:
        """KV-cache tokens of one replica: what the engine reserves and the ingress checks requests against."""
        return self.kv_cache_tokens or self.context_length * self.max_running_requests


EmbeddingTransport = Literal["object-store", "nixl"]


class QueueConfig(_Strict):
    max_items: int = Field(256, ge=1)
    max_bytes: int = Field(4 * 1024**3, ge=1024)
    enqueue_timeout_s: float = Field(30.0, ge=0)
    # An LLM replica that stops heartbeating this long is declared dead; its items are redelivered.
    lease_timeout_s: float = Field(10.0, gt=0)
    # Deliveries of one item before the request fails instead of being redelivered again.
    max_deliveries: int = Field(2, ge=1)
    # How image embeddings travel from a vision replica to an LLM replica (tensor_queue/transport.py):
    # Ray's object store, or Ray's direct transport with NIXL (device memory to device memory on GPUs).
    embedding_transport: EmbeddingTransport = "object-store"


class ImageLimits(_Strict):
    max_images_per_request: int = Field(8, ge=0)
    max_image_bytes: int = Field(20 * 1024 * 1024, ge=1024)
    max_image_pixels: int = Field(11_289_600, ge=3136, description="pixels after resize (smart-resize cap)")
    min_image_pixels: int = Field(3136, ge=1)
    fetch_timeout_s: float = Field(10.0, gt=0)
    # CIDRs or hostnames that http(s) image URLs may reach even though they are private/loopback.
    fetch_allow: list[str] = Field(default_factory=list)


class ApiConfig(_Strict):
    # Name of an environment variable holding comma-separated API keys; unset or empty = no auth.
    api_keys_env: str | None = API_KEYS_ENV
    images: ImageLimits = ImageLimits()
    # Longest a request may take end to end before it is cancelled with 504.
    request_timeout_s: float = Field(600.0, gt=0)
    # Ingress replicas (HTTP API); each is stateless, Serve's proxy spreads requests over them.
    ingress_replicas: int = Field(1, ge=1)
    # Largest request body accepted (bytes); None = room for the maximum number of images at the
    # maximum size, base64-encoded with escaped line breaks and slashes, plus 1 MiB of text (`body_limit`).
    max_body_bytes: int | None = Field(None, ge=1024)
    # Backpressure: image bytes (request bodies being read, image files until the request's first token)
    # one ingress replica holds at once; beyond it an image request gets 429. A request alone always fits.
    max_image_bytes_in_flight: int = Field(2 * 1024**3, ge=1024 * 1024)

    # What one image's bytes may take in a JSON body, per byte: base64 (4/3), wrapped in lines as
    # MIME/PEM encoders do (a line break every 64 characters, "\r\n" escaped in the JSON string as 4
    # characters: +6.25%) with every "/" escaped as "\/" (one base64 character in 64: +1.6%); 4/3 x 1.08
    # rounded up to 4/3 x 1.1. With only 4/3, eight images of the maximum size sent wrapped or escaped got
    # a 413 for the body although each was within `images.max_image_bytes`.
    BODY_BYTES_PER_IMAGE_BYTE: ClassVar[float] = 4 / 3 * 1.1

    def body_limit(self) -> int:
        """`max_body_bytes`, or by default room for `images.max_images_per_request` images of
        `images.max_image_bytes` each as base64 with escaped line breaks and slashes
        (x `BODY_BYTES_PER_IMAGE_BYTE`, 1.47), plus 1 MiB of text."""
        if self.max_body_bytes is not None:
            return self.max_body_bytes
        per_image = math.ceil(self.images.max_image_bytes * self.BODY_BYTES_PER_IMAGE_BYTE)
        return self.images.max_images_per_request * per_image + 1024 * 1024


class ServedModel(_Strict):
    """The application's `args` in the Serve config: the model every deployment serves. Ray hashes the
    args into the version of every deployment, so a change here restarts every replica; everything
    else travels in each deployment's own options (`ServeAppConfig.deployment_options`)."""

    model_path: str
    served_model_name: str
    device: Literal["cpu", "cuda"]
    dtype: Literal["float32", "bfloat16", "float16"]


class AutoscalingPolicyConfig(_Strict):
    """The settings of dotsvlm's autoscaling policy that Serve's per-deployment AutoscalingConfig has no
    field for: the SLO and each pool's `policy_knobs()`. They are part of the Ingress's slice, so a change
    reconfigures the ingress in place; the ingress writes them where the policy, in Serve's controller,
    reads them (`serve_policy.publish_settings`). Not the policy's kwargs: Ray hashes those into every
    deployment's version (see `ServeAppConfig.autoscaling_policy`)."""

    slo: SLOConfig
    vision: dict[str, Any]  # VisionAutoscaling.policy_knobs()
    llm: dict[str, Any]  # LLMAutoscaling.policy_knobs()


# Each deployment's own slice of the config: its Serve `user_config`, validated by its `reconfigure`.
# No defaults here: the values come from `ServeAppConfig`, the one home of the defaults.
class IngressConfig(_Strict):
    """What the Ingress checks requests against; applied in place (no restart)."""

    api: ApiConfig
    vision: VisionStageLimits  # backpressure: the vision stage's backlog it admits image requests against
    context_length: int
    max_new_tokens_default: int
    kv_cache_tokens: int  # an LLM replica's budget (LLMPoolConfig.kv_cache_budget())
    enqueue_timeout_s: float
    engine: EngineName  # the LLM pool's engine: named in the refusals of what it cannot give (n, logprobs)
    # dotsvlm's autoscaling policy settings that Serve has no field for; the ingress hands them to the
    # policy (None: no pool autoscales).
    autoscaling: AutoscalingPolicyConfig | None = None


class VisionEncoderConfig(_Strict):
    """The vision replica's batching and image limits; applied in place (no restart)."""

    max_batch_pixels: int
    max_batch_wait_ms: float
    max_pending_pixels_per_replica: int  # decoded pixels one replica holds at once
    images: ImageLimits
    embedding_transport: EmbeddingTransport = "object-store"  # how its answers travel (QueueConfig's)


class LLMServerConfig(_Strict):
    """The LLM replica's engine, its queue lease and its drain. `IN_PLACE` fields are applied in place; a
    change to any other field restarts the LLM replicas (draining them), through `restart_digest`."""

    IN_PLACE: ClassVar[frozenset[str]] = frozenset({"lease_timeout_s", "drain_timeout_s"})

    engine: EngineName
    gpus_per_replica: float
    tensor_parallel: int
    nodes_per_replica: int
    context_length: int
    max_running_requests: int
    kv_cache_tokens: int  # LLMPoolConfig.kv_cache_budget()
    memory_fraction: float | None
    cuda_graph_max_batch_size: int | None
    chunked_prefill: bool | None
    max_prefill_tokens: int | None
    lease_timeout_s: float
    drain_timeout_s: float = LLM_DRAIN_TIMEOUT_S

    def restart_digest(self) -> str:
        """A digest of what the engine is built from (all but the `IN_PLACE` fields). It is an environment
        variable of the replica actors (`RESTART_DIGEST_ENV`): Ray restarts the replicas of a deployment whose
        actor options change, and only calls `reconfigure` when only its `user_config` changes."""
        engine = self.model_dump(mode="json", exclude=set(self.IN_PLACE))
        return hashlib.sha256(json.dumps(engine, sort_keys=True).encode()).hexdigest()[:16]


RESTART_DIGEST_ENV = "DOTSVLM_RESTART_DIGEST"

# Replicas record their autoscaling stats every look_back_period_s * 0.2 s and push them to Serve's
# controller every RAY_SERVE_*_AUTOSCALING_METRIC_PUSH_INTERVAL_S (10 s by default: too slow for a pool
# that wakes from zero). dotsvlm's policy keeps its own windows, so Serve's delays are zero.
LOOK_BACK_PERIOD_S = 10.5  # > Serve's (deprecated) metrics_interval_s of 10 s; records every 2.1 s
METRICS_PUSH_ENV = {"RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1",
                    "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1"}


def autoscaling(t: AutoscalingTargets) -> dict[str, Any]:
    """Serve's autoscaling config for a deployment that dotsvlm's application-level policy sizes: the
    pool's `SERVE_AUTOSCALING_FIELDS` (Serve applies the bounds; the policy reads them all from
    `ctx.config`, so a change reaches it without a restart). Serve's own delays are zero: Serve would
    apply them on top of the policy's decisions, and the policy keeps its own windows."""
    cfg: dict[str, Any] = {"min_replicas": t.min_replicas, "max_replicas": t.max_replicas,
                           "target_ongoing_requests": t.target_ongoing_requests,
                           "upscale_delay_s": 0.0, "downscale_delay_s": 0.0, "look_back_period_s": LOOK_BACK_PERIOD_S}
    if t.initial_replicas is not None:
        cfg["initial_replicas"] = t.initial_replicas
    return cfg


# The deployments that only the application calls (vision, tensor queue, LLM) log no line per call: the
# queue alone answers several calls per request and one long-poll per LLM replica every second, which was
# a few % of its CPU under load and hundreds of log lines per second. The Ingress keeps its access log
# (one line per HTTP request). Serve applies a change of it in place, without restarting a replica.
INTERNAL_LOGGING: dict[str, Any] = {"logging_config": {"enable_access_log": False}}


def replica_options(t: AutoscalingTargets) -> dict[str, Any]:
    """Every deployment gets an autoscaling config, a fixed one too (min == max), so that each replica's
    `record_autoscaling_stats` reaches the policy and turning a pool's autoscaling on or off only moves
    its bounds (no replica restarts: see `ServeAppConfig.autoscaling_policy`)."""
    return {"autoscaling_config": autoscaling(t)}


def actor_options(*, num_gpus: float, pool_resource: str | None, num_cpus: float) -> dict[str, Any]:
    opts: dict[str, Any] = {"num_cpus": num_cpus}
    if num_gpus:
        opts["num_gpus"] = num_gpus
    if pool_resource:
        opts["resources"] = {pool_resource: 1}
    return opts


def control_options(opts: dict[str, Any] | None, control_resource: str | None) -> dict[str, Any]:
    """The Ingress's and TensorQueue's actor options, pinned (one unit of `control_resource`) to the nodes
    that advertise it (the Ray head, or the API pool's pods when the spec has one), where GPU-pool churn
    (scale-down, rollout, node drain) cannot take them down; unpinned when None (a local Ray)."""
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


class ServeAppConfig(_Strict):
    """Everything the Serve application needs; rendered by the operator, validated by the app builder."""

    model_path: str
    served_model_name: str = "dots.vlm1"
    device: Literal["cpu", "cuda"] = "cpu"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    vision: VisionPoolConfig = VisionPoolConfig()
    llm: LLMPoolConfig = LLMPoolConfig()
    queue: QueueConfig = QueueConfig()
    api: ApiConfig = ApiConfig()
    slo: SLOConfig = SLOConfig()
    # None: the Ingress and TensorQueue replicas go wherever Ray puts them (a local Ray of one node).
    control_resource: str | None = None

    def served_model(self) -> ServedModel:
        return ServedModel(model_path=self.model_path, served_model_name=self.served_model_name, device=self.device,
                           dtype=self.dtype)

    def ingress_config(self) -> IngressConfig:
        return IngressConfig(api=self.api, vision=self.vision.stage_limits(), context_length=self.llm.context_length,
                             max_new_tokens_default=self.llm.max_new_tokens_default,
                             kv_cache_tokens=self.llm.kv_cache_budget(), enqueue_timeout_s=self.queue.enqueue_timeout_s,
                             engine=self.llm.engine, autoscaling=self.policy_config())

    def policy_config(self) -> AutoscalingPolicyConfig:
        """The policy's settings beyond Serve's fields (for fixed sizes too: the policy always runs)."""
        return AutoscalingPolicyConfig(slo=self.slo, vision=self.vision.autoscaling.policy_knobs(),
                                       llm=self.llm.autoscaling.policy_knobs())

    def vision_encoder_config(self) -> VisionEncoderConfig:
        return VisionEncoderConfig(max_batch_pixels=self.vision.max_batch_pixels,
                                   max_batch_wait_ms=self.vision.max_batch_wait_ms,
                                   max_pending_pixels_per_replica=self.vision.max_pending_pixels_per_replica,
                                   images=self.api.images, embedding_transport=self.queue.embedding_transport)

    def llm_server_config(self) -> LLMServerConfig:
        engine_fields = set(LLMServerConfig.model_fields) - {"kv_cache_tokens", "lease_timeout_s"}
        return LLMServerConfig(**self.llm.model_dump(include=engine_fields), kv_cache_tokens=self.llm.kv_cache_budget(),
                               lease_timeout_s=self.queue.lease_timeout_s)

    def deployment_options(self) -> dict[str, dict[str, Any]]:
        """Each deployment's Serve options that follow from this config, by deployment name: its slice as
        `user_config`, replicas or autoscaling, CPUs/GPUs, the pool's Ray resource when `pool_resource` is
        set (pool workers advertise it; locally nothing is pinned), the LLM replica's placement group.
        The app builder applies them in code (`serve.run`) and the deploy body sends them as the Serve
        config's per-deployment overrides, so that Ray versions each deployment by its own options: a
        change to one deployment's options restarts (or, `user_config` alone, reconfigures) only it.
        Options about a deployment's code (concurrency, graceful shutdown) stay beside it in `deployments/`."""
        cpu_share = 0.0 if self.device == "cpu" else 1.0  # on CPU, Ray's CPU accounting must not block replicas
        single = AutoscalingTargets(min_replicas=1, max_replicas=1)
        n = self.api.ingress_replicas
        llm = self.llm_server_config()
        llm_opts = llm_placement(self.llm, num_cpus=cpu_share)
        env = {RESTART_DIGEST_ENV: llm.restart_digest()}
        llm_opts["ray_actor_options"] = _with_env(llm_opts["ray_actor_options"], env)
        opts = {
            INGRESS_DEPLOYMENT: {**replica_options(AutoscalingTargets(min_replicas=n, max_replicas=n)),
                                 # A stopping Ingress replica (its API pod drains) finishes its open requests
                                 # and streams, which may take the request timeout.
                                 "graceful_shutdown_timeout_s": self.api.request_timeout_s,
                                 "ray_actor_options": _with_env(control_options({"num_cpus": 0}, self.control_resource)),
                                 "user_config": self.ingress_config().model_dump(mode="json")},
            VISION_DEPLOYMENT: {**replica_options(self.vision.autoscaling), **INTERNAL_LOGGING,
                                "ray_actor_options": _with_env(actor_options(
                                    num_gpus=self.vision.gpus_per_replica, pool_resource=self.vision.pool_resource,
                                    num_cpus=cpu_share)),
                                "user_config": self.vision_encoder_config().model_dump(mode="json")},
            QUEUE_DEPLOYMENT: {**replica_options(single), **INTERNAL_LOGGING,
                               "ray_actor_options": _with_env(control_options({"num_cpus": 0}, self.control_resource)),
                               "user_config": self.queue.model_dump(mode="json")},
            LLM_DEPLOYMENT: {**replica_options(self.llm.autoscaling), **llm_opts, **INTERNAL_LOGGING,
                             # Ray applies a change of it in place (a "NeedsReconfigure" option), as the slice.
                             "graceful_shutdown_timeout_s": self.llm.graceful_shutdown_timeout_s(),
                             "user_config": llm.model_dump(mode="json")},
        }
        return opts

    def autoscaled(self) -> bool:
        """Whether a pool may change size: then dotsvlm's policy runs as the application's autoscaler."""
        return any(a.min_replicas != a.max_replicas for a in (self.vision.autoscaling, self.llm.autoscaling))

    def autoscaling_policy(self) -> dict:
        """The application-level `autoscaling_policy` of the Serve config: the policy's import path only,
        the same for every spec, fixed sizes included, so that no setting is part of it and turning a
        pool's autoscaling on or off restarts nothing (a fixed pool is one whose bounds are equal).

        What Ray 2.60 (as installed) does with each place a setting could travel:
        - the application's `autoscaling_policy`, its `policy_kwargs` included, is hashed into the
          application's code version (`ray/serve/_private/deploy_utils.py` `get_app_code_version`, the
          "autoscaling_policy" key), which every deployment's version carries: a change restarts every
          replica (`application_state.py` `apply_app_config`; `version.py` `requires_actor_restart`). The
          kwargs reach the policy only when Serve instantiates it after a rebuild
          (`autoscaling_state.py` `_resolve_policy_callable`). A deployment-level `policy` is hashed too
          (`get_app_code_version`, "deployment_autoscaling_policies").
        - a deployment's `autoscaling_config` is not: `version.py` `_get_serialized_options` keeps only its
          `metrics_interval_s` and `look_back_period_s` in the version; the rest is applied on the next
          deploy without touching a replica (`DeploymentAutoscalingState.register`), and the policy reads
          it every call as `ctx.config` (with `ctx.capacity_adjusted_min_replicas`/`max_replicas`).
          Serve also applies its `upscale_delay_s`, `downscale_delay_s` and scaling factors on top of
          an application-level policy's decisions (`autoscaling_policy.py`
          `_apply_app_level_autoscaling_config`), so those stay neutral and dotsvlm's own windows travel
          elsewhere; its extra keys are dropped (a pydantic model).
        - a deployment's `user_config` is applied in place (`reconfigure`), but the controller-side
          policy cannot read it: hence the Ingress's slice carries `policy_config()` and the ingress
          writes it to Ray's internal KV for the policy (`serve_policy.publish_settings`)."""
        return {"policy_function": AUTOSCALING_POLICY_PATH}

    def deploy_body(self, *, http_port: int = 8000, route_prefix: str = "/", http_host: str = "0.0.0.0") -> dict:
        """The JSON body for `PUT /api/serve/applications/` on the Ray head's dashboard (and for
        `deploy_apps` locally): the application with the model as its `args`, each deployment's options
        (`deployment_options`) and dotsvlm's autoscaling policy (always: fixed pools have equal bounds)."""
        # num_replicas: None says so explicitly, so that nothing falls back to what the code set.
        deployments = [{"name": name, "num_replicas": None, **opts} for name, opts in self.deployment_options().items()]
        application: dict = {"name": APP_NAME, "route_prefix": route_prefix, "import_path": APP_IMPORT_PATH,
                             "args": self.served_model().model_dump(mode="json"), "deployments": deployments}
        application["autoscaling_policy"] = self.autoscaling_policy()
        return {"http_options": {"host": http_host, "port": http_port}, "applications": [application]}


def _with_env(opts: dict[str, Any], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Replica actor options with environment variables: the settings that make the replicas report to
    the policy every second, and the restart digest."""
    return {**opts, "runtime_env": {"env_vars": {**METRICS_PUSH_ENV, **(env or {})}}}
