"""``python -m bench rpc --cluster``: each broker as one server beside it as a cluster, and
what losing a node costs.

Per transport, the same load (``--concurrency`` workers, each a cast, a notification and a
call per round) runs ``--seconds`` on the single server of scripts/servers, then on the
cluster (RabbitMQ 3 nodes with quorum queues, NATS 3 servers with R3 streams, Redis with
Sentinel, which makes durable sends WAIT for the replica); on the cluster the node holding
the data is then SIGKILLed and restarted (bench/_cluster.py). Printed: calls per second on
each and their ratio, the failover pause (kill to the first call that started after it and
succeeded), the time back to service after the restart, what was lost (must be 0) and the
duplicates. Last line: ``RESULT name=rpc_cluster <t>_single_calls_s=... <t>_cluster_calls_s=...
<t>_ratio=... <t>_pause_s=... <t>_lost=... <t>_dup_notes=...`` for t in rabbit, nats, redis.
The machine is shared: ratios in one run count, not the absolute rates.
"""

from __future__ import annotations

import argparse
import asyncio
import logging

from rich.console import Console
from rich.table import Table

from bench._cluster import RpcRun, cluster_url, nats_stream_leader, rpc_node_loss

# transport -> (single server, cluster)
TOPOLOGIES = {
    "rabbit": ("rabbitmq", "rabbitmq-cluster"),
    "nats": ("nats", "nats-cluster"),
    "redis": ("redis", "redis-sentinel"),
}


async def _measure(transport: str, seconds: float, concurrency: int) -> tuple[RpcRun, RpcRun]:
    single_name, cluster_name = TOPOLOGIES[transport]
    single = await rpc_node_loss(
        cluster_url(single_name), None, before=seconds, concurrency=concurrency
    )
    url = cluster_url(cluster_name)
    leader = nats_stream_leader(url) if transport == "nats" else None
    cluster = await rpc_node_loss(
        url, cluster_name, before=seconds, concurrency=concurrency, leader=leader
    )
    return single, cluster


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench rpc --cluster")
    parser.add_argument("--transports", default=",".join(TOPOLOGIES))
    parser.add_argument("--seconds", type=float, default=5.0, help="steady load before the kill")
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    console = Console(width=160)
    table = Table(title="RPC: one server beside a cluster, and a node lost (shared machine)")
    for column in (
        "transport",
        "single calls/s",
        "cluster calls/s",
        "ratio",
        "failover pause s",
        "back after restart s",
        "lost",
        "dup casts",
        "dup notes",
        "retryable",
    ):
        table.add_column(column, justify="right")
    result: list[str] = ["RESULT name=rpc_cluster"]
    for transport in args.transports.split(","):
        single, cluster = asyncio.run(_measure(transport, args.seconds, args.concurrency))
        s_rate, c_rate = single.steady_rate(), cluster.steady_rate()
        outage = cluster.outage
        lost = len(cluster.lost_casts) + len(cluster.lost_notes)
        back = outage.back - outage.revived if outage.back else float("inf")
        table.add_row(
            transport,
            f"{s_rate:.0f}",
            f"{c_rate:.0f}",
            f"{c_rate / s_rate:.2f}" if s_rate else "-",
            f"{outage.pause:.2f}",
            f"{back:.2f}",
            str(lost),
            str(cluster.duplicate_casts),
            str(cluster.duplicate_notes),
            str(cluster.calls_retryable),
        )
        result += [
            f"{transport}_single_calls_s={s_rate:.0f}",
            f"{transport}_cluster_calls_s={c_rate:.0f}",
            f"{transport}_ratio={c_rate / s_rate if s_rate else 0:.2f}",
            f"{transport}_pause_s={outage.pause:.2f}",
            f"{transport}_lost={lost}",
            f"{transport}_dup_notes={cluster.duplicate_notes}",
        ]
    console.print(table)
    print(" ".join(result))
