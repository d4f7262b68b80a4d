"""Redis's own edge: a server that is loading its dataset (after a restart, or DEBUG RELOAD)
answers ``LOADING``; Keel reports it as the retryable `BackendUnavailable`, and a waiting
acquire rides it out."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

import keel.coordination as kc
import servers
from keel.errors import BackendUnavailable

pytestmark = pytest.mark.timeout(60)


@contextlib.asynccontextmanager
async def _loading(url: str) -> AsyncIterator[asyncio.Task[object]]:
    """Make the server spend about two seconds loading its dataset (DEBUG RELOAD, slowed down
    per key), as it does after a restart; the task ends when it has loaded."""
    # redis-py's default 5 s socket timeout would cut DEBUG RELOAD short.
    admin = aioredis.Redis.from_url(url.rsplit("/", 1)[0] + "/15", socket_timeout=60)
    await admin.eval("for i = 1, 20000 do redis.call('set', 'keel-load-test:' .. i, 'x') end", 0)
    # The delay is per key of every database, and earlier tests leave keys in theirs: spread
    # about one second of sleeping over all of them, so the reload lasts the same on any server.
    keys = sum(int(db["keys"]) for db in (await admin.info("keyspace")).values())
    await admin.config_set("loading-process-events-interval-bytes", 1024)
    await admin.config_set("key-load-delay", max(1, 1_000_000 // keys))
    reload = asyncio.create_task(admin.execute_command("DEBUG", "RELOAD"))
    await asyncio.sleep(0.3)
    try:
        yield reload
    finally:
        await reload
        await admin.config_set("key-load-delay", 0)
        await admin.config_set("loading-process-events-interval-bytes", 2097152)
        await admin.flushdb()
        await admin.aclose()


async def test_loading_is_backend_unavailable() -> None:
    url = servers.server_url("redis")
    coord = await kc.connect(url, member_id="a", ttl=2)
    try:
        async with _loading(url) as reload:
            with pytest.raises(BackendUnavailable):
                await coord.try_acquire("loading")
            assert not reload.done()
            async with coord.lock("loading", timeout=20) as held:  # retried until loaded
                held.check()
    finally:
        await coord.close()
