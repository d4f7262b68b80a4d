"""The embedded hub store: one SQLite file in WAL mode, for one hub process.

Durability: every write is one transaction committed with ``synchronous=FULL`` (configurable)
before the coroutine returns, so what `append` returned survives a SIGKILL and, with FULL,
a power cut. One connection serializes everything (a lock around each operation);
concurrency comes from batching: `append` takes a whole ingest batch, and writes that queue
up during a COMMIT share the next transaction (group commit, a savepoint each). Statements
run on the event loop's thread and only COMMIT, which waits for the disk, runs on the
store's own thread: statements are CPU work of microseconds, and running them on a thread
made each one give up the GIL and wait to take it back behind the busy loop (a switch
interval, 5 ms), which is what made commits slow when the hub was busiest. Writes of
unbounded size (retention, deleting a queue) still run whole on the store thread.
Two hub processes must not share one file (use the scale-out store for that). See
`keel.hub.stores.base` for what each primitive promises.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import msgspec

from keel import _switch_interval
from keel._log import event as log_event
from keel.errors import ClaimExpired, ConfigError, Conflict, NotFound
from keel.hub.stores.base import (
    ACKED,
    DEAD,
    READY,
    Appended,
    Claim,
    Gap,
    Message,
    QueueStats,
    Routed,
    Subscription,
    quota_exceeded,
)
from keel.wire import new_id

T = TypeVar("T")

_json = msgspec.json.Encoder().encode
# A write waiting for the next group commit: what to run in it and who waits for the result.
# A write waiting for a transaction: the work, its outcome, and the future its writer awaits
# (set once the outcome is, or earlier to hand it the lead: see `SQLiteStore._group_write`).
_Queued = tuple[Callable[[sqlite3.Connection], Any], "asyncio.Future[Any]", "asyncio.Future[None]"]
log = logging.getLogger("keel.hub.sqlite")

CACHE_KIB = 64 * 1024
# About 40 MiB of WAL: reached only if the checkpoint thread falls behind.
BACKSTOP_CHECKPOINT_PAGES = 10_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS subscriptions (
    id TEXT PRIMARY KEY, project TEXT NOT NULL, body TEXT NOT NULL,
    last_seq INTEGER NOT NULL DEFAULT 0, first_seq INTEGER NOT NULL DEFAULT 1,
    dropped INTEGER NOT NULL DEFAULT 0, max_messages INTEGER, max_age_s REAL
);
CREATE INDEX IF NOT EXISTS subscriptions_project ON subscriptions (project, id);
CREATE TABLE IF NOT EXISTS events (id INTEGER PRIMARY KEY, body BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS messages (
    sub_id TEXT NOT NULL, seq INTEGER NOT NULL, event_id INTEGER NOT NULL,
    state TEXT NOT NULL, deliveries INTEGER NOT NULL DEFAULT 0,
    visible_at REAL NOT NULL DEFAULT 0, claim_id TEXT, enqueued_at REAL NOT NULL,
    expires_at REAL, PRIMARY KEY (sub_id, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS messages_state ON messages (sub_id, state, seq);
CREATE INDEX IF NOT EXISTS messages_claim ON messages (claim_id) WHERE claim_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS claims (
    id TEXT PRIMARY KEY, sub_id TEXT NOT NULL, expires_at REAL NOT NULL,
    created_at REAL NOT NULL DEFAULT 0, ttl REAL NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS ingested (event_id TEXT PRIMARY KEY, at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS ingested_at ON ingested (at);
"""

# Every queue's messages name increasing event ids, so an event below the smallest first id
# of all queues is no one's any more (one statement: one consistent view).
_DELETE_UNREFERENCED = """
DELETE FROM events WHERE id < coalesce(
    (SELECT min((SELECT m.event_id FROM messages m WHERE m.sub_id = s.id ORDER BY m.seq LIMIT 1))
     FROM subscriptions s),
    (SELECT max(id) + 1 FROM events))
"""
_SUB_COLUMNS = "body, last_seq, first_seq, dropped"
# A message's row names its event; the body is stored once however many queues it went to.
_MSG_FROM = (
    "SELECT m.seq, e.body, m.state, m.deliveries, m.enqueued_at, m.visible_at, m.claim_id, "
    "m.expires_at FROM messages m JOIN events e ON e.id = m.event_id"
)
# A message is live while ready and not expired (``?`` is now).
# (Unqualified: no column of ``events`` shares a name with one of ``messages``.)
_LIVE = "state = 'ready' AND (expires_at IS NULL OR expires_at > ?)"

# PRAGMA user_version. 0: a body in every message row (a column ``event``), with or without
# the per-message expiry and the claims' created_at and ttl; 2: bodies in ``events``, without
# those columns; 3: both.
SCHEMA_VERSION = 3

