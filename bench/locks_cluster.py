"""``python -m bench locks --cluster``: each coordination backend as one server beside it as a
cluster, and what losing the leader costs.

Per backend, ``--workers`` coordinators take one lock in turn and write under its fence for
``--seconds`` on the single server of scripts/servers, then on the cluster (etcd 3 members,
ZooKeeper 3 servers, Redis with Sentinel, where acquire and renew WAIT for the replica); on
the cluster the leader is then SIGKILLed and restarted (bench/_cluster.py). Printed: grants
per second on each and their ratio, the failover pause (kill to the first acquire that
started after it and succeeded), the time back after the restart, and fences that went
backwards (must be 0). Last line: ``RESULT name=locks_cluster <b>_single_per_s=...
<b>_cluster_per_s=... <b>_ratio=... <b>_pause_s=... <b>_backwards=...`` for b in etcd,
zookeeper, redis. The machine is shared: ratios in one run count.
"""

from __future__ import annotations

import argparse
import logging

from bench._cluster import Figure, LockRun, cluster_url, compare, lock_node_loss

# backend -> (single server, cluster)
TOPOLOGIES = {
    "etcd": ("etcd", "etcd-cluster"),
    "zookeeper": ("zookeeper", "zookeeper-cluster"),
    "redis": ("redis", "redis-sentinel"),
}


async def _measure(backend: str, seconds: float, workers: int) -> tuple[LockRun, LockRun]:
    single_name, cluster_name = TOPOLOGIES[backend]
    single = await lock_node_loss(cluster_url(single_name), None, before=seconds, workers=workers)
    cluster = await lock_node_loss(
        cluster_url(cluster_name), cluster_name, before=seconds, workers=workers
    )
    return single, cluster


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench locks --cluster")
    parser.add_argument("--backends", default=",".join(TOPOLOGIES))
    parser.add_argument("--seconds", type=float, default=5.0, help="steady load before the kill")
    parser.add_argument("--workers", type=int, default=3)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    compare(
        title="Locks: one server beside a cluster, and the leader lost (shared machine)",
        name="locks_cluster",
        kind="backend",
        unit="per_s",
        keys=args.backends.split(","),
        measure=lambda b: _measure(b, args.seconds, args.workers),
        figures=[
            Figure("fences backwards", lambda r: str(r.fences_backwards), "backwards"),
            Figure("stale writes", lambda r: str(r.stale_writes)),
            Figure("retryable", lambda r: str(r.retryable)),
        ],
    )
    return 0
