"""Shared fixtures. The `kube` fixture (a real control plane) lives in tests/support/cluster.py, the
`docker_engine` fixture (a private Docker engine for the images) in tests/support/images.py."""

pytest_plugins = ["support.cluster", "support.images"]
