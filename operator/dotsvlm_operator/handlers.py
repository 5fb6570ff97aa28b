"""kopf handlers: one reconcile loop per DotsVLMDeployment.

Each resource gets a kopf daemon that runs `reconcile_once` whenever something relevant changes (its
spec, or an event on one of its children: a pod scheduled, a Deployment edited or deleted by hand)
and at least every `resync_seconds`. Reconciling is idempotent: build the children (pure), apply them
with server-side apply, deploy the Serve config when it changed, observe, write status. All state
lives in the resource's status and in the cluster, so a restarted operator simply carries on.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import kopf
from pydantic import ValidationError
from pydantic.alias_generators import to_camel

from dotsvlm_operator import builders, models, naming, serve_app
from dotsvlm_operator.kube import Kube
from dotsvlm_operator.ray_head import RayHeadClient, RayHeadError
from dotsvlm_operator.status import PodView, ServeObservation, compute_status, pod_view

HEAD_URL_OVERRIDE_ENV = "DOTSVLM_RAY_HEAD_URL_OVERRIDE"


@dataclass
class OperatorConfig:
    """Operator-wide settings (from the command line)."""

    # Test/dev setting: talk to this Ray dashboard URL instead of the head Service of each deployment.
    # May contain {name} and {namespace}.
    head_url_override: str | None = field(default_factory=lambda: os.environ.get(HEAD_URL_OVERRIDE_ENV) or None)
    resync_seconds: float = 60.0
    head_timeout_seconds: float = 5.0
    priority: int = 0


CONFIG = OperatorConfig()
_triggers: dict[tuple[str, str], asyncio.Event] = {}
_kube: Kube | None = None
_service_monitor_crd: tuple[bool, float] | None = None  # (present, when checked)


def kube() -> Kube:
    global _kube
    if _kube is None:
        _kube = Kube()
    return _kube


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _trigger(namespace: str | None, name: str | None) -> None:
    ev = _triggers.get((namespace or "", name or ""))
    if ev is not None:
        ev.set()


# --- operator settings -------------------------------------------------------------------------------------

@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    # Keep kopf's bookkeeping in annotations, out of our structural status.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=naming.GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=naming.GROUP)
    settings.persistence.finalizer = f"{naming.GROUP}/operator"
    settings.peering.priority = CONFIG.priority
    settings.peering.lifetime = 30
    settings.watching.server_timeout = 300
    settings.networking.request_timeout = 60


# --- triggers ----------------------------------------------------------------------------------------------

@kopf.on.event(naming.GROUP, naming.VERSION, naming.PLURAL)
def on_resource_event(name: str | None, namespace: str | None, body: kopf.Body, **_: Any) -> None:
    """A spec change (new generation) wakes the resource's reconcile loop at once."""
    if body.get("metadata", {}).get("generation") != body.get("status", {}).get("observedGeneration"):
        _trigger(namespace, name)


def _on_child_event(labels: dict[str, str] | None, namespace: str | None, **_: Any) -> None:
    """A child changed (pod scheduled or ready, object edited or deleted): re-reconcile its owner."""
    _trigger(namespace, (labels or {}).get(naming.LABEL_DEPLOYMENT))


_CHILD_SELECTOR = {naming.LABEL_MANAGED_BY: naming.MANAGER, naming.LABEL_DEPLOYMENT: kopf.PRESENT}
for _group, _version, _plural in [("", "v1", "pods"), ("apps", "v1", "deployments"), ("", "v1", "services"),
                                  ("", "v1", "configmaps"), ("", "v1", "secrets"),
                                  ("policy", "v1", "poddisruptionbudgets"),
                                  ("networking.k8s.io", "v1", "networkpolicies")]:
    kopf.on.event(_group or None, _version, _plural, labels=_CHILD_SELECTOR, id=f"child-{_plural}")(_on_child_event)


# --- the reconcile loop ------------------------------------------------------------------------------------

