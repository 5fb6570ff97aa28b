"""Shared fixtures. The `kube` fixture (a real control plane) lives in tests/support/cluster.py, the
`docker_engine` fixture (a private Docker engine for the images) in tests/support/images.py."""

import logging
import os
import sys

import pytest

pytest_plugins = ["support.cluster", "support.images"]


def pytest_collection_modifyitems(config, items) -> None:
    """Tests on the shared Serve application (`served`, one in-process Ray for the session) run last.

    Some Ray modules connect this process to their own cluster and shut it down when done; run after
    `served` has started, they would find Ray already initialised, and their clean-up would take the shared
    application down with them (CI run of stop 18: test_head_drain_ray started `served`, then
    test_node_loss_ray's teardown stopped it and every later test_serving_app test got "connection refused").
    Order within each group is kept."""
    items[:] = ([i for i in items if "served" not in getattr(i, "fixturenames", ())]
                + [i for i in items if "served" in getattr(i, "fixturenames", ())])


_exit_status: int | None = None


def pytest_sessionfinish(session, exitstatus) -> None:
    global _exit_status
    _exit_status = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config) -> None:
    """After a run that loaded Ray, end the process at once with pytest's exit status.

    Every test, fixture teardown, report and summary is done by now; what is left is the interpreter's own
    finalisation, where Ray's and gRPC's native threads are torn down with the modules they call into.
    That step crashed once (CI run of stop 19: "516 passed", then `make: Segmentation fault`, exit 2), so a
    green suite was reported as a failure. Skipping it loses nothing: Ray was shut down by the fixtures,
    and the processes the tests start are stopped by their own teardowns."""
    if _exit_status is None or "ray" not in sys.modules or config.pluginmanager.has_plugin("pytester"):
        return
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_exit_status)
