"""The operator's kopf settings: what a person sees in `kubectl describe` and in the resource."""

from __future__ import annotations

import asyncio

import kopf

from dotsvlm_operator import handlers


def test_events_are_only_the_operators_own_not_every_log_line() -> None:
    settings = kopf.OperatorSettings()
    asyncio.run(handlers.configure(settings=settings))
    assert settings.posting.enabled  # kopf.event: Events with reasons (ScaledUp, RollingOut, ...)
    assert settings.posting.loggers is False  # no "Logging" Event per log line, repeating each of them
    assert settings.persistence.finalizer == "dotsvlm.io/operator"


def test_no_handler_needs_kopfs_diff_base_which_is_therefore_not_built() -> None:
    # The diff-base (a deep copy of every watched object on every event) serves only change-detecting
    # handlers (on.create/update/resume/field/delete). Add one, and the annotation storage must come back.
    settings = kopf.OperatorSettings()
    asyncio.run(handlers.configure(settings=settings))
    assert isinstance(settings.persistence.diffbase_storage, handlers.NoDiffBaseStorage)
    registry = kopf.get_default_registry()
    assert registry._spawning.get_all_handlers()  # the reconciler daemon is registered
    assert not registry._changing.get_all_handlers(), [h.id for h in registry._changing.get_all_handlers()]
