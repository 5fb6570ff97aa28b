"""kopf handlers: one reconcile loop per DotsVLMDeployment.

Each resource gets a kopf daemon with two kinds of pass:
- a *full* pass when its spec changes, when a child object (Deployment, Service, ...) changes or is
  deleted, and at least every `resync_seconds`: build the children (pure), apply those that changed (all of
  them on the resync, to correct drift), deploy the Serve config when it changed, list the pods, observe,
  write status;
- a *light* pass (the pod loop) every `pod_loop_seconds` and on every pod event: read Serve's targets and
  the autoscaler's report, size each pool's pods (`pod_sizing`), set the pods' deletion cost and the pool
  Deployments' replicas when they change, write status when it changes. Pods come from a cache fed by the
  pod events, so an idle light pass makes no Kubernetes API call.
All state that matters lives in the resource's status and in the cluster, so a restarted operator simply
carries on (the in-memory caches only save calls).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import os
import ssl
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import httpx
import kopf
from kubernetes.client.rest import ApiException
from pydantic import ValidationError
from pydantic.alias_generators import to_camel

from dotsvlm_operator import (builders, ingress_client, models, naming, pod_sizing, redis_cleanup, rollout, serve_app,
                              serve_drift)
from dotsvlm_operator.kube import KUBE_THREADS, Kube
from dotsvlm_operator.monitoring.operator_metrics import METRICS
from dotsvlm_operator.ray_head import RayHeadClient, RayHeadError, ServeApp
from dotsvlm_serving.serve_config import LLM_DEPLOYMENT
from dotsvlm_operator.status import (PodView, ServeObservation, compute_status, decision_ages, monitoring_notes,
                                     pod_view, raw_wish, scaling_events, serve_deployment)

HEAD_URL_OVERRIDE_ENV = "DOTSVLM_RAY_HEAD_URL_OVERRIDE"
API_URL_OVERRIDE_ENV = "DOTSVLM_API_URL_OVERRIDE"
POOLS = (naming.COMPONENT_VISION, naming.COMPONENT_LLM)
# After re-deploying over a drifted config, wait this long before doing it again (a head that keeps
# reporting a difference must not be re-deployed on every pass).
DRIFT_REDEPLOY_INTERVAL_S = 30.0


SERVICE_ACCOUNT_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


def _own_namespace() -> str | None:
    """The namespace the operator runs in: $POD_NAMESPACE (the chart sets it), else the pod's service
    account's; None outside a cluster."""
    ns = os.environ.get(naming.OPERATOR_NAMESPACE_ENV)
    if ns:
        return ns
    try:
        with open(SERVICE_ACCOUNT_NAMESPACE_FILE) as f:
            return f.read().strip() or None
    except OSError:
        return None


@dataclass
class OperatorConfig:
    """Operator-wide settings (from the command line)."""

    # Test/dev setting: talk to this Ray dashboard URL instead of the head Service of each deployment.
    # May contain {name} and {namespace}.
    head_url_override: str | None = field(default_factory=lambda: os.environ.get(HEAD_URL_OVERRIDE_ENV) or None)
    # Test/dev setting: read the ingress's /-/autoscaler at this base URL instead of the API Service.
    api_url_override: str | None = field(default_factory=lambda: os.environ.get(API_URL_OVERRIDE_ENV) or None)
    resync_seconds: float = 60.0
    pod_loop_seconds: float = 5.0
    head_timeout_seconds: float = 5.0
    priority: int = 0
    # The operator's own namespace: the deployments' NetworkPolicies admit the operator from there only.
    operator_namespace: str | None = field(default_factory=lambda: _own_namespace())


@dataclass
class ResourceState:
    """What the daemon of one resource remembers between passes (only to save API calls)."""

    wake: asyncio.Event = field(default_factory=asyncio.Event)
    full: bool = True  # the next pass is a full one
    pods: dict[str, dict[str, Any]] = field(default_factory=dict)  # pod name -> pod, from pod events
    applied: dict[str, tuple[str, str | None]] = field(default_factory=dict)  # kind/name -> (hash, version)
    dirty: set[str] = field(default_factory=set)  # kind/name changed by someone else: apply again
    last_full: float = 0.0
    token: str | None = None
    api_key: str | None = None
    status: models.DotsVLMDeploymentStatus | None = None  # the last status written
    built: tuple[tuple, list[tuple[dict[str, Any], str]]] | None = None  # (inputs, [(child, digest)]) last built
    spec_built: tuple[tuple, list[dict[str, Any]]] | None = None  # (inputs, children with the spec's own templates)
    serve_body: tuple[str, dict[str, Any], str] | None = None  # (spec JSON, Serve body, its hash)
    drift_deployed_at: float = float("-inf")  # monotonic time of the last re-deploy over a drifted config
    live: dict[str, dict[str, Any]] = field(default_factory=dict)  # Deployment name -> as the API server has it
    api_pool_read: bool = False  # the API pool's Deployment was read once (spec without apiPool: one left over?)
    template_plan: rollout.TemplatePlan | None = None  # the pod template per Ray component (a change rolls in turn)
    generation: int | None = None  # the spec generation the last full pass started from
    # The last answer of the Ray head and the ingress, with its monotonic time: a pass woken by pod events
    # uses it while it is younger than the pod loop's period (a rollout's pod events do not each call both).
    observed: tuple[float, ServeObservation, ingress_client.AutoscalerReport | None] | None = None
    # The children the API server refused (kind/name -> 'Kind name: its words'): the light passes keep them in
    # the status and do not send them; a full pass sends them again at `retry_full_at` (monotonic).
    refused: dict[str, str] = field(default_factory=dict)
    retry_full_at: float = 0.0
    # Per pool, the policy's decision time last read, when (monotonic) it was first read and last read:
    # `decision_ages`.
    decisions_heard: dict[str, tuple[float, float, float]] = field(default_factory=dict)


CONFIG = OperatorConfig()
_resources: dict[tuple[str, str], ResourceState] = {}
_kube: Kube | None = None
_crds: dict[str, tuple[bool, float]] = {}  # Prometheus Operator kind -> (CRD present, when checked)
MONITORING_KINDS = ("PodMonitor", "PrometheusRule")


_http: dict[tuple[str, str], httpx.AsyncClient] = {}  # (namespace, name) -> the client of that deployment
_tls: ssl.SSLContext | None = None


