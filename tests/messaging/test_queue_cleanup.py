"""An unnamed RPC server's queue is its own: stopping it deletes the queue and an empty
``.dlq`` beside it (four RabbitMQ runs used to leave four durable ``.dlq`` queues). A
dead-letter queue that holds messages is kept: nothing dead-lettered is dropped."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable

import aiormq
import nats
import nats.js.errors
import pytest
import redis.asyncio as aioredis

from keel import urls
from keel.messaging import RPCServer, Target, Transport, connect
from keel.messaging._target import rpc_queue
from tests.servers import server_url

pytestmark = pytest.mark.timeout(60)


async def _rabbit_exists(url: str, queue: str) -> bool:
    parsed = urls.parse(url)
    connection = aiormq.Connection(
        f"amqp://{parsed.username}:{parsed.password}@{parsed.host}:{parsed.port}/"
    )
    await connection.connect()
    try:
        channel = await connection.channel()
        try:
            await channel.queue_declare(queue, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return False
        return True
    finally:
        await connection.close()


async def _nats_exists(url: str, queue: str) -> bool:
    from keel.messaging.transports.nats import _token  # noqa: PLC0415 - the stream's name

    nc = await nats.connect(url)
    try:
        try:
            await nc.jetstream().stream_info("KQ_" + _token(queue))
        except nats.js.errors.NotFoundError:
            return False
        return True
    finally:
        await nc.close()


async def _redis_exists(url: str, queue: str) -> bool:
    client = aioredis.Redis.from_url(url)
    try:
        return bool(await client.exists(f"keel:mq:q:{queue}"))
    finally:
        await client.aclose()


# broker -> (server name, does this queue exist there?)
BROKERS: dict[str, Callable[[str, str], Awaitable[bool]]] = {
    "rabbitmq": _rabbit_exists,
    "nats": _nats_exists,
    "redis": _redis_exists,
}


class Poison:
    async def boom(self, ctx: object) -> None:
        return None


@pytest.fixture(params=sorted(BROKERS))
def broker(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def _served_and_stopped(url: str, dead_letter: bool) -> tuple[str, Transport]:
    transport = await connect(url)
    topic = f"cleanup-{uuid.uuid4().hex[:8]}"
    server = RPCServer(transport, Target(topic), [Poison()])
    await server.start()
    queue = rpc_queue(topic, server.name)
    if dead_letter:
        await transport.declare_queue(queue + ".dlq", durable=True)
        await transport.send(queue + ".dlq", b"a dead letter", durable=True)
    await server.stop()
    return queue, transport


async def test_stop_deletes_the_unnamed_servers_queue_and_its_empty_dlq(broker: str) -> None:
    url = server_url(broker)
    queue, transport = await _served_and_stopped(url, dead_letter=False)
    try:
        assert not await BROKERS[broker](url, queue)
        assert not await BROKERS[broker](url, queue + ".dlq")
    finally:
        await transport.close()


async def test_a_dlq_holding_dead_letters_is_kept(broker: str) -> None:
    url = server_url(broker)
    queue, transport = await _served_and_stopped(url, dead_letter=True)
    try:
        assert await BROKERS[broker](url, queue + ".dlq")
        await transport.delete_queue(queue + ".dlq")
    finally:
        await transport.close()
