"""The DotsVLMDeployment custom resource: pydantic models for its spec and status.

These models are the single source of truth for the CRD: `dotsvlm_operator.crd` turns them into the
OpenAPI v3 schema (descriptions, defaults, ranges, enums and the CEL rules attached below through
`json_schema_extra`), so the API server enforces the same rules the operator assumes. Field names
are snake_case in Python and camelCase in the API (alias generator).
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Any, Literal

from pydantic import AliasGenerator, BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

from dotsvlm_serving.serve_config import (LLM_DRAIN_TIMEOUT_S, LLM_SHUTDOWN_MARGIN_S, ApiConfig, AutoscalingTargets, LLMAutoscaling,
                                          EngineName, LLMPoolConfig, QueueConfig, SLOConfig, VisionAutoscaling,
                                          VisionPoolConfig)

from dotsvlm_operator.naming import POD_STOP_MARGIN_S, RAY_HEAD_PORTS, TOKEN_MOUNT

# Largest context the DeepSeek-V3 language model supports (max_position_embeddings).
MAX_CONTEXT_LENGTH = 163840
# Kubernetes quantities ("16Gi", "500m", "1.5", "1e3", 2), not negative: a number, then one suffix at most (a
# binary one, a decimal one, or an exponent), as Kubernetes' own parser reads them. (The pattern Kubernetes'
# own schemas carry is looser: it lets "-1Gi" or "1.2.3Gi" through to a refusal of the pool's Deployment.)
QUANTITY_PATTERN = r"^\+?([0-9]+(\.[0-9]*)?|\.[0-9]+)([KMGTPE]i|[numkMGTPE]|[eE][-+]?[0-9]+)?$"
DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
# A key of a Secret's data: letters, digits, "-", "_", "."; not "." or "..", nor starting with ".." (Kubernetes
# refuses any other in a pod's secretKeyRef).
SECRET_KEY_PATTERN = r"^([-_a-zA-Z0-9]|[.][-_a-zA-Z0-9])[-._a-zA-Z0-9]*$"
LABEL_VALUE_PATTERN = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"  # a Kubernetes label value (at most 63)
# A Kubernetes label key (a qualified name): an optional DNS-subdomain prefix and "/", then a name of at most 63
# characters; with the second pattern, the prefix is at most 253. Both read the same in RE2 (the CRD's CEL) and
# Python's `re` (with fullmatch), and have no backslash, so they go into a CEL string literal as they are.
LABEL_KEY_PATTERN = (r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
                     r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
LABEL_KEY_PREFIX_PATTERN = r"^([^/]{0,253}/)?[^/]*$"
# How Kubernetes' own types write a resource.Quantity in a CRD schema.
_QUANTITY_SCHEMA = {"anyOf": [{"type": "integer"}, {"type": "string"}], "pattern": QUANTITY_PATTERN, "minimum": 0,
                    "maxLength": 64, "x-kubernetes-int-or-string": True}


def _contract(model: type[BaseModel], field: str) -> Any:
    """The serving contract's default for `field`: defaults both sides share have their home there."""
    return model.model_fields[field].default


def _rules(*rules: tuple[str, str] | tuple[str, str, str]) -> dict[str, Any]:
    """CEL validation rules (rule, message[, fieldPath]) for `x-kubernetes-validations`.

    A message that starts with `=` is a CEL messageExpression (so it can quote the offending values);
    the API server falls back to the rule text when the expression fails."""
    out = []
    for r in rules:
        item = {"rule": r[0]}
        if r[1].startswith("="):
            item["messageExpression"] = r[1][1:]
        else:
            item["message"] = r[1]
        if len(r) == 3:
            item["fieldPath"] = r[2]
        out.append(item)
    return {"x-kubernetes-validations": out}


def _label_key_message(where: str, refused: str) -> str:
    return (f"every key of {where} must be a Kubernetes label key: a name of at most 63 letters, digits, '-', '_' "
            "or '.' that starts and ends with a letter or digit, optionally after a DNS subdomain of at most 253 "
            f"characters and a '/' (e.g. release, or example.com/team); {refused}")


def _label_map_schema(where: str, refused: str, max_properties: int) -> dict[str, Any]:
    """A map of Kubernetes labels in the CRD: values by pattern, keys by a CEL rule (a map's keys have no schema)."""
    return {"maxProperties": max_properties,
            "additionalProperties": {"type": "string", "maxLength": 63, "pattern": LABEL_VALUE_PATTERN},
            **_rules((f"self.all(k, k.matches('{LABEL_KEY_PATTERN}') && k.matches('{LABEL_KEY_PREFIX_PATTERN}'))",
                      _label_key_message(where, refused)))}


def _check_label_map(labels: dict[str, str] | None, where: str, refused: str) -> dict[str, str] | None:
    """The CRD's checks of a label map (`_label_map_schema`, same key message), for a spec read without it."""
    for key, value in (labels or {}).items():
        if not (re.fullmatch(LABEL_KEY_PATTERN, key) and re.fullmatch(LABEL_KEY_PREFIX_PATTERN, key)):
            raise ValueError(f"{_label_key_message(where, refused)} (got {key!r})")
        if len(value) > 63 or not re.fullmatch(LABEL_VALUE_PATTERN, value):
            raise ValueError(f"{where}.{key}: {value!r} is not a Kubernetes label value (at most 63 letters, digits, "
                             f"'-', '_' or '.', starting and ending with a letter or digit); {refused}")
    return labels


_NODE_SELECTOR_REFUSED = "Kubernetes refuses the pods otherwise"


def _node_selector_field(where: str, description: str) -> Any:
    return Field(None, description=description, json_schema_extra=_label_map_schema(where, _NODE_SELECTOR_REFUSED, 32))


# Ray Serve's default graceful-shutdown timeout of a replica (the vision encoder keeps it).
_SERVE_GRACEFUL_SHUTDOWN_S = 20
# The LLM pods' grace period must hold the LLM replica's graceful shutdown (its drain, llm.drainTimeoutSeconds,
# then the margin to send the last events and leave the queue), plus Ray's own stop.
LLM_GRACE_OVER_DRAIN_S = int(LLM_SHUTDOWN_MARGIN_S) + POD_STOP_MARGIN_S
MIN_LLM_GRACE_S = 1 + LLM_GRACE_OVER_DRAIN_S
MIN_VISION_GRACE_S = _SERVE_GRACEFUL_SHUTDOWN_S + POD_STOP_MARGIN_S


def _grace_field(default: int, minimum: int, pool: str, what: str) -> Any:
    return Field(default, ge=minimum, le=86400, description=(
        f"How long a stopping {pool} pod (rollout, scale-down, node drain) may take before Kubernetes kills it. "
        f"The pod first drains its Ray node: Ray Serve starts a replacement for its replica elsewhere and stops "
        f"the old one gracefully once that runs ({what}), at the latest just before this period ends less "
        f"{POD_STOP_MARGIN_S} s for Ray to stop. Longer gives a replacement time to load the model while the old "
        f"replica keeps serving; at least {minimum}."))


def _startup_field(default: int, pool: str) -> Any:
    return Field(default, ge=30, le=86400, description=(
        f"How long a new {pool} pod may take until Ray runs on it (its startup probe: Ray's raylet health, every "
        f"10 s) before Kubernetes restarts it; after that a liveness probe restarts a pod whose raylet stays "
        f"unhealthy for a minute. Raise it for slow image pulls or a node that is busy loading a large checkpoint."))


def _min_max_rule(pool: str) -> tuple[str, str]:
    return ("self.minReplicas <= self.maxReplicas",
            f"{pool}.minReplicas must be less than or equal to {pool}.maxReplicas")


