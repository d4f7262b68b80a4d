"""Attacks on "a queue deleted under its users" (docs/messaging-contract.md) beyond the
conformance module: races of the restore with a stop, a reconnect while a consumed queue is
gone, the deletion of a connection's own reply queue.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from keel.errors import CallTimeout
from keel.messaging import RPCClient, RPCServer, Target, Transport, connect
from keel.messaging._link import link
from keel.messaging._target import rpc_queue
from keel.messaging.transports.rabbitmq import RabbitTransport, _Consumer
from tests.conformance.test_messaging import serve
from tests.helpers import eventually
from tests.servers import server_url

pytestmark = pytest.mark.timeout(60)


class Echo:
    async def echo(self, ctx: Any, value: Any) -> Any:
        return value


async def _rabbit(url: str) -> RabbitTransport:
    transport = await connect(url)
    assert isinstance(transport, RabbitTransport)
    return transport


async def _consumers_of(transport: RabbitTransport, queue: str) -> int:
    """The broker's count of consumers on ``queue`` (a passive declare on a channel of its
    own: one of a missing queue closes the channel it runs on)."""
    connection = transport._connection
    assert connection is not None
    channel = await connection.channel()
    try:
        ok = await channel.queue_declare(queue, passive=True)
    finally:
        if not channel.is_closed:
            await channel.close()
    assert ok.consumer_count is not None
    return ok.consumer_count


async def test_rabbitmq_a_server_stopped_while_its_queue_is_declared_again_consumes_no_more() -> (
    None
):
    """The server stops in the moment its consumer consumes its deleted queue again: the
    stop's cancel saw the lost channel, and the restore's fresh one consumed on, for a
    consumer nobody owns any more, nacking every message back to the queue in a hot loop."""
    url = server_url("rabbitmq")
    server_side, operator = await _rabbit(url), await _rabbit(url)
    topic = f"t-{uuid.uuid4().hex[:8]}"
    queue = rpc_queue(topic, "s1")  # a named server's queue outlives its stop
    server = RPCServer(server_side, Target(topic, server="s1"), [Echo()])
    await server.start()
    own = server._own
    assert isinstance(own, _Consumer)
    real_start = own.start
    consuming_again, go_on = asyncio.Event(), asyncio.Event()

    async def held_start(connection: Any) -> None:
        consuming_again.set()
        await go_on.wait()
        await real_start(connection)

    own.start = held_start  # type: ignore[method-assign]
    try:
        await operator.delete_queue(queue)
        await asyncio.wait_for(consuming_again.wait(), 10)
        await server.stop()
        go_on.set()
        await eventually(lambda: not server_side._tasks, 10)
        assert own.channel is None
        assert await _consumers_of(operator, queue) == 0
    finally:
        go_on.set()
        await server_side.delete_queue(queue)
        await server_side.close()
        await operator.close()


async def test_rabbitmq_a_reconnect_is_not_refused_while_a_consumed_queue_is_gone() -> None:
    """A consumer of a queue another connection declared, deleted since: a reconnect then
    replayed that consumer, the broker refused it, and the whole connection never came
    back (every send of the transport failing) until someone declared the queue again."""
    url = server_url("rabbitmq") + "?reconnect_wait=5"
    consumer_side, declarer = await _rabbit(url), await _rabbit(url)
    theirs, mine = f"q-{uuid.uuid4().hex[:10]}", f"q-{uuid.uuid4().hex[:10]}"
    got: list[bytes] = []

    def on_message(delivery: Any) -> None:
        got.append(delivery.body)
        asyncio.get_running_loop().create_task(delivery.ack())

    try:
        await declarer.declare_queue(theirs, durable=True)
        await consumer_side.declare_queue(mine, durable=True)
        await consumer_side.consume(theirs, on_message, prefetch=4)
        await declarer.delete_queue(theirs)
        connection = consumer_side._connection
        assert connection is not None
        await connection.close()  # as a broker restart or a network cut would
        # The transport is back: what it declared itself is served.
        await consumer_side.send(mine, b"mine", durable=True)
        # And its consumer consumes again once the queue exists again.
        await declarer.declare_queue(theirs, durable=True)
        loop = asyncio.get_running_loop()
        end = loop.time() + 20
        while b"theirs" not in got:
            assert loop.time() < end, "the consumer never consumed its queue again"
            await declarer.send(theirs, b"theirs", durable=True)
            await asyncio.sleep(0.3)
    finally:
        await declarer.delete_queue(theirs)
        await declarer.delete_queue(mine)
        await consumer_side.close()
        await declarer.close()


@pytest.fixture(params=["memory", "redis"])
def deletable_reply_url(request: pytest.FixtureRequest) -> str:
    """Backends where another connection may delete a connection's exclusive queue (RabbitMQ
    refuses: only an operator's ``rabbitmqctl delete_queue`` can, and it is declared again
    from the broker's consumer cancel)."""
    if request.param == "memory":
        return f"memory://reply-loss-{uuid.uuid4().hex[:8]}"
    return server_url("redis") + "?exclusive_ttl=3"


async def test_a_client_hears_replies_again_after_its_reply_queue_is_deleted(
    deletable_reply_url: str,
) -> None:
    """The reply queue is a queue its transport declared, with a consumer: deleted under it,
    it is declared again like any other (the memory transport left the reply consumer
    waiting for a queue nobody would declare again, and every call timed out)."""
    opened: list[Transport] = [await connect(deletable_reply_url) for _ in range(3)]
    server_side, client_side, operator = opened
    topic = f"t-{uuid.uuid4().hex[:8]}"
    server, _ = await serve(server_side, topic)
    client = RPCClient(client_side, Target(topic), timeout=5)
    try:
        assert await client.call(None, "echo", value=1) == 1
        reply_queue = link(client_side).reply_to
        assert reply_queue is not None
        await operator.delete_queue(reply_queue)
        loop = asyncio.get_running_loop()
        end = loop.time() + 20
        while True:
            try:
                assert await client.prepare(timeout=1.0).call(None, "echo", value=2) == 2
                break
            except CallTimeout:
                assert loop.time() < end, "no reply heard again after the reply queue went"
    finally:
        await server.stop()
        for transport in reversed(opened):
            await transport.close()
