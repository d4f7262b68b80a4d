"""The guarded side of a lock: resources that refuse writes from stale holders.

A lock alone cannot stop a holder that was paused past its lease from writing after someone
else took over; the resource must check. Each helper keeps, per key, the highest fence it has
accepted and refuses (`StaleFence`) any write carrying a lower one. An equal fence is accepted:
one holder writes many times under one fence.

Pass the `HeldLock` itself rather than its number: the helper then checks the lease's expiry
bound right before it writes (`LockLost` if it ran out), so a holder resuming from a pause is
stopped here even when no newer holder has written yet.

**Read-modify-write needs the read fenced too.** Fencing only the write loses updates: a stale
holder reads 10, the new holder reads 10, the stale holder's write of 11 is still accepted
(no higher fence has been written yet), and the new holder writes 11 over it. The rule: the
read must *claim* the fence (raise the stored fence to yours as you read, so an older holder's
later write is refused), or the read and the write must be one transaction, or the write must
be a compare-and-set on a version every write changes. `fenced_modify` does the first for a
SQL row; docs/coordination-fencing.md shows them for a SQL row, an etcd key, a Redis key and
an HTTP API with ``If-Match``.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from keel.coordination._history import Accepted
from keel.coordination._lock import HeldLock
from keel.errors import NotFound, StaleFence

Fence = int | HeldLock


def fence_of(fence: Fence) -> int:
    """The number to write: a `HeldLock`'s fence after checking its lease, or the int given."""
    return fence.fence if isinstance(fence, HeldLock) else fence


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

    def write(self, key: str, fence: Fence, value: Any) -> None:
        """Store ``value`` if ``fence`` is at least the last accepted one, else `StaleFence`."""
        number = fence_of(fence)
        with self._lock:
            last = self._values.get(key)
            if last is not None and number < last[0]:
                raise _stale(key, number, last[0])
            self._values[key] = (number, value)

    def modify(self, key: str, fence: Fence, change: Callable[[Any], Any]) -> Any:
        """Replace the value by ``change(value)`` under the fence, read and write in one step."""
        number = fence_of(fence)
        with self._lock:
            last = self._values.get(key)
            if last is not None and number < last[0]:
                raise _stale(key, number, last[0])
            value = change(None if last is None else last[1])
            self._values[key] = (number, value)
            return value

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
    fence: Fence,
    fence_column: str = "fence",
) -> None:
    """One conditional ``UPDATE`` on a DB-API connection (qmark style): applies ``values`` to
    the row matching ``where`` only if its fence is not above ``fence``, and stores ``fence``.
    Raises `StaleFence` when no row was changed. A blind write only: for a write computed from
    a read, use `fenced_modify`. Table and column names are trusted code, not user input;
    values are bound parameters."""
    number = fence_of(fence)
    sets = ", ".join(f"{c} = ?" for c in values)
    conds = " AND ".join(f"{c} = ?" for c in where)
    sql = f"UPDATE {table} SET {sets}, {fence_column} = ? WHERE {conds} AND {fence_column} <= ?"
    cursor = conn.execute(sql, (*values.values(), number, *where.values(), number))
    if cursor.rowcount != 1:
        raise _stale(f"{table}:{dict(where)}", number, None)


