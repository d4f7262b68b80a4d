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
    admin = aioredis.Redis.from_url(url.rsplit("/", 1)[0] + "/15")
    await admin.eval("for i = 1, 20000 do redis.call('set', 'keel-load-test:' .. i, 'x') end", 0)
    await admin.config_set("loading-process-events-interval-bytes", 1024)
    await admin.config_set("key-load-delay", 100)
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
