"""Clusters for the topology tests: each started once per session, by the first test that
needs it, and stopped (if this run started it) as soon as a test needs another one, so that
one cluster at a time loads the machine. The tests are ordered so that every test of one
cluster runs together: the TLS tests (single servers) first, then cluster by cluster, across
modules (Redis under Sentinel serves both the messaging and the coordination node loss)."""

from __future__ import annotations

import pytest

from tests import servers

_HERE = __file__.rsplit("/", 1)[0]
_active: list[str] = []  # the cluster up now, if this session started it


def cluster_url(name: str) -> str:
    """The cluster's URL, starting it if needed and stopping the one used before."""
    if _active and _active[-1] != name:
        servers.release(_active.pop())
    if name not in _active:
        _active.append(name)
    return servers.server_url(name)


def _cluster_of(item: pytest.Item) -> str:
    callspec = getattr(item, "callspec", None)
    params = callspec.params if callspec is not None else {}
    return str(params.get("cluster") or getattr(item.module, "CLUSTER", ""))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = [i for i, item in enumerate(items) if str(item.path).startswith(_HERE)]
    if not here:
        return
    mine = [items[i] for i in here]
    mine.sort(key=_cluster_of)  # stable: in module order within a cluster; "" (TLS) first
    for i, item in zip(here, mine, strict=True):
        items[i] = item
