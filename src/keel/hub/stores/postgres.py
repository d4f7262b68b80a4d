"""The scale-out hub store: PostgreSQL through asyncpg (see docs/adr/0001-hub-scale-out-store.md).

Several hub processes may share one database. Durability: every write is one transaction;
`append` returns after COMMIT, which PostgreSQL makes durable (WAL fsync) unless the
operator turned ``fsync``/``synchronous_commit`` off. Concurrency: `append` locks the
subscriptions it writes to, in id order, so sequence numbers stay gapless and increasing
across processes without deadlocks; claims use ``FOR UPDATE SKIP LOCKED``, so concurrent
claimers in different processes get disjoint messages. Connection failures surface as
`BackendUnavailable` (retryable); nothing is half-written.

Other processes learn of changes through LISTEN/NOTIFY, sent inside the writing transaction
(so delivered only on commit): `watch` reports appends (streams and webhooks of that
subscription catch up from the store) and subscription changes (routes are reloaded). The
notification connection is watched (its termination, and a probe every ``listen_check_s``
for a silently dead peer); once lost it is reopened with backoff (``reconnect_min_s``
doubling up to ``reconnect_max_s``) and LISTENs again, then watchers get ``"resync"``:
notifications sent while it was down are gone, so the hub reloads every subscription and
every stream catches up from the store. The pool needs no such care: asyncpg replaces a
closed connection on the next acquire, and a request during an outage is
`BackendUnavailable`.

Connecting (several hosts with ``target_session_attrs=read-write`` for a primary and its
replicas, TLS, typed refusals): see `_pg_connect`. When the primary is replaced, requests in
flight fail `BackendUnavailable`, the pool's next connection goes to the new primary, and
the LISTEN connection reconnects and resyncs as above; with synchronous replication
(``synchronous_standby_names``) every acknowledged append is on the new primary.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, ClassVar

import asyncpg
import msgspec

from keel._log import event as log_event
from keel.errors import (
    BackendUnavailable,
    BadRequest,
    ClaimExpired,
    ConfigError,
    Conflict,
    NotFound,
)
from keel.hub.stores._pg_connect import dsn_and_ssl, hidden_refusal, refusal
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

_SCHEMA = """
CREATE TABLE IF NOT EXISTS {s}.subscriptions (
    id TEXT PRIMARY KEY, project TEXT NOT NULL, body TEXT NOT NULL,
    last_seq BIGINT NOT NULL DEFAULT 0, first_seq BIGINT NOT NULL DEFAULT 1,
    dropped BIGINT NOT NULL DEFAULT 0, max_messages BIGINT, max_age_s DOUBLE PRECISION
);
CREATE INDEX IF NOT EXISTS subscriptions_project ON {s}.subscriptions (project, id);
CREATE TABLE IF NOT EXISTS {s}.events (id BIGSERIAL PRIMARY KEY, body BYTEA NOT NULL);
CREATE TABLE IF NOT EXISTS {s}.messages (
    sub_id TEXT NOT NULL, seq BIGINT NOT NULL, event_id BIGINT NOT NULL, state TEXT NOT NULL,
    deliveries INT NOT NULL DEFAULT 0, visible_at DOUBLE PRECISION NOT NULL DEFAULT 0,
    claim_id TEXT, enqueued_at DOUBLE PRECISION NOT NULL, expires_at DOUBLE PRECISION,
    PRIMARY KEY (sub_id, seq)
);
CREATE INDEX IF NOT EXISTS messages_state ON {s}.messages (sub_id, state, seq);
CREATE INDEX IF NOT EXISTS messages_claim ON {s}.messages (claim_id) WHERE claim_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS {s}.claims (
    id TEXT PRIMARY KEY, sub_id TEXT NOT NULL, expires_at DOUBLE PRECISION NOT NULL,
    created_at DOUBLE PRECISION NOT NULL DEFAULT 0, ttl DOUBLE PRECISION NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS {s}.ingested (event_id TEXT PRIMARY KEY, at DOUBLE PRECISION NOT NULL);
CREATE INDEX IF NOT EXISTS ingested_at ON {s}.ingested (at);
ALTER TABLE {s}.messages ADD COLUMN IF NOT EXISTS expires_at DOUBLE PRECISION;
ALTER TABLE {s}.claims ADD COLUMN IF NOT EXISTS created_at DOUBLE PRECISION NOT NULL DEFAULT 0;
ALTER TABLE {s}.claims ADD COLUMN IF NOT EXISTS ttl DOUBLE PRECISION NOT NULL DEFAULT 0;
"""

# `PostgresStore.append` in one statement, so one round trip and its own (implicit)
# transaction: under a hostile tenant's load every round trip of the hub's loop and of the
# server costs several times its quiet price, and an append of nine (BEGIN, each statement,
# COMMIT, the pool's reset) was what the measured tenant's events waited behind, twice (the
# commit in flight, then its own). The same steps as before, in the same order: dedup, lock
# the queues in id order, advance them, insert the events (increasing ids, in batch order)
# and the messages, enforce max_messages, notify. Items are given as the flattened
# (item, subscription) pairs; it returns each message's queue, seq and item (1-based), in
# batch order.
_APPEND_FN = """
CREATE OR REPLACE FUNCTION {s}.append_batch(
    p_ev text[], p_body bytea[], p_pi int[], p_ps text[], p_vis float8[], p_exp float8[],
    p_now float8, p_ready text, p_channel text, p_origin text)
RETURNS TABLE (o_sub text, o_seq bigint, o_item int) LANGUAGE plpgsql AS $fn$
DECLARE
    v_fresh int[];
    v_kept int[];
    v_eids bigint[];
    v_sid text[];
    v_base bigint[];
    v_last bigint[];
    v_first bigint[];
    v_max bigint[];
    v_n bigint;
    v_k int;
    v_id text;
    v_chunk text := '';
BEGIN
    WITH ins AS (
        -- In order: two hubs inserting the same ids (a bus redelivery) in different orders
        -- deadlocked on each other's index entries.
        INSERT INTO {s}.ingested (event_id, at)
        SELECT DISTINCT e, p_now FROM unnest(p_ev) AS e ORDER BY e
        ON CONFLICT DO NOTHING RETURNING event_id)
    SELECT array_agg(f.k ORDER BY f.k) INTO v_fresh FROM (
        SELECT min(u.k) AS k FROM unnest(p_ev) WITH ORDINALITY AS u(e, k)
        JOIN ins ON ins.event_id = u.e GROUP BY u.e) AS f;
    IF v_fresh IS NULL THEN
        RETURN;
    END IF;
    PERFORM 1 FROM {s}.subscriptions AS s WHERE s.id IN (
        SELECT p.s FROM unnest(p_pi, p_ps) AS p(i, s) WHERE p.i = ANY(v_fresh))
        ORDER BY s.id FOR UPDATE;
    WITH c AS (
        SELECT p.s AS id, count(*) AS n FROM unnest(p_pi, p_ps) AS p(i, s)
        WHERE p.i = ANY(v_fresh) GROUP BY p.s),
    up AS (
        UPDATE {s}.subscriptions AS s SET last_seq = s.last_seq + c.n FROM c WHERE s.id = c.id
        RETURNING s.id, s.last_seq - c.n AS base, s.last_seq, s.first_seq, s.max_messages)
    SELECT array_agg(up.id ORDER BY up.id), array_agg(up.base ORDER BY up.id),
           array_agg(up.last_seq ORDER BY up.id), array_agg(up.first_seq ORDER BY up.id),
           array_agg(up.max_messages ORDER BY up.id)
    INTO v_sid, v_base, v_last, v_first, v_max FROM up;
    IF v_sid IS NULL THEN
        RETURN;
    END IF;
    SELECT array_agg(DISTINCT p.i ORDER BY p.i) INTO v_kept FROM unnest(p_pi, p_ps) AS p(i, s)
    WHERE p.i = ANY(v_fresh) AND p.s = ANY(v_sid);
    -- Inserted under the queues' locks: each queue's messages name increasing event ids.
    WITH x AS (
        INSERT INTO {s}.events (body) SELECT p_body[u.k] FROM unnest(v_kept)
        WITH ORDINALITY AS u(k, n) ORDER BY u.n RETURNING id)
    SELECT array_agg(x.id ORDER BY x.id) INTO v_eids FROM x;
    RETURN QUERY WITH pairs AS (
        SELECT p.s, p.i, p.o, k.eid,
               b.base + row_number() OVER (PARTITION BY p.s ORDER BY p.o) AS seq
        FROM unnest(p_pi, p_ps) WITH ORDINALITY AS p(i, s, o)
        JOIN unnest(v_sid, v_base) AS b(id, base) ON b.id = p.s
        JOIN unnest(v_kept, v_eids) AS k(i, eid) ON k.i = p.i),
    ins AS (
        INSERT INTO {s}.messages (sub_id, seq, event_id, state, enqueued_at, visible_at,
                                  expires_at)
        SELECT pairs.s, pairs.seq, pairs.eid, p_ready, p_now, p_vis[pairs.i], p_exp[pairs.i]
        FROM pairs)
    SELECT pairs.s, pairs.seq, pairs.i::int FROM pairs ORDER BY pairs.o;
    FOR v_k IN 1..array_length(v_sid, 1) LOOP
        IF v_max[v_k] IS NOT NULL AND v_last[v_k] - v_first[v_k] + 1 > v_max[v_k] THEN
            DELETE FROM {s}.messages AS m
            WHERE m.sub_id = v_sid[v_k] AND m.seq < v_last[v_k] - v_max[v_k] + 1;
            GET DIAGNOSTICS v_n = ROW_COUNT;
            UPDATE {s}.subscriptions AS s
            SET first_seq = greatest(s.first_seq, v_last[v_k] - v_max[v_k] + 1),
                dropped = s.dropped + v_n
            WHERE s.id = v_sid[v_k];
        END IF;
    END LOOP;
    -- NOTIFY payloads are limited to 8000 bytes: the ids in chunks of a bounded size.
    FOREACH v_id IN ARRAY v_sid LOOP
        IF v_chunk <> '' AND octet_length(v_chunk) + octet_length(v_id) > {notify_bytes} THEN
            PERFORM pg_notify(p_channel, p_origin || ' append ' || v_chunk);
            v_chunk := '';
        END IF;
        v_chunk := CASE WHEN v_chunk = '' THEN v_id ELSE v_chunk || ',' || v_id END;
    END LOOP;
    PERFORM pg_notify(p_channel, p_origin || ' append ' || v_chunk);
END $fn$;
"""
# Subscription writes, each one statement (its own transaction, one round trip) for the same
# reason as `append_batch`: a tenant changing subscriptions at its write rate made seven
# round trips per create and delete (BEGIN, lock, count, insert or the three deletes,
# NOTIFY, COMMIT), and those, beside a flood, were what raised the measured tenant's SSE
# p99 (bench hub, PostgreSQL, pooled p99 beside the hostile tenant 11.2 ms with its churn,
# 9.6 ms without, 6.3 ms alone). Statements of a VOLATILE plpgsql function each take a new
# snapshot, so the count after the advisory lock sees every create committed before it.
# create_subscription answers 0 (made), 1 (quota reached) or 2 (the id exists); the others
# whether the subscription was there.
_SUBSCRIPTION_FNS = """
CREATE OR REPLACE FUNCTION {s}.create_subscription(
    p_id text, p_project text, p_body text, p_max_messages bigint, p_max_age float8,
    p_quota int, p_channel text, p_origin text)
RETURNS int LANGUAGE plpgsql AS $fn$
BEGIN
    IF p_quota IS NOT NULL THEN
        -- One lock per (store, project), held to commit: concurrent creates of one
        -- project, in any hub process, count one after another.
        PERFORM pg_advisory_xact_lock(hashtext('{s}'), hashtext(p_project));
        IF (SELECT count(*) FROM {s}.subscriptions WHERE project = p_project) >= p_quota THEN
            RETURN 1;
        END IF;
    END IF;
    INSERT INTO {s}.subscriptions (id, project, body, max_messages, max_age_s)
    VALUES (p_id, p_project, p_body, p_max_messages, p_max_age) ON CONFLICT (id) DO NOTHING;
    IF NOT FOUND THEN
        RETURN 2;
    END IF;
    PERFORM pg_notify(p_channel, p_origin || ' subscription ' || p_id);
    RETURN 0;
END $fn$;
CREATE OR REPLACE FUNCTION {s}.update_subscription(
    p_id text, p_body text, p_max_messages bigint, p_max_age float8, p_channel text,
    p_origin text)
RETURNS boolean LANGUAGE plpgsql AS $fn$
BEGIN
    UPDATE {s}.subscriptions SET body = p_body, max_messages = p_max_messages,
        max_age_s = p_max_age WHERE id = p_id;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    PERFORM pg_notify(p_channel, p_origin || ' subscription ' || p_id);
    RETURN true;
END $fn$;
CREATE OR REPLACE FUNCTION {s}.delete_subscription(p_id text, p_channel text, p_origin text)
RETURNS boolean LANGUAGE plpgsql AS $fn$
BEGIN
    DELETE FROM {s}.subscriptions WHERE id = p_id;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    DELETE FROM {s}.messages WHERE sub_id = p_id;
    DELETE FROM {s}.claims WHERE sub_id = p_id;
    PERFORM pg_notify(p_channel, p_origin || ' subscription ' || p_id);
    RETURN true;
END $fn$;
"""
# Room for the ids in one NOTIFY payload (8000 bytes with the origin and the kind).
_NOTIFY_BYTES = 7000
_APPEND_FN = _APPEND_FN.replace("{notify_bytes}", str(_NOTIFY_BYTES))
# Concurrent hubs may still deadlock where their locks meet (PostgreSQL aborts one): an
# append or an open, each its own transaction, is run again this many times.
_DEADLOCK_RETRIES = 3
_RETRIED = (asyncpg.exceptions.DeadlockDetectedError, asyncpg.exceptions.SerializationError)

if TYPE_CHECKING:
    Conn = asyncpg.pool.PoolConnectionProxy[asyncpg.Record]

log = logging.getLogger("keel.hub.postgres")

# What a lost or refused connection raises (TimeoutError and ConnectionError are OSErrors);
# an InterfaceError is one only when its connection is closed (see `_conn`).
_LOST: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,  # admin shutdown, "starting up"
)


async def _reset(conn: asyncpg.Connection[asyncpg.Record]) -> None:
    """The pool's reset of a connection given back: only a transaction left open is rolled
    back. asyncpg's default (advisory unlock, CLOSE ALL, UNLISTEN, RESET ALL) was one more
    round trip after every statement, and this store leaves none of those behind: its
    advisory locks are transaction-scoped (released by this ROLLBACK at the latest)."""
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")


def _no_nul(sub_id: str) -> None:
    """PostgreSQL text cannot hold NUL: no subscription has such an id (asyncpg's error
    for it was a 500)."""
    if "\x00" in sub_id:
        raise NotFound(f"no subscription {sub_id!r}", subscription=sub_id)


def _dedup_key(event_id: str) -> str:
    """The event id as PostgreSQL text can hold it: a CloudEvents id may contain U+0000
    (SQLite stores it), which PostgreSQL refuses, and the refusal failed the whole group
    commit, every tenant's events in it. Only ids with U+0000 or a leading U+FFFF (a
    noncharacter) change: marked by a leading U+FFFF, with U+FFFF written twice and U+0000
    as U+FFFF "0", so no two ids share a key."""
    if "\x00" not in event_id and not event_id.startswith("\uffff"):
        return event_id
    escaped = event_id.replace("\uffff", "\uffff\uffff").replace("\x00", "\uffff0")
    return "\uffff" + escaped


def _gone(conn: Conn) -> bool:
    try:
        return conn.is_closed()
    except asyncpg.InterfaceError:
        # The pool took the connection back under us: it was lost (terminated) mid-operation.
        return True


_PROBE_FAILED: tuple[type[BaseException], ...] = (*_LOST, asyncpg.InterfaceError)

# A message's row names its event; the body is stored once however many queues it went to.
_MSG = (
    "m.seq, e.body AS event, m.state, m.deliveries, m.enqueued_at, m.visible_at, m.claim_id, "
    "m.expires_at"
)
_MSG_FROM = f"SELECT {_MSG} FROM {{s}}.messages m JOIN {{s}}.events e ON e.id = m.event_id"
# Each queue's messages name increasing event ids (events are inserted under the queues'
# locks), so an event below the smallest first id of all queues is no one's any more. One
# statement: messages and events are seen in one snapshot.
_DELETE_UNREFERENCED = """
DELETE FROM {s}.events WHERE id < coalesce(
    (SELECT min((SELECT m.event_id FROM {s}.messages m WHERE m.sub_id = s.id
                 ORDER BY m.seq LIMIT 1)) FROM {s}.subscriptions s),
    (SELECT max(id) + 1 FROM {s}.events))
