"""The operator's watches of its children ask the API server for its own objects only. A filter applied by the
handlers alone comes after kopf has listed and watched every pod, Secret and ConfigMap of the cluster (Helm's
release Secrets, with their contents, included): on a large cluster, memory and CPU for nothing."""

from __future__ import annotations

import asyncio
import concurrent.futures

import kopf

from dotsvlm_operator import handlers, naming


def test_child_watches_carry_the_operators_label_selector_and_the_resource_watch_none() -> None:
    settings = kopf.OperatorSettings()
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(handlers.configure(settings=settings))
    finally:
        executor = loop._default_executor  # configure set a thread pool of its own
        loop.close()
        if isinstance(executor, concurrent.futures.ThreadPoolExecutor):
            executor.shutdown()
    selector = f"{naming.LABEL_MANAGED_BY}={naming.MANAGER},{naming.LABEL_DEPLOYMENT}"
    for group, version, plural in [("", "v1", "pods"), ("", "v1", "secrets"), ("", "v1", "configmaps"),
                                   ("", "v1", "services"), ("apps", "v1", "deployments"),
                                   ("policy", "v1", "poddisruptionbudgets"),
                                   ("networking.k8s.io", "v1", "networkpolicies")]:
        assert settings.watching.label_selectors.collect(kopf.Resource(group, version, plural)) == [selector], plural
    # The custom resources themselves, and same-named kinds of other groups, are watched whole.
    assert settings.watching.label_selectors.collect(kopf.Resource(naming.GROUP, naming.VERSION, naming.PLURAL)) == []
    assert settings.watching.label_selectors.collect(kopf.Resource("example.com", "v1", "deployments")) == []
    assert settings.watching.chunk_size
