"""How soon the next commit starts, in loop iterations: on a busy hub each iteration runs
every stream's and every tenant's callbacks, and the single SQLite writer sits idle for all
of them (bench hub, a hostile tenant churning subscriptions beside a flood: the quiet
tenant's commits took 2.4 ms at p50 against 1.6 ms without the churn).

Asserted: writes that share a transaction take the connection's lock once between them, not
once each; a cancelled follower leaves the others their outcome; a hub whose commit ends with
events pending starts the next commit in the same loop iteration."""

from __future__ import annotations

import asyncio
import itertools
import sys
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Literal

import pytest

from keel.hub import CloudEvent, Hub, SQLiteStore, StaticTokens
from keel.hub.stores.base import Appended, Routed
from tests.hub.test_store_conformance import make_sub

pytestmark = pytest.mark.timeout(20)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    s = SQLiteStore(tmp_path / "hub.db")
    await s.open()
    try:
        yield s
    finally:
        await s.close()


class CountingLock(asyncio.Lock):
    def __init__(self) -> None:
        super().__init__()
        self.acquired = 0

    async def acquire(self) -> Literal[True]:
        self.acquired += 1
        return await super().acquire()


class Turns:
    """The loop iteration we are in: one callback per iteration counts it."""

    def __init__(self) -> None:
        self.now = 0
        self._loop = asyncio.get_running_loop()
        self._handle = self._loop.call_soon(self._tick)

    def _tick(self) -> None:
        self.now += 1
        self._handle = self._loop.call_soon(self._tick)

    def stop(self) -> None:
        self._handle.cancel()


async def test_writes_that_share_a_transaction_take_the_lock_once(store: SQLiteStore) -> None:
    lock = CountingLock()
    store._lock = lock
    await make_sub(store, "first")
    lock.acquired = 0
    await asyncio.gather(*(make_sub(store, f"s{i}") for i in range(20)))
    # The first writer leads and commits its own write; the other 19 queue during that
    # commit and share the next one. One queued turn each for the lock was 20 acquisitions.
    assert lock.acquired <= 3
    rows = store.db.execute("SELECT count(*) FROM subscriptions").fetchone()
    assert rows == (21,)


async def test_a_cancelled_follower_leaves_the_others_their_outcome(store: SQLiteStore) -> None:
    await make_sub(store, "first")
    writers = [asyncio.create_task(make_sub(store, f"s{i}")) for i in range(6)]
    await asyncio.sleep(0)  # the first leads; the others are queued behind its commit
    writers[3].cancel()
    writers[0].cancel()  # the leader itself: its commit is in flight and finishes
    results = await asyncio.gather(*writers, return_exceptions=True)
    assert isinstance(results[3], asyncio.CancelledError)
    ids = {row[0] for row in store.db.execute("SELECT id FROM subscriptions")}
    assert {"first", "s1", "s2", "s4", "s5"} <= ids
    assert "s3" not in ids
    assert not store._leading
    await make_sub(store, "after")  # the store still commits


async def test_the_next_commit_starts_in_the_iteration_the_last_one_ended(
    tmp_path: Path,
) -> None:
    store = SQLiteStore(tmp_path / "hub.db")
    await store.open()
    hub = Hub(store, StaticTokens({}))
    await hub.start()
    turns = Turns()
    spans: list[tuple[int, int, int]] = []  # (start, end, events pending at the end)
    extra: list[asyncio.Task[None]] = []
    real_append = store.append

    async def ingest() -> None:
        await hub.ingest(CloudEvent(id=uuid.uuid4().hex, source="s", type="t", tenant="p"))

    async def append(batch: Sequence[Routed], *, now: float) -> list[Appended]:
        start = turns.now
        if len(spans) < 6:  # events that arrive while this commit is in flight
            extra.extend(asyncio.create_task(ingest()) for _ in range(3))
        out = await real_append(batch, now=now)
        spans.append((start, turns.now, sum(1 for _ in hub._pending.tenants())))
        return out

    store.append = append  # type: ignore[method-assign]
    try:
        await ingest()
        while extra:
            await extra.pop()
    finally:
        turns.stop()
        await hub.stop()
        await store.close()
    gaps = [nxt[0] - end for (_, end, pending), nxt in itertools.pairwise(spans) if pending]
    assert gaps, spans
    # A task per batch, started by a batcher woken by the last one's done callback: 3 or
    # more iterations with the store idle each time.
    assert gaps == [0] * len(gaps), spans


async def test_an_open_store_lowers_the_switch_interval_and_the_last_close_restores_it(
    tmp_path: Path,
) -> None:
    before = sys.getswitchinterval()
    first = SQLiteStore(tmp_path / "a.db")
    second = SQLiteStore(tmp_path / "b.db")
    alone = SQLiteStore(tmp_path / "c.db", lower_switch_interval=False)
    await alone.open()
    assert sys.getswitchinterval() == before
    await first.open()
    await second.open()
    assert sys.getswitchinterval() <= 0.0005
    await first.close()
    assert sys.getswitchinterval() <= 0.0005  # the second one is still open
    await second.close()
    await alone.close()
    assert sys.getswitchinterval() == before