@kopf.daemon(naming.GROUP, naming.VERSION, naming.PLURAL, id="reconciler", cancellation_timeout=10)
async def reconciler(name: str, namespace: str, body: kopf.Body, stopped: kopf.DaemonStopped,
                     logger: logging.Logger, **_: Any) -> None:
    key = (namespace, name)
    ev = _triggers[key] = asyncio.Event()
    failures = 0
    try:
        while not stopped:
            ev.clear()
            try:
                await reconcile_once(body, logger)
                failures = 0
            except Exception as exc:  # noqa: BLE001 - one bad pass must not end the loop
                failures += 1
                logger.exception(f"reconcile failed ({failures} in a row): {exc}")
                await _report_failure(body, exc, logger)
            wait = CONFIG.resync_seconds if not failures else min(2.0 ** failures, CONFIG.resync_seconds)
            waiter = asyncio.ensure_future(ev.wait())
            stopper = asyncio.ensure_future(stopped.wait())
            try:
                await asyncio.wait({waiter, stopper}, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
                stopper.cancel()
            # Let a burst of child events (a rollout touches many pods) settle into one pass.
            if ev.is_set() and not stopped:
                settle = asyncio.ensure_future(stopped.wait())
                try:
                    await asyncio.wait({settle}, timeout=0.3)
                finally:
                    settle.cancel()
    finally:
        if _triggers.get(key) is ev:
            del _triggers[key]


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


async def observe_serve(owner: naming.Owner, spec: models.DotsVLMDeploymentSpec, token: str,
                        old: models.DotsVLMDeploymentStatus | None, logger: logging.Logger) -> ServeObservation:
    """Deploy the Serve config if it changed since the last successful deploy, then read the app's status."""
    body = serve_app.serve_body(spec)
    digest = serve_app.serve_body_hash(body)
    url = head_url(owner)
    deployed = old.serve_app.config_hash if old else None
    async with RayHeadClient(url, token, timeout=CONFIG.head_timeout_seconds) as client:
        try:
            status, message = await client.application_status()
            if deployed != digest or status == "NOT_DEPLOYED":
                await client.deploy(body)
                logger.info(f"deployed the Serve application to {url} (config {digest})")
                deployed = digest
                status, message = await client.application_status()
        except RayHeadError as exc:
            return ServeObservation(url=url, reachable=not exc.unreachable, status="Unknown", message=str(exc),
                                    config_hash=old.serve_app.config_hash if old else None)
    return ServeObservation(url=url, reachable=True, status=status, message=message, config_hash=deployed)


def _old_status(body: kopf.Body) -> models.DotsVLMDeploymentStatus | None:
    known = {to_camel(n) for n in models.DotsVLMDeploymentStatus.model_fields}
    raw = {k: v for k, v in dict(body.get("status") or {}).items() if k in known}
    if not raw:
        return None
    try:
        return models.DotsVLMDeploymentStatus.model_validate(raw)
    except ValidationError:
        return None


def _service_monitor_supported() -> bool:
    """Whether the Prometheus Operator's ServiceMonitor CRD exists (re-checked every 5 minutes)."""
    global _service_monitor_crd
    if _service_monitor_crd is None or time.monotonic() - _service_monitor_crd[1] > 300:
        _service_monitor_crd = (kube().has_service_monitor_crd(), time.monotonic())
    return _service_monitor_crd[0]


async def reconcile_once(body: kopf.Body, logger: logging.Logger) -> None:
    meta = body["metadata"]
    owner = naming.Owner(name=meta["name"], namespace=meta["namespace"], uid=meta["uid"])
    generation = meta.get("generation")
    old = _old_status(body)
    try:
        spec = models.DotsVLMDeploymentSpec.model_validate(dict(body.get("spec") or {}))
    except ValidationError as exc:
        # The CRD's schema normally stops this; an older CRD version might not.
        await _write_invalid(body, owner, generation, str(exc), old)
        return

    k = kube()
    token = await asyncio.to_thread(k.ensure_token, owner)
    desired = {naming.COMPONENT_VISION: builders.desired_replicas(spec.vision),
               naming.COMPONENT_LLM: builders.desired_replicas(spec.llm)}
    sm_crd = await asyncio.to_thread(_service_monitor_supported)
    sm = spec.monitoring.enabled and spec.monitoring.service_monitor and sm_crd
    objs = builders.children(owner, spec, vision_replicas=desired[naming.COMPONENT_VISION],
                             llm_replicas=desired[naming.COMPONENT_LLM], service_monitor_supported=bool(sm),
                             ray_token_hash=builders.token_hash(token))

    def apply_all() -> None:
        for obj in objs:
            k.apply(obj)
        if sm_crd and not sm:
            # Switched off: remove the ServiceMonitor this deployment had, if any.
            old_sm = k.get("ServiceMonitor", owner.namespace, owner.name)
            if old_sm and any(r.get("uid") == owner.uid for r in old_sm["metadata"].get("ownerReferences") or []):
                k.delete("ServiceMonitor", owner.namespace, owner.name)
    await asyncio.to_thread(apply_all)

    pods = [pod_view(p) for p in await asyncio.to_thread(k.list_pods, owner.namespace, owner.name)]
    serve = None
    if CONFIG.head_url_override or _head_ready(pods):
        serve = await observe_serve(owner, spec, token, old, logger)
    new, transitions = compute_status(spec=spec, generation=generation, pods=pods, desired=desired, serve=serve,
                                      endpoint=naming.endpoint(owner, spec.api.port), old=old, now=_now())
    new_raw = new.to_api()
    if old is None or old.to_api() != new_raw:
        await asyncio.to_thread(k.patch_status, owner.namespace, owner.name, new_raw)
    for t in transitions:
        kopf.event(body, type="Warning" if t.warning else "Normal", reason=t.reason,
                   message=f"{t.type}={t.status}: {t.message}"[:1000])
        log = logger.warning if t.warning else logger.info
        log(f"{t.type}={t.status} ({t.reason}): {t.message}")


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
