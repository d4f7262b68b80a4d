"""RabbitMQ connection setup: failover across the nodes a URL lists, queue types, and a send
that fails after reconnecting says which queue it was for (not an internal attribute)."""

from __future__ import annotations

import asyncio
import socket
import uuid

import pytest

from keel import errors, urls
from keel.messaging import connect
from keel.messaging.transports.rabbitmq import RabbitTransport
from tests.coord_support import CutProxy
from tests.servers import server_url

pytestmark = pytest.mark.timeout(60)


def _dead_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_send_that_fails_after_reconnecting_names_the_queue() -> None:
    live = urls.parse(server_url("rabbitmq"))
    assert live.port is not None
    proxy = CutProxy("127.0.0.1", live.port)
    transport = await connect(f"rabbit://guest:guest@127.0.0.1:{proxy.port}/", reconnect_wait=0.5)
    queue = f"q-{uuid.uuid4().hex[:8]}"
    try:
        await transport.declare_queue(queue, durable=True)
        proxy.close()  # the broker is gone and stays gone
        await asyncio.sleep(1)  # the transport has seen the loss and is reconnecting
        with pytest.raises(errors.TransportError) as info:
            await transport.send(queue, b"x", durable=True)
        assert "after 0.5s of reconnecting" in str(info.value)
        assert queue in str(info.value)
        assert "_confirm" not in str(info.value)
    finally:
        await transport.close()


async def test_connect_fails_over_to_the_next_listed_node() -> None:
    live = urls.parse(server_url("rabbitmq"))
    url = f"rabbit://guest:guest@127.0.0.1:{_dead_port()},guest:guest@127.0.0.1:{live.port}/"
    transport = await connect(url, queue_type="classic")
    try:
        queue = f"q-{uuid.uuid4().hex[:8]}"
        await transport.declare_queue(queue, durable=True)
        await transport.send(queue, b"x", durable=True)
        await transport.delete_queue(queue)
    finally:
        await transport.close()


def test_queue_type_defaults_to_quorum_for_a_cluster_url() -> None:
    one = RabbitTransport(urls.parse("rabbit://h1:5672/"))
    many = RabbitTransport(urls.parse("rabbit://u:p@h1:5672,u:p@h2:5673/"))
    assert (one.queue_type, many.queue_type) == ("classic", "quorum")
    with pytest.raises(errors.ConfigError, match="queue_type"):
        RabbitTransport(urls.parse("rabbit://h1/?queue_type=mirrored"))
    with pytest.raises(errors.ConfigError, match="quorum"):
        RabbitTransport(urls.parse("rabbit://h1/?delivery_limit=5"))