class _Api(BaseModel):
    """Base for API objects: camelCase aliases, unknown fields refused (the CRD prunes them anyway)."""

    model_config = ConfigDict(
        alias_generator=AliasGenerator(validation_alias=to_camel, serialization_alias=to_camel),
        populate_by_name=True,
        extra="forbid",
    )

    def to_api(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


# --- small reusable pieces ---------------------------------------------------------------------------


_EXISTS_WITH_VALUE = "a toleration with operator Exists matches every value: remove 'value' or use operator Equal"
_NO_KEY_NOT_EXISTS = ("a toleration without a key must have operator Exists (it then tolerates every taint): add a key, "
                      "or set operator: Exists")
_SECONDS_NOT_NOEXECUTE = ("tolerationSeconds applies only to effect NoExecute: set effect: NoExecute, or remove "
                          "tolerationSeconds")


class Toleration(_Api):
    """A Kubernetes toleration, copied onto the pool's pods (see `kubectl explain pod.spec.tolerations`)."""

    model_config = ConfigDict(json_schema_extra=_rules(
        ("!has(self.operator) || self.operator != 'Exists' || !has(self.value) || self.value == ''", _EXISTS_WITH_VALUE),
        ("(has(self.key) && self.key != '') || (has(self.operator) && self.operator == 'Exists')", _NO_KEY_NOT_EXISTS),
        ("!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')", _SECONDS_NOT_NOEXECUTE),
    ))

    key: str | None = Field(None, max_length=317, pattern=f"^({LABEL_KEY_PATTERN[1:-1]})?$", description=(
        "Taint key to tolerate (a label key, e.g. nvidia.com/gpu); empty with operator Exists tolerates every taint."))
    operator: Literal["Exists", "Equal"] | None = Field(None, description="Exists or Equal (default Equal).")
    value: str | None = Field(None, max_length=63, pattern=LABEL_VALUE_PATTERN,
                              description="Taint value to match when operator is Equal (a label value).")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        None, description="Taint effect to tolerate; empty tolerates every effect.")
    toleration_seconds: int | None = Field(
        None, ge=0, description="With effect NoExecute: how long the pod stays bound after the taint appears.")

    @model_validator(mode="after")
    def _as_kubernetes_checks(self) -> "Toleration":
        """The CRD's rules (above, same messages), for a spec read without it: Kubernetes refuses such a
        toleration in a pod."""
        if self.operator == "Exists" and self.value:
            raise ValueError(_EXISTS_WITH_VALUE)
        if not self.key and self.operator != "Exists":
            raise ValueError(_NO_KEY_NOT_EXISTS)
        if self.toleration_seconds is not None and self.effect != "NoExecute":
            raise ValueError(_SECONDS_NOT_NOEXECUTE)
        return self


# The resource names Kubernetes takes in a container (its standard ones, huge pages, or an extended resource with a
# domain, e.g. example.com/fpga); any other name (memroy, gpu) passed the CRD and was refused in the pool's Deployment.
_STANDARD_RESOURCES = ("cpu", "memory", "ephemeral-storage")
_RESOURCE_NAME_RULE = (f"k in [{', '.join(repr(r) for r in _STANDARD_RESOURCES)}] || k.startsWith('hugepages-') "
                       "|| k.contains('/')")
_RESOURCE_NAME_MESSAGE = ("every key of resources.requests and resources.limits must be a container resource: cpu, "
                          "memory, ephemeral-storage, hugepages-<size>, or an extended resource with its domain (e.g. "
                          "example.com/fpga); Kubernetes refuses the pods otherwise")


# Kubernetes' own checks of a container's requests against its limits (ValidateResourceRequirements): a request
# is at most its limit; a resource that cannot be overcommitted (huge pages, an extended resource such as
# example.com/fpga) needs a limit, equal to its request; an extended resource is counted in whole units. The CRD
# let them through and every apply of the pool's Deployment got a 422 (Degraded=ReconcileFailed, the pool kept
# its old pods or a new resource never got any).
_NO_OVERCOMMIT_RULE = "(k.startsWith('hugepages-') || (k.contains('/') && !k.contains('kubernetes.io/')))"
_EXTENDED_RULE = "(k.contains('/') && !k.contains('kubernetes.io/'))"


def _q(side: str) -> str:
    """A CEL quantity of self.<side>[k] (an int or a string there); isQuantity guards a value the pattern refuses."""
    return f"quantity(string(self.{side}[k]))"


_REQUEST_ABOVE_LIMIT_RULE = (
    "!has(self.requests) || !has(self.limits) || self.requests.all(k, !(k in self.limits) || "
    "!isQuantity(string(self.requests[k])) || !isQuantity(string(self.limits[k])) || "
    f"{_q('requests')}.compareTo({_q('limits')}) <= 0)")
_REQUEST_ABOVE_LIMIT_MESSAGE = ("every resources.requests value must be at most the resources.limits value of the same "
                                "resource (e.g. requests {memory: 200Gi} with limits {memory: 400Gi}): lower the "
                                "request or raise the limit; Kubernetes refuses the pods otherwise")
_NO_OVERCOMMIT_HINT = ("huge pages and extended resources (a name with a domain, e.g. example.com/fpga) cannot be "
                       "overcommitted: set resources.limits for them, equal to resources.requests (or the limit alone: "
                       "the request then defaults to it); Kubernetes refuses the pods otherwise")
_NO_OVERCOMMIT_RULE_FULL = (
    f"!has(self.requests) || self.requests.all(k, !{_NO_OVERCOMMIT_RULE} || (has(self.limits) && k in self.limits && "
    "(!isQuantity(string(self.requests[k])) || !isQuantity(string(self.limits[k])) || "
    f"{_q('requests')}.compareTo({_q('limits')}) == 0)))")
_HUGE_PAGES_RULE = (
    "!((has(self.requests) && self.requests.exists(k, k.startsWith('hugepages-'))) || "
    "(has(self.limits) && self.limits.exists(k, k.startsWith('hugepages-')))) || "
    "(has(self.requests) && ('cpu' in self.requests || 'memory' in self.requests)) || "
    "(has(self.limits) && ('cpu' in self.limits || 'memory' in self.limits))")
_HUGE_PAGES_MESSAGE = ("huge pages need a cpu or memory request or limit beside them (e.g. requests {memory: 1Gi, "
                       "hugepages-2Mi: 1Gi}); Kubernetes refuses the pods otherwise")
_WHOLE_UNITS_MESSAGE = ("an extended resource (a name with a domain, e.g. example.com/fpga) is counted in whole units: "
                        "use an integer such as 1, not 500m; Kubernetes refuses the pods otherwise")


def _whole_units_rule(side: str) -> str:
    return (f"!has(self.{side}) || self.{side}.all(k, !{_EXTENDED_RULE} || !isQuantity(string(self.{side}[k])) || "
            f"{_q(side)}.isInteger())")


