"""Shared fixtures. The `kube` fixture (a real control plane) lives in tests/support/cluster.py."""

pytest_plugins = ["support.cluster"]
