"""SQLite coordination backend: one database file, safe across processes on one host.

Each leased record is a row; taking a key is a single upsert that succeeds only if the row's
lease has ended and nobody is queued ahead, and bumps the row's fence, so fences grow per key
for as long as the file exists (rows are never deleted, only marked free). Waiters are rows of
a queue table, served in ticket order. Leases are *wall-clock* times written by the clients:
every process sharing the file must share one clock, and a clock stepped forward expires
leases early (safe: the fence still refuses the old holder) while a clock stepped back keeps a
dead holder's lock longer (liveness only). Not for several hosts: network filesystems do not
give SQLite's locking guarantees.

Durable fences without an fsync per acquire: commits use ``synchronous=NORMAL`` (WAL), which
an OS crash may roll back to the last fsync. So every connection first bumps an *epoch* in a
``synchronous=FULL`` transaction, and hands out fences of at least ``epoch << 32``. A crash
kills every process on the host, so every fence handed out after it comes from a connection
opened after it, with a higher durable epoch: above every fence the crash could have lost.

Statements run directly on the event loop (each takes microseconds). A busy database is
retried with an async back-off, never a blocking wait; only opening (schema, epoch) runs in a
thread, with ``busy_timeout``, so processes opening one new file together all succeed.

Checkpoints run mostly in a thread. SQLite's automatic checkpoint runs inside whichever commit
crosses 1000 WAL frames, and with ``synchronous=NORMAL`` it fsyncs the WAL and the database:
one commit in a thousand waited milliseconds for the disk, on the event loop. So every
``_CHECKPOINT_EVERY`` changes the backend starts a ``PASSIVE`` checkpoint on a connection of
its own in a worker thread: it takes no lock that writers wait for, and its fsyncs are the
same ones, made off the loop. A WAL is only rewound from its start by a commit that finds it
wholly copied, which a thread racing a busy writer never leaves it; so the connection's own
automatic checkpoint stays, at ``_AUTOCHECKPOINT`` frames (4x SQLite's default), to copy the
last frames and rewind: the file stays bounded, and the loop waits for the disk a quarter as
often. What is durable when is unchanged.

Waiting: other processes' commits are seen through ``PRAGMA data_version`` (a counter in
shared memory, no table read), polled every 1 ms by a lock's waiters and every 10 ms by
observers; waiters in this process are woken at once. A release is applied at the end of the
current loop iteration; if this client takes the same key again before then (and nobody is
queued), the release and the new acquisition are one write, with a new fence.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from keel.coordination._clock import now
from keel.coordination.backends.base import (
    TAKE_LATER,
    Backend,
    Changes,
    Characteristic,
    Grant,
    Record,
    Waiter,
    map_errors,
)
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
DROP INDEX IF EXISTS keel_leases_parent;
CREATE INDEX IF NOT EXISTS keel_leases_by_parent ON keel_leases (parent);
CREATE TABLE IF NOT EXISTS keel_waiters (
    ticket INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL,
    token TEXT NOT NULL UNIQUE,
    expires REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS keel_waiters_by_key ON keel_waiters (key, ticket);
CREATE TABLE IF NOT EXISTS keel_meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""
_EPOCH = """
INSERT INTO keel_meta (name, value) VALUES ('epoch', 1)
ON CONFLICT (name) DO UPDATE SET value = value + 1 RETURNING value
"""
# Take the key if its lease ended and no live waiter holds a lower ticket (a try uses an
# infinite ticket: it yields to every waiter).
_TAKE = """
INSERT INTO keel_leases (key, parent, owner, fence, expires, data)
SELECT ?1, ?2, ?3, ?4, ?5, ?6
WHERE NOT EXISTS (
    SELECT 1 FROM keel_waiters WHERE key = ?1 AND ticket < ?8 AND expires > ?7)
ON CONFLICT (key) DO UPDATE SET owner = excluded.owner, fence = max(keel_leases.fence + 1, ?4),
    expires = excluded.expires, data = excluded.data
