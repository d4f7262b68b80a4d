"""The guarded side of a lock: resources that refuse writes from stale holders.

A lock alone cannot stop a holder that was paused past its lease from writing after someone
else took over; the resource must check. Each helper keeps, per key, the highest fence it has
accepted and refuses (`StaleFence`) any write carrying a lower one. An equal fence is accepted:
one holder writes many times under one fence.

How to fence other resources (see docs/coordination-contract.md):

* a SQL row: ``fenced_update`` — ``UPDATE ... SET ..., fence = :fence WHERE id = :id AND
  fence <= :fence``; zero rows changed means stale. The check and the write are one statement,
  so there is no window between them.
* a file: keep the fence next to it (``name.fence``) and replace both under ``flock`` — or
  store it in the file and compare-and-rename; a reader of the file never needs the lock.
* an HTTP API: send the fence in a header (``Keel-Fence: 42``) and have the server compare it
  with the stored one in the same transaction as the write (``409 Conflict`` when stale), or
  use ``If-Match`` with an ETag that includes the fence.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Mapping
from typing import Any

from keel.errors import StaleFence


def _stale(key: str, fence: int, last: int | None) -> StaleFence:
    return StaleFence(
        f"write to {key!r} with fence {fence} refused: the resource already accepted fence "
        f"{last}; this holder lost its lock — stop and re-acquire",
        key=key,
        fence=fence,
        last=last,
    )


class FencedRegister:
    """An in-process fenced value per key (thread-safe): the reference implementation."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, tuple[int, Any]] = {}

    def write(self, key: str, fence: int, value: Any) -> None:
        """Store ``value`` if ``fence`` is at least the last accepted one, else `StaleFence`."""
        with self._lock:
            last = self._values.get(key)
            if last is not None and fence < last[0]:
                raise _stale(key, fence, last[0])
            self._values[key] = (fence, value)

    def read(self, key: str) -> tuple[int, Any] | None:
        """(fence, value) last accepted for ``key``."""
        with self._lock:
            return self._values.get(key)


def fenced_update(
    conn: Any,
    table: str,
    *,
    where: Mapping[str, Any],
    values: Mapping[str, Any],
    fence: int,
    fence_column: str = "fence",
) -> None:
    """One conditional ``UPDATE`` on a DB-API connection (qmark style): applies ``values`` to
    the row matching ``where`` only if its fence is not above ``fence``, and stores ``fence``.
    Raises `StaleFence` when no row was changed. Table and column names are trusted code, not
    user input; values are bound parameters."""
    sets = ", ".join(f"{c} = ?" for c in values)
    conds = " AND ".join(f"{c} = ?" for c in where)
    sql = f"UPDATE {table} SET {sets}, {fence_column} = ? WHERE {conds} AND {fence_column} <= ?"
    cursor = conn.execute(sql, (*values.values(), fence, *where.values(), fence))
    if cursor.rowcount != 1:
        raise _stale(f"{table}:{dict(where)}", fence, None)


class SqliteFencedRegister:
    """A fenced register in an SQLite file, shared by processes on one host; every accepted
    write is also appended to a log (``writes()``), which the history checker reads."""

    def __init__(self, path: str) -> None:
        self._db = sqlite3.connect(path, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.executescript(
            """
            CREATE TABLE IF NOT EXISTS register (key TEXT PRIMARY KEY, fence INTEGER, value TEXT);
            CREATE TABLE IF NOT EXISTS accepted (
                seq INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT, fence INTEGER, value TEXT,
                at REAL);
            """
        )

    def write(self, key: str, fence: int, value: str) -> None:
        """Store ``value`` under ``key`` if ``fence`` is not stale, else `StaleFence`."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.execute(
                "INSERT OR IGNORE INTO register (key, fence, value) VALUES (?, -1, '')", (key,)
            )
            try:
                fenced_update(
                    self._db, "register", where={"key": key}, values={"value": value}, fence=fence
                )
            except StaleFence:
                (last,) = self._db.execute(
                    "SELECT fence FROM register WHERE key = ?", (key,)
                ).fetchone()
                raise _stale(key, fence, last) from None
            self._db.execute(
                "INSERT INTO accepted (key, fence, value, at) VALUES (?, ?, ?, ?)",
                (key, fence, value, time.time()),
            )
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def writes(self) -> list[tuple[int, str, int, str, float]]:
        """Every accepted write in acceptance order: (seq, key, fence, value, time)."""
        return list(
            self._db.execute("SELECT seq, key, fence, value, at FROM accepted ORDER BY seq")
        )

    def close(self) -> None:
        self._db.close()
