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
import logging

from bench._cluster import Figure, RpcRun, cluster_url, compare, nats_stream_leader, rpc_node_loss

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
    compare(
        title="RPC: one server beside a cluster, and a node lost (shared machine)",
        name="rpc_cluster",
        kind="transport",
        unit="calls_s",
        keys=args.transports.split(","),
        measure=lambda t: _measure(t, args.seconds, args.concurrency),
        figures=[
            Figure("lost", lambda r: str(len(r.lost_casts) + len(r.lost_notes)), "lost"),
            Figure("dup casts", lambda r: str(r.duplicate_casts)),
            Figure("dup notes", lambda r: str(r.duplicate_notes), "dup_notes"),
            Figure("retryable", lambda r: str(r.calls_retryable)),
        ],
    )