WHERE keel_leases.expires <= ?7
RETURNING fence
"""
# A release not yet applied, and this client takes the key again: one write for both. The
# row's fence is known (?3), so the new one is too (?4, computed by the caller as the row's
# fence plus one, or the epoch floor): no RETURNING, whose result table cost a fifth of the
# statement, and no expression to evaluate.
_RETAKE = """
UPDATE keel_leases SET fence = ?4, expires = ?5, data = ?6
WHERE key = ?1 AND owner = ?2 AND fence = ?3 AND expires > ?7
    AND NOT EXISTS (SELECT 1 FROM keel_waiters WHERE key = ?1 AND expires > ?7)
"""
_JOIN = """
INSERT INTO keel_waiters (key, token, expires) VALUES (?, ?, ?)
ON CONFLICT (token) DO UPDATE SET expires = excluded.expires RETURNING ticket
"""
_TURN = """
SELECT (SELECT expires FROM keel_leases WHERE key = ?1),
       (SELECT min(ticket) FROM keel_waiters WHERE key = ?1 AND expires > ?2)
"""
_STAY = "UPDATE keel_waiters SET expires = ? WHERE token = ? AND expires > ?"
_LEAVE = "DELETE FROM keel_waiters WHERE token = ?"
_PRUNE = "DELETE FROM keel_waiters WHERE key = ? AND expires <= ?"
_RENEW = (
    "UPDATE keel_leases SET expires = ? WHERE key = ? AND owner = ? AND fence = ? AND expires > ?"
)
_RELEASE = (
    "UPDATE keel_leases SET expires = 0, owner = NULL WHERE key = ? AND owner = ? AND fence = ?"
)
# A persistent record is a row that never expires (owner ''); taken only if the row is free
# and nobody waits for the key. Its fence follows the key's like a take's (epoch floor ?4).
_CREATE = """
INSERT INTO keel_leases (key, parent, owner, fence, expires, data)
SELECT ?1, ?2, '', ?4, ?3, ?5
WHERE NOT EXISTS (SELECT 1 FROM keel_waiters WHERE key = ?1 AND expires > ?6)
ON CONFLICT (key) DO UPDATE SET owner = '', fence = max(keel_leases.fence + 1, ?4),
    expires = excluded.expires, data = excluded.data
