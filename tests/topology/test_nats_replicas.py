"""NATS: clients of one cluster agree on a stream's replicas whatever their URLs list
(issue 19): a client whose URL named one server picked 1 replica, one that named three
picked 3, and the second to declare a queue failed with "stream name already in use with a
different configuration". The default now follows the cluster the server reports, and a
default that still differs from an existing stream's adopts it."""

from __future__ import annotations

import logging
import uuid
from typing import Any

import pytest

from keel import errors
from keel.messaging import connect
from tests.helpers import eventually
from tests.topology.conftest import cluster_url

pytestmark = [pytest.mark.timeout(120)]

CLUSTER = "nats-cluster"


async def _declare_both(first_url: str, second_url: str) -> None:
    queue = f"replicas-{uuid.uuid4().hex[:8]}"
    first = await connect(first_url)
    second = await connect(second_url)
    try:
        await first.declare_queue(queue, durable=True)
        await second.declare_queue(queue, durable=True)
        held: list[Any] = []
        await second.consume(queue, held.append, prefetch=10)
        await first.send(queue, b"one", durable=True)
        await eventually(lambda: [d.body for d in held] == [b"one"])
        await held[0].ack()
        await second.delete_queue(queue)
    finally:
        await first.close()
        await second.close()


async def test_one_server_and_three_server_urls_agree() -> None:
    hosts = cluster_url(CLUSTER).removeprefix("nats://").split(",")
    await _declare_both(f"nats://{','.join(hosts)}", f"nats://{hosts[1]}")
    await _declare_both(f"nats://{hosts[2]}", f"nats://{','.join(hosts)}")


async def test_a_default_adopts_an_existing_streams_replicas(
    caplog: pytest.LogCaptureFixture,
) -> None:
    hosts = cluster_url(CLUSTER).removeprefix("nats://").split(",")
    caplog.set_level(logging.INFO)
    await _declare_both(f"nats://{hosts[0]}?replicas=2", f"nats://{','.join(hosts)}")
    assert any("replicas" in r.getMessage() for r in caplog.records)


async def test_an_explicit_mismatch_still_fails_typed() -> None:
    hosts = cluster_url(CLUSTER).removeprefix("nats://").split(",")
    with pytest.raises(errors.MessagingError, match="queue"):
        await _declare_both(f"nats://{hosts[0]}?replicas=1", f"nats://{hosts[1]}?replicas=3")
