"""A NATS ack that cannot be sent (nats-py's reconnect buffer full while a cluster fails
over, a connection closed under it) must still give its credit back.

Before the fix, `_Delivery._settle` marked the delivery settled and then raised from the
publish, skipping `_Puller.settled`: the delivery stayed in the puller's unsettled set for
good. Each such ack took one unit of credit away for the life of the consumer; once a
prefetch's worth had failed, the puller had no free credit and no request outstanding, so it
never pulled again (bench rpc --cluster: a listener stopped with 4,119 confirmed
notifications pending and no pull request waiting on the server). The message itself is
not lost: the server redelivers what was never acked after ack_wait."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import nats.errors
import pytest

from keel.errors import KeelError
from keel.messaging.transports.base import Delivery, Transport
from tests.helpers import eventually


@pytest.fixture
def transport(nats_transport: Transport) -> Transport:
    return nats_transport


def _fail(transport: Transport, verdict: bytes, error: type[Exception]) -> Callable[[], None]:
    """Every ``verdict`` (an ack, a nak) published from now on fails with ``error``, as
    nats-py fails a publish when its reconnect buffer is full or its connection closed;
    returns what puts the connection back."""
    nc = transport.nc  # type: ignore[attr-defined]
    publish = nc.publish

    async def failing(subject: str, payload: bytes = b"", **kwargs: Any) -> None:
        if payload == verdict:
            raise error
        await publish(subject, payload, **kwargs)

    nc.publish = failing

    def restore() -> None:
        nc.publish = publish

    return restore


async def test_failed_acks_give_their_credit_back(transport: Transport) -> None:
    queue = f"fa-{uuid.uuid4().hex[:8]}"
    prefetch = 2
    await transport.declare_queue(queue, durable=True)
    got: list[Delivery] = []
    consumer = await transport.consume(queue, got.append, prefetch=prefetch)
    try:
        for i in range(prefetch):
            await transport.send(queue, b"first-%d" % i, durable=True)
        await eventually(lambda: len(got) == prefetch, timeout=10)
        restore = _fail(transport, b"+ACK", nats.errors.OutboundBufferLimitError)
        for delivery in got:
            with pytest.raises(KeelError):  # the caller learns its ack did not go out
                await delivery.ack()
        restore()  # the connection is back
        await transport.send(queue, b"after", durable=True)
        # Within a heartbeat or two, not after ack_wait: the credit came back at once.
        await eventually(lambda: any(d.body == b"after" for d in got), timeout=5)
        assert consumer.requested >= 0  # type: ignore[attr-defined]
        assert len(consumer.unsettled) <= prefetch  # type: ignore[attr-defined]
    finally:
        await consumer.cancel()
        await transport.delete_queue(queue)


async def test_a_failed_requeue_gives_its_credit_back_too(transport: Transport) -> None:
    queue = f"fr-{uuid.uuid4().hex[:8]}"
    await transport.declare_queue(queue, durable=True)
    got: list[Delivery] = []
    consumer = await transport.consume(queue, got.append, prefetch=1)
    try:
        await transport.send(queue, b"one", durable=True)
        await eventually(lambda: len(got) == 1, timeout=10)
        restore = _fail(transport, b"-NAK", nats.errors.ConnectionClosedError)
        with pytest.raises(KeelError):
            await got[0].requeue()
        restore()
        await transport.send(queue, b"two", durable=True)
        await eventually(lambda: any(d.body == b"two" for d in got), timeout=5)
    finally:
        await consumer.cancel()
        await transport.delete_queue(queue)