# From a layout with a column ``event``: every message row kept its own copy of the body.
# Each becomes one event (ids in queue order, so each queue's messages name increasing event
# ids, which the clean-up of unreferenced events relies on). ``{expires}`` is the old rows'
# expiry, or NULL where the layout had none.
_MIGRATE_BODIES = """
CREATE TABLE events (id INTEGER PRIMARY KEY, body BLOB NOT NULL);
CREATE TABLE messages_v3 (
    sub_id TEXT NOT NULL, seq INTEGER NOT NULL, event_id INTEGER NOT NULL,
    state TEXT NOT NULL, deliveries INTEGER NOT NULL DEFAULT 0,
    visible_at REAL NOT NULL DEFAULT 0, claim_id TEXT, enqueued_at REAL NOT NULL,
    expires_at REAL, PRIMARY KEY (sub_id, seq)
) WITHOUT ROWID;
INSERT INTO events (id, body)
    SELECT row_number() OVER (ORDER BY sub_id, seq), event FROM messages;
INSERT INTO messages_v3
    SELECT sub_id, seq, row_number() OVER (ORDER BY sub_id, seq), state, deliveries,
           visible_at, claim_id, enqueued_at, {expires} FROM messages;
DROP TABLE messages;
ALTER TABLE messages_v3 RENAME TO messages;
"""
# Columns later layouts added to a table an earlier one had: (table, column, declaration).
_ADDED_COLUMNS = (
    ("messages", "expires_at", "REAL"),
    ("claims", "created_at", "REAL NOT NULL DEFAULT 0"),
    ("claims", "ttl", "REAL NOT NULL DEFAULT 0"),
)


# A queue up to this long is deleted in the group commit, on the loop; a longer one in a
# transaction of its own on the store thread (its size has no bound).
SMALL_QUEUE = 1000


# How many loop turns a write without an ingest batch waits for the hub's next one to join
# its transaction (see `SQLiteStore._wait_for_ingest`).
INGEST_WAIT_TURNS = 16


def _settle(
    committed: asyncio.Future[None],
    finished: asyncio.Future[BaseException | None],
    error: BaseException | None,
) -> None:
    finished.set_result(error)
    if not committed.done():  # cancelled: the waiter went on to wait for ``finished``
        if error is None:
            committed.set_result(None)
        else:
            committed.set_exception(error)


class _TooLarge(Exception):
    """The queue is longer than `SMALL_QUEUE`."""