"""
# From a layout with a body in every message row (a column ``event``, with or without
# ``expires_at``): each row's body becomes one event, in queue order. Run under the schema's
# advisory lock at open, before `_SCHEMA`, which adds the columns an earlier layout lacks.
_MIGRATE = """
DO $$ BEGIN
IF EXISTS (SELECT 1 FROM information_schema.columns WHERE table_schema = '{s}'
           AND table_name = 'messages' AND column_name = 'event') THEN
    CREATE TABLE {s}.events (id BIGSERIAL PRIMARY KEY, body BYTEA NOT NULL);
    ALTER TABLE {s}.messages ADD COLUMN event_id BIGINT;
    WITH numbered AS (
        SELECT sub_id, seq, event, row_number() OVER (ORDER BY sub_id, seq) AS n
        FROM {s}.messages),
    ins AS (INSERT INTO {s}.events (id, body) SELECT n, event FROM numbered RETURNING id)
    UPDATE {s}.messages m SET event_id = numbered.n FROM numbered
        WHERE m.sub_id = numbered.sub_id AND m.seq = numbered.seq;
    PERFORM setval(pg_get_serial_sequence('{s}.events', 'id'),
                   coalesce((SELECT max(id) FROM {s}.events), 0) + 1, false);
    ALTER TABLE {s}.messages ALTER COLUMN event_id SET NOT NULL;
    ALTER TABLE {s}.messages DROP COLUMN event;
