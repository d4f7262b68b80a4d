"""A node lost under load, on each coordination cluster of scripts/servers: etcd (three
members), ZooKeeper (a three-server ensemble) and Redis under Sentinel.

Three workers take one lock in turn and write under its fence to a fenced register; the
node that leads (etcd's and ZooKeeper's leader, the Redis primary) is SIGKILLed, then
restarted. Asserted: fences of successive grants only grow across the leader change (the
register never refuses a holder); failures are retryable (BackendUnavailable, LockLost,
LockTimeout); the workers get the lock again by themselves within the bound, and again after
the node is back. Figures: bench locks --cluster.
"""

from __future__ import annotations

import pytest
from bench._cluster import lock_node_loss

from tests.topology.conftest import cluster_url

pytestmark = [pytest.mark.timeout(400), pytest.mark.slow]

CLUSTERS = ["etcd-cluster", "redis-sentinel", "zookeeper-cluster"]
RECOVERY_BOUND_S = 45.0


@pytest.mark.parametrize("cluster", CLUSTERS)
async def test_a_node_lost_under_load(cluster: str) -> None:
    url = cluster_url(cluster)
    run = await lock_node_loss(url, cluster)
    outage = run.outage
    print(
        f"\n{cluster}: killed node {outage.node}; pause {outage.pause:.2f}s; grants "
        f"{len(run.grants)} (fences {run.grants[0][1]}..{run.grants[-1][1]}); retryable "
        f"{run.retryable}; stale writes {run.stale_writes}"
    )
    assert not run.unexpected, run.unexpected[:5]
    assert run.fences_backwards == 0
    assert run.stale_writes == 0
    assert run.writes == len(run.grants)
    assert outage.pause < RECOVERY_BOUND_S
    assert outage.back > outage.revived
