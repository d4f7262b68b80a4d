"""SQLite specifics: a write whose transaction cannot begin (another connection holds the
write lock past the busy timeout) gets SQLite's error, and the store works again once the
lock is gone. (Earlier layouts: tests/hub/test_store_migration.py.)"""

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