def fenced_modify(
    conn: Any,
    table: str,
    *,
    where: Mapping[str, Any],
    columns: Sequence[str],
    modify: Callable[[dict[str, Any]], Mapping[str, Any]],
    fence: Fence,
    fence_column: str = "fence",
) -> dict[str, Any]:
    """A fenced read-modify-write of one row on a DB-API connection (qmark style).

    1. *Claim*: ``UPDATE ... SET fence = :fence WHERE ... AND fence <= :fence`` — from here on
       an older holder's write to the row is refused, so nothing it writes can be lost;
    2. read ``columns``; 3. ``modify(row)`` returns the new values; 4. write them with
       `fenced_update`, refused if a newer holder claimed the row meanwhile.

    `StaleFence` if a newer fence claimed the row first (at 1 or 4), `NotFound` if no row
    matches. Works in autocommit or inside the caller's transaction (which it does not commit).
    Returns the values written."""
    number = fence_of(fence)
    conds = " AND ".join(f"{c} = ?" for c in where)
    keys = tuple(where.values())
    claim = f"UPDATE {table} SET {fence_column} = ? WHERE {conds} AND {fence_column} <= ?"
    if conn.execute(claim, (number, *keys, number)).rowcount != 1:
        row = conn.execute(f"SELECT {fence_column} FROM {table} WHERE {conds}", keys).fetchone()
        if row is None:
            raise NotFound(f"no row in {table} matches {dict(where)}", table=table)
        raise _stale(f"{table}:{dict(where)}", number, row[0])
    cols = ", ".join(columns)
    read = conn.execute(f"SELECT {cols} FROM {table} WHERE {conds}", keys).fetchone()
    if read is None:
        raise NotFound(f"no row in {table} matches {dict(where)}", table=table)
    values = dict(modify(dict(zip(columns, read, strict=True))))
    fenced_update(conn, table, where=where, values=values, fence=fence, fence_column=fence_column)
    return values


class SqliteFencedRegister:
    """A fenced register in an SQLite file, shared by processes on one host. Every accepted
    write is logged (a trigger, so the log is in the order the writes were applied) with, for a
    read-modify-write, the value its writer had read; the history checker reads the log
    (``accepted()``) and finds every lost update."""

    def __init__(self, path: str) -> None:
        self._db = sqlite3.connect(path, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.executescript(
            """
            CREATE TABLE IF NOT EXISTS register (
                key TEXT PRIMARY KEY, fence INTEGER, value TEXT, writer TEXT, read TEXT);
            CREATE TABLE IF NOT EXISTS accepted (
                seq INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT, fence INTEGER, writer TEXT,
                at REAL, before TEXT, value TEXT);
            CREATE TRIGGER IF NOT EXISTS register_log AFTER UPDATE OF value ON register BEGIN
                INSERT INTO accepted (key, fence, writer, at, before, value) VALUES (
                    NEW.key, NEW.fence, NEW.writer, (julianday('now') - 2440587.5) * 86400.0,
                    NEW.read, NEW.value);
            END;
            """
        )

    def _row(self, key: str, initial: str) -> None:
        self._db.execute(
            "INSERT OR IGNORE INTO register (key, fence, value, writer) VALUES (?, -1, ?, '')",
            (key, initial),
        )

    def write(self, key: str, fence: Fence, value: str) -> None:
        """Store ``value`` (also logged as its writer) under ``key`` unless ``fence`` is stale."""
        self._row(key, "")
        try:
            fenced_update(
                self._db,
                "register",
                where={"key": key},
                values={"value": value, "writer": value, "read": None},
                fence=fence,
            )
        except StaleFence:
            (last,) = self._db.execute(
                "SELECT fence FROM register WHERE key = ?", (key,)
            ).fetchone()
            raise _stale(key, fence_of(fence), last) from None

    def modify(self, key: str, fence: Fence, change: Callable[[str], str], writer: str) -> str:
        """Read-modify-write ``key``'s value (initially ``"0"``) with `fenced_modify`."""
        self._row(key, "0")
        done = fenced_modify(
            self._db,
            "register",
            where={"key": key},
            columns=["value"],
            modify=lambda row: {
                "value": change(row["value"]),
                "writer": writer,
                "read": row["value"],
            },
            fence=fence,
        )
        return str(done["value"])

    def value(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM register WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def writes(self) -> list[tuple[int, str, int, str, float]]:
        """Every accepted write in acceptance order: (seq, key, fence, writer, time)."""
        return list(
            self._db.execute("SELECT seq, key, fence, writer, at FROM accepted ORDER BY seq")
        )

    def accepted(self) -> list[Accepted]:
        """Every accepted write as the history checker takes it, with what it read and wrote."""
        rows = self._db.execute(
            "SELECT seq, key, fence, writer, before, value FROM accepted ORDER BY seq"
        )
        return [Accepted(s, k, f, w, read=b, wrote=v) for s, k, f, w, b, v in rows]

    def close(self) -> None:
        self._db.close()
