"""A queue deleted behind the transports' backs (docs/messaging-contract.md, "A queue deleted
under its users"), on every transport: as an operator would (``rabbitmqctl delete_queue``, a
``DEL`` of the stream), by another connection's ``delete_queue``.

What the queue held is gone with it. After that nothing more is lost: the server's consumer
declares the queue again and consumes on, a cast sent meanwhile is held (its sender declares
the queue again), and a listener hears the next notification.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from keel.errors import CallTimeout, TransportError
from keel.messaging import NotificationListener, Notifier, RPCClient, Target
from keel.messaging._target import notify_queue, rpc_queue
from tests.conformance.conftest import TransportFactory
from tests.conformance.test_messaging import serve
from tests.helpers import eventually

pytestmark = pytest.mark.timeout(90)

# Seconds a consumer may take to notice and declare its queue again: NATS hears of a deleted
# consumer only through its pull requests (a silent re-ask after the idle heartbeat).
RECOVERY = 30.0


async def _calls_again(client: RPCClient, value: int) -> None:
    """Call until one is answered: one sent before the server declared the queue again may
    be lost (calls are not confirmed by every broker) and time out."""
    loop = asyncio.get_running_loop()
    end = loop.time() + RECOVERY
    while True:
        try:
            assert await client.prepare(timeout=1.0).call(None, "echo", value=value) == value
            return
        except CallTimeout:
            if loop.time() > end:
                raise


async def test_a_server_serves_again_after_its_queue_is_deleted(
    make_transport: TransportFactory, topic: str
) -> None:
    server_side, client_side, operator = [await make_transport() for _ in range(3)]
    server, recorder = await serve(server_side, topic)
    client = RPCClient(client_side, Target(topic), timeout=5)
    try:
        assert await client.call(None, "echo", value=1) == 1
        await operator.delete_queue(rpc_queue(topic))
        # A cast is confirmed by the broker: sent into the gap, it is held, never dropped.
        await client.cast(None, "record", value="into the gap")
        await eventually(lambda: ("record", "into the gap") in recorder.calls, RECOVERY)
        await _calls_again(client, 2)
        # And it stays served: a few more, each answered.
        for value in range(3, 8):
            assert await client.call(None, "echo", value=value) == value
    finally:
        await server.stop()


async def test_a_second_deletion_is_survived_too(
    make_transport: TransportFactory, topic: str
) -> None:
    server_side, client_side, operator = [await make_transport() for _ in range(3)]
    server, recorder = await serve(server_side, topic)
    client = RPCClient(client_side, Target(topic), timeout=5)
    try:
        for round_ in range(2):
            await operator.delete_queue(rpc_queue(topic))
            await client.cast(None, "record", value=round_)
            await eventually(lambda r=round_: ("record", r) in recorder.calls, RECOVERY)  # type: ignore[misc]
        await _calls_again(client, 9)
    finally:
        await server.stop()


class _Sink:
    def __init__(self) -> None:
        self.seen: list[Any] = []

    async def info(
        self, ctx: Any, publisher_id: str, event_type: str, payload: Any, metadata: Any
    ) -> None:
        self.seen.append(payload)


async def test_a_listener_hears_again_after_its_queue_is_deleted(
    make_transport: TransportFactory, topic: str
) -> None:
    listener_side, notifier_side, operator = [await make_transport() for _ in range(3)]
    sink = _Sink()
    listener = NotificationListener(listener_side, [Target(topic)], [sink])
    await listener.start()
    notifier = Notifier(notifier_side, "test", topics=[topic])
    try:
        await notifier.info(None, "before", 0)
        await eventually(lambda: 0 in sink.seen, 10)
        await operator.delete_queue(notify_queue(topic, "info", None))
        # Until one arrives: one published before the queue is back may find no queue on a
        # broker whose listener alone declares it again.
        loop = asyncio.get_running_loop()
        end = loop.time() + RECOVERY
        sent = 0
        while not any(isinstance(p, int) and p > 0 for p in sink.seen):
            assert loop.time() < end, f"no notification heard in {RECOVERY}s after the deletion"
            sent += 1
            await notifier.info(None, "after", sent)
            await asyncio.sleep(0.2)
        # From then on every one arrives.
        last = sent
        for value in range(last + 1, last + 6):
            await notifier.info(None, "after", value)
        await eventually(lambda: all(v in sink.seen for v in range(last + 1, last + 6)), 10)
    finally:
        await listener.stop()


async def test_a_durable_send_to_a_queue_gone_that_the_sender_never_declared_is_refused(
    make_transport: TransportFactory, topic: str
) -> None:
    """Declaring again is for queues the sender declared: one it never did is no queue to
    send to, and a durable send to it says so rather than vanish."""
    sender, operator = await make_transport(), await make_transport()
    queue = rpc_queue(topic)
    await operator.declare_queue(queue, durable=True)
    await operator.delete_queue(queue)
    with pytest.raises(TransportError):
        await sender.send(queue, b"x", durable=True)


async def test_a_durable_send_with_no_consumer_declares_the_queue_again(
    make_transport: TransportFactory, topic: str
) -> None:
    """No consumer to declare it again: the sender that declared the queue does, at once,
    and the message waits there for the next consumer."""
    sender, operator = await make_transport(), await make_transport()
    queue = rpc_queue(topic)
    await sender.declare_queue(queue, durable=True)
    await operator.delete_queue(queue)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await sender.send(queue, b"held", durable=True)
    assert loop.time() - started < 2.0  # declared again, not waited for
    got: list[bytes] = []
    acks: set[asyncio.Task[None]] = set()

    def handle(delivery: Any) -> None:
        got.append(delivery.body)
        task = asyncio.ensure_future(delivery.ack())
        acks.add(task)
        task.add_done_callback(acks.discard)

    consumer = await sender.consume(queue, handle, prefetch=1)
    try:
        await eventually(lambda: got == [b"held"], 10)
    finally:
        await consumer.cancel()
