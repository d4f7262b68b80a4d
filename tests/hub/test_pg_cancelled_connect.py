"""PostgreSQL store: a request cancelled while the pool opens a connection for it.

A client that leaves mid-request cancels its handler; with the pool short of a connection the
cancel lands inside asyncpg's connect, whose sslmode=prefer probe then left an exception no one
retrieved (the last CI run: `test_sixteen_mib_frames_are_refused_before_they_are_buffered
[postgres]` failed its teardown on "Future exception was never retrieved"). The session's
check for unretrieved exceptions (tests/conftest.py) is what fails these tests."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import AsyncIterator

import pytest

from keel.errors import NotFound
from keel.hub.stores.postgres import PostgresStore
from tests.hub.conftest import fresh_pg_store


@pytest.fixture
async def pg() -> AsyncIterator[PostgresStore]:
    async with fresh_pg_store(pool_size=4) as store:
        yield store


async def _lookup(store: PostgresStore) -> None:
    with contextlib.suppress(NotFound):
        await store.get_subscription("nobody")


async def test_requests_cancelled_at_every_step_of_a_connect_leave_nothing_unretrieved(
    pg: PostgresStore,
) -> None:
    for turns in range(60):
        # More requests than the pool holds open: the extra ones connect; cancel them on the
        # loop's `turns`-th turn, from before the socket exists to after the login.
        tasks = [asyncio.create_task(_lookup(pg)) for _ in range(4)]
        for _ in range(turns):
            await asyncio.sleep(0)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await pg.close()  # the next round's pool starts short again
        await pg.open()
        gc.collect()  # an unretrieved exception is reported when its Future is collected
    await asyncio.sleep(0.05)
