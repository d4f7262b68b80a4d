"""Clusters for the node-loss tests: each started once, by the first test that needs it, and
stopped when its module is done (if this run started it), so that no more than one cluster
loads the machine at a time."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests import servers


@pytest.fixture(scope="module")
def clusters() -> Iterator[list[str]]:
    """Clusters used by this module; the test appends their names after starting them."""
    used: list[str] = []
    yield used
    for name in used:
        servers.release(name)


def cluster_url(used: list[str], name: str) -> str:
    if name not in used:
        used.append(name)
    return servers.server_url(name)
