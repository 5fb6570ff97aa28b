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
    # The diff-base (a deep copy of every watched object on every event) serves the handlers that compare an
    # object with its last handled state (on.create/update/resume/field). Add one, and the annotation storage
    # must come back. on.delete needs none: kopf recognises a deletion by its deletionTimestamp.
    settings = kopf.OperatorSettings()
    asyncio.run(handlers.configure(settings=settings))
    assert isinstance(settings.persistence.diffbase_storage, handlers.NoDiffBaseStorage)
    registry = kopf.get_default_registry()
    assert registry._spawning.get_all_handlers()  # the reconciler daemon is registered
    changing = registry._changing.get_all_handlers()
    assert [h.id for h in changing] == ["redis-cleanup"]
    assert all(h.reason == kopf.Reason.DELETE for h in changing), [(h.id, h.reason) for h in changing]
