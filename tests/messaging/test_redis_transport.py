"""What the Redis transport adds under the shared contract: reclaim of a dead consumer's
entries, expiry of a dead owner's exclusive queues, requeue counts, errors at its boundary."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from keel import errors
from keel.messaging import Transport, connect
from keel.messaging.transports.redis import GROUP, PREFIX, RedisTransport
from tests.helpers import eventually
from tests.servers import server_url


@pytest.fixture
async def redis_url() -> str:
    return server_url("redis")


@pytest.fixture
async def opened(redis_url: str) -> AsyncIterator[list[Transport]]:
    transports: list[Transport] = []
    yield transports
    for transport in transports:
        await transport.close()


def _queue() -> str:
    return f"rt-{uuid.uuid4().hex[:8]}"


async def _open(url: str, opened: list[Transport], **options: Any) -> RedisTransport:
    transport = await connect(url, **options)
    opened.append(transport)
    assert isinstance(transport, RedisTransport)
    return transport


async def test_a_dead_consumers_entries_are_redelivered(
    redis_url: str, opened: list[Transport]
) -> None:
    t = await _open(redis_url, opened, visibility_timeout=0.6)
    queue = _queue()
    await t.declare_queue(queue, durable=True)
    await t.send(queue, b"orphan", durable=True)
    # A consumer that reads and dies before settling: the entry stays pending under its name.
    await t.cmd(
        "XREADGROUP", "GROUP", GROUP, "dead-one", "COUNT", 1, "STREAMS", f"{PREFIX}q:{queue}", ">"
    )
    got: list[Any] = []
    await t.consume(queue, got.append, prefetch=4)
    await eventually(lambda: len(got) == 1, timeout=10)
    assert got[0].body == b"orphan"
    assert got[0].delivery_count == 2
    await got[0].ack()


async def test_a_live_consumer_keeps_its_unsettled_entries(
    redis_url: str, opened: list[Transport]
) -> None:
    a = await _open(redis_url, opened, visibility_timeout=1.0)
    b = await _open(redis_url, opened, visibility_timeout=1.0)
    queue = _queue()
    await a.declare_queue(queue, durable=True)
    held: list[Any] = []
    await a.consume(queue, held.append, prefetch=1)
    await a.send(queue, b"slow work", durable=True)
    await eventually(lambda: len(held) == 1)
    other: list[Any] = []
    await b.consume(queue, other.append, prefetch=1)
    await asyncio.sleep(2.5)  # past two visibility timeouts: a's heartbeat keeps it a's
    assert other == []
    await held[0].ack()


async def test_requeue_and_dead_letter(redis_url: str, opened: list[Transport]) -> None:
    t = await _open(redis_url, opened)
    queue = _queue()
    await t.declare_queue(queue, durable=True)
    await t.declare_queue(queue + ".dlq", durable=True)
    got: list[Any] = []
    dead: list[Any] = []
    await t.consume(queue, got.append, prefetch=1)
    await t.consume(queue + ".dlq", dead.append, prefetch=1)
    await t.send(queue, b"m", durable=True)
    await eventually(lambda: len(got) == 1)
    await got[0].requeue()
    await eventually(lambda: len(got) == 2)
    assert got[1].delivery_count == 2
    await got[1].dead_letter("bad input")
    await eventually(lambda: len(dead) == 1)
    assert dead[0].body == b"m"
    fields = await t.cmd("XRANGE", f"{PREFIX}q:{queue}.dlq", "-", "+")
    assert fields[0][1][b"reason"] == b"bad input"
    assert await t.cmd("XLEN", f"{PREFIX}q:{queue}") == 0


async def test_a_dead_owners_exclusive_queue_expires(
    redis_url: str, opened: list[Transport]
) -> None:
    owner = await _open(redis_url, opened, exclusive_ttl=0.6)
    sender = await _open(redis_url, opened)
    queue = _queue()
    await owner.declare_queue(queue, durable=False, exclusive=True, bindings=[queue + ".s"])
    await sender.send(queue, b"while alive", durable=False)
    assert owner._keepalive is not None
    owner._keepalive.cancel()  # the owner stops refreshing, as a killed process would
    await asyncio.sleep(1)
    with pytest.raises(errors.TransportError, match="does not exist"):
        await sender.send(queue, b"after death", durable=False)
    await sender.publish(queue + ".s", b"to nobody", durable=False)
    assert await sender.cmd("SISMEMBER", f"{PREFIX}b:{queue}.s", queue) == 0


async def test_exclusive_queues_vanish_on_close(redis_url: str, opened: list[Transport]) -> None:
    owner = await _open(redis_url, opened)
    other = await _open(redis_url, opened)
    queue = _queue()
    await owner.declare_queue(queue, durable=False, exclusive=True)
    with pytest.raises(errors.TransportError, match="exclusive"):
        await other.consume(queue, lambda d: None, prefetch=1)
    await owner.close()
    with pytest.raises(errors.TransportError, match="does not exist"):
        await other.send(queue, b"x", durable=False)


async def test_an_unreachable_server_is_a_transport_error() -> None:
    with pytest.raises(errors.TransportError) as info:
        await connect("redis://127.0.0.1:1/0", reconnect_retries=1)
    assert info.value.retryable
    assert "127.0.0.1:1" in str(info.value)
