"""NATS: a queue's consumer keeps receiving when the server leading its JetStream consumer is
lost while the consumer's own connection stays up: a suspected cause of issue 19's
intermittent notification loss after a node kill (1 run in 3, not reproduced since).

Suspected cause, ruled out by this test: a pull request lives on the consumer's leader, and
the client's connection here is to another server, so nothing but the server tells the puller
that its outstanding request died with the leader. NATS 2.9.10 does: the puller gets a 409
"Leadership Change" and asks again; messages stored after the kill arrive within seconds.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import nats
import pytest
from bench._cluster import servers

from keel import errors
from keel.messaging import NotificationListener, Notifier, Target, connect
from tests.topology.conftest import cluster_url
from tests.topology.nats_sink import Sink, node_number, wait_until

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

CLUSTER = "nats-cluster"
DELIVERY_BOUND_S = 20.0  # well below the 30 s a pull request lives, and the 60 s the bench waits


async def test_a_consumer_survives_the_loss_of_its_consumer_leader() -> None:
    hosts = cluster_url(CLUSTER).removeprefix("nats://").split(",")
    topic = f"cfail-{uuid.uuid4().hex[:8]}"
    listen_t = await connect(f"nats://{hosts[0]}?replicas=3")  # node 1, which is never killed here
    send_t = await connect(f"nats://{hosts[1]},{hosts[2]}?replicas=3")
    sink = Sink()
    listener = NotificationListener(listen_t, [Target(topic)], [sink])
    await listener.start()
    killed = 0
    try:
        nc = await nats.connect(f"nats://{hosts[0]}")
        try:
            js = nc.jetstream()
            names = [s.config.name for s in await js.streams_info() if topic in str(s.config.name)]
            assert len(names) == 1, names
            stream = names[0]
            consumer = (await js.consumers_info(stream))[0].name
            for _ in range(20):  # move the consumer's leadership off node 1
                info = await js.consumer_info(stream, consumer)
                if info.cluster is not None and info.cluster.leader not in (None, "keel-n1"):
                    break
                await nc.request(f"$JS.API.CONSUMER.LEADER.STEPDOWN.{stream}.{consumer}", b"")
                await asyncio.sleep(1.0)
            assert info.cluster is not None
            assert info.cluster.leader not in (None, "keel-n1")
            killed = node_number(info.cluster.leader)
        finally:
            await nc.close()
        notifier = Notifier(send_t, "failover", topics=[topic])
        await notifier.info(None, "tick", 0)
        await wait_until(lambda: 0 in sink.seen, 10)
        assert 0 in sink.seen  # the pull request is waiting on the consumer's leader now
        await asyncio.to_thread(servers, "kill", CLUSTER, str(killed))
        started = time.monotonic()
        for i in range(1, 21):
            for _ in range(50):  # a send during the stream's election retries (bounded)
                try:
                    await notifier.info(None, "tick", i)
                    break
                except errors.KeelError:  # retryable while the stream's group elects
                    await asyncio.sleep(0.2)
        await wait_until(lambda: all(i in sink.seen for i in range(21)), DELIVERY_BOUND_S)
        missing = [i for i in range(21) if i not in sink.seen]
        assert not missing, (missing, time.monotonic() - started)
    finally:
        await listener.stop()
        await listen_t.close()
        await send_t.close()
        if killed:
            await asyncio.to_thread(servers, "revive", CLUSTER, str(killed))