def quantity_value(q: int | str) -> Fraction:
    """A Kubernetes quantity as an exact number (Kubernetes' parser: one suffix, binary, decimal or an exponent)."""
    if isinstance(q, int):
        return Fraction(q)
    m = re.fullmatch(QUANTITY_PATTERN, q)
    if m is None:
        raise ValueError(f"{q!r} is not a Kubernetes quantity")
    value, suffix = Fraction(m.group(1).rstrip(".")), m.group(3) or ""
    if suffix.endswith("i"):
        return value * 1024 ** ("KMGTPE".index(suffix[0]) + 1)
    if len(suffix) > 1:  # an exponent (e3, E-2); "E" alone is exa, "Ei" exbi
        return value * Fraction(10) ** int(suffix[1:])
    return value * {"": 1, "n": Fraction(1, 10**9), "u": Fraction(1, 10**6), "m": Fraction(1, 1000), "k": 10**3,
                    "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18}[suffix]


def _extended(name: str) -> bool:
    """An extended resource (a domain outside kubernetes.io): whole units, never overcommitted."""
    return "/" in name and "kubernetes.io/" not in name


def _no_overcommit(name: str) -> bool:
    return name.startswith("hugepages-") or _extended(name)


class Resources(_Api):
    """Extra CPU / memory requests and limits for the pool's Ray container. GPUs are set from the pool's
    GPU fields, not here."""

    model_config = ConfigDict(json_schema_extra=_rules(
        ("!has(self.requests) || !('nvidia.com/gpu' in self.requests)",
         "do not set nvidia.com/gpu in resources: use the pool's gpusPerReplica instead", ".requests"),
        ("!has(self.limits) || !('nvidia.com/gpu' in self.limits)",
         "do not set nvidia.com/gpu in resources: use the pool's gpusPerReplica instead", ".limits"),
        (f"!has(self.requests) || self.requests.all(k, {_RESOURCE_NAME_RULE})", _RESOURCE_NAME_MESSAGE, ".requests"),
        (f"!has(self.limits) || self.limits.all(k, {_RESOURCE_NAME_RULE})", _RESOURCE_NAME_MESSAGE, ".limits"),
        (_REQUEST_ABOVE_LIMIT_RULE, _REQUEST_ABOVE_LIMIT_MESSAGE, ".requests"),
        (_NO_OVERCOMMIT_RULE_FULL, _NO_OVERCOMMIT_HINT, ".requests"),
        (_whole_units_rule("requests"), _WHOLE_UNITS_MESSAGE, ".requests"),
        (_whole_units_rule("limits"), _WHOLE_UNITS_MESSAGE, ".limits"),
        (_HUGE_PAGES_RULE, _HUGE_PAGES_MESSAGE),
    ))

    requests: dict[str, int | str] | None = Field(
        None, description="Resource requests, e.g. {cpu: 16, memory: 200Gi}.",
        json_schema_extra={"additionalProperties": _QUANTITY_SCHEMA, "maxProperties": 32})
    limits: dict[str, int | str] | None = Field(
        None, description="Resource limits, e.g. {memory: 400Gi}.",
        json_schema_extra={"additionalProperties": _QUANTITY_SCHEMA, "maxProperties": 32})

    @field_validator("requests", "limits")
    @classmethod
    def _quantities(cls, v: dict[str, int | str] | None) -> dict[str, int | str] | None:
        """The CRD's check, for a spec read without it: each value a Kubernetes quantity, not negative."""
        for name, q in (v or {}).items():
            if not (name in _STANDARD_RESOURCES or name.startswith("hugepages-") or "/" in name):
                raise ValueError(f"{_RESOURCE_NAME_MESSAGE} (got {name!r})")
            if isinstance(q, int) and q < 0 or isinstance(q, str) and (len(q) > 64
                                                                       or not re.match(QUANTITY_PATTERN, q)):
                raise ValueError(f"{name}: {q!r} is not a Kubernetes quantity (e.g. 16, 500m, 200Gi; not negative)")
            if _extended(name) and quantity_value(q).denominator != 1:
                raise ValueError(f"resources.{name}: {q!r}: {_WHOLE_UNITS_MESSAGE}")
        return v

    @model_validator(mode="after")
    def _requests_fit_limits(self) -> "Resources":
        """The CRD's rules on requests against limits (above), for a spec read without it, naming the resource."""
        limits = self.limits or {}
        names = {*(self.requests or {}), *limits}
        if any(n.startswith("hugepages-") for n in names) and not names & {"cpu", "memory"}:
            raise ValueError(_HUGE_PAGES_MESSAGE)
        for name, request in (self.requests or {}).items():
            limit = limits.get(name)
            if limit is None:
                if _no_overcommit(name):
                    raise ValueError(f"resources.requests.{name} is {request} with no resources.limits.{name}: "
                                     f"{_NO_OVERCOMMIT_HINT}")
                continue
            if _no_overcommit(name) and quantity_value(request) != quantity_value(limit):
                raise ValueError(f"resources.requests.{name} is {request} but resources.limits.{name} is {limit}: "
                                 f"{_NO_OVERCOMMIT_HINT}")
            if quantity_value(request) > quantity_value(limit):
                raise ValueError(f"resources.requests.{name} ({request}) is above resources.limits.{name} ({limit}): "
                                 "lower the request or raise the limit; Kubernetes refuses the pods otherwise")
        return self


class SecretKeyRef(_Api):
    """A key in a Secret in the same namespace as the DotsVLMDeployment."""

    name: str = Field(..., min_length=1, max_length=253, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
                      description="Name of the Secret (same namespace).")
    key: str = Field("api-keys", min_length=1, max_length=253, pattern=SECRET_KEY_PATTERN,
                     description="Key in the Secret whose value is a comma-separated list of API keys.")


class Autoscaling(_Api):
    """How dotsvlm's autoscaling policy sizes this pool between minReplicas and maxReplicas. The defaults
    suit most workloads; docs/autoscaling.md says when to change them."""

    target_ongoing_requests: float = Field(
        _contract(AutoscalingTargets, "target_ongoing_requests"), gt=0, le=10000, description=(
            "Vision pool: image requests in the vision stage per replica, used only until a replica has measured "
            "its encode rate (then the pool is sized for the pixels arriving and waiting). LLM pool: requests "
            "running, waiting or queued per replica (keep it below maxRunningRequests). Higher packs replicas "
            "harder."))
    upscale_delay_seconds: float = Field(
        _contract(AutoscalingTargets, "upscale_delay_s"), ge=0, le=3600, description=(
            "How long every signal must ask for more replicas before the pool grows (a pool at zero wakes at once)."))
    downscale_delay_seconds: float = Field(
        _contract(AutoscalingTargets, "downscale_delay_s"), ge=0, le=86400, description=(
            "How long every signal must ask for fewer replicas before the pool shrinks."))
    max_scale_up_step: int = Field(
        _contract(AutoscalingTargets, "max_scale_up_step"), ge=1, le=1000, description=(
            "Most replicas added at once, counted from the replicas that actually run (replicas that cannot be "
            "placed earn no more)."))
    max_scale_down_step: int = Field(
        _contract(AutoscalingTargets, "max_scale_down_step"), ge=1, le=1000, description="Most replicas removed at once.")
    scale_down_interval_seconds: float = Field(
        _contract(AutoscalingTargets, "scale_down_interval_s"), ge=0, le=86400, description=(
            "Shortest time between two scale-downs (each removed replica drains first)."))
    metrics_stale_seconds: float = Field(
        _contract(AutoscalingTargets, "metrics_stale_s"), gt=0, le=3600, description=(
            "Signals older than this hold the pool at its size; the status says MetricsStale."))
    replica_startup_seconds: float = Field(
        _contract(AutoscalingTargets, "replica_startup_s"), ge=0, le=3600, description=(
            "How long a new replica takes to serve (start, load weights). Replicas asked for less than this ago "
            "that are still starting are not cancelled by a scale-down; the LLM pool scales for the demand its "
            "recent trend predicts this far ahead (0 turns the prediction off)."))


class VisionAutoscaling(Autoscaling):
    """Autoscaling of the vision pool: encode backlog against the measured encode rate, encode latency
    against its share of the image-TTFT target, image requests per replica."""

    upscale_delay_seconds: float = Field(
        _contract(VisionAutoscaling, "upscale_delay_s"), ge=0, le=3600, description=(
            "How long every signal must ask for more vision replicas before the pool grows. Default 0 (as "
            "Kubernetes' HPA scales up): the encode backlog is measured, and a vision replica is one GPU and "
            "starts within a minute; the downscale delay still keeps the pool from flapping."))
    encode_budget_fraction: float = Field(
        _contract(VisionAutoscaling, "encode_budget_fraction"), gt=0, le=1, description=(
            "Share of slo.imageTTFTSeconds that encoding (queueing included) may take; the pool grows so its "
            "backlog drains within it."))
    encode_utilization: float = Field(
        _contract(VisionAutoscaling, "encode_utilization"), gt=0, le=1, description=(
            "Share of a vision replica's measured encode rate that arriving images may use; the rest absorbs "
            "bursts. The pool is sized for (pixels arriving per second / this) plus its backlog drained within "
            "the encode budget."))
    idle_to_zero_seconds: float = Field(
        _contract(VisionAutoscaling, "idle_to_zero_s"), ge=0, le=86400, description=(
            "With minReplicas 0: no image work for this long scales the pool to zero. The next image request "
            "waits for a replica (within api.requestTimeoutSeconds); text-only requests never wait."))


class LLMAutoscaling(Autoscaling):
    """Autoscaling of the LLM pool: running, waiting and queued requests, the tensor queue's oldest item,
    KV-cache use, TTFT and inter-token latency against spec.slo, and the vision pool's backlog as a
    leading signal."""

    target_ongoing_requests: float | None = Field(
        None, gt=0, le=10000, description=(
            "Requests running, waiting or queued per LLM replica that the pool aims for. Default: 3/4 of "
            "llm.maxRunningRequests. Lower it for shorter waits, raise it to pack replicas harder."))
    replica_startup_seconds: float = Field(
        _contract(LLMAutoscaling, "replica_startup_s"), ge=0, le=3600, description=(
            "How long a new LLM replica takes to serve (start, load weights: minutes for DeepSeek-V3). The pool "
            "scales for the demand its recent trend predicts this far ahead, and does not cancel replicas "
            "asked for less than this ago that are still starting (0 turns both off)."))
    queue_age_fraction: float = Field(
        _contract(LLMAutoscaling, "queue_age_fraction"), gt=0, le=1, description=(
            "Share of slo.textTTFTSeconds an item may wait in the tensor queue before the pool grows by one."))
    kv_cache_target: float = Field(
        _contract(LLMAutoscaling, "kv_cache_target"), gt=0, le=1, description="KV-cache use (0-1) the pool aims to stay under.")
    vision_lead_weight: float = Field(
        _contract(LLMAutoscaling, "vision_lead_weight"), ge=0, le=4, description=(
            "How much LLM demand each image request in the vision stage counts for, before it reaches the queue "
            "(the coupling between the pools); 0 turns the coupling off."))


class SLOSpec(_Api):
    """Service levels per modality (an image request and a text request have different budgets): the
    autoscaling policy scales against them and status.slo reports against them."""

    image_ttft_seconds: float = Field(_contract(SLOConfig, "image_ttft_s"), gt=0, le=3600, alias="imageTTFTSeconds",
                                      description="Target p90 time to first token of a request with images.")
    text_ttft_seconds: float = Field(_contract(SLOConfig, "text_ttft_s"), gt=0, le=3600, alias="textTTFTSeconds",
                                     description="Target p90 time to first token of a text-only request.")
    inter_token_seconds: float = Field(_contract(SLOConfig, "inter_token_s"), gt=0, le=60,
                                       description="Target p90 time between two generated tokens.")


# --- the spec ------------------------------------------------------------------------------------------


_VOLUME_SOURCES = ("persistentVolumeClaim", "hostPath", "nfs", "csi", "ephemeral", "emptyDir", "image")


def _volume_source(kind: str) -> Any:
    return Field(None, description=f"The {kind} volume source, as in a pod's volumes (kubectl explain pod.spec.volumes.{kind}).",
                 json_schema_extra={"x-kubernetes-preserve-unknown-fields": True})


class VolumeSource(_Api):
    """Exactly one Kubernetes volume source (the fields of a pod volume, without its name)."""

    model_config = ConfigDict(json_schema_extra=_rules(
        ("[" + ", ".join(f"has(self.{k})" for k in _VOLUME_SOURCES) + "].filter(x, x).size() == 1",
         "model.volume must name exactly one volume source, e.g. {persistentVolumeClaim: {claimName: dots-weights}}; "
         "supported: " + ", ".join(_VOLUME_SOURCES)),
    ))

    persistent_volume_claim: dict[str, Any] | None = _volume_source("persistentVolumeClaim")
    host_path: dict[str, Any] | None = _volume_source("hostPath")
    nfs: dict[str, Any] | None = _volume_source("nfs")
    csi: dict[str, Any] | None = _volume_source("csi")
    ephemeral: dict[str, Any] | None = _volume_source("ephemeral")
    empty_dir: dict[str, Any] | None = _volume_source("emptyDir")
    image: dict[str, Any] | None = _volume_source("image")


# The paths every Ray pod mounts besides the model (builders._volumes): model.mountPath must keep clear of them.
_OWN_MOUNTS = ("/dev/shm", TOKEN_MOUNT)


class ModelSpec(_Api):
    """Where the dots.vlm1 checkpoint lives and how it is served."""

    model_config = ConfigDict(json_schema_extra=_rules(
        ("self.path.startsWith(self.mountPath + '/') || self.path == self.mountPath",
         "model.path must lie inside model.mountPath (the folder where model.volume is mounted), "
         "e.g. mountPath /models and path /models/dots.vlm1.inst"),
        ("!self.mountPath.endsWith('/')", "model.mountPath must not end with '/', e.g. /models"),
        # Two mounts at one path are refused for every pod (a 422 on each apply of its Deployment); the model over
        # a folder above them (/etc, /dev) hides the image's own files there.
        ("![" + ", ".join(f"'{p}'" for p in _OWN_MOUNTS) + "].exists(p, p == self.mountPath || "
         "p.startsWith(self.mountPath + '/') || self.mountPath.startsWith(p + '/'))",
         "model.mountPath must not be " + ", ".join(_OWN_MOUNTS) + ", a folder above them or one inside them "
         "(every Ray pod mounts its shared memory and its Ray token there): use e.g. /models"),
    ))

    path: str = Field(..., min_length=2, max_length=1024, pattern=r"^/", description=(
        "Absolute path of the checkpoint directory (config.json, *.safetensors, tokenizer) inside the pods."))
    volume: VolumeSource = Field(..., description=(
        "The Kubernetes volume that holds the weights, e.g. {persistentVolumeClaim: {claimName: dots-weights}} "
        "or {hostPath: {path: /mnt/models}}. It is mounted read-only at mountPath in every Ray pod."))
    mount_path: str = Field("/models", max_length=1024, pattern=r"^/.+", description="Where model.volume is mounted in every Ray pod.")
    served_name: str = Field("dots.vlm1", min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]*$",
                             description="Model name clients pass in the OpenAI API's 'model' field.")
    quantization: Literal["fp8", "none"] = Field(
        "fp8", description="fp8: the released FP8 (e4m3, 128x128 block scales) LLM weights; none: unquantized weights.")
    dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="Compute dtype for activations and unquantized weights.")


