"""SQLite specifics: a write whose transaction cannot begin (another connection holds the
write lock past the busy timeout) gets SQLite's error, and the store works again once the
lock is gone; deleting a subscription, short queue or long. (Earlier layouts:
tests/hub/test_store_migration.py.)"""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from pathlib import Path
from typing import Any

import pytest

from keel.errors import NotFound
from keel.hub import CloudEvent, Hub, Principal, SQLiteStore, StaticTokens
from keel.hub.stores.base import Routed
from keel.hub.stores.sqlite import SMALL_QUEUE
from tests.hub.test_store_conformance import NOW, ev, make_sub


async def test_a_refused_transaction_fails_its_writer_and_the_store_recovers(
    tmp_path: Path,
) -> None:
    store = SQLiteStore(tmp_path / "hub.db")
    await store.open()
    try:
        other = sqlite3.connect(tmp_path / "hub.db", isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # hold the write lock
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            await make_sub(store, "refused")
        other.execute("ROLLBACK")
        other.close()
        await make_sub(store, "after")
        assert (await store.get_subscription("after")).id == "after"
    finally:
        await store.close()


async def test_deletes_of_short_queues_share_the_group_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tenant churning subscriptions must not take a transaction (an fsync) of its own per
    delete: every other tenant's ingest waited behind each one."""
    store = SQLiteStore(tmp_path / "hub.db")
    await store.open()
    try:
        for n in range(20):
            await make_sub(store, f"s{n}")
        await store.append([Routed("e1", ev(1), tuple(f"s{n}" for n in range(20)))], now=NOW)
        commits = 0
        commit = store._commit

        def counted() -> None:
            nonlocal commits
            commits += 1
            commit()

        monkeypatch.setattr(store, "_commit", counted)
        await asyncio.gather(*(store.delete_subscription(f"s{n}") for n in range(20)))
        assert commits <= 3, commits
        assert await store.list_subscriptions(None, limit=100, marker=None) == []
    finally:
        await store.close()


async def test_a_long_queue_and_a_short_one_are_deleted_whole(tmp_path: Path) -> None:
    """The short one in the group commit, the long one (past SMALL_QUEUE) in a transaction of
    its own; a subscription made again under either id starts empty, the queue beside them
    keeps every message, and the retention sweep removes the events no queue holds."""
    store = SQLiteStore(tmp_path / "hub.db")
    await store.open()
    try:
        for sub_id in ("short", "long", "kept"):
            await make_sub(store, sub_id)
        n_long = SMALL_QUEUE + 5
        await store.append([Routed("e0", ev(0), ("short",))], now=NOW)
        await store.append([Routed(f"l{n}", ev(n), ("long",)) for n in range(n_long)], now=NOW)
        await store.append([Routed("k", ev(-1), ("kept",))], now=NOW)
        await store.delete_subscription("short")
        await store.delete_subscription("long")
        with pytest.raises(NotFound):
            await store.delete_subscription("long")
        for sub_id in ("short", "long"):
            await make_sub(store, sub_id)
            assert await store.read(sub_id, after=0, limit=10) == (None, [])
        _, kept = await store.read("kept", after=0, limit=10)
        assert [m.seq for m in kept] == [1]
        await store.enforce_retention(now=NOW)
        (left,) = store.db.execute("SELECT count(*) FROM events").fetchone()
        assert left == 1  # the one "kept" holds
    finally:
        await store.close()


async def test_subscription_churn_shares_the_ingest_commits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the hub ingests, a tenant creating and deleting subscriptions one after another
    joins the transactions of the ingest batches rather than taking every other one (an
    fsync each, which every waiting event of every tenant waited for). Counted in
    transactions, not time."""
    store = SQLiteStore(tmp_path / "hub.db")
    await store.open()
    flooder = Principal("one", "p-one", ("member",))
    churner = Principal("two", "p-two", ("member",))
    hub = Hub(store, StaticTokens({}), subscription_burst=100)  # 60 writes: not rate-limited
    await hub.start()
    try:
        await hub.create_subscription(flooder, {})
        carried: list[bool] = []  # per transaction: did it carry an ingest batch
        committing = asyncio.Event()  # the flood is committing
        commit_batch = store._commit_batch

        async def counted(batch: Any) -> None:
            carried.append(store._ingesting)
            if store._ingesting:
                committing.set()
            await commit_batch(batch)

        monkeypatch.setattr(store, "_commit_batch", counted)
        stop = asyncio.Event()

        async def flood() -> None:
            while not stop.is_set():
                await hub.ingest(
                    CloudEvent(id=uuid.uuid4().hex, source="s", type="t", tenant="p-one")
                )

        floods = [asyncio.create_task(flood()) for _ in range(8)]
        await asyncio.wait_for(committing.wait(), 10)
        before = len(carried)
        for _ in range(30):
            sub = await hub.create_subscription(churner, {})
            await hub.delete_subscription(churner, sub.id)
        churned = carried[before:]
        stop.set()
        await asyncio.gather(*floods)
        alone = churned.count(False)
        assert alone <= 3, (alone, len(churned))
    finally:
        await hub.stop()
        await store.close()