END IF;
END $$;
"""
# A message is live while ready and not expired ($2 is now in every query that uses it;
# unqualified: no column of ``events`` shares a name with one of ``messages``).
_LIVE = "state = 'ready' AND (expires_at IS NULL OR expires_at > $2)"
# A claim's grace: an expiring message lives at least until ${n} (greatest() skips NULLs, so
# a message that never expires would get an expiry without the CASE).
_KEEP_ALIVE = "CASE WHEN expires_at IS NULL THEN NULL ELSE greatest(expires_at, ${n}) END"
_SUB = "body, last_seq, first_seq, dropped"


def _sub(row: asyncpg.Record) -> Subscription:
    sub = msgspec.json.decode(row["body"], type=Subscription)
    sub.last_seq, sub.first_seq, sub.dropped = row["last_seq"], row["first_seq"], row["dropped"]
    return sub


def _msg(row: asyncpg.Record) -> Message:
    return Message(
        seq=row["seq"],
        event=msgspec.Raw(bytes(row["event"])),
        state=row["state"],
        deliveries=row["deliveries"],
        enqueued_at=row["enqueued_at"],
        visible_at=row["visible_at"],
        claim_id=row["claim_id"],
        expires_at=row["expires_at"],
    )


class PostgresStore:
    multi_process: ClassVar[bool] = True
    # One batch forms while the previous commits (the pool has connections for both).
    append_concurrency: ClassVar[int] = 2

    def __init__(
        self,
        url: str,
        *,
        schema: str = "keel_hub",
        dedup_s: float = 86400.0,
        pool_size: int = 10,
        connect_timeout: float = 10.0,
        listen_check_s: float = 5.0,
        reconnect_min_s: float = 0.1,
        reconnect_max_s: float = 5.0,
    ) -> None:
        if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", schema):
            raise ConfigError("schema must be a lowercase SQL identifier")
        self.url = url
        self._dsn, self._ssl = dsn_and_ssl(url)
        self.schema = schema
        self.dedup_s = dedup_s
        self.pool_size = pool_size
        self.connect_timeout = connect_timeout
        self.listen_check_s = listen_check_s
        self.reconnect_min_s = reconnect_min_s
        self.reconnect_max_s = reconnect_max_s
        self._pool: asyncpg.Pool[asyncpg.Record] | None = None
        self._listener: asyncpg.Connection[asyncpg.Record] | None = None
        self._listener_lost = asyncio.Event()
        self._listen_task: asyncio.Task[None] | None = None
        self.listen_reconnects = 0
        self._watchers: list[Callable[[str, str], None]] = []
        self.origin = new_id()  # tells this process's own notifications from others'
        self.channel = f"keel_hub_{schema}"

    def _q(self, sql: str) -> str:
        return sql.replace("{s}", self.schema)

    async def open(self) -> None:
        try:
            self._pool = await asyncpg.create_pool(
                self._dsn,
                min_size=1,
                max_size=self.pool_size,
                timeout=self.connect_timeout,
                ssl=self._ssl,
                reset=_reset,
            )
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            refused = refusal(exc, self.url) or await hidden_refusal(exc, self.url)
            if refused is not None:
                raise refused from None
            raise BackendUnavailable(
                f"cannot reach PostgreSQL at the hub store URL: {exc}"
            ) from None
        try:
            await self._set_up()
        except BaseException:
            await self._pool.close()
            self._pool = None
            raise

    async def _set_up(self) -> None:
        """Create or migrate the schema, unless it is the layout this code writes already.

        A hub that (re)starts while others append only reads the schema's mark: its DDL
        (CREATE INDEX IF NOT EXISTS takes the tables' locks in another order than an append)
        deadlocked with them. The DDL runs in one transaction under a transaction-scoped
        advisory lock, released at COMMIT: a session lock released by the script's last
        statement let the next hub in before the schema was committed, and its CREATE
        SCHEMA failed on the unique name."""
        ddl = (
            self._q(_MIGRATE) + self._q(_SCHEMA) + self._q(_APPEND_FN) + self._q(_SUBSCRIPTION_FNS)
        )
        mark = "keel-hub " + hashlib.sha256(ddl.encode()).hexdigest()[:16]
        for attempt in range(_DEADLOCK_RETRIES + 1):
            async with self._conn() as conn:
                current = await conn.fetchval(
                    "SELECT obj_description(oid, 'pg_namespace') FROM pg_namespace "
                    "WHERE nspname = $1 AND to_regproc($2) IS NOT NULL",
                    self.schema,
                    f"{self.schema}.append_batch",
                )
                if current == mark:
                    return
                try:
                    async with conn.transaction():
                        await conn.execute(
                            f"SELECT pg_advisory_xact_lock(hashtext('{self.schema}'));"
                            f"CREATE SCHEMA IF NOT EXISTS {self.schema};"
                            + ddl
                            + f"COMMENT ON SCHEMA {self.schema} IS '{mark}';"
                        )
                except _RETRIED:
                    if attempt == _DEADLOCK_RETRIES:
                        raise
                else:
                    return

    async def watch(self, on_change: Callable[[str, str], None]) -> None:
        self._watchers.append(on_change)
        if self._listen_task is not None:
            return
        try:
            await self._listen()  # the first connection fails loudly; later ones are retried
        except _LOST as exc:
            raise BackendUnavailable(f"cannot listen for hub changes: {exc}") from None
        self._listen_task = asyncio.create_task(self._keep_listening(), name="keel-hub-listen")

    def _handle(self, conn: object, pid: int, channel: str, payload: object) -> None:
        origin, kind, ids = str(payload).split(" ", 2)
        if origin == self.origin:
            return
        for sub_id in ids.split(","):
            self._emit(kind, sub_id)

    def _emit(self, kind: str, sub_id: str) -> None:
        for watcher in list(self._watchers):
            watcher(kind, sub_id)

    async def _listen(self) -> None:
        conn = await asyncpg.connect(self._dsn, timeout=self.connect_timeout, ssl=self._ssl)
        lost = asyncio.Event()
        try:
            conn.add_termination_listener(lambda _: lost.set())
            await conn.add_listener(self.channel, self._handle)
        except BaseException:
            conn.terminate()
            raise
        self._listener, self._listener_lost = conn, lost

    async def _until_lost(self) -> None:
        """Return once the LISTEN connection is gone: terminated, or not answering a probe
        (a peer that vanished without closing the socket never fires the termination)."""
        conn, lost = self._listener, self._listener_lost
        assert conn is not None
        while not lost.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(lost.wait(), self.listen_check_s)
                return
            try:
                await asyncio.wait_for(conn.fetchval("SELECT 1"), self.listen_check_s)
            except _PROBE_FAILED as exc:
                log_event(log, logging.WARNING, "hub.listen_probe_failed", error=repr(exc))
                conn.terminate()
                return

    async def _keep_listening(self) -> None:
        while True:
            await self._until_lost()
            log_event(log, logging.WARNING, "hub.listen_lost", channel=self.channel)
            if self._listener is not None:
                self._listener.terminate()
            delay = self.reconnect_min_s
            while True:
                try:
                    await self._listen()
                    break
                # Whatever the server answers (too many connections, still starting), keep
                # trying: this task is the process's only way to hear the other hubs.
                except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                    log_event(log, logging.WARNING, "hub.listen_reconnect_failed", error=repr(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.reconnect_max_s)
            self.listen_reconnects += 1
            log_event(log, logging.INFO, "hub.listen_restored", channel=self.channel)
            self._emit("resync", "")

    async def unwatch(self, on_change: Callable[[str, str], None]) -> None:
        if on_change in self._watchers:
            self._watchers.remove(on_change)

    @property
    def listener_pid(self) -> int | None:
        """The server process of the LISTEN connection (operators and tests terminate it)."""
        return None if self._listener is None else self._listener.get_server_pid()

    async def close(self) -> None:
        if self._listen_task is not None:
            self._listen_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listen_task
            self._listen_task = None
        if self._listener is not None:
            self._listener.terminate()  # close() would wait on a server that may be gone
            self._listener = None
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    @asynccontextmanager
    async def _conn(self) -> AsyncIterator[Conn]:
        if self._pool is None:
            raise ConfigError("the store is not open; call open() first")
        try:
            async with self._pool.acquire() as conn:
                try:
                    yield conn
                except asyncpg.InterfaceError as exc:
                    if not _gone(conn):
                        raise
                    raise BackendUnavailable(f"PostgreSQL connection lost: {exc}") from None
                except asyncpg.InternalClientError as exc:
                    # asyncpg's protocol state after a connection broke mid-operation (seen
                    # when the primary is killed): the connection is unusable, drop it.
                    conn.terminate()
                    raise BackendUnavailable(f"PostgreSQL connection broke: {exc}") from None
        except BackendUnavailable:
            raise
        except _LOST as exc:
            raise BackendUnavailable(f"PostgreSQL is unreachable: {exc}") from None

    @asynccontextmanager
    async def _tx(self) -> AsyncIterator[Conn]:
        async with self._conn() as conn, conn.transaction():
            yield conn

    async def _require(self, conn: Conn, sub_id: str) -> tuple[int, int]:
        row = await conn.fetchrow(
            self._q("SELECT first_seq, last_seq FROM {s}.subscriptions WHERE id = $1"), sub_id
        )
        if row is None:
            raise NotFound(f"no subscription {sub_id!r}", subscription=sub_id)
        return int(row[0]), int(row[1])

    # --- subscriptions ------------------------------------------------------------------

    async def create_subscription(self, sub: Subscription, *, quota: int | None = None) -> None:
        r = sub.retention
        if "\x00" in sub.id or "\x00" in sub.project:  # asyncpg's DataError was a 500
            raise BadRequest("PostgreSQL text cannot hold NUL: not in a subscription id or project")
        if len(sub.id.encode()) > _NOTIFY_BYTES:  # its NOTIFY failed ("payload string too long")
            raise BadRequest(f"a subscription id is at most {_NOTIFY_BYTES} bytes")
        # The function's quota is an int (a Python one past 2**31 - 1 failed the statement);
        # no project holds 2**31 - 1 subscriptions.
        limit = None if quota is None else min(max(quota, 0), 2**31 - 1)
        async with self._conn() as conn:
            made = await conn.fetchval(
                self._q("SELECT {s}.create_subscription($1, $2, $3, $4, $5, $6, $7, $8)"),
                sub.id,
                sub.project,
                msgspec.json.encode(sub).decode(),
                r.max_messages,
                r.max_age_s,
                limit,
                self.channel,
                self.origin,
            )
        if made == 1:
            assert quota is not None
            raise quota_exceeded(sub.project, quota)
        if made == 2:
            raise Conflict(f"subscription {sub.id} exists")

    async def get_subscription(self, sub_id: str) -> Subscription:
        _no_nul(sub_id)
        async with self._conn() as conn:
            row = await conn.fetchrow(
                self._q(f"SELECT {_SUB} FROM {{s}}.subscriptions WHERE id = $1"), sub_id
            )
        if row is None:
            raise NotFound(f"no subscription {sub_id!r}", subscription=sub_id)
        return _sub(row)

    async def update_subscription(self, sub: Subscription) -> None:
        r = sub.retention
        _no_nul(sub.id)
        async with self._conn() as conn:
            found = await conn.fetchval(
                self._q("SELECT {s}.update_subscription($1, $2, $3, $4, $5, $6)"),
                sub.id,
                msgspec.json.encode(sub).decode(),
                r.max_messages,
                r.max_age_s,
                self.channel,
                self.origin,
            )
        if not found:
            raise NotFound(f"no subscription {sub.id!r}", subscription=sub.id)

    async def list_subscriptions(
        self, project: str | None, *, limit: int, marker: str | None
    ) -> list[Subscription]:
        # PostgreSQL text cannot hold NUL, and no id does: after "a\0b" is after "a".
        after = (marker or "").split("\x00", 1)[0]
        async with self._conn() as conn:
            rows = await conn.fetch(
                self._q(
                    f"SELECT {_SUB} FROM {{s}}.subscriptions WHERE id > $1 "
                    "AND ($2::text IS NULL OR project = $2) ORDER BY id LIMIT $3"
                ),
                after,
                project,
                limit,
            )
        return [_sub(r) for r in rows]

    async def count_subscriptions(self, project: str) -> int:
        async with self._conn() as conn:
            n = await conn.fetchval(
                self._q("SELECT count(*) FROM {s}.subscriptions WHERE project = $1"), project
            )
        return int(n)

    async def delete_subscription(self, sub_id: str) -> None:
        _no_nul(sub_id)
        async with self._conn() as conn:
            found = await conn.fetchval(
                self._q("SELECT {s}.delete_subscription($1, $2, $3)"),
                sub_id,
                self.channel,
                self.origin,
            )
        if not found:
            raise NotFound(f"no subscription {sub_id!r}", subscription=sub_id)

    # --- queues -------------------------------------------------------------------------

    async def append(self, batch: Sequence[Routed], *, now: float) -> list[Appended]:
        if not batch:
            return []
        pair_items: list[int] = []
        pair_subs: list[str] = []
        for n, item in enumerate(batch, 1):
            pair_items += [n] * len(item.subscriptions)
            pair_subs += item.subscriptions
        for attempt in range(_DEADLOCK_RETRIES + 1):
            try:
                rows = await self._append_batch(batch, pair_items, pair_subs, now)
                break
            except _RETRIED:
                if attempt == _DEADLOCK_RETRIES:
                    raise
        out: list[Appended] = []
        for sub_id, seq, n in rows:
            item = batch[n - 1]
            out.append(Appended(sub_id, seq, item.body, item.event_id))
        return out

    async def _append_batch(
        self, batch: Sequence[Routed], pair_items: list[int], pair_subs: list[str], now: float
    ) -> list[asyncpg.Record]:
        async with self._conn() as conn:
            # One statement, outside an explicit transaction: its own, one round trip.
            return await conn.fetch(
                self._q(
                    "SELECT o_sub, o_seq, o_item FROM {s}.append_batch($1::text[], "
                    "$2::bytea[], $3::int[], $4::text[], $5::float8[], $6::float8[], "
                    "$7::float8, $8::text, $9::text, $10::text)"
                ),
                [_dedup_key(item.event_id) for item in batch],
                [item.body for item in batch],
                pair_items,
                pair_subs,
                [now + item.delay if item.delay else 0.0 for item in batch],
                [now + item.ttl if item.ttl is not None else None for item in batch],
                now,
                READY,
                self.channel,
                self.origin,
            )

    async def _drop_before(self, conn: Conn, sub_id: str, first: int) -> int:
        done = await conn.execute(
            self._q("DELETE FROM {s}.messages WHERE sub_id = $1 AND seq < $2"), sub_id, first
        )
        dropped = int(done.split()[-1])
        await conn.execute(
            self._q(
                "UPDATE {s}.subscriptions SET first_seq = greatest(first_seq, $2), "
                "dropped = dropped + $3 WHERE id = $1"
            ),
            sub_id,
            first,
            dropped,
        )
        return dropped

    async def enforce_retention(self, *, now: float) -> int:
        total = 0
        async with self._tx() as conn:
            subs = await conn.fetch(
                self._q(
                    "SELECT id, max_age_s, last_seq FROM {s}.subscriptions "
                    "WHERE max_age_s IS NOT NULL ORDER BY id FOR UPDATE"
                )
            )
            for sub in subs:
                keep = await conn.fetchval(
                    self._q(
                        "SELECT min(seq) FROM {s}.messages WHERE sub_id = $1 AND enqueued_at >= $2"
                    ),
                    sub["id"],
                    now - sub["max_age_s"],
                )
                total += await self._drop_before(
                    conn, sub["id"], keep if keep is not None else sub["last_seq"] + 1
                )
            await conn.execute(
                self._q("DELETE FROM {s}.ingested WHERE at < $1"), now - self.dedup_s
            )
            await conn.execute(self._q("DELETE FROM {s}.claims WHERE expires_at < $1"), now - 3600)
            await conn.execute(self._q(_DELETE_UNREFERENCED))
        return total

    async def read(
        self, sub_id: str, *, after: int, limit: int
    ) -> tuple[Gap | None, list[Message]]:
        async with self._conn() as conn:
            first, last = await self._require(conn, sub_id)
            rows = await conn.fetch(
                self._q(f"{_MSG_FROM} WHERE m.sub_id = $1 AND m.seq > $2 ORDER BY m.seq LIMIT $3"),
                sub_id,
                after,
                limit,
            )
        gap = Gap(after + 1, min(first - 1, last)) if after + 1 < first else None
        return gap, [_msg(r) for r in rows]

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
        async with self._tx() as conn:
            await self._require(conn, sub_id)
            await conn.execute(
                self._q(
                    "UPDATE {s}.messages SET state = $2, claim_id = NULL WHERE sub_id = $1 "
                    "AND state = $3 AND visible_at <= $4 AND deliveries >= $5"
                ),
                sub_id,
                DEAD,
                READY,
                now,
                max_deliveries,
            )
            if head_only:
                head = await conn.fetchrow(
                    self._q(
                        f"SELECT seq, visible_at FROM {{s}}.messages WHERE sub_id = $1 AND {_LIVE} "
                        "ORDER BY seq LIMIT 1 FOR UPDATE"
                    ),
                    sub_id,
                    now,
                )
                seqs = [head["seq"]] if head is not None and head["visible_at"] <= now else []
            else:
                seqs = [
                    r[0]
                    for r in await conn.fetch(
                        self._q(
                            f"SELECT seq FROM {{s}}.messages WHERE sub_id = $1 AND {_LIVE} "
                            "AND visible_at <= $2 ORDER BY seq LIMIT $3 FOR UPDATE SKIP LOCKED"
                        ),
                        sub_id,
                        now,
                        limit,
                    )
                ]
            if not seqs:
                return None
            claim_id = "clm-" + new_id()
            expires = now + ttl
            await conn.execute(
                self._q(
                    "INSERT INTO {s}.claims (id, sub_id, expires_at, created_at, ttl) "
                    "VALUES ($1, $2, $3, $4, $5)"
                ),
                claim_id,
                sub_id,
                expires,
                now,
                ttl,
            )
            rows = await conn.fetch(
                self._q(
                    "UPDATE {s}.messages m SET claim_id = $3, visible_at = $4, "
                    f"deliveries = deliveries + 1, expires_at = {_KEEP_ALIVE.format(n=5)} "
                    "FROM {s}.events e "
                    "WHERE m.sub_id = $1 AND m.seq = ANY($2::bigint[]) AND e.id = m.event_id "
                    f"RETURNING {_MSG}"
                ),
                sub_id,
                seqs,
                claim_id,
                expires,
                expires + grace,
            )
        messages = sorted((_msg(r) for r in rows), key=lambda m: m.seq)
        return Claim(
            id=claim_id,
            subscription=sub_id,
            expires_at=expires,
            messages=messages,
            created_at=now,
            ttl=ttl,
        )

    async def _live_claim(
        self, conn: Conn, sub_id: str, claim_id: str, now: float, *, lock: bool = True
    ) -> asyncpg.Record:
        """The live claim's expires_at, created_at and ttl (its row locked if ``lock``)."""
        await self._require(conn, sub_id)
        if "\x00" in claim_id:  # PostgreSQL text cannot hold NUL: no claim has that id
            raise NotFound(f"no claim {claim_id!r} on this subscription", claim=claim_id)
        row = await conn.fetchrow(
            self._q(
                "SELECT expires_at, created_at, ttl FROM {s}.claims WHERE id = $1 AND sub_id = $2"
                + (" FOR UPDATE" if lock else "")
            ),
            claim_id,
            sub_id,
        )
        if row is None:
            raise NotFound(f"no claim {claim_id!r} on this subscription", claim=claim_id)
        if row["expires_at"] <= now:
            raise ClaimExpired(
                f"claim {claim_id} expired; its messages are visible again, claim them anew",
                claim=claim_id,
            )
        return row

    @staticmethod
    def _count(status: str) -> int:
        return int(status.rsplit(maxsplit=1)[-1])

    async def ack(
        self, sub_id: str, claim_id: str, seqs: Sequence[int] | None, *, now: float
    ) -> int:
        async with self._tx() as conn:
            await self._live_claim(conn, sub_id, claim_id, now)
            status = await conn.execute(
                self._q(
                    "UPDATE {s}.messages SET state = $3, claim_id = NULL WHERE sub_id = $1 "
                    "AND claim_id = $2 AND state = $4 "
                    "AND ($5::bigint[] IS NULL OR seq = ANY($5::bigint[]))"
                ),
                sub_id,
                claim_id,
                ACKED,
                READY,
                list(seqs) if seqs is not None else None,
            )
        return self._count(status)

    async def release(self, sub_id: str, claim_id: str, *, now: float) -> int:
        async with self._tx() as conn:
            await self._live_claim(conn, sub_id, claim_id, now)
            status = await conn.execute(
                self._q(
                    "UPDATE {s}.messages SET claim_id = NULL, visible_at = $3 WHERE sub_id = $1 "
                    "AND claim_id = $2 AND state = $4"
                ),
                sub_id,
                claim_id,
                now,
                READY,
            )
            await conn.execute(self._q("DELETE FROM {s}.claims WHERE id = $1"), claim_id)
        return self._count(status)

    async def extend(
        self, sub_id: str, claim_id: str, *, ttl: float, now: float, grace: float = 0.0
    ) -> float:
        expires = now + ttl
        async with self._tx() as conn:
            await self._live_claim(conn, sub_id, claim_id, now)
            await conn.execute(
                self._q("UPDATE {s}.claims SET expires_at = $2, ttl = $3 WHERE id = $1"),
                claim_id,
                expires,
                ttl,
            )
            await conn.execute(
                self._q(
                    "UPDATE {s}.messages SET visible_at = $3, expires_at = "
                    f"{_KEEP_ALIVE.format(n=5)} WHERE sub_id = $1 AND claim_id = $2 AND state = $4"
                ),
                sub_id,
                claim_id,
                expires,
                READY,
                expires + grace,
            )
        return expires

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
        where = f"sub_id = $1 AND seq > $3 AND {_LIVE}"
        if not claimed and not delayed:
            where += " AND visible_at <= $2"
        elif not claimed:  # delayed ones (never claimed) stay; held ones go
            where += " AND NOT (claim_id IS NOT NULL AND visible_at > $2)"
        elif not delayed:
            where += " AND NOT (claim_id IS NULL AND visible_at > $2)"
        async with self._conn() as conn:
            await self._require(conn, sub_id)
            rows = await conn.fetch(
                self._q(f"{_MSG_FROM} WHERE {where} ORDER BY seq LIMIT $4"),
                sub_id,
                now,
                after,
                limit,
            )
        return [_msg(r) for r in rows]

    async def get_messages(self, sub_id: str, seqs: Sequence[int], *, now: float) -> list[Message]:
        async with self._conn() as conn:
            await self._require(conn, sub_id)
            rows = await conn.fetch(
                self._q(
                    f"{_MSG_FROM} WHERE sub_id = $1 AND {_LIVE} "
                    "AND seq = ANY($3::bigint[]) ORDER BY seq"
                ),
                sub_id,
                now,
                list(seqs),
            )
        return [_msg(r) for r in rows]

    async def delete_messages(
        self, sub_id: str, seqs: Sequence[int] | None, *, now: float, unclaimed_only: bool
    ) -> int:
        async with self._tx() as conn:
            await self._require(conn, sub_id)
            status = await conn.execute(
                self._q(
                    "UPDATE {s}.messages SET state = $2, claim_id = NULL WHERE sub_id = $1 "
                    "AND state = $3 AND ($4::bigint[] IS NULL OR seq = ANY($4::bigint[])) "
                    "AND NOT ($5 AND claim_id IS NOT NULL AND visible_at > $6)"
                ),
                sub_id,
                ACKED,
                READY,
                list(seqs) if seqs is not None else None,
                unclaimed_only,
                now,
            )
        return self._count(status)

    async def get_claim(self, sub_id: str, claim_id: str, *, now: float) -> Claim:
        async with self._conn() as conn:
            row = await self._live_claim(conn, sub_id, claim_id, now, lock=False)
            rows = await conn.fetch(
                self._q(
                    f"{_MSG_FROM} WHERE claim_id = $1 AND sub_id = $2 AND state = $3 ORDER BY seq"
                ),
                claim_id,
                sub_id,
                READY,
            )
        return Claim(
            id=claim_id,
            subscription=sub_id,
            expires_at=row["expires_at"],
            messages=[_msg(r) for r in rows],
            created_at=row["created_at"],
            ttl=row["ttl"],
        )

    async def stats(self, sub_id: str, *, now: float) -> QueueStats:
        async with self._conn() as conn:
            await self._require(conn, sub_id)
            row = await conn.fetchrow(
                self._q(
                    "SELECT count(*) FILTER (WHERE visible_at <= $2) AS free, "
                    "count(*) FILTER (WHERE visible_at > $2 AND claim_id IS NOT NULL) AS claimed, "
                    "count(*) FILTER (WHERE visible_at > $2 AND claim_id IS NULL) AS delayed, "
                    f"min(seq) AS low, max(seq) AS high FROM {{s}}.messages "
                    f"WHERE sub_id = $1 AND {_LIVE}"
                ),
                sub_id,
                now,
            )
            assert row is not None  # an aggregate always answers one row
            ends = []
            if row["low"] is not None:
                ends = await conn.fetch(
                    self._q(
                        f"{_MSG_FROM} WHERE sub_id = $1 AND seq = ANY($2::bigint[]) ORDER BY seq"
                    ),
                    sub_id,
                    [row["low"], row["high"]],
                )
        msgs = [_msg(r) for r in ends]
        return QueueStats(
            free=row["free"],
            claimed=row["claimed"],
            delayed=row["delayed"],
            oldest=msgs[0] if msgs else None,
            newest=msgs[-1] if msgs else None,
        )

    async def ack_upto(self, sub_id: str, seq: int) -> int:
        async with self._tx() as conn:
            await self._require(conn, sub_id)
            status = await conn.execute(
                self._q(
                    "UPDATE {s}.messages SET state = $3 WHERE sub_id = $1 AND seq <= $2 "
                    "AND state = $4 AND claim_id IS NULL"
                ),
                sub_id,
                seq,
                ACKED,
                READY,
            )
        return self._count(status)

    async def acked_upto(self, sub_id: str) -> int:
        async with self._conn() as conn:
            _, last = await self._require(conn, sub_id)
            low = await conn.fetchval(
                self._q("SELECT min(seq) FROM {s}.messages WHERE sub_id = $1 AND state = $2"),
                sub_id,
                READY,
            )
        return last if low is None else int(low) - 1

    async def dead_letters(self, sub_id: str, *, after: int, limit: int) -> list[Message]:
        async with self._conn() as conn:
            await self._require(conn, sub_id)
            rows = await conn.fetch(
                self._q(
                    f"{_MSG_FROM} WHERE m.sub_id = $1 AND m.state = $2 AND m.seq > $3 "
                    "ORDER BY m.seq LIMIT $4"
                ),
                sub_id,
                DEAD,
                after,
                limit,
            )
        return [_msg(r) for r in rows]

    async def redrive(self, sub_id: str, seqs: Sequence[int] | None) -> int:
        async with self._tx() as conn:
            await self._require(conn, sub_id)
            status = await conn.execute(
                self._q(
                    "UPDATE {s}.messages SET state = $2, deliveries = 0, visible_at = 0, "
                    "claim_id = NULL WHERE sub_id = $1 AND state = $3 "
                    "AND ($4::bigint[] IS NULL OR seq = ANY($4::bigint[]))"
                ),
                sub_id,
                READY,
                DEAD,
                list(seqs) if seqs is not None else None,
            )
        return self._count(status)