class VisionPool(_Api):
    """The vision-encoder pool: Ray workers that run the NaViT vision tower and patch merger."""

    model_config = ConfigDict(json_schema_extra=_rules(
        _min_max_rule("vision"),
    ))

    gpus_per_replica: int = Field(1, ge=0, le=8, description="nvidia.com/gpu per vision replica (one replica per pod); 0 runs on CPU.")
    min_replicas: int = Field(1, ge=0, le=1000, description="Fewest vision replicas; 0 lets the pool scale to zero when no request has images.")
    max_replicas: int = Field(8, ge=1, le=1000, description="Most vision replicas.")
    max_batch_pixels: int = Field(_contract(VisionPoolConfig, "max_batch_pixels"), ge=3136, description="Pixel budget of one encode batch (after resize).")
    max_batch_wait_ms: float = Field(_contract(VisionPoolConfig, "max_batch_wait_ms"), ge=0, le=10000, description="How long a replica waits to fill a batch before encoding.")
    max_pending_pixels_per_replica: int = Field(
        _contract(VisionPoolConfig, "max_pending_pixels_per_replica"), ge=3136, description=(
            "Backpressure: pixels (after resize) of images waiting in or for the vision stage per running vision "
            "replica (a pool at zero counts as one while it wakes up). Beyond it image requests get HTTP 429 with "
            "Retry-After; a replica also decodes no more than this at once (its memory: about 12 bytes per pixel). "
            "Keep it above what one replica encodes within its share of slo.imageTTFTSeconds, so the autoscaler "
            "still sees a backlog that asks for more replicas."))
    max_pending_pixels: int | None = Field(
        None, ge=3136, description=(
            "Backpressure: pixels of images waiting in or for the vision stage in all, whatever the replicas. "
            "Default: maxPendingPixelsPerReplica x maxReplicas."))
    node_selector: dict[str, str] | None = _node_selector_field(
        "vision.nodeSelector", "Node labels the pool's pods require, e.g. {nvidia.com/gpu.product: NVIDIA-L40S}.")
    _node_selector_labels = field_validator("node_selector")(
        lambda v: _check_label_map(v, "vision.nodeSelector", _NODE_SELECTOR_REFUSED))
    tolerations: list[Toleration] | None = Field(None, description="Tolerations for the pool's pods (e.g. for tainted GPU nodes).")
    resources: Resources | None = Field(None, description="CPU and memory for each pod.")
    shm_size: str = Field("16Gi", pattern=QUANTITY_PATTERN, description="Size of the in-memory /dev/shm volume (Ray's object store and NCCL use it).")
    termination_grace_period_seconds: int = _grace_field(
        120, MIN_VISION_GRACE_S, "vision", f"Serve waits up to {_SERVE_GRACEFUL_SHUTDOWN_S} s for its requests")
    startup_timeout_seconds: int = _startup_field(600, "vision")
    autoscaling: VisionAutoscaling = Field(default_factory=VisionAutoscaling, description="How the autoscaler sizes the pool.")


