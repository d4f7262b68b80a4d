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
import asyncio
import logging

from rich.console import Console
from rich.table import Table

from bench._cluster import LockRun, cluster_url, lock_node_loss

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
    console = Console(width=160)
    table = Table(title="Locks: one server beside a cluster, and the leader lost (shared machine)")
    for column in (
        "backend",
        "single grants/s",
        "cluster grants/s",
        "ratio",
        "failover pause s",
        "back after restart s",
        "fences backwards",
        "stale writes",
        "retryable",
    ):
        table.add_column(column, justify="right")
    result: list[str] = ["RESULT name=locks_cluster"]
    for backend in args.backends.split(","):
        single, cluster = asyncio.run(_measure(backend, args.seconds, args.workers))
        s_rate, c_rate = single.steady_rate(), cluster.steady_rate()
        outage = cluster.outage
        back = outage.back - outage.revived if outage.back else float("inf")
        table.add_row(
            backend,
            f"{s_rate:.0f}",
            f"{c_rate:.0f}",
            f"{c_rate / s_rate:.2f}" if s_rate else "-",
            f"{outage.pause:.2f}",
            f"{back:.2f}",
            str(cluster.fences_backwards),
            str(cluster.stale_writes),
            str(cluster.retryable),
        )
        result += [
            f"{backend}_single_per_s={s_rate:.0f}",
            f"{backend}_cluster_per_s={c_rate:.0f}",
            f"{backend}_ratio={c_rate / s_rate if s_rate else 0:.2f}",
            f"{backend}_pause_s={outage.pause:.2f}",
            f"{backend}_backwards={cluster.fences_backwards}",
        ]
    console.print(table)
    print(" ".join(result))
    return 0