WHERE keel_leases.expires <= ?6
RETURNING fence
"""
_UPDATE = "UPDATE keel_leases SET data = ? WHERE key = ? AND fence = ? AND expires > ?"
_DELETE = """
UPDATE keel_leases SET expires = 0, owner = NULL WHERE key = ? AND fence = ? AND expires > ?
AND NOT EXISTS (SELECT 1 FROM keel_leases WHERE parent = ? AND expires > ?)
"""
_GET = "SELECT key, owner, fence, data FROM keel_leases WHERE key = ? AND expires > ?"
_CHILDREN = "SELECT key, owner, fence, data FROM keel_leases WHERE parent = ? AND expires > ?"
_NEXT_EXPIRY = (
    "SELECT min(expires) FROM keel_leases WHERE (key = ?1 OR parent = ?1) AND expires > ?2"
)
_NO_TICKET = 1 << 62
_TURN_POLL = 0.001
_WATCH_POLL = 0.01
_BUSY_GIVE_UP = 30.0
_OPEN_BUSY_MS = 30000
_CHECKPOINT_EVERY = 1000  # changes (rows written) between background checkpoints
_AUTOCHECKPOINT = 4 * _CHECKPOINT_EVERY  # WAL frames before a commit checkpoints on the loop
# Rows are small (a key, a fence, an expiry): every commit appends (and checksums) one WAL
# frame per page it changed, so a quarter of SQLite's default page is a quarter the bytes per
# commit; an uncontended acquire's write took a third less time.
_PAGE_SIZE = 1024


def _parent(key: str) -> str:
    return key.rpartition("/")[0] + "/"


def _setup(path: str) -> tuple[sqlite3.Connection, int]:
    """Open, migrate and bump the epoch (in a thread: it may wait for other processes)."""
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        db.execute(f"PRAGMA busy_timeout = {_OPEN_BUSY_MS}")
        # Before WAL, so a new file gets it (an existing one keeps its own: harmless).
        db.execute(f"PRAGMA page_size = {_PAGE_SIZE}")
        db.execute("PRAGMA journal_mode = WAL").fetchall()
        db.executescript(_SCHEMA)
        db.execute("PRAGMA synchronous = FULL")
        (epoch,) = db.execute(_EPOCH).fetchone()
        db.execute("PRAGMA synchronous = NORMAL")
        db.execute("PRAGMA busy_timeout = 0")  # from here on busy is retried without blocking
        # Checkpoints run in a thread (above); this one only restarts a WAL they cannot.
        db.execute(f"PRAGMA wal_autocheckpoint = {_AUTOCHECKPOINT}")
    except BaseException:
        db.close()
        raise
    return db, int(epoch)


_BUSY: Any = object()  # a statement found the database locked by another process
# Backends (per event loop) with releases not yet applied: any SQLite operation in the process
# applies them all first, so once ``release()`` returned no Keel client here sees it held.
_unflushed: dict[asyncio.AbstractEventLoop, set[SqliteBackend]] = {}


class SqliteBackend:
    """Leased records in one SQLite file (see the module docstring for its limits)."""

    characteristics = frozenset(
        {Characteristic.DURABLE_FENCES, Characteristic.PER_LOCK_TTL, Characteristic.FAIR_QUEUE}
    )
    # Options every coordinator takes; a local file has no connect to time out.
    URL_OPTIONS = frozenset({"connect_timeout"})

    def __init__(self, db: sqlite3.Connection, path: str, epoch: int) -> None:
        self._db = db
        # One cursor for every statement (each is read to the end at once): a cursor per
        # statement was an object made and dropped every acquire.
        self._cursor = db.cursor()
        self._path = path
        self._base = epoch << 32
        self._loop = asyncio.get_running_loop()
        self._releases: dict[str, tuple[str, int]] = {}
        self._flush_due = False
        self._done: asyncio.Future[None] = self._loop.create_future()
        self._done.set_result(None)
        self._later: asyncio.Task[None] | None = None
        self.changed = 0  # this client's grants and releases, for its own waiters (and watchers)
        self._checkpoint_at = db.total_changes + _CHECKPOINT_EVERY
        self._checkpointing: asyncio.Future[None] | None = None
        # Set here, cleared by the worker thread: a loop that never yields (an uncontended
        # acquire and release does not) never sees the future done.
        self._checkpoint_running = False
        self._checkpoint_db: sqlite3.Connection | None = None

    @classmethod
    async def open(
        cls, url: Any, *, member_id: str, ttl: float, options: Mapping[str, str]
    ) -> Backend:
        path = url.path
        if not path or path == "/":
            raise ConfigError(f"{url.raw!r} names no database file; use sqlite:///path/to/file")
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            db, epoch = await asyncio.to_thread(_setup, path)
        except (OSError, sqlite3.Error) as exc:
            raise BackendUnavailable(f"cannot open SQLite database {path}: {exc}") from exc
        return cls(db, path, epoch)

    # --- statements ------------------------------------------------------------------------

    def _try(self, sql: str, params: tuple[Any, ...]) -> Any:
        """Run one statement: (rows, rowcount), or _BUSY if another process is writing."""
        try:
            cursor = self._cursor.execute(sql, params)
            rows = cursor.fetchall(), cursor.rowcount
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc) or "busy" in str(exc):
                return _BUSY
            with map_errors((), backend="sqlite", url=self._path):
                raise
        if self._db.total_changes >= self._checkpoint_at:
            self._checkpoint_soon()
        return rows

    async def _retrying(self, attempt: Callable[[], Any]) -> Any:
        give_up = time.monotonic() + _BUSY_GIVE_UP
        delay = 0.0002
        while (result := attempt()) is _BUSY:
            if time.monotonic() > give_up:
                raise BackendUnavailable(f"sqlite {self._path} stayed locked for {_BUSY_GIVE_UP}s")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.005)
        return result

    async def _execute(self, sql: str, params: tuple[Any, ...]) -> tuple[list[Any], int]:
        self._flush()
        result: tuple[list[Any], int] = await self._retrying(lambda: self._try(sql, params))
        return result

    async def _rows(self, sql: str, params: tuple[Any, ...]) -> list[Any]:
        return (await self._execute(sql, params))[0]

    def _transaction(self, *steps: tuple[str, tuple[Any, ...]]) -> Any:
        """Run the statements in one write transaction: their rows, or _BUSY."""
        if self._try("BEGIN IMMEDIATE", ()) is _BUSY:
            return _BUSY
        try:
            results = []
            for sql, params in steps:
                done = self._try(sql, params)
                if done is _BUSY:
                    self._db.execute("ROLLBACK")
                    return _BUSY
                results.append(done[0])
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise
        return results

    # --- checkpoints, in a thread ----------------------------------------------------------

    def _checkpoint_soon(self) -> None:
        self._checkpoint_at = self._db.total_changes + _CHECKPOINT_EVERY
        if not self._checkpoint_running:
            self._checkpoint_running = True
            self._checkpointing = self._loop.run_in_executor(None, self._checkpoint)

    def _checkpoint(self) -> None:
        """Copy the WAL into the database (in a worker thread; one at a time). A failure is
        harmless: the WAL keeps the commits, and the next checkpoint copies them."""
        try:
            if self._checkpoint_db is None:
                self._checkpoint_db = sqlite3.connect(
                    self._path, isolation_level=None, check_same_thread=False
                )
                self._checkpoint_db.execute("PRAGMA synchronous = NORMAL")
            self._checkpoint_db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except sqlite3.Error:
            pass
        finally:
            self._checkpoint_running = False

    # --- releases, applied at the end of the loop iteration -------------------------------

    def _flush(self) -> None:
        waiting = _unflushed.get(self._loop)
        if waiting:
            for backend in list(waiting):
                backend._flush_own()

    def _flush_own(self) -> None:
        for key, (owner, fence) in list(self._releases.items()):
            if self._try(_RELEASE, (key, owner, fence)) is _BUSY:
                if self._later is None or self._later.done():
                    self._later = self._loop.create_task(self._flush_later())
                return
            del self._releases[key]
            self.changed += 1
        if not self._releases:
            _unflushed.get(self._loop, set()).discard(self)

    def _flush_soon(self) -> None:
        self._flush_due = False
        self._flush()

    async def _flush_later(self) -> None:
        await asyncio.sleep(0.001)
        self._flush()

    # --- the Backend protocol ----------------------------------------------------------------

    def lease_ttl(self, ttl: float) -> float:
        return ttl

    def take_now(self, key: str, owner: str, ttl: float, data: bytes) -> Any:
        """The core's fast path (`keel.coordination.backends.base.TakesNow`): `_take` for a
        first try, without a `Waiter` or a `Grant` to make."""
        sent, wall = now(), time.time()
        taken = self._retake(key, ttl, data, sent, wall)
        if taken is None:
            self._flush()
            params = (key, _parent(key), owner, self._base, wall + ttl, data, wall, _NO_TICKET)
            done = self._try(_TAKE, params)
            if done is _BUSY:
                return TAKE_LATER
            if not done[0]:
                return None
            self.changed += 1
            return int(done[0][0][0]), sent + ttl
        return TAKE_LATER if taken is _BUSY else taken

    def _retake(self, key: str, ttl: float, data: bytes, sent: float, wall: float) -> Any:
        """Our own release of the key not applied yet: take it again in the same write.
        ``(fence, expires)``, None (no such release, or the key is not ours to retake: the
        release stays pending), or _BUSY."""
        pending = self._releases.pop(key, None)
        if pending is None:
            return None
        owner, fence = pending
        new = max(fence + 1, self._base)
        # `_try`, inlined for the one statement of an uncontended cycle (no rows to fetch).
        try:
            changed = self._cursor.execute(
                _RETAKE, (key, owner, fence, new, wall + ttl, data, wall)
            ).rowcount
        except sqlite3.OperationalError as exc:
            self._releases[key] = pending  # still to apply, whatever happened
            if "locked" not in str(exc) and "busy" not in str(exc):
                with map_errors((), backend="sqlite", url=self._path):
                    raise
            return _BUSY
        if self._db.total_changes >= self._checkpoint_at:
            self._checkpoint_soon()
        if changed == 1:
            self.changed += 1
            return new, sent + ttl
        self._releases[key] = pending
        return None

    def _take(self, waiter: Waiter, ticket: int) -> Any:
        """One attempt to take the key: a Grant, None if it is not ours to take, or _BUSY."""
        sent, wall = now(), time.time()
        key, expires, data = waiter.key, wall + waiter.ttl, waiter.data
        taken = self._retake(key, waiter.ttl, data, sent, wall)
        if taken is _BUSY:
            return _BUSY
        if taken is not None:
            return Grant(*taken)

        self._flush()
        take = (_TAKE, (key, _parent(key), waiter.owner, self._base, expires, data, wall, ticket))
        if ticket == _NO_TICKET:
            done = self._try(*take)
            rows = _BUSY if done is _BUSY else done[0]
        else:
            done = self._transaction(take, (_LEAVE, (waiter.token,)))
            rows = _BUSY if done is _BUSY else done[0]
        if rows is _BUSY:
            return _BUSY
        if not rows:
            return None
        self.changed += 1
        return Grant(int(rows[0][0]), sent + waiter.ttl)

    async def enqueue(self, waiter: Waiter, *, queue: bool) -> Grant | None:
        if waiter.state is None:
            grant: Grant | None = self._take(waiter, _NO_TICKET)  # no coroutine unless busy
            if grant is _BUSY:
                grant = await self._retrying(lambda: self._take(waiter, _NO_TICKET))
            if grant is not None or not queue:
                return grant
        wall = time.time()
        await self._execute(_PRUNE, (waiter.key, wall))
        rows = await self._rows(_JOIN, (waiter.key, waiter.token, wall + waiter.ttl))
        waiter.sent, waiter.state = True, int(rows[0][0])
        return (await self._turn(waiter))[0]

    async def _turn(self, waiter: Waiter) -> tuple[Grant | None, float]:
        """Take the key if it is free and this waiter is first (a read decides whether to
        try); else None and the wall-clock time the current lease ends."""
        wall = time.time()
        ((lease_ends, first),) = await self._rows(_TURN, (waiter.key, wall))
        lease_ends = 0.0 if lease_ends is None else float(lease_ends)
        if lease_ends <= wall and first == waiter.state:
            grant = await self._retrying(lambda: self._take(waiter, int(waiter.state)))
            if grant is not None:
                return grant, 0.0
        return None, lease_ends

    async def wait_turn(self, waiter: Waiter, timeout: float) -> Grant | None:
        deadline = now() + timeout
        stay = now() + waiter.ttl / 3
        while True:
            version, changed = self._version(), self.changed
            grant, lease_ends = await self._turn(waiter)
            if grant is not None:
                return grant
            # Wait for a commit by another process, a release here, the holder's lease to
            # run out (that commits nothing), the time to renew our place, or the deadline.
            wake = min(deadline, stay, now() + max(0.0, lease_ends - time.time()) + 0.0005)
            # Other processes' commits have no event to wait on: poll the counter.
            while not self._moved(version, changed) and now() < wake:  # noqa: ASYNC110
                await asyncio.sleep(_TURN_POLL)
            if now() >= deadline:
                return (await self._turn(waiter))[0]
            if now() >= stay:
                stay = now() + waiter.ttl / 3
                await self._stay(waiter)

    async def _stay(self, waiter: Waiter) -> None:
        wall = time.time()
        _, kept = await self._execute(_STAY, (wall + waiter.ttl, waiter.token, wall))
        if not kept:  # our place lapsed (we were paused past it): queue again, at the back
            await self._execute(_LEAVE, (waiter.token,))
            rows = await self._rows(_JOIN, (waiter.key, waiter.token, wall + waiter.ttl))
            waiter.state = int(rows[0][0])

    def _moved(self, version: int, changed: int) -> bool:
        """Whether anything was committed since ``(data_version, changed)`` was taken."""
        return self._version() != version or self.changed != changed

    def _version(self) -> int:
        done = self._try("PRAGMA data_version", ())
        return -1 if done is _BUSY else int(done[0][0][0])

    async def dequeue(self, waiter: Waiter) -> None:
        await self._execute(_LEAVE, (waiter.token,))

    async def renew(self, key: str, owner: str, fence: int, ttl: float) -> float | None:
        sent, wall = now(), time.time()
        _, changed = await self._execute(_RENEW, (wall + ttl, key, owner, fence, wall))
        return sent + ttl if changed == 1 else None

    async def release(self, key: str, owner: str, fence: int) -> Awaitable[None]:
        # Applied at the end of this loop iteration (or merged into this client's next take
        # of the key), retried while the file is busy: it cannot fail but by closing, so the
        # caller needs no confirmation to wait for.
        if key in self._releases:
            self._flush()
        self._releases[key] = (owner, fence)
        waiting = _unflushed.get(self._loop)  # not setdefault: that makes a set every call
        if waiting is None:
            waiting = _unflushed[self._loop] = set()
        waiting.add(self)
        if not self._flush_due:
            self._flush_due = True
            self._loop.call_soon(self._flush_soon)
        return self._done

    async def create(self, key: str, data: bytes) -> int | None:
        params = (key, _parent(key), math.inf, self._base, data, time.time())
        rows = await self._rows(_CREATE, params)
        if not rows:
            return None
        self.changed += 1
        return int(rows[0][0])

    async def update(self, key: str, fence: int, data: bytes) -> bool:
        _, changed = await self._execute(_UPDATE, (data, key, fence, time.time()))
        self.changed += changed
        return changed == 1

    async def delete(self, key: str, fence: int) -> bool:
        wall = time.time()
        _, changed = await self._execute(_DELETE, (key, fence, wall, key + "/", wall))
        self.changed += changed
        return changed == 1

    async def get(self, key: str) -> Record | None:
        rows = await self._rows(_GET, (key, time.time()))
        return Record(rows[0][0], rows[0][1], rows[0][2], rows[0][3]) if rows else None

    async def children(self, prefix: str) -> list[Record]:
        rows = await self._rows(_CHILDREN, (prefix, time.time()))
        return [Record(k, o, f, d) for k, o, f, d in rows]

    @contextlib.asynccontextmanager
    async def changes(self, key: str) -> AsyncIterator[Changes]:
        yield _Changes(self, key)

    def on_session_lost(self, callback: Callable[[], None]) -> None:
        return None

    async def close(self) -> None:
        give_up = time.monotonic() + _BUSY_GIVE_UP
        while self._releases and time.monotonic() < give_up:
            self._flush()
            if self._releases:
                await asyncio.sleep(0.005)  # busy: a release must not be dropped
        self._releases.clear()
        waiting = _unflushed.get(self._loop)
        if waiting is not None:
            waiting.discard(self)
            if not waiting:
                del _unflushed[self._loop]
        if self._checkpointing is not None:
            with contextlib.suppress(Exception):
                await self._checkpointing
        if self._checkpoint_db is not None:
            self._checkpoint_db.close()
        self._db.close()


class _Changes:
    """Another connection committed (data_version moved), this client released something, or a
    lease under the key ran out."""

    def __init__(self, backend: SqliteBackend, key: str) -> None:
        self._backend = backend
        self._key = key
        # Releases sent before the subscription are applied first: they must not count as
        # changes after it (a reader that let a writer in would be woken by its own release).
        backend._flush()
        self._version = backend._version()
        self._changed = backend.changed

    async def wait(self, timeout: float) -> None:
        backend = self._backend
        wall = time.time()
        rows = await backend._rows(_NEXT_EXPIRY, (self._key, wall))
        if rows and rows[0][0] is not None:
            timeout = min(timeout, rows[0][0] - wall + 0.001)
        deadline = now() + max(0.0, timeout)
        moved = backend._moved
        while not moved(self._version, self._changed) and now() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(_WATCH_POLL)
        self._version, self._changed = backend._version(), backend.changed