class LLMPool(_Api):
    """The language-model pool: Ray workers that run DeepSeek-V3. One LLM replica is one tensor-parallel
    group that may span several pods (one pod per node)."""

    model_config = ConfigDict(json_schema_extra=_rules(
        _min_max_rule("llm"),
        ("self.gpusPerReplica % self.nodesPerReplica == 0",
         "llm.gpusPerReplica must be divisible by llm.nodesPerReplica: every node of a replica gets the same number "
         "of GPUs (e.g. 16 GPUs over 2 nodes = 8 per node)"),
        ("self.gpusPerReplica == 0 || self.gpusPerReplica % self.tensorParallel == 0",
         "llm.gpusPerReplica must be a multiple of llm.tensorParallel (usually equal: one tensor-parallel group per replica)"),
        ("self.nodesPerReplica == 1 || self.gpusPerReplica > 0",
         "llm.nodesPerReplica > 1 needs GPUs: set llm.gpusPerReplica"),
        ("self.gpusPerReplica / self.nodesPerReplica <= 16",
         "llm.gpusPerReplica / llm.nodesPerReplica must be at most 16 GPUs per node: raise llm.nodesPerReplica"),
        ("!has(self.engine) || self.engine != 'transformers' || self.gpusPerReplica <= 1",
         "llm.engine transformers runs a replica on one device: set llm.engine to vllm to shard the model over "
         "llm.gpusPerReplica GPUs, or set llm.gpusPerReplica to 0 or 1"),
        ("!has(self.engine) || self.engine != 'vllm' || self.gpusPerReplica > 0",
         "llm.engine vllm needs GPUs: set llm.gpusPerReplica (a CPU pool runs the transformers engine)"),
        ("(has(self.engine) ? self.engine == 'vllm' : self.gpusPerReplica > 0) || (!has(self.memoryFraction) && "
         "!has(self.cudaGraphMaxBatchSize) && !has(self.chunkedPrefill) && !has(self.maxPrefillTokens))",
         "llm.memoryFraction, llm.cudaGraphMaxBatchSize, llm.chunkedPrefill and llm.maxPrefillTokens only apply to the "
         "vllm engine (the default when llm.gpusPerReplica > 0): remove them or use the vllm engine"),
        ("!has(self.maxPrefillTokens) || !has(self.chunkedPrefill) || self.chunkedPrefill",
         "llm.maxPrefillTokens is the chunk size of chunked prefill, which llm.chunkedPrefill turns off: remove one"),
        (f"self.terminationGracePeriodSeconds >= self.drainTimeoutSeconds + {LLM_GRACE_OVER_DRAIN_S}",
         # A plain message: a messageExpression quoting the values costs more than the CRD's CEL budget allows.
         f"llm.terminationGracePeriodSeconds must be at least llm.drainTimeoutSeconds + {LLM_GRACE_OVER_DRAIN_S}: a "
         f"stopping pod drains its replica, which then sends its last events and leaves the queue "
         f"({int(LLM_SHUTDOWN_MARGIN_S)} s), and Ray stops ({POD_STOP_MARGIN_S} s). Raise "
         f"llm.terminationGracePeriodSeconds or lower llm.drainTimeoutSeconds"),
    ))

    # (serving's type itself: typing caches `Literal[...] | None` by the literal's values, whatever their order,
    # so a second Literal of the same engines in another order gave the CRD's enum in whichever order was cached)
    engine: EngineName | None = Field(
        None, description=(
            "The LLM replica's inference engine. vllm: the production engine, tensor parallel over all GPUs of the "
            "replica, across nodes. transformers: dotsvlm's own loop on one device (CPU pools, small test models). "
            "Default: vllm when gpusPerReplica > 0, transformers otherwise. See docs/engine.md."))

    gpus_per_replica: int = Field(8, ge=0, le=256, description="nvidia.com/gpu per LLM replica, spread evenly over nodesPerReplica pods.")
    tensor_parallel: int = Field(8, ge=1, le=256, description="Tensor-parallel size of one LLM replica.")
    nodes_per_replica: int = Field(1, ge=1, le=32, description="Pods (one per node) that one LLM replica spans; each pod gets gpusPerReplica/nodesPerReplica GPUs.")
    min_replicas: int = Field(1, ge=0, le=1000, description="Fewest LLM replicas.")
    max_replicas: int = Field(1, ge=1, le=1000, description="Most LLM replicas.")
    context_length: int = Field(65536, ge=16, le=MAX_CONTEXT_LENGTH, description=f"Longest sequence (prompt + output tokens); at most {MAX_CONTEXT_LENGTH}.")
    max_running_requests: int = Field(64, ge=1, le=4096, description="Requests one LLM replica decodes at the same time.")
    max_new_tokens_default: int = Field(_contract(LLMPoolConfig, "max_new_tokens_default"), ge=1, description="max_tokens used when a request does not set it.")
    memory_fraction: float | None = Field(
        None, gt=0, le=1, description="vllm: share of each GPU's memory for weights, activations and KV cache "
        "(vLLM gpu_memory_utilization, SGLang mem_fraction_static). Default: the engine's (0.9).")
    cuda_graph_max_batch_size: int | None = Field(
        None, ge=1, le=4096, description="vllm: largest decode batch captured as a CUDA graph (SGLang "
        "cuda_graph_max_bs). Default: the engine's.")
    chunked_prefill: bool | None = Field(
        None, description="vllm: split long prompts into chunks between decode steps. Default: the engine's (on).")
    max_prefill_tokens: int | None = Field(
        None, ge=16, description="vllm: tokens of prompt per engine step with chunked prefill (vLLM "
        "max_num_batched_tokens, SGLang chunked_prefill_size). Default: the engine's.")
    node_selector: dict[str, str] | None = _node_selector_field(
        "llm.nodeSelector", "Node labels the pool's pods require, e.g. {nvidia.com/gpu.product: NVIDIA-H100-80GB-HBM3}.")
    _node_selector_labels = field_validator("node_selector")(
        lambda v: _check_label_map(v, "llm.nodeSelector", _NODE_SELECTOR_REFUSED))
    tolerations: list[Toleration] | None = Field(None, description="Tolerations for the pool's pods.")
    resources: Resources | None = Field(None, description="CPU and memory for each pod.")
    shm_size: str = Field("64Gi", pattern=QUANTITY_PATTERN, description="Size of the in-memory /dev/shm volume (NCCL and Ray's object store use it).")
    termination_grace_period_seconds: int = _grace_field(
        300, MIN_LLM_GRACE_S, "LLM", f"the LLM replica finishes its running requests for up to "
        f"drainTimeoutSeconds and hands the rest back to the queue; Serve waits {LLM_SHUTDOWN_MARGIN_S:.0f} s "
        f"longer for it. At least drainTimeoutSeconds + {LLM_GRACE_OVER_DRAIN_S}")
    drain_timeout_seconds: int = Field(int(LLM_DRAIN_TIMEOUT_S), ge=1, le=86400, description=(
        "How long a stopping LLM replica (scale-down, rollout, node drain, a new engine setting) keeps decoding "
        "the requests it runs, taking no new ones, before it hands the rest back to the tensor queue: a "
        "non-streaming request then starts over on another replica (its client sees nothing of it), a stream "
        "that has sent tokens ends with an error event (code 503: retry). Raise it when answers run long (a "
        "stream of 4000 tokens at 30 ms a token takes 2 minutes), with terminationGracePeriodSeconds at least "
        f"this + {LLM_GRACE_OVER_DRAIN_S}. Changing it restarts no replica."))
    startup_timeout_seconds: int = _startup_field(3600, "LLM")
    autoscaling: LLMAutoscaling = Field(default_factory=LLMAutoscaling, description="How the autoscaler sizes the pool.")

    @property
    def gpus_per_pod(self) -> int:
        return self.gpus_per_replica // self.nodes_per_replica

    @model_validator(mode="after")
    def _grace_holds_the_drain(self) -> "LLMPool":
        """The CEL rule above, for specs read outside the API server (the operator's tests, `dotsvlm`)."""
        need = self.drain_timeout_seconds + LLM_GRACE_OVER_DRAIN_S
        if self.termination_grace_period_seconds < need:
            raise ValueError(
                f"llm.terminationGracePeriodSeconds must be at least llm.drainTimeoutSeconds + {LLM_GRACE_OVER_DRAIN_S} "
                f"({need}; it is {self.termination_grace_period_seconds}): raise llm.terminationGracePeriodSeconds "
                f"or lower llm.drainTimeoutSeconds")
        return self