def http(owner: naming.Owner) -> httpx.AsyncClient:
    """The HTTP client of one deployment (its Ray head and its ingress), kept while its daemon runs so its
    connections are reused. One client per deployment, not one for all: httpcore's pool is a list that each
    request scans, so with 100 deployments every call walked 100 idle connections (a third of the
    operator's CPU in a burst of creates). The TLS trust store is loaded once and shared."""
    global _tls
    key = (owner.namespace, owner.name)
    client = _http.get(key)
    if client is None:
        if _tls is None:
            _tls = httpx.create_ssl_context()
        client = _http[key] = httpx.AsyncClient(verify=_tls, limits=httpx.Limits(max_connections=8,
                                                                                 max_keepalive_connections=4))
    return client


async def _forget_http(key: tuple[str, str]) -> None:
    client = _http.pop(key, None)
    if client is not None:
        await client.aclose()


def kube() -> Kube:
    global _kube
    if _kube is None:
        _kube = Kube()
    return _kube


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")




# --- operator settings -------------------------------------------------------------------------------------

class NoDiffBaseStorage(kopf.DiffBaseStorage):
    """No diff-base: kopf builds every watched object's "essence" (a deep copy of it) on every watch event,
    to find what changed for on.create/on.update/on.field handlers. This operator has none (a daemon and
    event handlers; it compares what it builds with what it applied itself), so that copy of each pod and
    Deployment event was wasted: a tenth of the operator's CPU in a burst of creates. A change-detecting
    handler would need kopf's annotation storage back (tests/unit/test_operator_settings.py says so)."""

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> Any:
        return None

    def fetch(self, *, body: kopf.Body) -> Any:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: Any) -> None:
        return None


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    # Threads for the blocking Kubernetes client (asyncio.to_thread); Python's default is CPUs + 4, which
    # lets only a handful of resources talk to the API server at once when many are created together.
    asyncio.get_running_loop().set_default_executor(
        concurrent.futures.ThreadPoolExecutor(max_workers=KUBE_THREADS, thread_name_prefix="kube"))
    # Keep kopf's bookkeeping in annotations, out of our structural status.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=naming.GROUP)
    settings.persistence.diffbase_storage = NoDiffBaseStorage()
    settings.persistence.finalizer = f"{naming.GROUP}/operator"
    # Our Events are explicit (kopf.event, each with a reason a person can filter on). kopf would also post
    # every INFO log line about a resource as an Event (reason "Logging"): each transition twice, each pool
    # resize once more, a burst of creates several hundred extra API writes.
    settings.posting.loggers = False
    settings.peering.priority = CONFIG.priority
    settings.peering.lifetime = 30
    settings.watching.server_timeout = 300
    # The child watches' label filter, sent to the API server: the handlers' own `labels=` filters only after
    # kopf has listed and watched every pod, Secret, ... of the cluster (Helm's release Secrets included).
    settings.watching.label_selectors[_is_child_resource] = CHILD_LABEL_SELECTOR
    settings.watching.chunk_size = 500  # the first list of each watch in pages, not one reply
    settings.networking.request_timeout = 60


@kopf.on.cleanup()
async def close_http(**_: Any) -> None:
    for key in list(_http):
        await _forget_http(key)


# --- triggers ----------------------------------------------------------------------------------------------

@kopf.on.event(naming.GROUP, naming.VERSION, naming.PLURAL)
async def on_resource_event(name: str | None, namespace: str | None, body: kopf.Body, **_: Any) -> None:
    """A spec change (a generation the loop has not reconciled yet) wakes the resource's reconcile loop at
    once. Not kopf's own patch of a new resource (its finalizer), nor a status write: a burst of creates
    would otherwise make a second full pass of each."""
    state = _resources.get((namespace or "", name or ""))
    if state is not None and body.get("metadata", {}).get("generation") != state.generation:
        state.full = True
        state.wake.set()


_KIND_OF_PLURAL = {"deployments": "Deployment", "services": "Service", "configmaps": "ConfigMap", "secrets": "Secret",
                   "poddisruptionbudgets": "PodDisruptionBudget", "networkpolicies": "NetworkPolicy"}


def _child_key(kind: str, name: str) -> str:
    return f"{kind}/{name}"


def _change_marker(obj: dict[str, Any]) -> str | None:
    """What changes when someone else changes the object: its generation where it has one (status updates
    by a controller do not bump it), else its resourceVersion."""
    meta = obj.get("metadata") or {}
    generation = meta.get("generation")
    return f"g{generation}" if generation is not None else meta.get("resourceVersion")


async def _on_child_event(labels: dict[str, str] | None, namespace: str | None, name: str | None, body: kopf.Body,
                    type: str | None, resource: kopf.Resource, **_: Any) -> None:
    """A child changed, was edited or deleted: re-reconcile its owner, re-applying that child unless the
    change is our own apply or only its status (same generation, or same resourceVersion)."""
    state = _resources.get((namespace or "", (labels or {}).get(naming.LABEL_DEPLOYMENT, "")))
    if state is None:
        return
    kind = _KIND_OF_PLURAL.get(resource.plural, resource.plural)
    key = _child_key(kind, name or "")
    if kind == "Deployment":
        # Its rollout's progress (status) decides when the next group takes its new pod template.
        if type == "DELETED":
            state.live.pop(name or "", None)
        else:
            state.live[name or ""] = dict(body)
        if state.template_plan is not None and state.template_plan.rolling:
            state.full = True
            state.wake.set()
    ours = state.applied.get(key)
    if type != "DELETED" and ours is not None and ours[1] == _change_marker(body):
        return
    state.dirty.add(key)
    state.full = True
    state.wake.set()


async def _on_pod_event(labels: dict[str, str] | None, namespace: str | None, name: str | None, body: kopf.Body,
                  type: str | None, **_: Any) -> None:
    """A pod changed (scheduled, ready, gone): keep the owner's pod cache and wake its light pass."""
    state = _resources.get((namespace or "", (labels or {}).get(naming.LABEL_DEPLOYMENT, "")))
    if state is None:
        return
    if type == "DELETED":
        state.pods.pop(name or "", None)
    else:
        state.pods[name or ""] = dict(body)
    state.wake.set()