class SQLiteStore:
    multi_process: ClassVar[bool] = False
    # One connection commits one batch at a time (the hub forms the next batch only then).
    append_concurrency: ClassVar[int] = 1

    def __init__(
        self,
        path: str | Path,
        *,
        synchronous: str = "FULL",
        dedup_s: float = 86400.0,
        lower_switch_interval: bool = True,
    ) -> None:
        if synchronous.upper() not in ("FULL", "NORMAL", "EXTRA"):
            raise ConfigError("synchronous must be FULL, EXTRA or NORMAL")
        self.path = str(path)
        # While open, the process's GIL switch interval is at most 0.5 ms (see
        # keel._switch_interval): every COMMIT returns to the loop through a thread.
        self.lower_switch_interval = lower_switch_interval
        self._holds_interval = False
        self.synchronous = synchronous.upper()
        self.dedup_s = dedup_s
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="keel-hub-sqlite")
        self._db: sqlite3.Connection | None = None
        self._lock = asyncio.Lock()
        self._queued: list[_Queued] = []
        self._ingest_queued = False  # an ingest batch (`append`) is among ``_queued``
        self._ingesting = False  # the last transaction carried one
        self._leading = False  # a writer is committing the queued writes, or about to
        self._successor_due = False  # `_wake_successor` is scheduled
        # Checkpoints run on their own connection and thread (see `_checkpoint`).
        self._checkpointer = ThreadPoolExecutor(1, thread_name_prefix="keel-hub-checkpoint")
        self._checkpoint_db: sqlite3.Connection | None = None
        self._checkpoint_due = False

    async def _run(self, func: Callable[..., T], *args: Any) -> T:
        """A read, on the loop's thread, once no COMMIT is in flight on the connection."""
        async with self._lock:
            return func(*args)

    async def _write(self, func: Callable[[sqlite3.Connection], T]) -> T:
        """``func`` in a transaction, committed (durably) before this returns.

        Group commit: writes that queue up while a COMMIT is in flight share the next
        transaction, each in its own savepoint (one that raises is rolled back alone and
        gets its exception), so concurrent claimers and ackers share one fsync instead of
        taking turns for one each."""
        return await self._group_write(func, ingest=False)

    async def _group_write(self, func: Callable[[sqlite3.Connection], T], *, ingest: bool) -> T:
        """One leader at a time commits every write queued (see `_lead`); the others wait
        for their outcome only. A writer whose write went into someone else's transaction
        never queues for the connection's lock just to learn it is done: each such turn is
        one more loop iteration before the next commit can start, and a tenant churning
        subscriptions put a turn per write between every other tenant's commits."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        wake: asyncio.Future[None] = loop.create_future()
        self._queued.append((func, fut, wake))
        if ingest:
            self._ingest_queued = True
        if self._leading:
            try:
                await wake
            except asyncio.CancelledError:
                # Woken with no outcome: it was handed the lead just as it was cancelled.
                handed = wake.done() and not wake.cancelled() and not fut.done()
                fut.cancel()  # not yet run: the next batch skips it
                if handed:
                    self._pass_lead()
                raise
            if not fut.done():  # not taken: handed the lead
                await self._lead_for(fut)
        else:
            self._leading = True
            await self._lead_for(fut)
        result: T = fut.result()
        return result

    async def _lead_for(self, fut: asyncio.Future[Any]) -> None:
        try:
            await self._lead()
        except asyncio.CancelledError:
            fut.cancel()  # cancelled before its batch was taken: the next batch skips it
            raise

    async def _lead(self) -> None:
        try:
            async with self._lock:
                if self._queued:
                    if not self._ingest_queued and self._ingesting:
                        await self._wait_for_ingest()
                    batch, self._queued = self._queued, []
                    self._ingesting, self._ingest_queued = self._ingest_queued, False
                    try:
                        await self._commit_batch(batch)
                    finally:
                        for _, fut, wake in batch:
                            if not fut.done():  # cannot happen; never leave a writer hanging
                                fut.set_exception(RuntimeError("write left without an outcome"))
                            if not wake.done():
                                wake.set_result(None)
        finally:
            self._pass_lead()

    def _pass_lead(self) -> None:
        """Stop leading; writes still queued get a leader on the next loop turn, unless a
        writer arriving in this one (the hub's next ingest batch, as a rule) leads first and
        takes them into its transaction."""
        self._leading = False
        if self._queued and not self._successor_due:
            self._successor_due = True
            asyncio.get_running_loop().call_soon(self._wake_successor)

    def _wake_successor(self) -> None:
        self._successor_due = False
        if self._leading:
            return
        self._queued = [q for q in self._queued if not q[1].done()]
        for _, _, wake in self._queued:
            if not wake.done():
                self._leading = True
                wake.set_result(None)
                return

    async def _wait_for_ingest(self) -> None:
        """While the hub ingests, its next batch is on its way (a few loop turns after the
        last commit): a write without one lets it join, rather than commit alone and make
        every waiting event wait for one more fsync. Without this a tenant churning
        subscriptions took every other commit, doubling every other tenant's latency.
        Bounded in loop turns, not time: when no batch comes, the write goes on its own."""
        for _ in range(INGEST_WAIT_TURNS):
            await asyncio.sleep(0)
            if self._ingest_queued:
                return

    async def _commit_batch(self, batch: list[_Queued]) -> None:
        batch = [q for q in batch if not q[1].done()]
        if not batch:
            return
        outcomes = self._run_batch(batch)
        if outcomes is None:
            return  # the transaction failed: every writer of the batch holds the error
        loop = asyncio.get_running_loop()
        # Two futures the thread settles with one loop callback: ``committed`` is awaited
        # (a cancel cancels only it, never the COMMIT), ``finished`` is what a cancelled
        # commit waits for. `run_in_executor` under `asyncio.shield` took two more loop
        # iterations to resume this task, each one the writer idle while everyone waits.
        committed: asyncio.Future[None] = loop.create_future()
        finished: asyncio.Future[BaseException | None] = loop.create_future()
        self._executor.submit(self._commit_then, loop, committed, finished)
        cancelled = False
        try:
            await committed
        except asyncio.CancelledError:
            # The thread goes on with the COMMIT: keep the connection until it is done.
            cancelled = True
            # However many times this task is cancelled meanwhile: a second cancel that
            # escaped here left the batch's other writers without their results.
            while not finished.done():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait([finished])
        except Exception:
            pass  # reported to every writer of the batch below
        failed = finished.result()
        for fut, error, value in outcomes:
            problem = failed or error
            if fut.done():
                continue
            if problem is not None:
                fut.set_exception(problem)
            else:
                fut.set_result(value)
        if cancelled:
            raise asyncio.CancelledError

    def _run_batch(
        self, batch: list[_Queued]
    ) -> list[tuple[asyncio.Future[Any], BaseException | None, Any]] | None:
        """Each write in its savepoint; None when the transaction itself failed (BEGIN
        refused, say, while another connection holds the write lock)."""
        outcomes: list[tuple[asyncio.Future[Any], BaseException | None, Any]] = []
        db: sqlite3.Connection | None = None
        try:
            db = self.db  # closed while the batch waited: every writer of it is told so
            db.execute("BEGIN IMMEDIATE")
            for func, fut, _ in batch:
                db.execute("SAVEPOINT w")
                try:
                    value = func(db)
                except Exception as exc:
                    db.execute("ROLLBACK TO w")
                    db.execute("RELEASE w")
                    outcomes.append((fut, exc, None))
                else:
                    db.execute("RELEASE w")
                    outcomes.append((fut, None, value))
        except BaseException as exc:
            if db is not None and db.in_transaction:
                db.execute("ROLLBACK")
            for _, fut, _ in batch:
                if not fut.done():
                    fut.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return None
        return outcomes

    async def _write_on_thread(self, func: Callable[[sqlite3.Connection], T]) -> T:
        """A whole transaction on the store thread, for the writes whose size has no bound
        (retention sweeps, deleting a subscription's queue): on the loop they would stall
        every stream for as long as they take."""
        async with self._lock:
            task = asyncio.get_running_loop().run_in_executor(self._executor, self._tx, func)
            try:
                return await asyncio.shield(task)
            except asyncio.CancelledError:
                while not task.done():  # the thread still holds the connection
                    with contextlib.suppress(asyncio.CancelledError):
                        await asyncio.wait([task])
                raise

    def _tx(self, func: Callable[[sqlite3.Connection], T]) -> T:
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            result = func(db)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self._commit()
        return result

    def _commit_then(
        self,
        loop: asyncio.AbstractEventLoop,
        committed: asyncio.Future[None],
        finished: asyncio.Future[BaseException | None],
    ) -> None:
        """On the store thread: COMMIT, then settle both futures in one loop callback."""
        error: BaseException | None = None
        try:
            self._commit()
        except BaseException as exc:
            error = exc
        loop.call_soon_threadsafe(_settle, committed, finished, error)

    def _commit(self) -> None:
        db = self.db
        try:
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    async def open(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._executor, self._open)
        if self.lower_switch_interval and not self._holds_interval:
            _switch_interval.hold()
            self._holds_interval = True

    def _open(self) -> None:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={self.synchronous}")
        db.execute("PRAGMA busy_timeout=5000")
        # Each commit touches a page or two of every queue it appends to (and of their
        # indexes); with the default 2 MiB cache those pages were read back from the file
        # inside the write transaction, which held up the one store thread.
        db.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
        # The writer's own checkpoint is only a backstop: `_checkpoint` runs them beside it.
        db.execute(f"PRAGMA wal_autocheckpoint={BACKSTOP_CHECKPOINT_PAGES}")
        self._migrate(db)
        db.executescript(_SCHEMA)
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        self._db = db

    @staticmethod
    def _migrate(db: sqlite3.Connection) -> None:
        """Bring a file of any earlier layout to `SCHEMA_VERSION`, in one transaction: the
        bodies into ``events`` if every row still holds its own, then the columns that layout
        lacks. A new file is left to `_SCHEMA`."""
        (version,) = db.execute("PRAGMA user_version").fetchone()
        columns = {r[1] for r in db.execute("PRAGMA table_info(messages)")}
        if version >= SCHEMA_VERSION or not columns:
            return  # current, or a new file
        log_event(
            log,
            logging.INFO,
            "hub.sqlite_migrating",
            path="store",
            from_version=version,
            to=SCHEMA_VERSION,
        )
        db.execute("BEGIN IMMEDIATE")
        try:
            if "event" in columns:
                expires = "expires_at" if "expires_at" in columns else "NULL"
                for statement in _MIGRATE_BODIES.format(expires=expires).split(";"):
                    if statement.strip():
                        db.execute(statement)
            for table, column, decl in _ADDED_COLUMNS:
                have = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
                if have and column not in have:
                    db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def _request_checkpoint(self) -> None:
        """After a commit: copy the WAL into the file, off this thread.

        SQLite's automatic checkpoint runs inside the COMMIT that crosses its threshold, so
        every few ingest batches one commit also wrote back and fsynced the database file;
        that commit's callers (and the streams waiting for it) paid for all of them. A
        PASSIVE checkpoint on another connection runs concurrently with the writer and does
        not change what a commit promises (the WAL is fsynced before COMMIT returns)."""
        if not self._checkpoint_due:
            self._checkpoint_due = True
            self._checkpointer.submit(self._checkpoint)

    def _checkpoint(self) -> None:
        self._checkpoint_due = False
        try:
            if self._checkpoint_db is None:
                db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
                db.execute(f"PRAGMA synchronous={self.synchronous}")
                db.execute("PRAGMA busy_timeout=5000")
                self._checkpoint_db = db
            self._checkpoint_db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except sqlite3.Error as exc:
            # The backstop checkpoint of the writer still bounds the WAL.
            log_event(log, logging.WARNING, "hub.sqlite_checkpoint_failed", error=repr(exc))

    def _close_checkpointer(self) -> None:
        if self._checkpoint_db is not None:
            self._checkpoint_db.close()
            self._checkpoint_db = None

    async def watch(self, on_change: Callable[[str, str], None]) -> None:
        """One process per file: nobody else changes it."""

    async def unwatch(self, on_change: Callable[[str, str], None]) -> None:
        """Nothing to stop."""

    async def close(self) -> None:
        if self._db is not None:
            async with self._lock:
                self._db.close()
            self._db = None
            await asyncio.get_running_loop().run_in_executor(
                self._checkpointer, self._close_checkpointer
            )
        self._executor.shutdown(wait=True)
        self._checkpointer.shutdown(wait=True)
        if self._holds_interval:
            _switch_interval.release()
            self._holds_interval = False

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise ConfigError("the store is not open; call open() first")
        return self._db

    # --- subscriptions ------------------------------------------------------------------

    async def create_subscription(self, sub: Subscription, *, quota: int | None = None) -> None:
        body = msgspec.json.encode(sub).decode()
        r = sub.retention

        def run(db: sqlite3.Connection) -> None:
            # BEGIN IMMEDIATE holds the write lock: no create slips between count and insert.
            if quota is not None:
                (n,) = db.execute(
                    "SELECT count(*) FROM subscriptions WHERE project = ?", (sub.project,)
                ).fetchone()
                if n >= quota:
                    raise quota_exceeded(sub.project, quota)
            try:
                db.execute(
                    "INSERT INTO subscriptions (id, project, body, max_messages, max_age_s) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (sub.id, sub.project, body, r.max_messages, r.max_age_s),
                )
            except sqlite3.IntegrityError:
                raise Conflict(f"subscription {sub.id} exists") from None

        await self._write(run)

    @staticmethod
    def _sub(row: tuple[Any, ...]) -> Subscription:
        sub = msgspec.json.decode(row[0], type=Subscription)
        sub.last_seq, sub.first_seq, sub.dropped = row[1], row[2], row[3]
        return sub

    async def get_subscription(self, sub_id: str) -> Subscription:
        def run() -> Subscription:
            row = self.db.execute(
                f"SELECT {_SUB_COLUMNS} FROM subscriptions WHERE id = ?", (sub_id,)
            ).fetchone()
            if row is None:
                raise NotFound(f"no subscription {sub_id!r}", subscription=sub_id)
            return self._sub(row)

        return await self._run(run)

    async def update_subscription(self, sub: Subscription) -> None:
        body = msgspec.json.encode(sub).decode()
        r = sub.retention

        def run(db: sqlite3.Connection) -> None:
            # The body's last_seq, first_seq and dropped are not read (the columns are).
            done = db.execute(
                "UPDATE subscriptions SET body = ?, max_messages = ?, max_age_s = ? WHERE id = ?",
                (body, r.max_messages, r.max_age_s, sub.id),
            )
            if done.rowcount == 0:
                raise NotFound(f"no subscription {sub.id!r}", subscription=sub.id)

        await self._write(run)

    async def list_subscriptions(
        self, project: str | None, *, limit: int, marker: str | None
    ) -> list[Subscription]:
        def run() -> list[Subscription]:
            where, args = "id > ?", [marker or ""]
            if project is not None:
                where += " AND project = ?"
                args.append(project)
            rows = self.db.execute(
                f"SELECT {_SUB_COLUMNS} FROM subscriptions WHERE {where} ORDER BY id LIMIT ?",
                (*args, limit),
            ).fetchall()
            return [self._sub(r) for r in rows]

        return await self._run(run)

    async def count_subscriptions(self, project: str) -> int:
        def run() -> int:
            row = self.db.execute(
                "SELECT count(*) FROM subscriptions WHERE project = ?", (project,)
            ).fetchone()
            return int(row[0])

        return await self._run(run)

    async def delete_subscription(self, sub_id: str) -> None:
        def run(db: sqlite3.Connection) -> None:
            if db.execute("DELETE FROM subscriptions WHERE id = ?", (sub_id,)).rowcount == 0:
                raise NotFound(f"no subscription {sub_id!r}", subscription=sub_id)
            db.execute("DELETE FROM messages WHERE sub_id = ?", (sub_id,))
            db.execute("DELETE FROM claims WHERE sub_id = ?", (sub_id,))
            db.execute(_DELETE_UNREFERENCED)

        def small(db: sqlite3.Connection) -> None:
            # A short queue goes in the group commit, sharing its fsync with every ingest in
            # flight: a transaction of its own per delete let a tenant churning
            # subscriptions take every other commit and double everyone's ingest latency.
            # The events it leaves unreferenced (any number) wait for the retention sweep.
            (n,) = db.execute(
                "SELECT count(*) FROM (SELECT 1 FROM messages WHERE sub_id = ? LIMIT ?)",
                (sub_id, SMALL_QUEUE + 1),
            ).fetchone()
            if n > SMALL_QUEUE:
                raise _TooLarge
            if db.execute("DELETE FROM subscriptions WHERE id = ?", (sub_id,)).rowcount == 0:
                raise NotFound(f"no subscription {sub_id!r}", subscription=sub_id)
            db.execute("DELETE FROM messages WHERE sub_id = ?", (sub_id,))
            db.execute("DELETE FROM claims WHERE sub_id = ?", (sub_id,))

        try:
            await self._write(small)
        except _TooLarge:
            await self._write_on_thread(run)

    # --- queues -------------------------------------------------------------------------

    async def append(self, batch: Sequence[Routed], *, now: float) -> list[Appended]:
        out = await self._group_write(lambda db: self._append(db, batch, now), ingest=True)
        self._request_checkpoint()
        return out

    def _append(
        self, db: sqlite3.Connection, batch: Sequence[Routed], now: float
    ) -> list[Appended]:
        # One statement per kind of row, not one per subscription: the ids and queue states
        # travel as one JSON parameter each (json_each). The messages themselves go through
        # executemany, which binds rows for less CPU than SQLite spends expanding JSON.
        seen = {
            r[0]
            for r in db.execute(
                "SELECT event_id FROM ingested WHERE event_id IN (SELECT value FROM json_each(?))",
                (_json([item.event_id for item in batch]),),
            )
        }
        fresh: list[Routed] = []
        for item in batch:
            if item.event_id not in seen:
                seen.add(item.event_id)  # a duplicate within the batch too
                fresh.append(item)
        if not fresh:
            return []
        db.execute(
            "INSERT INTO ingested (event_id, at) SELECT value, ? FROM json_each(?)",
            (now, _json([item.event_id for item in fresh])),
        )
        touched = {s for item in fresh for s in item.subscriptions}
        (state,) = db.execute(
            "SELECT json_group_object(id, json_array(last_seq, first_seq, max_messages)) "
            "FROM subscriptions WHERE id IN (SELECT value FROM json_each(?))",
            (_json(sorted(touched)),),
        ).fetchone()
        # Subscriptions deleted between routing and commit are absent and get nothing.
        subs: dict[str, list[int | None]] = msgspec.json.decode(state)
        seqs = {sub_id: int(v[0] or 0) for sub_id, v in subs.items()}
        out: list[Appended] = []
        rows: list[tuple[str, int, int, str, float, float, float | None]] = []
        bodies: list[tuple[int, bytes]] = []
        # The one connection holds the write lock: the ids after the largest are ours.
        (event_id,) = db.execute("SELECT coalesce(max(id), 0) FROM events").fetchone()
        for item in fresh:
            targets = [s for s in item.subscriptions if s in seqs]
            if not targets:
                continue  # routed only to subscriptions deleted meanwhile: nothing to keep
            event_id += 1
            bodies.append((event_id, item.body))
            visible = now + item.delay if item.delay else 0.0
            expires = now + item.ttl if item.ttl is not None else None
            for sub_id in targets:
                seq = seqs[sub_id] = seqs[sub_id] + 1
                rows.append((sub_id, seq, event_id, READY, now, visible, expires))
                out.append(Appended(sub_id, seq, item.body, item.event_id))
        if not out:
            return []
        db.executemany("INSERT INTO events (id, body) VALUES (?, ?)", bodies)
        # In key order: consecutive rows land on the same leaf page of the table and of its
        # state index, where in event order each row went to another queue's page (a fresh
        # descent of both b-trees per row). Measured 25-30% off this statement.
        rows.sort()
        db.executemany(
            "INSERT INTO messages (sub_id, seq, event_id, state, enqueued_at, visible_at, "
            "expires_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
        last = {a.subscription: seqs[a.subscription] for a in out}
        # One row each by its key: the one statement over a JSON object looked each row's
        # value up in the whole object (quadratic in the subscriptions a batch touched).
        db.executemany(
            "UPDATE subscriptions SET last_seq = ? WHERE id = ?",
            [(seq, sub_id) for sub_id, seq in last.items()],
        )
        for sub_id, seq in last.items():
            _, first, limit = subs[sub_id]
            if limit is not None and first is not None and seq - first + 1 > limit:
                self._drop_before(db, sub_id, seq - limit + 1)
        return out

    @staticmethod
    def _drop_before(db: sqlite3.Connection, sub_id: str, first: int) -> int:
        """Remove messages with seq < first; count them; move first_seq."""
        dropped = db.execute(
            "DELETE FROM messages WHERE sub_id = ? AND seq < ?", (sub_id, first)
        ).rowcount
        db.execute(
            "UPDATE subscriptions SET first_seq = max(first_seq, ?), dropped = dropped + ? "
            "WHERE id = ?",
            (first, dropped, sub_id),
        )
        return int(dropped)

    async def enforce_retention(self, *, now: float) -> int:
        def run(db: sqlite3.Connection) -> int:
            total = 0
            subs = db.execute(
                "SELECT id, max_age_s, last_seq FROM subscriptions WHERE max_age_s IS NOT NULL"
            ).fetchall()
            for sub_id, max_age, last in subs:
                row = db.execute(
                    "SELECT min(seq) FROM messages WHERE sub_id = ? AND enqueued_at >= ?",
                    (sub_id, now - max_age),
                ).fetchone()
                keep_from = row[0] if row[0] is not None else last + 1
                total += self._drop_before(db, sub_id, keep_from)
            db.execute("DELETE FROM ingested WHERE at < ?", (now - self.dedup_s,))
            db.execute("DELETE FROM claims WHERE expires_at < ?", (now - 3600,))
            db.execute(_DELETE_UNREFERENCED)
            return total

        return await self._write_on_thread(run)

    def _require(self, db: sqlite3.Connection, sub_id: str) -> tuple[int, int]:
        row = db.execute(
            "SELECT first_seq, last_seq FROM subscriptions WHERE id = ?", (sub_id,)
        ).fetchone()
        if row is None:
            raise NotFound(f"no subscription {sub_id!r}", subscription=sub_id)
        return int(row[0]), int(row[1])

    @staticmethod
    def _msg(row: tuple[Any, ...]) -> Message:
        return Message(
            seq=row[0],
            event=msgspec.Raw(row[1]),
            state=row[2],
            deliveries=row[3],
            enqueued_at=row[4],
            visible_at=row[5],
            claim_id=row[6],
            expires_at=row[7],
        )

    async def read(
        self, sub_id: str, *, after: int, limit: int
    ) -> tuple[Gap | None, list[Message]]:
        def run() -> tuple[Gap | None, list[Message]]:
            db = self.db
            first, last = self._require(db, sub_id)
            gap = Gap(after + 1, min(first - 1, last)) if after + 1 < first else None
            rows = db.execute(
                f"{_MSG_FROM} WHERE m.sub_id = ? AND m.seq > ? ORDER BY m.seq LIMIT ?",
                (sub_id, after, limit),
            ).fetchall()
            return gap, [self._msg(r) for r in rows]

        return await self._run(run)

    async def claim(
        self,
        sub_id: str,
        *,
        limit: int,
        ttl: float,
        now: float,
        max_deliveries: int,
        head_only: bool = False,
        grace: float = 0.0,
    ) -> Claim | None:
        def run(db: sqlite3.Connection) -> Claim | None:
            self._require(db, sub_id)
            # Messages that already had their last delivery go to the dead letters first.
            db.execute(
                "UPDATE messages SET state = ?, claim_id = NULL WHERE sub_id = ? AND state = ? "
                "AND visible_at <= ? AND deliveries >= ?",
                (DEAD, sub_id, READY, now, max_deliveries),
            )
            if head_only:
                head = db.execute(
                    f"SELECT seq, visible_at FROM messages WHERE sub_id = ? AND {_LIVE} "
                    "ORDER BY seq LIMIT 1",
                    (sub_id, now),
                ).fetchone()
                rows = [(head[0],)] if head is not None and head[1] <= now else []
            else:
                rows = db.execute(
                    f"SELECT seq FROM messages WHERE sub_id = ? AND {_LIVE} AND visible_at <= ? "
                    "ORDER BY seq LIMIT ?",
                    (sub_id, now, now, limit),
                ).fetchall()
            if not rows:
                return None
            claim_id = "clm-" + new_id()
            expires = now + ttl
            db.execute(
                "INSERT INTO claims (id, sub_id, expires_at, created_at, ttl) "
                "VALUES (?, ?, ?, ?, ?)",
                (claim_id, sub_id, expires, now, ttl),
            )
            db.executemany(
                "UPDATE messages SET claim_id = ?, visible_at = ?, deliveries = deliveries + 1, "
                "expires_at = CASE WHEN expires_at IS NULL THEN NULL ELSE max(expires_at, ?) END "
                "WHERE sub_id = ? AND seq = ?",
                [(claim_id, expires, expires + grace, sub_id, r[0]) for r in rows],
            )
            marks = ",".join("?" * len(rows))
            msgs = db.execute(
                f"{_MSG_FROM} WHERE m.sub_id = ? AND m.seq IN ({marks}) ORDER BY m.seq",
                (sub_id, *(r[0] for r in rows)),
            ).fetchall()
            return Claim(
                id=claim_id,
                subscription=sub_id,
                expires_at=expires,
                messages=[self._msg(m) for m in msgs],
                created_at=now,
                ttl=ttl,
            )

        return await self._write(run)

    def _live_claim(
        self, db: sqlite3.Connection, sub_id: str, claim_id: str, now: float
    ) -> tuple[float, float, float]:
        """The live claim's expires_at, created_at and ttl."""
        self._require(db, sub_id)
        row = db.execute(
            "SELECT expires_at, created_at, ttl FROM claims WHERE id = ? AND sub_id = ?",
            (claim_id, sub_id),
        ).fetchone()
        if row is None:
            raise NotFound(f"no claim {claim_id!r} on this subscription", claim=claim_id)
        if row[0] <= now:
            raise ClaimExpired(
                f"claim {claim_id} expired; its messages are visible again, claim them anew",
                claim=claim_id,
            )
        return float(row[0]), float(row[1]), float(row[2])

    async def ack(
        self, sub_id: str, claim_id: str, seqs: Sequence[int] | None, *, now: float
    ) -> int:
        def run(db: sqlite3.Connection) -> int:
            self._live_claim(db, sub_id, claim_id, now)
            query = (
                "UPDATE messages SET state = ?, claim_id = NULL WHERE sub_id = ? "
                "AND claim_id = ? AND state = ?"
            )
            args: list[Any] = [ACKED, sub_id, claim_id, READY]
            if seqs is not None:
                query += f" AND seq IN ({','.join('?' * len(seqs))})"
                args.extend(seqs)
            return int(db.execute(query, args).rowcount)

        return await self._write(run)

    async def release(self, sub_id: str, claim_id: str, *, now: float) -> int:
        def run(db: sqlite3.Connection) -> int:
            self._live_claim(db, sub_id, claim_id, now)
            n = db.execute(
                "UPDATE messages SET claim_id = NULL, visible_at = ? WHERE sub_id = ? "
                "AND claim_id = ? AND state = ?",
                (now, sub_id, claim_id, READY),
            ).rowcount
            db.execute("DELETE FROM claims WHERE id = ?", (claim_id,))
            return int(n)

        return await self._write(run)

    async def extend(
        self, sub_id: str, claim_id: str, *, ttl: float, now: float, grace: float = 0.0
    ) -> float:
        def run(db: sqlite3.Connection) -> float:
            self._live_claim(db, sub_id, claim_id, now)
            expires = now + ttl
            db.execute(
                "UPDATE claims SET expires_at = ?, ttl = ? WHERE id = ?", (expires, ttl, claim_id)
            )
            db.execute(
                "UPDATE messages SET visible_at = ?, expires_at = CASE WHEN expires_at IS NULL "
                "THEN NULL ELSE max(expires_at, ?) END WHERE sub_id = ? AND claim_id = ? "
                "AND state = ?",
                (expires, expires + grace, sub_id, claim_id, READY),
            )
            return expires

        return await self._write(run)

    async def live(
        self,
        sub_id: str,
        *,
        after: int,
        limit: int,
        now: float,
        claimed: bool = False,
        delayed: bool = False,
    ) -> list[Message]:
        where = f"sub_id = ? AND seq > ? AND {_LIVE}"
        args: list[Any] = [sub_id, after, now]
        if not claimed and not delayed:
            where += " AND visible_at <= ?"
            args.append(now)
        elif not claimed:  # delayed ones (never claimed) stay; held ones go
            where += " AND NOT (claim_id IS NOT NULL AND visible_at > ?)"
            args.append(now)
        elif not delayed:
            where += " AND NOT (claim_id IS NULL AND visible_at > ?)"
            args.append(now)

        def run() -> list[Message]:
            self._require(self.db, sub_id)
            rows = self.db.execute(
                f"{_MSG_FROM} WHERE {where} ORDER BY seq LIMIT ?",
                (*args, limit),
            ).fetchall()
            return [self._msg(r) for r in rows]

        return await self._run(run)

    async def get_messages(self, sub_id: str, seqs: Sequence[int], *, now: float) -> list[Message]:
        def run() -> list[Message]:
            self._require(self.db, sub_id)
            rows = self.db.execute(
                f"{_MSG_FROM} WHERE sub_id = ? AND {_LIVE} "
                "AND seq IN (SELECT value FROM json_each(?)) ORDER BY seq",
                (sub_id, now, _json(list(seqs))),
            ).fetchall()
            return [self._msg(r) for r in rows]

        return await self._run(run)

    async def delete_messages(
        self, sub_id: str, seqs: Sequence[int] | None, *, now: float, unclaimed_only: bool
    ) -> int:
        query = "UPDATE messages SET state = ?, claim_id = NULL WHERE sub_id = ? AND state = ?"
        args: list[Any] = [ACKED, sub_id, READY]
        if seqs is not None:
            query += " AND seq IN (SELECT value FROM json_each(?))"
            args.append(_json(list(seqs)))
        if unclaimed_only:
            query += " AND NOT (claim_id IS NOT NULL AND visible_at > ?)"
            args.append(now)

        def run(db: sqlite3.Connection) -> int:
            self._require(db, sub_id)
            return int(db.execute(query, args).rowcount)

        if seqs is None:  # a whole queue: of unbounded size, off the loop
            return await self._write_on_thread(run)
        return await self._write(run)

    async def get_claim(self, sub_id: str, claim_id: str, *, now: float) -> Claim:
        def run() -> Claim:
            expires, created, ttl = self._live_claim(self.db, sub_id, claim_id, now)
            rows = self.db.execute(
                f"{_MSG_FROM} WHERE claim_id = ? AND sub_id = ? AND state = ? ORDER BY seq",
                (claim_id, sub_id, READY),
            ).fetchall()
            return Claim(
                id=claim_id,
                subscription=sub_id,
                expires_at=expires,
                messages=[self._msg(r) for r in rows],
                created_at=created,
                ttl=ttl,
            )

        return await self._run(run)

    async def stats(self, sub_id: str, *, now: float) -> QueueStats:
        def run() -> QueueStats:
            db = self.db
            self._require(db, sub_id)
            free, claimed, delayed, low, high = db.execute(
                "SELECT coalesce(sum(visible_at <= ?1), 0), "
                "coalesce(sum(visible_at > ?1 AND claim_id IS NOT NULL), 0), "
                "coalesce(sum(visible_at > ?1 AND claim_id IS NULL), 0), min(seq), max(seq) "
                "FROM messages WHERE sub_id = ?2 AND state = 'ready' "
                "AND (expires_at IS NULL OR expires_at > ?1)",
                (now, sub_id),
            ).fetchone()
            ends = (
                db.execute(
                    f"{_MSG_FROM} WHERE sub_id = ? AND seq IN (?, ?) ORDER BY seq",
                    (sub_id, low, high),
                ).fetchall()
                if low is not None
                else []
            )
            msgs = [self._msg(r) for r in ends]
            return QueueStats(
                free=int(free),
                claimed=int(claimed),
                delayed=int(delayed),
                oldest=msgs[0] if msgs else None,
                newest=msgs[-1] if msgs else None,
            )

        return await self._run(run)

    async def ack_upto(self, sub_id: str, seq: int) -> int:
        def run(db: sqlite3.Connection) -> int:
            self._require(db, sub_id)
            return int(
                db.execute(
                    "UPDATE messages SET state = ? WHERE sub_id = ? AND seq <= ? AND state = ? "
                    "AND claim_id IS NULL",
                    (ACKED, sub_id, seq, READY),
                ).rowcount
            )

        return await self._write(run)

    async def acked_upto(self, sub_id: str) -> int:
        def run() -> int:
            _, last = self._require(self.db, sub_id)
            row = self.db.execute(
                "SELECT min(seq) FROM messages WHERE sub_id = ? AND state = ?", (sub_id, READY)
            ).fetchone()
            return last if row[0] is None else int(row[0]) - 1

        return await self._run(run)

    async def dead_letters(self, sub_id: str, *, after: int, limit: int) -> list[Message]:
        def run() -> list[Message]:
            self._require(self.db, sub_id)
            rows = self.db.execute(
                f"{_MSG_FROM} WHERE m.sub_id = ? AND m.state = ? AND m.seq > ? "
                "ORDER BY m.seq LIMIT ?",
                (sub_id, DEAD, after, limit),
            ).fetchall()
            return [self._msg(r) for r in rows]

        return await self._run(run)

    async def redrive(self, sub_id: str, seqs: Sequence[int] | None) -> int:
        def run(db: sqlite3.Connection) -> int:
            self._require(db, sub_id)
            query = (
                "UPDATE messages SET state = ?, deliveries = 0, visible_at = 0, claim_id = NULL "
                "WHERE sub_id = ? AND state = ?"
            )
            args: list[Any] = [READY, sub_id, DEAD]
            if seqs is not None:
                query += f" AND seq IN ({','.join('?' * len(seqs))})"
                args.extend(seqs)
            return int(db.execute(query, args).rowcount)

        return await self._write(run)