class QueueSpec(_Api):
    """The tensor queue between the pools: bounded, FIFO, with backpressure (full -> wait, then HTTP 429)."""

    max_items: int = Field(_contract(QueueConfig, "max_items"), ge=1, le=1_000_000, description="Most requests waiting for an LLM replica (one item per request, text-only too; image embeddings stay in Ray's object store).")
    max_bytes: int = Field(_contract(QueueConfig, "max_bytes"), ge=1024, description="Most bytes of embeddings waiting for an LLM replica.")
    enqueue_timeout_seconds: float = Field(_contract(QueueConfig, "enqueue_timeout_s"), ge=0, le=3600, description="How long a request waits for room in a full queue before it is answered 429.")
    lease_timeout_seconds: float = Field(_contract(QueueConfig, "lease_timeout_s"), gt=0, le=3600, description="How long an LLM replica may go without a heartbeat before it is declared dead and the items it holds are delivered again (or their requests fail, if tokens were already streamed).")
    max_deliveries: int = Field(_contract(QueueConfig, "max_deliveries"), ge=1, le=10, description="How often an item is delivered before its request fails with an error (a replica died holding it).")
    embedding_transport: Literal["ObjectStore", "NIXL"] = Field("ObjectStore", description=(
        "How image embeddings travel from a vision replica to an LLM replica. ObjectStore (default): through Ray's "
        "object store, in host memory (shared memory on one node). NIXL: Ray's direct tensor transport with NIXL: "
        "the embeddings stay on the vision replica's GPU until the LLM replica pulls them, GPU to GPU over NVLink or "
        "RDMA; for GPU pools (on CPU it works but is slower than ObjectStore). Needs NIXL in the serving image "
        "(dotsvlm[serving] installs it); changed in place, without restarting a replica."))


class ApiSpec(_Api):
    """The OpenAI-compatible HTTP API and the Service in front of it."""

    port: int = Field(8000, ge=1024, le=65535, description="Port of the API (Ray Serve's HTTP proxy and the Service).")
    service_type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = Field("ClusterIP", description="Type of the API Service.")
    request_timeout_seconds: float = Field(_contract(ApiConfig, "request_timeout_s"), gt=0, le=86400, description="Longest a request may take end to end before it is answered with an error.")
    max_image_bytes_in_flight: int = Field(
        _contract(ApiConfig, "max_image_bytes_in_flight"), ge=1024 * 1024, description=(
            "Backpressure: bytes of images (request bodies being read, image files until the request's first token) "
            "one API replica holds at once. Beyond it image requests get HTTP 429 with Retry-After; a request alone "
            "always fits."))
    api_key_secret_ref: SecretKeyRef | None = Field(
        None, description="Secret key holding comma-separated API keys; clients then send 'Authorization: Bearer <key>'. Unset: no API keys.")

    model_config = ConfigDict(json_schema_extra=_rules(
        (f"!(self.port in [{', '.join(map(str, RAY_HEAD_PORTS))}])",
         f"api.port must not be one of Ray's own ports on the pods that serve the API ({', '.join(map(str, RAY_HEAD_PORTS))})"),
    ))


class RedisPasswordRef(SecretKeyRef):
    """A key in a Secret in the same namespace as the DotsVLMDeployment (SecretKeyRef, another default key)."""

    key: str = Field("password", min_length=1, max_length=253, pattern=SECRET_KEY_PATTERN,
                     description="Key in the Secret whose value is the Redis password.")


class GcsFaultTolerance(_Api):
    """Ray's GCS fault tolerance: the head keeps the cluster's state (nodes, actors, Serve's checkpoint, the
    internal KV) in an external Redis. When the head pod restarts (a crash, an eviction, the last step of an
    image rollout) the pool pods and their replicas keep running and rejoin the new head: the LLM does not
    reload its weights. The API and the tensor queue run on the head and restart with it (unless spec.apiPool
    moves them to pods of their own)."""

    redis_address: str = Field(..., min_length=3, max_length=260,
                               pattern=r"^[A-Za-z0-9]([-A-Za-z0-9.]*[A-Za-z0-9])?:[0-9]{1,5}$", description=(
        "host:port of a Redis (6.2 or later) that the head pod can reach, e.g. redis.redis.svc.cluster.local:6379. "
        "It holds the cluster's state: if Redis loses it while the head is down, the pools restart too."))
    password_secret_ref: RedisPasswordRef | None = Field(
        None, description="Secret key holding the Redis password. Unset: Redis without a password.")
    storage_namespace: str | None = Field(None, min_length=1, max_length=63, pattern=r"^[A-Za-z0-9_-]+$", description=(
        "Prefix of this deployment's keys in Redis. Default: the resource's UID, so a deployment deleted and "
        "created again starts afresh. When the resource is deleted, the operator stops the head and removes "
        "these keys with a Job (`dotsvlm cleanup-redis`, the head's image and Redis settings); after a change of "
        "storageNamespace or redisAddress, it removes the previous place's keys once the head has moved "
        "(status.redisState)."))
    head_restart_tolerance_seconds: int = Field(600, ge=30, le=86400, description=(
        "How long the pool pods' Ray processes wait for a new head before they give up and their pods restart "
        "(their replicas with them). Cover the head pod's scheduling, image pull and start."))


class HeadSpec(_Api):
    """The Ray head pod (GCS, dashboard, Serve controller and HTTP proxy). It needs no GPU."""

    node_selector: dict[str, str] | None = _node_selector_field("head.nodeSelector", "Node labels the head pod requires.")
    _node_selector_labels = field_validator("node_selector")(
        lambda v: _check_label_map(v, "head.nodeSelector", _NODE_SELECTOR_REFUSED))
    tolerations: list[Toleration] | None = Field(None, description="Tolerations for the head pod.")
    resources: Resources | None = Field(None, description="CPU and memory for the head pod.")
    gcs_fault_tolerance: GcsFaultTolerance | None = Field(None, description=(
        "Keep the Ray cluster's state in an external Redis so that the pools (and the LLM's loaded weights) "
        "survive a restart of the head pod. Unset: a head restart restarts every Ray process of the deployment."))


