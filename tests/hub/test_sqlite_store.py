"""SQLite specifics: a write whose transaction cannot begin (another connection holds the
write lock past the busy timeout) gets SQLite's error, and the store works again once the
lock is gone."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from keel.hub import SQLiteStore
from tests.hub.test_store_conformance import make_sub


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


# The layout before schema version 2: every message row held its own copy of the body.
_V0 = """
CREATE TABLE subscriptions (
    id TEXT PRIMARY KEY, project TEXT NOT NULL, body TEXT NOT NULL,
    last_seq INTEGER NOT NULL DEFAULT 0, first_seq INTEGER NOT NULL DEFAULT 1,
    dropped INTEGER NOT NULL DEFAULT 0, max_messages INTEGER, max_age_s REAL
);
CREATE TABLE messages (
    sub_id TEXT NOT NULL, seq INTEGER NOT NULL, event BLOB NOT NULL,
    state TEXT NOT NULL, deliveries INTEGER NOT NULL DEFAULT 0,
    visible_at REAL NOT NULL DEFAULT 0, claim_id TEXT, enqueued_at REAL NOT NULL,
    PRIMARY KEY (sub_id, seq)
) WITHOUT ROWID;
"""


async def test_a_file_of_the_old_layout_is_migrated_in_place(tmp_path: Path) -> None:
    path = tmp_path / "hub.db"
    store = SQLiteStore(path)
    await store.open()
    await make_sub(store, "a")
    await make_sub(store, "b")
    body = await store.get_subscription("a")
    await store.close()
    sub_rows = sqlite3.connect(path).execute("SELECT * FROM subscriptions").fetchall()
    path.unlink()
    old = sqlite3.connect(path)
    old.executescript(_V0)
    old.executemany("INSERT INTO subscriptions VALUES (?, ?, ?, ?, ?, ?, ?, ?)", sub_rows)
    old.executemany(
        "INSERT INTO messages (sub_id, seq, event, state, enqueued_at) VALUES (?, ?, ?, ?, 1)",
        [(s, n, b'{"n":%d,"q":"%s"}' % (n, s.encode()), "ready") for s in "ab" for n in (1, 2)],
    )
    old.execute("UPDATE subscriptions SET last_seq = 2")
    old.commit()
    old.close()
    store = SQLiteStore(path)
    await store.open()
    try:
        assert body.id == "a"
        for s in "ab":
            _, messages = await store.read(s, after=0, limit=10)
            got = [bytes(m.event) for m in messages]
            assert got == [b'{"n":%d,"q":"%s"}' % (n, s.encode()) for n in (1, 2)]
        claim = await store.claim("a", limit=5, ttl=30, now=2, max_deliveries=5)
        assert claim is not None
        assert [m.seq for m in claim.messages] == [1, 2]
        version = sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0]
        assert version == 2
    finally:
        await store.close()
