"""A node lost under load, on each messaging cluster of scripts/servers: RabbitMQ (three
nodes, quorum queues), NATS (three servers, R3 streams) and Redis under Sentinel.

Sustained calls, casts and notifications; SIGKILL of the node that holds the data (the
quorum queues' leader, the stream's leader, the Redis primary); then its restart. Asserted:
nothing confirmed is lost; casts run once (deduplicated) and notification duplicates are
counted; every call completes or fails with a retryable error; clients and servers recover by
themselves within the bound, and again after the node is back (Redis: within 8 s of the kill
and 5 s of the restart, though Sentinel demotes the returned old primary only about 10 s
later). Figures: bench rpc --cluster.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
from bench._cluster import MAX_PAUSE, RpcRun, nats_stream_leader, rpc_node_loss

from tests.topology.conftest import cluster_url

pytestmark = [pytest.mark.timeout(400), pytest.mark.slow]

# cluster -> how to find the node holding the topic's data (None: `servers leader`)
CLUSTERS: dict[str, Callable[[str], Callable[[str], Awaitable[int]]] | None] = {
    "rabbitmq-cluster": None,
    "nats-cluster": nats_stream_leader,
    "redis-sentinel": None,
}
RECOVERY_BOUND_S = 45.0
# Redis under Sentinel (issue 19): consumers whose blocking read was in flight at the kill
# reconnected to the dead primary's address without asking the sentinels, for the whole
# retry budget (about 10 s). If the old primary came back within it (a master again, with
# its old data, demoted by Sentinel only about 10 s later), they sat on it and calls stalled
# about 20 s after the restart; if not, the failover pause was that budget, not Sentinel's
# 2-3 s. Tighter bounds for it catch both.
PAUSE_BOUND_S = {"redis-sentinel": 8.0}
BACK_BOUND_S = {"redis-sentinel": 5.0}


@pytest.mark.parametrize("cluster", sorted(CLUSTERS))
async def test_a_node_lost_under_load(cluster: str) -> None:
    url = cluster_url(cluster)
    leader = CLUSTERS[cluster]
    run: RpcRun = await rpc_node_loss(
        url, cluster, leader=leader(url) if leader is not None else None
    )
    outage = run.outage
    back = outage.back - outage.revived if outage.back else float("inf")
    print(
        f"\n{cluster}: killed node {outage.node}; pause {outage.pause:.2f}s; back {back:.2f}s "
        "after the restart; "
        f"calls ok {run.calls_ok} retryable {run.calls_retryable}; casts "
        f"{len(run.casts_confirmed)} confirmed, {run.duplicate_casts} duplicate runs; "
        f"notifications {len(run.notes_confirmed)} confirmed, {run.duplicate_notes} duplicates"
    )
    assert not run.unexpected, run.unexpected[:5]
    assert not run.lost_casts, sorted(run.lost_casts)[:20]
    assert not run.lost_notes, sorted(run.lost_notes)[:20]
    assert run.duplicate_casts == 0  # casts carry an idempotency key: run once
    assert outage.pause < PAUSE_BOUND_S.get(cluster, RECOVERY_BOUND_S)
    assert outage.back > outage.revived  # still serving once the node is back
    assert back < BACK_BOUND_S.get(cluster, MAX_PAUSE), f"calls resumed {back:.2f}s after"
    assert run.calls_ok > 0
    assert run.casts_confirmed