class ApiPool(_Api):
    """CPU pods that run the API (Ray Serve's HTTP proxy and the Ingress replicas) and the tensor queue, in
    place of the Ray head. With head.gcsFaultTolerance the API then keeps answering while the head restarts
    (the last step of an image rollout, a head pod evicted or lost); without it a head restart still restarts
    every Ray process. It also spreads the API's work (request validation, image download and decode checks)
    over more CPUs than the head has."""

    replicas: int = Field(2, ge=1, le=100, description=(
        "API pods; each runs one Ingress replica and a Serve HTTP proxy behind the API Service, one of them the "
        "tensor queue. Two or more keep the API answering while one of them stops."))
    node_selector: dict[str, str] | None = _node_selector_field("apiPool.nodeSelector", "Node labels the API pods require.")
    _node_selector_labels = field_validator("node_selector")(
        lambda v: _check_label_map(v, "apiPool.nodeSelector", _NODE_SELECTOR_REFUSED))
    tolerations: list[Toleration] | None = Field(None, description="Tolerations for the API pods.")
    resources: Resources | None = Field(None, description="CPU and memory for each API pod.")
    termination_grace_period_seconds: int | None = Field(None, ge=60, le=86400, description=(
        "How long a stopping API pod (rollout, node drain) may take before Kubernetes kills it. The pod first "
        "drains its Ray node: Ray Serve starts its Ingress (and the tensor queue) on another API pod and the "
        "old replica finishes its open requests and streams (the old tensor queue hands its state to the new "
        "one). Default: api.requestTimeoutSeconds (at least 45) + "
        f"{2 * POD_STOP_MARGIN_S} s."))
    startup_timeout_seconds: int = _startup_field(600, "API")


_MONITORING_LABELS_REFUSED = "the PodMonitor and the PrometheusRule are refused otherwise"


class MonitoringSpec(_Api):
    """Prometheus integration."""

    enabled: bool = Field(True, description="Expose Ray and dotsvlm metrics on port 8080 of every Ray pod (and allow scraping through the NetworkPolicy).")
    pod_monitor: bool = Field(True, description="Create a PodMonitor that scrapes every Ray pod when the Prometheus Operator's PodMonitor CRD is installed. Without that CRD, or when false, the Ray pods carry prometheus.io/scrape annotations instead.")
    prometheus_rule: bool = Field(False, description="Create a PrometheusRule with dotsvlm's alerts for this deployment (needs the PrometheusRule CRD). Leave false when the Helm chart installs the alert rules for every deployment.")
    scrape_interval: str = Field("30s", pattern=r"^[0-9]+(ms|s|m|h)$", description="Scrape interval of the PodMonitor, e.g. 30s.")
    labels: dict[str, str] | None = Field(
        None, description=(
            "Extra labels on the PodMonitor and the PrometheusRule, for a Prometheus that selects them by label: "
            "kube-prometheus-stack selects `release: <its Helm release>` by default, so without that label it "
            "scrapes none of this deployment's metrics and loads none of its alerts. The operator's own labels "
            "(app.kubernetes.io/*, dotsvlm.io/*) cannot be overridden."),
        json_schema_extra=_label_map_schema("monitoring.labels", _MONITORING_LABELS_REFUSED, 16))

    @field_validator("labels")
    @classmethod
    def _label_keys(cls, labels: dict[str, str] | None) -> dict[str, str] | None:
        """The CRD's checks, for a spec read without it: Kubernetes refuses the PodMonitor (422) on every
        reconcile otherwise."""
        return _check_label_map(labels, "monitoring.labels", _MONITORING_LABELS_REFUSED)


class DotsVLMDeploymentSpec(_Api):
    """Desired state: one dots.vlm1 model served with separately scaled vision and LLM pools."""

    model_config = ConfigDict(json_schema_extra=_rules(
        ("self.model.quantization != 'fp8' || self.llm.gpusPerReplica > 0",
         "FP8 weights need GPUs: set llm.gpusPerReplica, or set model.quantization to none for a CPU test deployment"),
    ))

    # No whitespace: Kubernetes refuses an image with it at either end (a templated "repo:tag " passed the CRD,
    # then every Ray Deployment got a 422), and one with it inside can never be pulled.
    image: str = Field(..., min_length=1, max_length=1024, pattern=r"^\S+$",
                       description="Serving image (Ray + dotsvlm_serving) used by every Ray pod.")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field("IfNotPresent", description="Pull policy for image.")
    image_pull_secrets: list[str] | None = Field(None, description="Names of Secrets used to pull image.")
    rollout_strategy: Literal["OneGroupAtATime", "AllAtOnce"] = Field("OneGroupAtATime", description=(
        "How a change that reaches every Ray pod (a new image, pull secrets, ...) rolls. OneGroupAtATime: the "
        "vision pool, then the LLM pool, then the API pool (with spec.apiPool), then the Ray head, each once the one "
        "before has finished, pool pods drained one at a time (the deployment serves until the head restarts). "
        "AllAtOnce: every group takes it "
        "together; the way to change the Ray or Python version of the image, since Ray refuses nodes of another "
        "version (one group at a time, the first new vision pod cannot join the old head and the rollout stops "
        "there). New requests get 503 until the new head and pools serve."))
    model: ModelSpec = Field(..., description="The checkpoint and how it is served.")
    vision: VisionPool = Field(default_factory=VisionPool, description="The vision-encoder pool.")
    llm: LLMPool = Field(default_factory=LLMPool, description="The language-model pool.")
    queue: QueueSpec = Field(default_factory=QueueSpec, description="Limits of the tensor queue between the pools.")
    api: ApiSpec = Field(default_factory=ApiSpec, description="The OpenAI-compatible API.")
    head: HeadSpec = Field(default_factory=HeadSpec, description="The Ray head pod.")
    api_pool: ApiPool | None = Field(None, description=(
        "Run the API and the tensor queue on pods of their own instead of the Ray head (see ApiPool). Unset: "
        "they run on the head. Turning it on or off restarts the head once (Ray's resources move)."))
    monitoring: MonitoringSpec = Field(default_factory=MonitoringSpec, description="Metrics and scraping.")
    slo: SLOSpec = Field(default_factory=SLOSpec, description="Latency targets per modality, for the autoscaler and the status.")


# --- the status ----------------------------------------------------------------------------------------


class Condition(_Api):
    """A standard Kubernetes condition."""

    type: str = Field(..., description="Ready, Progressing or Degraded.")
    status: Literal["True", "False", "Unknown"] = Field(..., description="True, False or Unknown.")
    reason: str = Field(..., description="One CamelCase word for machines.")
    message: str = Field("", description="What is happening and, when something is wrong, what to do.")
    last_transition_time: str | None = Field(None, description="When status last changed (RFC 3339).")
    observed_generation: int | None = Field(None, description="metadata.generation the condition was computed for.")


class ScalingDecisionStatus(_Api):
    """A decision of the autoscaling policy (it runs inside Ray Serve's controller)."""

    reason: str = Field(..., description=(
        "The signal that drove it (e.g. VisionBacklog, QueueAge, ImageTTFTMiss, LowLoad, IdleToZero), or why the "
        "pool holds (Stable, Stabilizing, MetricsMissing, MetricsStale: hold at the current size until signals arrive)."))
    message: str = Field("", description="The numbers behind the decision, for a person.")
    direction: Literal["up", "down", "hold"] | None = Field(None, description="up, down or hold.")
    desired: int | None = Field(None, description="Replicas the decision set.")
    raw: int | None = Field(None, description="Replicas the signals alone asked for (before windows and step limits).")
    signal: str | None = Field(None, description=(
        "The rule that set raw, also when reason says the pool holds (e.g. Stable with signal VisionBacklog: the "
        "measured encode rate sized the pool)."))
    time: str | None = Field(None, description="When the decision was made (RFC 3339).")


class PoolStatus(_Api):
    """Observed state of one pool, in replicas (an LLM replica spans nodesPerReplica pods)."""

    replicas: int = Field(0, description="Replicas whose pods all exist.")
    ready_replicas: int = Field(0, description="Replicas whose pods are all ready.")
    desired_replicas: int = Field(0, description=(
        "Replicas Ray Serve's autoscaler wants (its target); the spec's minReplicas until the Ray head answers."))
    current_replicas: int | None = Field(None, description="Replicas Ray Serve runs now (RUNNING); unset when the Ray head did not answer.")
    pods: int = Field(0, description="Pods of this pool.")
    ready_pods: int = Field(0, description="Ready pods of this pool.")
    pending_pods: int = Field(0, description="Pods no node could take yet (see the Degraded condition for the scheduler's reason).")
    desired_pods: int | None = Field(None, description="Pods the operator keeps for this pool (its Deployment's replicas).")
    pods_reason: str | None = Field(None, description=(
        "Why the pool has desiredPods: ServeTarget, AheadOfDemand (the autoscaler's signals ask for more than Serve's "
        "target yet), PendingPods (none added ahead while pods are pending), Draining (pods still host replicas that "
        "leave), ServeUnknown (the Ray head did not answer: size kept)."))
    pods_message: str | None = Field(None, description="The numbers behind podsReason.")
    ready_of_desired: str = Field("0/0", description="readyReplicas/desiredReplicas, for kubectl get.")
    last_decision: ScalingDecisionStatus | None = Field(None, description=(
        "The autoscaling policy's latest decision for this pool (kept until its outcome or reason changes)."))
    last_scale: ScalingDecisionStatus | None = Field(None, description="The last decision that changed the pool's size.")