_CHILD_SELECTOR = {naming.LABEL_MANAGED_BY: naming.MANAGER, naming.LABEL_DEPLOYMENT: kopf.PRESENT}
CHILD_LABEL_SELECTOR = f"{naming.LABEL_MANAGED_BY}={naming.MANAGER},{naming.LABEL_DEPLOYMENT}"  # the same, for the API
_CHILD_KINDS = [("", "v1", "pods"), ("apps", "v1", "deployments"), ("", "v1", "services"),
                ("", "v1", "configmaps"), ("", "v1", "secrets"), ("policy", "v1", "poddisruptionbudgets"),
                ("networking.k8s.io", "v1", "networkpolicies")]


def _is_child_resource(resource: kopf.Resource) -> bool:
    return (resource.group, resource.version, resource.plural) in _CHILD_KINDS


kopf.on.event("", "v1", "pods", labels=_CHILD_SELECTOR, id="child-pods")(_on_pod_event)
for _group, _version, _plural in _CHILD_KINDS[1:]:
    kopf.on.event(_group or None, _version, _plural, labels=_CHILD_SELECTOR, id=f"child-{_plural}")(_on_child_event)


# --- the reconcile loop ------------------------------------------------------------------------------------

@kopf.daemon(naming.GROUP, naming.VERSION, naming.PLURAL, id="reconciler", cancellation_timeout=10)
async def reconciler(name: str, namespace: str, body: kopf.Body, stopped: kopf.DaemonStopped,
                     logger: logging.Logger, **_: Any) -> None:
    key = (namespace, name)
    state = _resources[key] = ResourceState()
    METRICS.managed(len(_resources))
    failures = refusals = 0
    try:
        while not stopped:
            woken = state.wake.is_set()  # by an event, not by the pod loop's timer
            state.wake.clear()
            full = (state.full or time.monotonic() - state.last_full >= CONFIG.resync_seconds or failures > 0
                    or bool(state.refused) and time.monotonic() >= state.retry_full_at)
            started = time.monotonic()
            try:
                if full:
                    await reconcile_once(body, logger, state)
                    METRICS.reconciled(namespace, name, time.monotonic() - started, ok=True)
                else:
                    await size_pods_once(body, logger, state, reuse_observation=woken)
                failures = 0
            except ChildrenRefused as exc:  # the pass went on; its status says so (Degraded=ReconcileFailed)
                # The light passes go on (the pools follow the autoscaler); a full pass retries the refused
                # children after a backoff, as a failed pass would.
                failures = 0
                refusals += 1
                state.retry_full_at = time.monotonic() + min(2.0 ** refusals, CONFIG.resync_seconds)
                METRICS.reconciled(namespace, name, time.monotonic() - started, ok=False)
                logger.error(f"the API server refused children ({refusals} times in a row): {exc}")
            except Exception as exc:  # noqa: BLE001 - one bad pass must not end the loop
                failures += 1
                METRICS.reconciled(namespace, name, time.monotonic() - started, ok=False)
                logger.exception(f"reconcile failed ({failures} in a row): {exc}")
                await _report_failure(body, exc, logger)
            if not state.refused:
                refusals = 0
            if failures:
                wait = min(2.0 ** failures, CONFIG.resync_seconds)
            else:
                wait = min(CONFIG.pod_loop_seconds, max(0.0, state.last_full + CONFIG.resync_seconds - time.monotonic()))
                if state.refused:
                    wait = min(wait, max(0.0, state.retry_full_at - time.monotonic()))
            waiter = asyncio.ensure_future(state.wake.wait())
            stopper = asyncio.ensure_future(stopped.wait())
            try:
                await asyncio.wait({waiter, stopper}, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
                stopper.cancel()
            # Let a burst of events (a rollout touches many pods) settle into one pass.
            if state.wake.is_set() and not stopped:
                settle = asyncio.ensure_future(stopped.wait())
                try:
                    await asyncio.wait({settle}, timeout=0.3 if state.full else 0.1)
                finally:
                    settle.cancel()
    finally:
        if _resources.get(key) is state:
            del _resources[key]
            METRICS.forget(namespace, name)
            await _forget_http(key)
        METRICS.managed(len(_resources))


# --- on deletion ---------------------------------------------------------------------------------------------

@kopf.on.delete(naming.GROUP, naming.VERSION, naming.PLURAL, id="redis-cleanup")
async def remove_redis_state(name: str, namespace: str, body: kopf.Body, runtime: Any, retry: int,
                             logger: logging.Logger, **_: Any) -> None:
    """With spec.head.gcsFaultTolerance: stop the head, then remove its state from Redis (redis_cleanup.next_step)
    before the resource goes. Without it there is nothing outside Kubernetes to remove."""
    if retry == 0:
        _warn_unfinished_move(body, logger)
    if not ((body.get("spec") or {}).get("head") or {}).get("gcsFaultTolerance"):
        return
    try:
        spec = models.DotsVLMDeploymentSpec.model_validate(dict(body.get("spec") or {}))
    except ValidationError as exc:
        kopf.event(body, type="Warning", reason="RedisStateLeft",
                   message=f"the spec is not valid, so its Ray state in Redis cannot be removed: {exc}"[:1000])
        return
    ft = spec.head.gcs_fault_tolerance
    if ft is None:
        return
    if (namespace, name) in _resources:
        raise kopf.TemporaryError("waiting for the reconcile loop to stop", delay=1)
    owner = naming.Owner.of(body["metadata"])
    k = kube()
    head = await asyncio.to_thread(k.get, "Deployment", namespace, naming.head_name(name))
    job_name = naming.redis_cleanup_job_name(name)
    job = await asyncio.to_thread(k.get, "Job", namespace, job_name)
    if job is not None and ((job.get("metadata") or {}).get("annotations") or {}).get(naming.ANNOTATION_OWNER_UID) != owner.uid:
        # Left by an earlier resource of the same name (its cleanup was interrupted): not this one's answer.
        await asyncio.to_thread(k.delete, "Job", namespace, job_name)
        raise kopf.TemporaryError(f"removing the Job {job_name} of an earlier resource of this name", delay=2)
    pods = await asyncio.to_thread(k.list_pods, namespace, name)
    step = redis_cleanup.next_step(ft, owner.uid, head_deployment=head is not None,
                                   head_pods=sum(1 for p in pods if _component(p) == naming.COMPONENT_HEAD), job=job,
                                   job_pods=_job_pods(pods, job_name), elapsed_s=runtime.total_seconds())
    step = await _cleanup_job_step(body, step, job, lambda: builders.redis_cleanup_job(owner, spec),
                                   lambda why: redis_cleanup.give_up(ft, owner.uid, why), logger)
    if step.action in ("done", "give_up"):
        return
    if step.action == "stop_head":
        await asyncio.to_thread(k.delete, "Deployment", namespace, naming.head_name(name))
    logger.info(step.message)
    raise kopf.TemporaryError(step.message, delay=2)


def _warn_unfinished_move(body: kopf.Body, logger: logging.Logger) -> None:
    """Deleted while the keys at a previous place were still to be removed (status.redisState): that Job goes
    with the resource, so say which keys are left and how to remove them."""
    old = _old_status(body)
    recorded = old.redis_state if old is not None else None
    if recorded is None:
        return
    uid = body["metadata"]["uid"]
    left: list[models.RedisPlace] = [recorded, *(recorded.pending or [])]
    try:
        spec = models.DotsVLMDeploymentSpec.model_validate(dict(body.get("spec") or {}))
        wanted = redis_cleanup.location(spec.head.gcs_fault_tolerance, uid)
        left = [p for p in left if not redis_cleanup.same_place(p, wanted)]  # the deletion's own Job empties that one
    except ValidationError:  # the spec's place is unknown: say what the status names
        pass
    for place in left:
        step = redis_cleanup.give_up_previous(place, uid, "the resource was deleted before the operator removed it")
        logger.warning(step.message)
        kopf.event(body, type="Warning", reason="RedisStateLeft", message=step.message[:1000])


async def _cleanup_job_step(body: kopf.Body, step: redis_cleanup.Step, job: dict[str, Any] | None,
                            make_job: Callable[[], dict[str, Any]], give_up_with: Callable[[str], redis_cleanup.Step],
                            logger: logging.Logger) -> redis_cleanup.Step:
    """Act on a Redis cleanup's step: create the Job ("run_job"; refused for good with 403, e.g. its namespace is
    being deleted: give up), or at the end post RedisStateRemoved / RedisStateLeft and delete the Job."""
    k = kube()
    if step.action == "run_job":
        try:
            await asyncio.to_thread(k.apply, make_job())
        except ApiException as exc:
            if exc.status != 403:
                raise
            step = give_up_with(f"the cleanup Job could not be created: {error_text(exc)}")
    if step.action in ("done", "give_up"):
        done = step.action == "done"
        (logger.info if done else logger.warning)(step.message)
        kopf.event(body, type="Normal" if done else "Warning", reason="RedisStateRemoved" if done else "RedisStateLeft",
                   message=step.message[:1000])
        if job is not None:
            await asyncio.to_thread(k.delete, "Job", job["metadata"]["namespace"], job["metadata"]["name"])
    return step


def _component(pod: dict[str, Any]) -> str | None:
    return ((pod.get("metadata") or {}).get("labels") or {}).get(naming.LABEL_COMPONENT)


def _job_pods(pods: Iterable[dict[str, Any]], job_name: str) -> list[dict[str, Any]]:
    """The pods of one Job (the Job controller labels them with its name)."""
    return [p for p in pods if ((p.get("metadata") or {}).get("labels") or {}).get("job-name") == job_name]


async def _redis_state(body: kopf.Body, owner: naming.Owner, spec: models.DotsVLMDeploymentSpec,
                       old: models.DotsVLMDeploymentStatus | None, state: ResourceState,
                       logger: logging.Logger) -> models.RedisStateStatus | None:
    """status.redisState: where the head keeps the Ray state in Redis. After the spec moved it, the keys at the
    previous place are removed once no head pod uses it (redis_cleanup.previous_step); no API call otherwise."""
    wanted = redis_cleanup.location(spec.head.gcs_fault_tolerance, owner.uid)
    recorded = old.redis_state if old is not None else None
    if not redis_cleanup.moved(recorded, wanted):
        # Back at the recorded place (L1 -> L2 -> L1): the places in between are still to be emptied.
        return redis_cleanup.after_cleanup(recorded, wanted) if recorded is not None and recorded.pending else wanted
    assert recorded is not None
    k = kube()
    job_name = naming.previous_redis_cleanup_job_name(owner.name)
    heads = [p for p in state.pods.values() if _component(p) == naming.COMPONENT_HEAD]
    recorded = redis_cleanup.with_pending(recorded, wanted, heads)
    head_uses = any(redis_cleanup.head_uses(p, recorded) for p in heads)
    job = None if head_uses else await asyncio.to_thread(k.get, "Job", owner.namespace, job_name)
    if job is not None and ((job.get("metadata") or {}).get("annotations") or {}).get(
            naming.ANNOTATION_REDIS_PLACE) != redis_cleanup.place_label(recorded):
        # Left by an earlier move that was given up: not this place's answer.
        await asyncio.to_thread(k.delete, "Job", owner.namespace, job_name)
        return recorded.model_copy(update={"message": f"removing the Job {job_name} of an earlier move first"})
    step = redis_cleanup.previous_step(recorded, wanted, owner.uid, head_uses_recorded=head_uses, job=job,
                                       job_pods=_job_pods(state.pods.values(), job_name),
                                       job_age_s=redis_cleanup.job_age_s(job, time.time()) if job is not None else 0.0)
    if step.action == "record":
        return wanted
    step = await _cleanup_job_step(body, step, job, lambda: builders.redis_cleanup_job(owner, spec, previous=recorded),
                                   lambda why: redis_cleanup.give_up_previous(recorded, owner.uid, why), logger)
    if step.action in ("done", "give_up"):
        return redis_cleanup.after_cleanup(recorded, wanted)
    if recorded.message != step.message:
        logger.info(step.message)
    return recorded.model_copy(update={"message": step.message})


def error_text(exc: BaseException) -> str:
    """A short, readable reason: the API server's own message when there is one."""
    body = getattr(exc, "body", None)
    if body:
        try:
            return str(json.loads(body).get("message") or body)[:500]
        except (ValueError, AttributeError):
            return str(body)[:500]
    return f"{type(exc).__name__}: {exc}"[:500]


async def _report_failure(body: kopf.Body, exc: BaseException, logger: logging.Logger) -> None:
    """Show a failed pass in status (Degraded=ReconcileFailed), so `kubectl describe` says what is wrong."""
    meta = body["metadata"]
    old = _old_status(body) or models.DotsVLMDeploymentStatus()
    prev = next((c for c in old.conditions if c.type == "Degraded"), None)
    message = f"the operator could not reconcile this resource and will retry: {error_text(exc)}"
    if prev is not None and prev.reason == "ReconcileFailed" and prev.message == message:
        return
    cond = models.Condition(type="Degraded", status="True", reason="ReconcileFailed", message=message,
                            last_transition_time=_now(), observed_generation=meta.get("generation"))
    conditions = [c for c in old.conditions if c.type != "Degraded"] + [cond]
    try:
        await asyncio.to_thread(kube().patch_status, meta["namespace"], meta["name"],
                                {"conditions": [c.to_api() for c in conditions]})
        kopf.event(body, type="Warning", reason="ReconcileFailed", message=message[:1000])
    except Exception as again:  # noqa: BLE001 - the API server may be the problem; the log has it
        logger.warning(f"could not record the failure in status either: {again}")


def head_url(owner: naming.Owner) -> str:
    if CONFIG.head_url_override:
        return CONFIG.head_url_override.format(name=owner.name, namespace=owner.namespace)
    return naming.dashboard_url(owner)


def api_url(owner: naming.Owner, spec: models.DotsVLMDeploymentSpec) -> str:
    if CONFIG.api_url_override:
        return CONFIG.api_url_override.format(name=owner.name, namespace=owner.namespace)
    return naming.api_url(owner, spec.api.port)


async def observe_serve(owner: naming.Owner, spec: models.DotsVLMDeploymentSpec, token: str,
                        old: models.DotsVLMDeploymentStatus | None, logger: logging.Logger,
                        state: ResourceState | None = None) -> ServeObservation:
    """Deploy the Serve config if it changed since the last successful deploy, the head lost it, or the
    head runs another config (drift: someone deployed by hand), then read the application: its status
    and each deployment's target and replicas. `drift` in the answer says what differed."""
    spec_json = spec.model_dump_json()
    if state is not None and state.serve_body is not None and state.serve_body[0] == spec_json:
        _, body, digest = state.serve_body
    else:
        body = serve_app.deploy_body(spec)
        digest = serve_app.body_hash(body)
        if state is not None:
            state.serve_body = (spec_json, body, digest)
    url = head_url(owner)
    deployed = old.serve_app.config_hash if old else None
    drift = None
    async with RayHeadClient(url, token, timeout=CONFIG.head_timeout_seconds, http=http(owner)) as client:
        try:
            app = await client.application()
            if deployed == digest and app.status not in ("NOT_DEPLOYED", "DELETING"):
                # What the head runs, against what the spec wants: someone may have deployed by hand.
                drift = serve_drift.config_drift(body, app.deployed_config)
                if drift is not None and state is not None:
                    if time.monotonic() - state.drift_deployed_at < DRIFT_REDEPLOY_INTERVAL_S:
                        drift = None  # just re-deployed: give the head time before trying again
                    else:
                        state.drift_deployed_at = time.monotonic()
            if deployed != digest or app.status == "NOT_DEPLOYED" or drift is not None:
                await client.deploy(body)
                logger.info(f"deployed the Serve application to {url} (config {digest})"
                            + (f": the head ran another config ({drift})" if drift else ""))
                deployed = digest
                app = await client.application()
        except RayHeadError as exc:
            return ServeObservation(url=url, reachable=not exc.unreachable, status="Unknown", message=str(exc),
                                    config_hash=old.serve_app.config_hash if old else None)
        app = await _with_replica_spans(client, app, spec, logger)
    return ServeObservation(url=url, reachable=True, status=app.status, message=app.message, config_hash=deployed,
                            app=app, drift=drift)


async def _with_replica_spans(client: RayHeadClient, app: ServeApp, spec: models.DotsVLMDeploymentSpec,
                              logger: logging.Logger) -> ServeApp:
    """An LLM replica over several nodes: which pods it holds (all of them, not just the first), so the
    pods of a replica that stays are never the ones removed. Without the answer, nodesPerReplica pods
    are kept per replica (pod_sizing)."""
    dep = app.deployments.get(LLM_DEPLOYMENT)
    if spec.llm.nodes_per_replica <= 1 or dep is None or not dep.replicas:
        return app
    try:
        spans = await client.replica_spans()
    except RayHeadError as exc:
        logger.debug(f"could not read the LLM replicas' nodes from Ray's state API: {exc}")
        return app
    return replace(app, deployments={**app.deployments, LLM_DEPLOYMENT: dep.with_spans(spans)})


def _old_status(body: kopf.Body) -> models.DotsVLMDeploymentStatus | None:
    known = {to_camel(n) for n in models.DotsVLMDeploymentStatus.model_fields}
    raw = {k: v for k, v in dict(body.get("status") or {}).items() if k in known}
    if not raw:
        return None
    try:
        return models.DotsVLMDeploymentStatus.model_validate(raw)
    except ValidationError:
        return None


def _crd_installed(kind: str) -> bool:
    """Whether the Prometheus Operator's CRD for `kind` exists (re-checked every 5 minutes)."""
    seen = _crds.get(kind)
    if seen is None or time.monotonic() - seen[1] > 300:
        seen = _crds[kind] = (kube().has_crd(kind), time.monotonic())
    return seen[0]


def _installed_as_last_seen() -> dict[str, bool]:
    """The light pass asks no API: the CRDs as the last full pass found them."""
    return {kind: (_crds.get(kind) or (False, 0.0))[0] for kind in MONITORING_KINDS}


def _pool_spec(spec: models.DotsVLMDeploymentSpec, pool: str) -> models.VisionPool | models.LLMPool:
    return spec.vision if pool == naming.COMPONENT_VISION else spec.llm


def _previous_replicas(spec: models.DotsVLMDeploymentSpec, old: models.DotsVLMDeploymentStatus | None,
                       pool: str, live: dict[str, Any] | None) -> int | None:
    """The replicas the pool's pods were last sized for (kept while Serve cannot be asked). When the status does
    not say (a restarted operator that cannot read it, e.g. a field of a newer version), the live Deployment's
    size: sizing the pool at minReplicas would remove pods that still host replicas."""
    pods = getattr(old, pool).desired_pods if old is not None else None
    if pods is None and live is not None:
        pods = (live.get("spec") or {}).get("replicas")
    if not isinstance(pods, int):
        return None
    return pods // (spec.llm.nodes_per_replica if pool == naming.COMPONENT_LLM else 1)


def _build(owner: naming.Owner, spec: models.DotsVLMDeploymentSpec, token: str, pods: dict[str, int],
           installed: dict[str, bool], templates: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    return builders.children(owner, spec, vision_replicas=pods[naming.COMPONENT_VISION],
                             llm_replicas=pods[naming.COMPONENT_LLM] // spec.llm.nodes_per_replica,
                             pod_monitor_supported=installed["PodMonitor"],
                             prometheus_rule_supported=installed["PrometheusRule"],
                             ray_token_hash=builders.token_hash(token),
                             operator_namespace=CONFIG.operator_namespace, templates=templates)


def _build_inputs(generation: int | None, spec: models.DotsVLMDeploymentSpec, token: str, pods: dict[str, int],
                  installed: dict[str, bool]) -> tuple:
    return (generation, spec.model_dump_json(), token, tuple(sorted(pods.items())), tuple(sorted(installed.items())))


def _children(owner: naming.Owner, spec: models.DotsVLMDeploymentSpec, token: str, pods: dict[str, int],
              installed: dict[str, bool], state: ResourceState, generation: int | None,
              prebuilt: list[dict[str, Any]] | None = None) -> list[tuple[dict[str, Any], str]]:
    """The children (pure builders), built again only when their inputs changed: the pod loop asks every
    few seconds and nearly always gets the same answer. `installed`: which Prometheus Operator CRDs exist.
    The Ray components' pod templates are those of the last rollout plan (`state.template_plan`);
    `prebuilt`: the same children already built with exactly those templates."""
    templates = state.template_plan.templates if state.template_plan is not None else {}
    inputs = (*_build_inputs(generation, spec, token, pods, installed), builders.object_hash(templates))
    if state.built is None or state.built[0] != inputs:
        objs = prebuilt if prebuilt is not None else _build(owner, spec, token, pods, installed, templates)
        state.built = (inputs, [(obj, builders.object_hash(obj)) for obj in objs])
    return state.built[1]


class ChildrenRefused(Exception):
    """The API server refused some children (an admission policy, a value Kubernetes does not allow); the others
    were applied and the pass went on to size the pools and write the status (Degraded=ReconcileFailed)."""


def _apply_changed(k: Kube, objs: list[tuple[dict[str, Any], str]], state: ResourceState, force: bool,
                   refused: dict[str, str] | None = None) -> int:
    """Server-side apply the objects that changed since we last applied them, that someone else changed,
    or all of them when `force` (the resync: drift we did not hear about). Returns how many were sent.

    `refused`: collect the children the API server refuses (4xx) there, key -> 'Kind name: its words', and go on
    with the others (a refused LoadBalancer Service must not keep a new resource from its Ray pods); a child
    already in it is not sent again this pass. Without it the first refusal raises."""
    sent = 0
    for obj, digest in objs:
        key = _child_key(obj["kind"], obj["metadata"]["name"])
        known = state.applied.get(key)
        if not force and known is not None and known[0] == digest and key not in state.dirty:
            continue
        if refused is not None and key in refused:
            continue
        state.dirty.discard(key)
        try:
            live = k.apply(obj)
        except ApiException as exc:
            if refused is None or not 400 <= (exc.status or 0) < 500:
                raise
            state.dirty.add(key)  # sent again on the next full pass
            refused[key] = f"{obj['kind']} {obj['metadata']['name']}: {error_text(exc)}"
            continue
        state.applied[key] = (digest, _change_marker(live or {}))
        if obj["kind"] == "Deployment" and live:
            state.live[obj["metadata"]["name"]] = live
        sent += 1
    return sent


async def reconcile_once(body: kopf.Body, logger: logging.Logger, state: ResourceState | None = None) -> None:
    """The full pass: children (changed ones; all on the resync), Serve config, pods, status."""
    state = state if state is not None else ResourceState()
    state.full = False
    meta = body["metadata"]
    owner = naming.Owner.of(meta)
    generation = state.generation = meta.get("generation")
    old = state.status or _old_status(body)
    try:
        spec = models.DotsVLMDeploymentSpec.model_validate(dict(body.get("spec") or {}))
    except ValidationError as exc:
        # The CRD's schema normally stops this; an older CRD version might not.
        state.refused = {}  # what an earlier spec's children met says nothing now (and retries nothing)
        await _write_invalid(body, owner, generation, str(exc), old)
        return

    k = kube()
    forced = time.monotonic() - state.last_full >= CONFIG.resync_seconds
    token_key = _child_key("Secret", naming.token_secret_name(owner.name))
    if state.token is None or forced or token_key in state.dirty:
        # Read again on the resync, or when the watch saw someone else change or delete the Secret. Its
        # version is remembered, so the watch event of our own create or read is not taken for a change.
        state.dirty.discard(token_key)
        state.token, version = await asyncio.to_thread(k.ensure_token, owner, new_resource=not body.get("status"))
        state.applied[token_key] = ("", version)
    token = state.token
    installed = {kind: await asyncio.to_thread(_crd_installed, kind) for kind in MONITORING_KINDS}
    # Children first, with the pods the pools were last sized for: a new resource gets its children at once.
    # A resource with no status yet is new: it has no children to read. One whose status the operator cannot
    # read (`old` None) is not: its live Deployments are read (once) for their sizes and pod templates.
    new_resource = not body.get("status")
    await asyncio.to_thread(_read_live, k, owner, state, new_resource, spec.api_pool is not None)
    sized = {pool: pod_sizing.kept_replicas(_pool_spec(spec, pool), _previous_replicas(
                 spec, old, pool, state.live.get(_RAY_DEPLOYMENTS[pool](owner.name))))
             * (spec.llm.nodes_per_replica if pool == naming.COMPONENT_LLM else 1) for pool in POOLS}
    # The children as the spec builds them (pod templates included): built once per change of their inputs,
    # and reused as the children themselves when no group waits in a rollout (nearly always).
    inputs = _build_inputs(generation, spec, token, sized, installed)
    if state.spec_built is None or state.spec_built[0] != inputs:
        state.spec_built = (inputs, _build(owner, spec, token, sized, installed, {}))
    built = state.spec_built[1]
    desired = builders.ray_templates(built)
    state.template_plan = _plan_templates(owner, desired, state, spec.rollout_strategy == "AllAtOnce")
    objs = _children(owner, spec, token, sized, installed, state, generation,
                     prebuilt=built if state.template_plan.templates == desired else None)
    kept = {obj["kind"] for obj, _ in objs}

    refused: dict[str, str] = {}

    def apply_all() -> None:
        _apply_changed(k, objs, state, force=forced, refused=refused)
        for kind in MONITORING_KINDS:
            if installed[kind] and kind not in kept:
                # Switched off: remove the one this deployment had, if any (objects of the same name
                # that another owner made are left alone).
                old_obj = k.get(kind, owner.namespace, owner.name)
                if old_obj and any(r.get("uid") == owner.uid for r in old_obj["metadata"].get("ownerReferences") or []):
                    k.delete(kind, owner.namespace, owner.name)
        api_pool = naming.pool_name(owner.name, naming.COMPONENT_API_POOL)
        if spec.api_pool is None and api_pool in state.live:
            # spec.apiPool removed: its pods go (the API and the queue move back to the head, which restarts
            # with the control resource). The watch saw the Deployment, so nothing is read to find it.
            for kind in ("Deployment", "PodDisruptionBudget"):
                k.delete(kind, owner.namespace, api_pool)
                state.applied.pop(_child_key(kind, api_pool), None)
            state.live.pop(api_pool, None)
        if spec.api.api_key_secret_ref is not None:
            ref = spec.api.api_key_secret_ref
            keys = k.secret_value(owner.namespace, ref.name, ref.key)
            state.api_key = next((x.strip() for x in (keys or "").split(",") if x.strip()), None)
        else:
            state.api_key = None
    await asyncio.to_thread(apply_all)
    if forced:
        state.last_full = time.monotonic()

    listed = await asyncio.to_thread(k.list_pods, owner.namespace, owner.name)
    state.pods = {p["metadata"]["name"]: p for p in listed}
    await _size_and_report(body, owner, spec, generation, old, state, installed, logger, refused=refused)
    state.refused = refused
    if refused:
        raise ChildrenRefused("; ".join(refused.values()))


_RAY_DEPLOYMENTS = {naming.COMPONENT_HEAD: naming.head_name, naming.COMPONENT_VISION: lambda n: naming.pool_name(n, naming.COMPONENT_VISION),
                    naming.COMPONENT_LLM: lambda n: naming.pool_name(n, naming.COMPONENT_LLM),
                    naming.COMPONENT_API_POOL: lambda n: naming.pool_name(n, naming.COMPONENT_API_POOL)}


def _read_live(k: Kube, owner: naming.Owner, state: ResourceState, new_resource: bool, api_pool: bool) -> None:
    """The live Ray Deployments come from the watch; one not seen yet (a restarted operator) is read once. A new
    resource has none to read: three calls fewer for each of a burst of creates. Without spec.apiPool, the API
    pool's is read once per operator run (one left from a spec changed while the operator was down is then
    deleted), not on every pass (a call for nothing, and one being deleted would be read back)."""
    if new_resource:
        return
    for component, name_of in _RAY_DEPLOYMENTS.items():
        if component == naming.COMPONENT_API_POOL and not api_pool:
            if state.api_pool_read:
                continue
            state.api_pool_read = True
        name = name_of(owner.name)
        if name not in state.live:
            got = k.get("Deployment", owner.namespace, name)
            if got is not None:
                state.live[name] = got


def _plan_templates(owner: naming.Owner, desired: dict[str, dict[str, Any]], state: ResourceState,
                    all_at_once: bool) -> rollout.TemplatePlan:
    """Which pod template each Ray component gets now: a template change (a new spec.image, say) rolls
    the vision pool, then the LLM pool, then the head, each once the one before has finished (live
    Deployments as `_read_live` left them)."""
    live = {component: state.live.get(name_of(owner.name)) for component, name_of in _RAY_DEPLOYMENTS.items()
            if component in desired}  # the API pool only when the spec has one
    return rollout.plan_templates(desired, live, all_at_once=all_at_once)


async def size_pods_once(body: kopf.Body, logger: logging.Logger, state: ResourceState, *,
                         reuse_observation: bool = False) -> None:
    """The light pass (pod loop): Serve's targets -> pool pods; status when it changed. No Kubernetes API
    call unless something changed. `reuse_observation`: woken by a pod event, it may use the Ray head's and
    the ingress's last answer if it is younger than the pod loop's period (the timer's passes always ask)."""
    meta = body["metadata"]
    owner = naming.Owner.of(meta)
    try:
        spec = models.DotsVLMDeploymentSpec.model_validate(dict(body.get("spec") or {}))
    except ValidationError:
        state.full = True  # the full pass reports it
        return
    if state.token is None:
        state.full = True
        return
    old = state.status or _old_status(body)
    # The children the last full pass could not apply stay in the status (and are not sent: the full pass's
    # retry does that); a pool Deployment refused here joins them.
    refused = dict(state.refused)
    await _size_and_report(body, owner, spec, meta.get("generation"), old, state, _installed_as_last_seen(), logger,
                           reuse_observation=reuse_observation, refused=refused)
    if refused.keys() - state.refused.keys():
        state.refused = refused
        raise ChildrenRefused("; ".join(refused.values()))


async def _size_and_report(body: kopf.Body, owner: naming.Owner, spec: models.DotsVLMDeploymentSpec,
                           generation: int | None, old: models.DotsVLMDeploymentStatus | None, state: ResourceState,
                           installed: dict[str, bool], logger: logging.Logger, *,
                           reuse_observation: bool = False, refused: dict[str, str] | None = None) -> None:
    """Observe Serve and the autoscaler, size the pools' pods, write status and Events. `refused`: the full
    pass's children that the API server refused (status says so; a pool Deployment among them is not sent
    again)."""
    k = kube()
    assert state.token is not None
    pods = [pod_view(p) for p in state.pods.values()]
    serve: ServeObservation | None = None
    report: ingress_client.AutoscalerReport | None = None
    if CONFIG.head_url_override or _head_ready(pods):
        cached = state.observed
        if reuse_observation and cached is not None and time.monotonic() - cached[0] < CONFIG.pod_loop_seconds:
            _, serve, report = cached
        else:
            serve = await observe_serve(owner, spec, state.token, old, logger, state)
            if serve.reachable and serve.app is not None and serve.status not in ("NOT_DEPLOYED", "Unknown"):
                report = await ingress_client.fetch_report(api_url(owner, spec), state.api_key,
                                                           timeout=CONFIG.head_timeout_seconds, http=http(owner))
            # Only a running application's answer is worth reusing (one still being deployed, or a head
            # not answering, is asked again at once); its drift was acted on and told once.
            state.observed = ((time.monotonic(), replace(serve, drift=None), report)
                              if report is not None or serve.status == "RUNNING" else None)
    else:
        state.observed = None
    now_unix = time.time()
    state.decisions_heard, decisions_silent = decision_ages(report, state.decisions_heard, now_unix, time.monotonic())
    plans = {pool: pod_sizing.plan_pool(_pool_spec(spec, pool), deployment=serve_deployment(serve, pool),
                                        raw_wish=raw_wish(report, pool, decisions_silent),
                                        pods=[p for p in pods if p.component == pool],
                                        previous_replicas=_previous_replicas(
                                            spec, old, pool, state.live.get(_RAY_DEPLOYMENTS[pool](owner.name))))
             for pool in POOLS}

    # Shrinking pool: rank its pods first (empty ones go first), then, on a later pass that sees the new ranks,
    # lower the Deployment's replicas.
    costs: dict[str, str] = {}
    for pool, plan in list(plans.items()):
        live_dep = state.live.get(_RAY_DEPLOYMENTS[pool](owner.name))
        dep_pods = (live_dep.get("spec") or {}).get("replicas") if live_dep is not None else None
        plans[pool], patches = pod_sizing.rank_before_shrinking(
            plan, [p for p in pods if p.component == pool and not p.deleting],
            deployment_pods=dep_pods if isinstance(dep_pods, int) else None)
        costs.update(patches)
    objs = _children(owner, spec, state.token, {pool: plan.pods for pool, plan in plans.items()}, installed,
                     state, generation)
    pool_objs = [(o, digest) for o, digest in objs if o["kind"] == "Deployment"
                 and o["metadata"]["labels"][naming.LABEL_COMPONENT] in POOLS]

    def resize() -> int:
        for pod_name, cost in costs.items():
            if not k.patch_pod_annotations(owner.namespace, pod_name, {naming.ANNOTATION_POD_DELETION_COST: cost}):
                state.pods.pop(pod_name, None)  # gone since the watch told us: its delete event follows
        return _apply_changed(k, pool_objs, state, force=False, refused=refused)
    if costs or any(state.applied.get(_child_key("Deployment", o["metadata"]["name"]), ("",))[0] != digest
                    for o, digest in pool_objs):
        await asyncio.to_thread(resize)
        for pool, plan in plans.items():
            logger.info(f"{pool} pool: {plan.pods} pod(s) ({plan.reason}: {plan.message})")

    desired = {pool: (dep.target if (dep := serve_deployment(serve, pool)) is not None and dep.target is not None
                      else plans[pool].replicas) for pool in POOLS}
    redis_state = await _redis_state(body, owner, spec, old, state, logger)
    new, transitions = compute_status(spec=spec, generation=generation, pods=pods, desired=desired, serve=serve,
                                      endpoint=naming.endpoint(owner, spec.api.port), old=old, now=_now(),
                                      plans=plans, report=report, now_unix=now_unix,
                                      rollout=state.template_plan.message if state.template_plan is not None else None,
                                      redis_state=redis_state,
                                      refused=list(refused.values()) if refused else None,
                                      notes=monitoring_notes(spec, installed))
    unschedulable = {pool: sum(1 for p in pods if p.component == pool and p.unschedulable and not p.deleting)
                     for pool in POOLS}
    METRICS.observe_status(owner.namespace, owner.name, spec, new, unschedulable)
    new_raw = new.to_api()
    old_raw = old.to_api() if old is not None else {}
    if old_raw != new_raw:
        await asyncio.to_thread(k.patch_status, owner.namespace, owner.name, merge_patch(old_raw, new_raw))
    state.status = new
    if serve is not None and serve.drift:
        message = (f"the Ray head ran a Serve config that differs from the spec ({serve.drift}); "
                   "the operator deployed the spec's config again")
        kopf.event(body, type="Warning", reason="ServeConfigDrift", message=message[:1000])
        logger.warning(message)
    for t in transitions:
        kopf.event(body, type="Warning" if t.warning else "Normal", reason=t.reason,
                   message=f"{t.type}={t.status}: {t.message}"[:1000])
        log = logger.warning if t.warning else logger.info
        log(f"{t.type}={t.status} ({t.reason}): {t.message}")
    known = {pool: serve_deployment(serve, pool) is not None for pool in POOLS}
    for ev in scaling_events(old, new, report, known):
        kopf.event(body, type="Normal", reason=ev.reason, message=ev.message)
        logger.info(f"scaling: {ev.message} ({ev.reason})")


def merge_patch(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """`new` as a JSON merge patch over `old`: fields `new` dropped become null (removed)."""
    out: dict[str, Any] = dict(new)
    for key, value in old.items():
        if key not in new:
            out[key] = None
        elif isinstance(value, dict) and isinstance(new[key], dict):
            out[key] = merge_patch(value, new[key])
    return out


def _head_ready(pods: list[PodView]) -> bool:
    return any(p.component == naming.COMPONENT_HEAD and p.ready and not p.deleting for p in pods)


async def _write_invalid(body: kopf.Body, owner: naming.Owner, generation: int | None, error: str,
                         old: models.DotsVLMDeploymentStatus | None) -> None:
    cond = models.Condition(type="Degraded", status="True", reason="InvalidSpec",
                            message=f"the spec is invalid, fix it and apply again: {error}"[:2000],
                            last_transition_time=_now(), observed_generation=generation)
    status = (old or models.DotsVLMDeploymentStatus()).model_copy(update={"observed_generation": generation})
    status.conditions = [c for c in status.conditions if c.type != "Degraded"] + [cond]
    await asyncio.to_thread(kube().patch_status, owner.namespace, owner.name, status.to_api())
    kopf.event(body, type="Warning", reason="InvalidSpec", message=cond.message[:1000])
