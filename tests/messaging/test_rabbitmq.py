"""What the RabbitMQ transport adds to the conformance suite: its own failure handling."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiormq
import pytest

from keel import errors
from keel.messaging import RPCClient, RPCServer, Target, Transport, connect
from keel.messaging.transports.rabbitmq import REASON_HEADER, RabbitTransport
from tests.helpers import eventually
from tests.servers import server_url

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def url() -> str:
    return server_url("rabbitmq")


@pytest.fixture
async def transport(url: str) -> AsyncIterator[RabbitTransport]:
    transport = await connect(url)
    assert isinstance(transport, RabbitTransport)
    yield transport
    await transport.close()


@pytest.fixture
def queue() -> str:
    return f"q-{uuid.uuid4().hex[:10]}"


class Echo:
    async def echo(self, ctx: Any, value: Any) -> Any:
        return value


async def test_amqp_scheme_and_vhost(url: str, queue: str) -> None:
    transport = await connect(url.replace("rabbit://", "amqp://") + "?heartbeat=5")
    assert isinstance(transport, RabbitTransport)
    got: list[bytes] = []
    await transport.declare_queue(queue, durable=False)
    await transport.consume(queue, lambda d: got.append(d.body), prefetch=0, auto_ack=True)
    await transport.send(queue, b"hi", durable=False)
    await eventually(lambda: got == [b"hi"])
    await transport.close()


async def test_unreachable_broker_is_a_transport_error() -> None:
    with pytest.raises(errors.TransportError) as info:
        await connect("rabbit://guest:secret@127.0.0.1:1/")
    assert info.value.retryable
    assert "secret" not in str(info.value)


async def test_redeclaring_differently_is_a_config_error(transport: Transport, queue: str) -> None:
    await transport.declare_queue(queue, durable=True)
    with pytest.raises(errors.ConfigError, match=queue):
        await transport.declare_queue(queue, durable=False)
    await transport.send(queue, b"still usable", durable=True)  # the channel was reopened


async def test_another_connections_exclusive_queue_is_refused(
    transport: Transport, url: str, queue: str
) -> None:
    await transport.declare_queue(queue, durable=False, exclusive=True)
    other = await connect(url)
    with pytest.raises(errors.TransportError):
        await other.consume(queue, lambda d: None, prefetch=1)
    await other.close()


async def test_requeue_counts_and_dead_letter_reason(
    transport: RabbitTransport, url: str, queue: str
) -> None:
    await transport.declare_queue(queue, durable=True)
    counts: list[int] = []

    def handler(delivery: Any) -> None:
        counts.append(delivery.delivery_count)
        settle = delivery.requeue() if len(counts) < 3 else delivery.dead_letter("gave up")
        asyncio.get_running_loop().create_task(settle)

    await transport.consume(queue, handler, prefetch=1)
    await transport.send(queue, b"poison", durable=True)
    await eventually(lambda: len(counts) == 3)
    assert counts == [1, 2, 3]
    async with aiormq.connect(url.replace("rabbit://", "amqp://")) as connection:
        channel = await connection.channel()
        for _ in range(50):
            message = await channel.basic_get(queue + ".dlq", no_ack=True)
            if message.body:
                break
            await asyncio.sleep(0.05)
        assert message.body == b"poison"
        assert message.header.properties.headers == {REASON_HEADER: "gave up"}


async def test_a_consumer_survives_its_channel_being_closed(
    transport: RabbitTransport, queue: str
) -> None:
    # What RabbitMQ does on consumer_timeout or a channel error: close the consumer's channel.
    await transport.declare_queue(queue, durable=True)
    got: list[bytes] = []

    def handler(delivery: Any) -> None:
        got.append(delivery.body)
        asyncio.get_running_loop().create_task(delivery.ack())

    consumer = await transport.consume(queue, handler, prefetch=5)
    channel = consumer.channel
    assert channel is not None
    with pytest.raises(aiormq.exceptions.ChannelPreconditionFailed):
        await channel.queue_declare(queue, durable=False)
    await eventually(lambda: consumer.channel is not None and consumer.channel is not channel)
    await transport.send(queue, b"after", durable=True)
    await eventually(lambda: got == [b"after"])


async def test_reconnects_and_replays_after_losing_the_connection(
    transport: RabbitTransport, topic_name: str
) -> None:
    server = RPCServer(transport, Target(topic_name), [Echo()])
    await server.start()
    client = RPCClient(transport, Target(topic_name), timeout=10)
    assert await client.call(None, "echo", value=1) == 1
    connection = transport._connection
    assert connection is not None
    await connection.close()  # as a dropped TCP connection would
    # the reply queue (exclusive) and the server's consumers come back by themselves
    assert await client.call(None, "echo", value=2) == 2
    assert transport._connection is not connection
    await server.stop()


@pytest.fixture
def topic_name() -> str:
    return f"rt-{uuid.uuid4().hex[:8]}"