class QueueStatus(_Api):
    """The tensor queue between the pools, as the ingress reported it."""

    depth: int = Field(0, description="Items waiting for an LLM replica.")
    bytes: int = Field(0, description="Bytes of embeddings waiting.")
    oldest_age_seconds: float = Field(0.0, description="Age of the oldest waiting item.")
    waiting_producers: int = Field(0, description="Requests waiting for room in a full queue.")
    max_items: int | None = Field(None, description="The queue's item limit (queue.maxItems).")
    leased: int | None = Field(None, description=(
        "Items LLM replicas have taken and are generating now (they leave the queue when their answer ends)."))
    rejected_total: int = Field(0, description="Requests answered 429 because the queue stayed full (since the queue started).")
    last_rejection_time: str | None = Field(None, description=(
        "When the operator first saw rejectedTotal grow (RFC 3339, within the status's refresh of ~10 s): "
        "how recent the last refusal is. Unset while the queue has refused nothing."))
    redelivered_total: int = Field(0, description="Items delivered again after an LLM replica died holding them.")
    observed_time: str | None = Field(None, description="When these values were read (RFC 3339); refreshed every few seconds under change.")


class BackpressureStatus(_Api):
    """Backpressure before the tensor queue (docs/serving.md, "Backpressure"), as the API replicas reported it."""

    vision_pending_pixels: int = Field(0, description="Pixels (after resize) of images sent to the vision stage and not back yet (the vision pool's scaling signal).")
    vision_pending_pixels_limit: int = Field(0, description="The vision stage's limit with the replicas running now (vision.maxPendingPixelsPerReplica x running replicas, at most vision.maxPendingPixels).")
    image_bytes: int = Field(0, description="Image bytes the API replicas hold before their requests' first token.")
    image_bytes_limit: int = Field(0, description="Their limit (api.maxImageBytesInFlight x API replicas).")
    rejected_total: int = Field(0, description="Requests answered 429 because a stage was full (since the API replicas started).")
    rejected: dict[str, int] | None = Field(None, description="The same by reason: vision_backlog_full, image_bytes_full, queue_full.")
    last_rejection_time: str | None = Field(None, description=(
        "When the operator first saw rejectedTotal grow (RFC 3339, within the status's refresh of ~10 s): "
        "how recent the last refusal is. Unset while nothing was refused."))
    observed_time: str | None = Field(None, description="When these values were read (RFC 3339).")


class SLOTargetStatus(_Api):
    """One latency target against what was observed."""

    target_seconds: float = Field(..., description="The target p90 (from spec.slo).")
    observed_p90_seconds: float | None = Field(None, description="Observed p90 over the recent window; unset: no requests of this kind.")
    met: bool | None = Field(None, description="observedP90Seconds <= targetSeconds; unset when nothing was observed.")


class SLOStatus(_Api):
    """Observed latencies per modality against spec.slo."""

    image_ttft: SLOTargetStatus | None = Field(None, alias="imageTTFT", description="Time to first token of requests with images.")
    text_ttft: SLOTargetStatus | None = Field(None, alias="textTTFT", description="Time to first token of text-only requests.")
    inter_token: SLOTargetStatus | None = Field(None, description="Time between two generated tokens.")
    encode_latency_p90_seconds: float | None = Field(None, description="Observed p90 of the vision stage (queueing and encoding).")


class AutoscalerStatus(_Api):
    """Whether the operator could read the autoscaler's report from the ingress (GET /-/autoscaler on the API port)."""

    reachable: bool = Field(False, description=(
        "The last read succeeded; false too while the report is not read (the Ray head pod not ready, or the Serve "
        "application not running): the figures in the status are then the last ones read."))
    message: str = Field("", description="Why it could not be read, or what was read.")
    url: str | None = Field(None, description="Where the operator reads it.")


class ServeAppStatus(_Api):
    """The Ray Serve application, as reported by the Ray head."""

    status: str = Field("Unknown", description="Ray Serve application status (RUNNING, DEPLOYING, ...) or Unknown.")
    message: str = Field("", description="Ray Serve's message, or why it could not be read.")
    config_hash: str | None = Field(None, description="Hash of the Serve config last deployed to the head.")
    last_drift: str | None = Field(None, description=(
        "The last time the head ran a Serve config other than the spec's (someone deployed by hand): what "
        "differed. The operator deployed the spec's config again (Event ServeConfigDrift); change the "
        "DotsVLMDeployment instead of the head."))
    last_drift_time: str | None = Field(None, description="When lastDrift was found and corrected (RFC 3339).")


class RedisPlace(_Api):
    """A place in Redis where a Ray head keeps (or kept) this deployment's cluster state."""

    redis_address: str = Field(..., description="host:port of the Redis.")
    storage_namespace: str = Field(..., description="Prefix of the deployment's keys (Ray names them RAY<namespace>@<table>).")
    password_secret_ref: RedisPasswordRef | None = Field(None, description="The Secret key with the Redis password, if any.")


class RedisStateStatus(RedisPlace):
    """Where the Ray head keeps this deployment's cluster state in Redis (spec.head.gcsFaultTolerance)."""

    message: str | None = Field(None, description=(
        "Set while this place is no longer the spec's (a new redisAddress or storageNamespace, or fault "
        "tolerance turned off): what the operator is doing to remove its keys."))
    pending: list[RedisPlace] | None = Field(None, description=(
        "Other places a Ray head pod used while this one's keys were being removed (the spec moved again "
        "meanwhile): each is emptied in turn, once no head pod uses it."))


class ApiPoolStatus(_Api):
    """The API pool's pods (spec.apiPool)."""

    pods: int = Field(0, description="API pods that exist (not stopping).")
    ready_pods: int = Field(0, description="API pods whose Ray node is up: the API Service sends requests to them.")


class DotsVLMDeploymentStatus(_Api):
    """Observed state, written by the operator."""

    observed_generation: int | None = Field(None, description="metadata.generation the operator last reconciled.")
    conditions: list[Condition] = Field(default_factory=list, description="Ready, Progressing and Degraded.")
    vision: PoolStatus = Field(default_factory=PoolStatus, description="The vision pool.")
    llm: PoolStatus = Field(default_factory=PoolStatus, description="The LLM pool.")
    api_pool: ApiPoolStatus | None = Field(None, description="The API pool's pods; unset without spec.apiPool.")
    serve_app: ServeAppStatus = Field(default_factory=ServeAppStatus, description="The Ray Serve application.")
    queue: QueueStatus | None = Field(None, description="The tensor queue between the pools (depth, oldest item, rejections).")
    backpressure: BackpressureStatus | None = Field(None, description="The vision stage's backlog and the image bytes held against their limits, and the requests refused with 429 by reason.")
    slo: SLOStatus | None = Field(None, description="Observed p90 latencies against spec.slo, with met / missed per target.")
    autoscaler: AutoscalerStatus | None = Field(None, description="Whether the autoscaler's report could be read.")
    endpoint: str | None = Field(None, description="Base URL of the OpenAI-compatible API inside the cluster.")
    redis_state: RedisStateStatus | None = Field(None, description=(
        "With spec.head.gcsFaultTolerance: where the head keeps the Ray state in Redis. After the spec moves it "
        "(a new redisAddress or storageNamespace, or fault tolerance off), this names the previous place until "
        "the operator has removed its keys (Job <name>-redis-cleanup-prev; Events RedisStateRemoved or "
        "RedisStateLeft), then the new one."))
