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
