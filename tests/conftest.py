"""Shared fixtures. The `kube` fixture (a real control plane) lives in tests/support/cluster.py, the
`docker_engine` fixture (a private Docker engine for the images) in tests/support/images.py."""

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
