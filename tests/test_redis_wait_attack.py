"""Attacks on ``WAIT`` under Sentinel (scripts/servers redis-sentinel): a replica that stalls
(a busy read-only script on the replica, so the primary still lists it online) makes ``WAIT`` count
fewer replicas than asked. The caller must see the typed, retryable error, and the ambiguous
attempt must not leave the lock held by nobody for its whole ttl."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio as aioredis

import keel.coordination as kc
import servers
from keel import urls
from keel.errors import BackendUnavailable, TransportError
from keel.messaging.transports.redis import RedisTransport

pytestmark = pytest.mark.timeout(90)


async def _stall_replica(seconds: float) -> asyncio.Task[object]:
    replica = aioredis.Redis(host="127.0.0.1", port=servers.sentinel_replica_port())
    busy = (
        "local t0 = redis.call('TIME') local s = tonumber(ARGV[1]) "
        "while true do local t = redis.call('TIME') "
        "if (t[1] - t0[1]) + (t[2] - t0[2]) / 1e6 > s then return 1 end end"
    )
    task = asyncio.create_task(replica.execute_command("EVAL_RO", busy, 0, seconds))
    task.add_done_callback(lambda _: asyncio.ensure_future(replica.aclose()))
    await asyncio.sleep(0.2)
    return task


async def test_wait_short_is_typed_and_leaves_no_ghost() -> None:
    url = servers.server_url("redis-sentinel")
    a = await kc.connect(url, member_id="wait-a", ttl=30)
    b = await kc.connect(url, member_id="wait-b", ttl=30)
    try:
        stall = await _stall_replica(3)
        with pytest.raises(BackendUnavailable, match="may or may not"):
            await a.try_acquire("keel-attack-wait")
        await stall
        # The ambiguous attempt was given up: the lock is free now, not in 30 s.
        started = time.monotonic()
        held = await b.try_acquire("keel-attack-wait")
        assert held is not None, "the ambiguous acquire left the lock held by nobody"
        await held.release_confirmed()
        assert time.monotonic() - started < 5
    finally:
        await a.close()
        await b.close()


async def test_durable_send_with_wait_short_is_a_transport_error() -> None:
    """The messaging side: a durable send whose WAIT counts no replica while one is
    connected is the documented TransportError, and the pipe serves the next send."""
    url = servers.server_url("redis-sentinel")
    t = RedisTransport(urls.parse(url))
    await t.connect()
    try:
        queue = f"keel-attack-wait-{time.monotonic_ns()}"
        await t.declare_queue(queue, durable=True)
        await t.send(queue, b"before", durable=True)
        stall = await _stall_replica(3)
        with pytest.raises(TransportError, match="may or may not"):
            await t.send(queue, b"\x00\xff" * 1000, durable=True)
        await stall
        await t.send(queue, b"after", durable=True)
        await t.delete_queue(queue)
    finally:
        await t.close()
