"""SQLite coordination backend: one database file, safe across processes on one host.

Each leased record is a row; ``acquire`` is a single upsert that takes the row only if its lease
has ended and bumps the row's fence, so fences grow per key for as long as the file exists
(rows are never deleted, only marked free). Leases are *wall-clock* times written by the
clients: every process sharing the file must share one clock, and a clock stepped forward
expires leases early (safe: the fence still refuses the old holder) while a clock stepped back
keeps a dead holder's lock longer (liveness only). Not for several hosts: network filesystems
do not give SQLite's locking guarantees.

Statements run directly on the event loop: each is a few microseconds, and a busy database is
retried with an async back-off rather than blocking the loop (``busy_timeout`` is 0).
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from keel.coordination.backends.base import Backend, Characteristic, Grant, Record, map_errors
from keel.errors import BackendUnavailable, ConfigError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS keel_leases (
    key TEXT PRIMARY KEY,
    parent TEXT NOT NULL,
    owner TEXT,
    fence INTEGER NOT NULL,
    expires REAL NOT NULL,
    data BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS keel_leases_parent ON keel_leases (parent, expires);
"""

_ACQUIRE = """
INSERT INTO keel_leases (key, parent, owner, fence, expires, data) VALUES (?, ?, ?, 1, ?, ?)
ON CONFLICT (key) DO UPDATE SET owner = excluded.owner, fence = keel_leases.fence + 1,
    expires = excluded.expires, data = excluded.data
WHERE keel_leases.expires <= ?
RETURNING fence
"""
_RENEW = (
    "UPDATE keel_leases SET expires = ? WHERE key = ? AND owner = ? AND fence = ? AND expires > ?"
)
_RELEASE = (
    "UPDATE keel_leases SET expires = 0, owner = NULL WHERE key = ? AND owner = ? AND fence = ?"
)
_GET = "SELECT key, owner, fence, data FROM keel_leases WHERE key = ? AND expires > ?"
_CHILDREN = "SELECT key, owner, fence, data FROM keel_leases WHERE parent = ? AND expires > ?"
_POLL = 0.005
_BUSY_GIVE_UP = 30.0


def _parent(key: str) -> str:
    return key.rpartition("/")[0] + "/"


class SqliteBackend:
    """Leased records in one SQLite file (see the module docstring for its limits)."""

    characteristics = frozenset({Characteristic.DURABLE_FENCES, Characteristic.PER_LOCK_TTL})
    # Options every coordinator takes; a local file has no connect to time out.
    URL_OPTIONS = frozenset({"connect_timeout"})

    def __init__(self, path: str) -> None:
        self._path = path
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA busy_timeout = 0")
        self._call(lambda: self._db.execute("PRAGMA journal_mode = WAL").fetchall())
        self._db.execute("PRAGMA synchronous = NORMAL")
        self._call(lambda: self._db.executescript(_SCHEMA))

    @classmethod
    async def open(
        cls, url: Any, *, member_id: str, ttl: float, options: Mapping[str, str]
    ) -> Backend:
        path = url.path
        if not path or path == "/":
            raise ConfigError(f"{url.raw!r} names no database file; use sqlite:///path/to/file")
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            return cls(path)
        except (OSError, sqlite3.Error) as exc:
            raise BackendUnavailable(f"cannot open SQLite database {path}: {exc}") from exc

    def _call(self, op: Callable[[], Any]) -> Any:
        with map_errors((sqlite3.OperationalError,), backend="sqlite", url=self._path):
            return op()

    async def _run(self, sql: str, params: tuple[Any, ...]) -> list[Any]:
        return (await self._execute(sql, params))[0]

    async def _execute(self, sql: str, params: tuple[Any, ...]) -> tuple[list[Any], int]:
        give_up = time.monotonic() + _BUSY_GIVE_UP
        delay = 0.0005
        while True:
            try:
                cursor = self._db.execute(sql, params)
                return cursor.fetchall(), cursor.rowcount
            except sqlite3.OperationalError as exc:
                # Another process holds the write lock for a moment; back off without
                # blocking the event loop. Any other operational error is fatal.
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise BackendUnavailable(f"sqlite {self._path}: {exc}") from exc
                if time.monotonic() > give_up:
                    raise BackendUnavailable(
                        f"sqlite {self._path} stayed locked for {_BUSY_GIVE_UP}s"
                    ) from exc
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.02)

    def lease_ttl(self, ttl: float) -> float:
        return ttl

    async def acquire(self, key: str, owner: str, ttl: float, data: bytes) -> Grant | None:
        sent, now = time.monotonic(), time.time()
        rows = await self._run(_ACQUIRE, (key, _parent(key), owner, now + ttl, data, now))
        return Grant(int(rows[0][0]), sent + ttl) if rows else None

    async def renew(self, key: str, owner: str, fence: int, ttl: float) -> float | None:
        sent, now = time.monotonic(), time.time()
        _, changed = await self._execute(_RENEW, (now + ttl, key, owner, fence, now))
        return sent + ttl if changed == 1 else None

    async def release(self, key: str, owner: str, fence: int) -> None:
        await self._run(_RELEASE, (key, owner, fence))

    async def get(self, key: str) -> Record | None:
        rows = await self._run(_GET, (key, time.time()))
        return Record(rows[0][0], rows[0][1], rows[0][2], rows[0][3]) if rows else None

    async def children(self, prefix: str) -> list[Record]:
        rows = await self._run(_CHILDREN, (prefix, time.time()))
        return [Record(k, o, f, d) for k, o, f, d in rows]

    async def wait(self, key: str, timeout: float) -> None:
        # Poll with reads (which never take the write lock in WAL mode) so that contending
        # waiters do not queue on the writer lock; return as soon as the key looks free.
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            await asyncio.sleep(min(left, _POLL))
            if not key.endswith("/") and not await self._run(_GET, (key, time.time())):
                return

    def on_session_lost(self, callback: Callable[[], None]) -> None:
        return None

    async def close(self) -> None:
        self._db.close()
