"""Attacks on a5147ec (a failed NATS settlement gives its credit back): no credit counted
twice, never more in hand than the prefetch, a failed ack redelivered (at least once), a
cancelled puller and a closing transport while settlements fail, no nats-py error leaking.

The failing publish is the one `tests.messaging.test_nats_failed_ack` uses: nats-py raises
`OutboundBufferLimitError` while reconnecting with a full pending buffer and
`ConnectionClosedError` once closed, from ``nc.publish``."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import nats.errors
import pytest

from keel.errors import KeelError
from keel.messaging import connect
from keel.messaging.transports.base import Delivery, Transport
from tests.helpers import eventually
from tests.servers import server_url

_VERDICTS = (b"+ACK", b"-NAK", b"+TERM")


def _fail(
    transport: Transport, verdicts: tuple[bytes, ...], error: type[Exception]
) -> Callable[[], None]:
    """Every publish of one of ``verdicts`` fails with ``error`` from now on (after one
    turn of the loop, as a publish that waits on a full buffer would); returns what puts
    the connection back."""
    nc = transport.nc  # type: ignore[attr-defined]
    publish = nc.publish

    async def failing(subject: str, payload: bytes = b"", **kwargs: Any) -> None:
        if payload in verdicts:
            await asyncio.sleep(0)  # concurrent acks interleave here
            raise error
        await publish(subject, payload, **kwargs)

    nc.publish = failing

    def restore() -> None:
        nc.publish = publish

    return restore


def _credit_ok(consumer: Any) -> bool:
    return len(consumer.unsettled) + consumer.requested <= consumer.prefetch


@pytest.fixture
async def short_wait() -> AsyncIterator[Transport]:
    """A transport whose server redelivers an unacked message after one second."""
    t = await connect(server_url("nats") + "?ack_wait=1")
    try:
        yield t
    finally:
        await t.close()


async def test_concurrent_failed_acks_and_repeats_never_give_credit_twice(
    short_wait: Transport,
) -> None:
    transport = short_wait
    queue = f"ac-{uuid.uuid4().hex[:8]}"
    prefetch = 4
    await transport.declare_queue(queue, durable=True)
    got: list[Delivery] = []
    in_hand: set[Delivery] = set()
    most = 0

    def handler(d: Delivery) -> None:
        nonlocal most
        got.append(d)
        in_hand.add(d)
        most = max(most, len(in_hand))

    consumer = await transport.consume(queue, handler, prefetch=prefetch)
    try:
        for i in range(prefetch):
            await transport.send(queue, b"m-%d" % i, durable=True)
        await eventually(lambda: len(got) == prefetch, timeout=10)
        restore = _fail(transport, _VERDICTS, nats.errors.OutboundBufferLimitError)
        first = list(got)
        # Each delivery settled three times at once (ack, ack, requeue), all failing.
        results = await asyncio.gather(
            *(s for d in first for s in (d.ack(), d.ack(), d.requeue())),
            return_exceptions=True,
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        assert len(errors) == prefetch  # one per delivery; the repeats are no-ops
        assert all(isinstance(e, KeelError) for e in errors), errors
        assert all(d.settled for d in first)
        in_hand.difference_update(first)
        assert _credit_ok(consumer), (len(consumer.unsettled), consumer.requested)
        restore()
        for i in range(3 * prefetch):
            await transport.send(queue, b"n-%d" % i, durable=True)

        async def ack_all() -> None:
            for d in list(in_hand):
                in_hand.discard(d)
                await d.ack()

        # The redeliveries of the failed acks (after ack_wait) and the new messages: all come,
        # and never more than the prefetch in hand at once.
        deadline = asyncio.get_running_loop().time() + 15
        while asyncio.get_running_loop().time() < deadline:
            await ack_all()
            assert _credit_ok(consumer), (len(consumer.unsettled), consumer.requested)
            bodies = {d.body for d in got}
            if all(b"m-%d" % i in bodies for i in range(prefetch)) and len(got) >= 4 * prefetch:
                redelivered = [d for d in got[prefetch:] if d.body.startswith(b"m-")]
                if len(redelivered) == prefetch:
                    break
            await asyncio.sleep(0.05)
        await ack_all()
        redelivered = [d for d in got[prefetch:] if d.body.startswith(b"m-")]
        # At least once: each failed ack came back, counted as a second delivery.
        assert sorted(d.body for d in redelivered) == sorted(d.body for d in first)
        assert all(d.delivery_count >= 2 for d in redelivered)
        assert sum(d.body.startswith(b"n-") for d in got) == 3 * prefetch
        assert most <= prefetch, most
    finally:
        await consumer.cancel()
        await transport.delete_queue(queue)


async def test_an_auto_ack_puller_whose_acks_fail_gets_the_messages_again(
    short_wait: Transport,
) -> None:
    transport = short_wait
    queue = f"aa-{uuid.uuid4().hex[:8]}"
    await transport.declare_queue(queue, durable=True)
    got: list[Delivery] = []
    restore = _fail(transport, (b"+ACK",), nats.errors.OutboundBufferLimitError)
    consumer = await transport.consume(queue, got.append, prefetch=1, auto_ack=True)
    try:
        for i in range(3):
            await transport.send(queue, b"a-%d" % i, durable=True)
        await asyncio.sleep(0.5)
        assert got == []  # not acked, so not handed over
        restore()
        await eventually(lambda: len(got) == 3, timeout=10)  # after ack_wait
        assert sorted(d.body for d in got) == [b"a-0", b"a-1", b"a-2"]
        await transport.send(queue, b"after", durable=True)
        await eventually(lambda: any(d.body == b"after" for d in got), timeout=5)
    finally:
        restore()
        await consumer.cancel()
        await transport.delete_queue(queue)


async def test_a_cancelled_puller_whose_acks_fail_is_forgotten_and_pulls_no_more() -> None:
    transport = await connect(server_url("nats"))
    queue = f"cp-{uuid.uuid4().hex[:8]}"
    try:
        await transport.declare_queue(queue, durable=True)
        got: list[Delivery] = []
        consumer = await transport.consume(queue, got.append, prefetch=2)
        for i in range(2):
            await transport.send(queue, b"c-%d" % i, durable=True)
        await eventually(lambda: len(got) == 2, timeout=10)
        await consumer.cancel()
        assert consumer in transport.pullers  # type: ignore[attr-defined]  # still unsettled
        restore = _fail(transport, _VERDICTS, nats.errors.OutboundBufferLimitError)
        for d in got:
            with pytest.raises(KeelError):
                await d.ack()
        restore()
        assert not consumer.unsettled  # type: ignore[attr-defined]
        assert consumer not in transport.pullers  # type: ignore[attr-defined]
        assert consumer.requested == 0 or not consumer.active  # type: ignore[attr-defined]
        await transport.send(queue, b"later", durable=True)
        await asyncio.sleep(0.5)
        assert [d.body for d in got] == [b"c-0", b"c-1"]  # a cancelled puller takes no more
        await transport.delete_queue(queue)
    finally:
        await transport.close()


@pytest.mark.parametrize(
    "error", [nats.errors.OutboundBufferLimitError, nats.errors.ConnectionClosedError]
)
async def test_close_while_its_requeues_fail_still_closes(error: type[Exception]) -> None:
    # close() hands every unsettled delivery back with -NAK; when those publishes fail (the
    # connection reconnecting with a full buffer, or closed under it), close must still
    # finish: cancel the core consumers and the keep-alive, close nats-py, raise nothing.
    transport = await connect(server_url("nats"))
    queue = f"cl-{uuid.uuid4().hex[:8]}"
    other = await connect(server_url("nats"))
    try:
        await other.declare_queue(queue, durable=True)
        await transport.declare_queue(queue, durable=True)
        got: list[Delivery] = []
        await transport.consume(queue, got.append, prefetch=3)
        for i in range(3):
            await other.send(queue, b"x-%d" % i, durable=True)
        await eventually(lambda: len(got) == 3, timeout=10)
        _fail(transport, _VERDICTS, error)
        await transport.close()  # raised TransportError before the fix
        assert transport.closed  # type: ignore[attr-defined]
        assert transport.nc.is_closed  # type: ignore[attr-defined]
        assert all(d.settled for d in got)
        # Not lost: the server redelivers them after ack_wait (10 s here) to another consumer.
        again: list[Delivery] = []
        later = await other.consume(queue, again.append, prefetch=3)
        await eventually(lambda: len(again) == 3, timeout=20)
        assert sorted(d.body for d in again) == [b"x-0", b"x-1", b"x-2"]
        for d in again:
            await d.ack()
        await later.cancel()
    finally:
        if not transport.closed:  # type: ignore[attr-defined]
            transport.nc.publish = type(transport.nc).publish.__get__(transport.nc)  # type: ignore[attr-defined]
            await transport.close()
        await other.delete_queue(queue)
        await other.close()


async def test_a_failed_ack_raises_only_keel_errors(short_wait: Transport) -> None:
    transport = short_wait
    queue = f"ty-{uuid.uuid4().hex[:8]}"
    await transport.declare_queue(queue, durable=True)
    got: list[Delivery] = []
    consumer = await transport.consume(queue, got.append, prefetch=8)
    errors = [
        nats.errors.OutboundBufferLimitError,
        nats.errors.ConnectionClosedError,
        nats.errors.ConnectionReconnectingError,
        nats.errors.ConnectionDrainingError,
        nats.errors.StaleConnectionError,
        OSError,
        TimeoutError,
    ]
    try:
        for i in range(len(errors)):
            await transport.send(queue, b"t-%d" % i, durable=True)
        await eventually(lambda: len(got) == len(errors), timeout=10)
        for delivery, error in zip(list(got), errors, strict=True):
            restore = _fail(transport, _VERDICTS, error)
            try:
                with pytest.raises(KeelError):
                    await delivery.ack()
            finally:
                restore()
        assert _credit_ok(consumer)
    finally:
        await consumer.cancel()
        await transport.delete_queue(queue)
