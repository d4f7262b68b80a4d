"""What the RabbitMQ transport adds to the conformance suite: its own failure handling."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiormq
import pytest

from keel import errors
from keel.messaging import RPCClient, RPCServer, Target, Transport, connect
from keel.messaging._link import link
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


def _hold_first_ack(channel: Any) -> asyncio.Event:
    """Make the channel's first basic.ack wait until the returned event is set, as a write
    waits for room in aiormq's full frame queue."""
    real = channel.basic_ack
    gate = asyncio.Event()
    calls = 0

    async def slow_first(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            await gate.wait()
        return await real(*args, **kwargs)

    channel.basic_ack = slow_first
    return gate


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


async def test_a_reconnect_moves_replies_to_a_new_queue(
    transport: RabbitTransport, url: str, topic_name: str
) -> None:
    """RabbitMQ deletes a dead node's exclusive queues by name, after listing them: a reply
    queue declared again under its old name on another node could lose its record (and its
    replies, silently) to that. After a reconnect new calls use a new reply queue; the old
    one is deleted once the calls waiting on it are done."""
    serving = await connect(url)
    server = RPCServer(serving, Target(topic_name), [Echo()])
    await server.start()
    client = RPCClient(transport, Target(topic_name), timeout=10)
    try:
        assert await client.call(None, "echo", value=1) == 1
        lk = link(transport)
        old = lk.reply_to
        assert old is not None
        connection = transport._connection
        assert connection is not None
        await connection.close()
        # Sent while reconnecting: its reply comes on the old queue, declared again.
        assert await client.call(None, "echo", value=2) == 2
        assert await client.call(None, "echo", value=3) == 3
        assert lk.reply_to not in (None, old)
        await eventually(lambda: old not in transport._queues, timeout=10)
        assert await client.call(None, "echo", value=4) == 4
    finally:
        await server.stop()
        await serving.close()


@pytest.fixture
def topic_name() -> str:
    return f"rt-{uuid.uuid4().hex[:8]}"


async def test_batched_acks_never_cover_an_older_open_delivery(url: str, queue: str) -> None:
    """Acks of one loop iteration go out as one basic.ack(multiple): an older delivery still
    being handled must stay unacknowledged, and come back when its consumer goes."""
    first = await connect(url)
    await first.declare_queue(queue, durable=True)
    for i in range(6):
        await first.send(queue, b"%d" % i, durable=True)
    held: list[Any] = []
    await first.consume(queue, held.append, prefetch=10)
    await eventually(lambda: len(held) == 6)
    # 1 stays open; 0 and 2..5 are acked in the same iteration (one batch).
    await asyncio.gather(*(d.ack() for i, d in enumerate(held) if i != 1))
    await first.close()  # the broker requeues what is unacknowledged: only "1"
    second = await connect(url)
    try:
        again: list[bytes] = []
        await second.consume(queue, lambda d: again.append(d.body), prefetch=10, auto_ack=True)
        await eventually(lambda: again == [b"1"])
        await asyncio.sleep(0.3)
        assert again == [b"1"]
        await second.delete_queue(queue)
    finally:
        await second.close()


async def test_a_later_batch_below_an_earlier_one_is_not_acked_twice(
    url: str, queue: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Three ack batches in flight while the first one's write waits (aiormq's frame queue
    full): the second batch (tags 3, 4) waits for the first, the third (tag 2) forms
    meanwhile. The second's basic.ack(4, multiple) must not cover tag 2, whose own batch has
    not been written yet: before the fix it did, the third batch then acked tag 2 again, and
    the broker closed the channel on the unknown tag, putting the open messages back."""
    transport = await connect(url)
    try:
        await transport.declare_queue(queue, durable=True)
        for i in range(6):
            await transport.send(queue, b"%d" % i, durable=True)
        held: list[Any] = []
        await transport.consume(queue, held.append, prefetch=10)
        await eventually(lambda: len(held) == 6)
        channel = held[0]._consumer.channel
        real = channel.basic_ack
        gate = _hold_first_ack(channel)  # the first batch's frame waits for room
        first = asyncio.ensure_future(held[0].ack())
        await asyncio.sleep(0.05)  # the first batch is writing, and waits
        second = asyncio.ensure_future(asyncio.gather(held[2].ack(), held[3].ack()))
        await asyncio.sleep(0.05)  # the second batch's task waits for the first
        third = asyncio.ensure_future(held[1].ack())
        await asyncio.sleep(0.05)
        gate.set()
        await asyncio.wait_for(asyncio.gather(first, second, third), 5)
        channel.basic_ack = real
        await asyncio.gather(held[4].ack(), held[5].ack())
        await asyncio.sleep(0.5)
        assert not channel.is_closed, "the broker closed the channel on a doubled ack"
        assert len(held) == 6, "a message came back after its ack"
        assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        await transport.delete_queue(queue)
    finally:
        await transport.close()


async def test_a_cancelled_consumer_writes_every_ack_before_its_channel_closes(
    url: str, queue: str
) -> None:
    """A consumer cancelled with deliveries open closes its channel after the last one is
    settled. If that last one is a requeue, while an ack batch still waits behind a slow
    write (aiormq's frame queue full), the close must wait for that batch too: before the
    fix it closed the channel under it, the ack failed and its message came back."""
    transport = await connect(url)
    try:
        await transport.declare_queue(queue, durable=True)
        for i in range(3):
            await transport.send(queue, b"%d" % i, durable=True)
        held: list[Any] = []
        consumer = await transport.consume(queue, held.append, prefetch=10)
        await eventually(lambda: len(held) == 3)
        channel = held[0]._consumer.channel
        gate = _hold_first_ack(channel)
        first = asyncio.ensure_future(held[0].ack())
        await asyncio.sleep(0.05)  # the first batch is writing, and waits
        await consumer.cancel()
        second = asyncio.ensure_future(held[1].ack())
        await asyncio.sleep(0.05)  # the second batch waits for the first
        await held[2].requeue()  # the last open delivery: the channel closes after it
        await asyncio.sleep(0.05)
        gate.set()
        await asyncio.wait_for(asyncio.gather(first, second), 5)
        again: list[Any] = []
        await transport.consume(queue, again.append, prefetch=10)
        await eventually(lambda: len(again) >= 1)
        await asyncio.sleep(0.3)
        assert [d.body for d in again] == [b"2"], "an acked message came back"
        await again[0].ack()
        await transport.delete_queue(queue)
    finally:
        await transport.close()


async def test_acks_and_requeues_settled_together(
    url: str, queue: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Batched acks beside requeues and publishes in the same iterations, with
    aiormq's 10-frame write queue full: no basic.ack(multiple) may cover a tag whose nack or
    single ack is still waiting to be written (before the fix the batch overtook waiting
    nacks: the requeued messages were acked, and the broker closed the channel on the nack's
    unknown tag). Every requeued message, and only those, comes back."""
    transport = await connect(url)
    try:
        await transport.declare_queue(queue, durable=True)
        await transport.declare_queue(queue + "-noise", durable=False)
        n = 400
        for i in range(n):
            await transport.send(queue, b"%d" % i, durable=True)
        held: list[Any] = []
        await transport.consume(queue, held.append, prefetch=1000)
        await eventually(lambda: len(held) == n)
        requeued = {b"%d" % i for i in range(n) if i % 3 == 0}

        def settle(delivery: Any) -> Any:
            return delivery.requeue() if delivery.body in requeued else delivery.ack()

        noise = (transport.send(queue + "-noise", b"x", durable=False) for _ in range(200))
        await asyncio.gather(*(settle(d) for d in held), *noise)
        await eventually(lambda: len(held) >= n + len(requeued))
        again = held[n:]
        assert sorted(d.body for d in again) == sorted(requeued)
        assert all(d.delivery_count == 2 for d in again)
        await asyncio.gather(*(d.ack() for d in again))
        await asyncio.sleep(0.5)
        assert len(held) == n + len(requeued), "a settled message came back"
        assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        await transport.delete_queue(queue)
        await transport.delete_queue(queue + "-noise")
    finally:
        await transport.close()


async def test_a_retiring_reply_queue_ends_with_its_transport(url: str, topic_name: str) -> None:
    """A reply queue replaced by a reconnect waits (up to 300 s) for the calls sent on it.
    Closing the transport meanwhile ends that wait: no task of a closed transport sleeps on
    for minutes and then talks to it."""
    transport = await connect(url)
    assert isinstance(transport, RabbitTransport)
    serving = await connect(url)
    server = RPCServer(serving, Target(topic_name), [Echo()])
    await server.start()
    lk = link(transport)
    try:
        client = RPCClient(transport, Target(topic_name), timeout=10)
        assert await client.call(None, "echo", value=1) == 1
        waiting = lk.expect("a-call-without-a-deadline")  # still waiting at the reconnect
        connection = transport._connection
        assert connection is not None
        await connection.close()
        await eventually(lambda: bool(lk._retiring), timeout=15)
        await transport.close()
        await eventually(lambda: not lk._retiring, timeout=5)
    finally:
        lk.forget("a-call-without-a-deadline", waiting)
        for task in list(lk._retiring):
            task.cancel()
        await transport.close()
        await server.stop()
        await serving.close()


async def test_a_call_that_read_the_reply_queue_before_a_reconnect_gets_its_reply(
    transport: RabbitTransport, url: str, topic_name: str
) -> None:
    """The first call to a topic reads the reply queue, then declares the topic's queue
    (which waits for a reconnect in progress), then registers its request id. The
    reconnect's reply-queue move snapshots the calls waiting, without this one, and deletes
    the old queue at once: the reply goes to a deleted queue and the call times out."""
    serving = await connect(url)
    first, second = topic_name, topic_name + "-b"
    servers = [RPCServer(serving, Target(t), [Echo()]) for t in (first, second)]
    for server in servers:
        await server.start()
    try:
        assert await RPCClient(transport, Target(first), timeout=10).call(None, "echo", value=1)
        lk = link(transport)
        old = lk.reply_to
        connection = transport._connection
        assert connection is not None
        assert old is not None
        await connection.close()
        # A new topic: its queue is declared after reply_to is read, across the reconnect.
        client = RPCClient(transport, Target(second), timeout=5)
        assert await client.call(None, "echo", value=2) == 2
    finally:
        for server in servers:
            await server.stop()
        await serving.close()


async def _reject_publish_queue(url: str, queue: str) -> None:
    """A queue that holds one message and nacks every publish beyond it (a classic queue:
    a quorum queue's overflow state reaches its publishers late, so it nacks inexactly)."""
    connection = aiormq.Connection(url.replace("rabbit://", "amqp://"))
    await connection.connect()
    try:
        channel = await connection.channel()
        await channel.queue_declare(
            queue,
            durable=True,
            arguments={
                "x-max-length": 1,
                "x-overflow": "reject-publish",
            },
        )
        await channel.basic_publish(b"full", routing_key=queue)
    finally:
        await connection.close()


async def test_concurrent_nacks_are_refused_typed_and_retire_one_channel(
    url: str, queue: str
) -> None:
    """Many confirmed publishes nacked at once (a full reject-publish queue): each
    raises a retryable TransportError (never an aiormq error, never reported sent), the
    confirm channel is replaced once for the whole burst (the rest retry on the new one),
    the old channel is closed once its confirms are due, and nothing got into the queue."""
    await _reject_publish_queue(url, queue)
    transport = await connect(url + "?queue_type=quorum&publish_timeout=1")
    assert isinstance(transport, RabbitTransport)
    try:
        first = transport._confirm
        assert first is not None
        results = await asyncio.gather(
            *(
                transport.publish_raw("", queue, f"m{i}".encode(), durable=False, confirm=True)
                for i in range(50)
            ),
            return_exceptions=True,
        )
        assert all(isinstance(r, errors.TransportError) and r.retryable for r in results), {
            type(r).__name__ for r in results
        }
        second = transport._confirm
        assert second is not None
        assert second is not first
        await asyncio.sleep(0.6)  # past _RETIRE_EVERY_S: the next nack may retire again
        with pytest.raises(errors.TransportError):
            await transport.publish_raw("", queue, b"late", durable=False, confirm=True)
        assert transport._confirm is not second
        await eventually(lambda: first.is_closed and second.is_closed, timeout=5)
        await eventually(lambda: not transport._tasks, timeout=5)
        channel = await transport._channel("_control", "test")
        ok = await channel.queue_declare(queue, passive=True)
        assert ok.message_count == 1
    finally:
        await transport.delete_queue(queue)
        await transport.close()


async def test_two_reconnects_retire_both_old_reply_queues(
    transport: RabbitTransport, url: str, topic_name: str
) -> None:
    """Two reconnects in quick succession, a call between them and one waiting across both:
    each replaced reply queue is deleted once the calls sent on it are done, and no retiring
    task is left behind."""
    serving = await connect(url)
    server = RPCServer(serving, Target(topic_name), [Echo()])
    await server.start()
    lk = link(transport)
    client = RPCClient(transport, Target(topic_name), timeout=10)
    waiting = None
    try:
        assert await client.call(None, "echo", value=1) == 1
        first = lk.reply_to
        waiting = lk.expect("waits-across-both")
        for _ in range(2):
            connection = transport._connection
            assert connection is not None
            await connection.close()
            await eventually(lambda c=connection: transport._connection is not c, timeout=15)
            assert await client.call(None, "echo", value=2) == 2
        current = lk.reply_to
        assert len({first, current, None}) == 3
        assert len(lk._retiring) == 2
        lk.forget("waits-across-both", waiting)
        waiting = None
        await eventually(lambda: not lk._retiring, timeout=5)
        assert first not in transport._queues
        assert [q for q in transport._queues if q.startswith("keel.reply.")] == [lk.reply_to]
        assert await client.call(None, "echo", value=3) == 3
    finally:
        if waiting is not None:
            lk.forget("waits-across-both", waiting)
        await server.stop()
        await serving.close()
