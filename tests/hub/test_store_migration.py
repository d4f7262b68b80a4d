"""Every earlier store layout opens as the current one, data intact, in both stores.

The layouts: before issue 13 (a body in every message row), issue 13's (bodies once in
``events``, ``messages.event_id``), and the Zaqar branch's (a body in every row, plus the
message expiry and the claims' creation time and ttl). One migration path per store takes
each of them to the current layout (bodies once, and the Zaqar columns)."""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import msgspec
import pytest

from keel.hub import SQLiteStore
from keel.hub.stores.base import Routed, Store, Subscription
from keel.hub.stores.postgres import PostgresStore
from keel.hub.stores.sqlite import SCHEMA_VERSION
from tests.servers import server_url

NOW = 1_000.0


@dataclass(frozen=True)
class Layout:
    body_in_row: bool  # messages.event (else events + messages.event_id)
    expiry: bool  # messages.expires_at
    claim_times: bool  # claims.created_at, claims.ttl
    user_version: int  # SQLite's PRAGMA user_version


LAYOUTS = {
    "before-issue-13": Layout(body_in_row=True, expiry=False, claim_times=False, user_version=0),
    "issue-13": Layout(body_in_row=False, expiry=False, claim_times=False, user_version=2),
    "zaqar-branch": Layout(body_in_row=True, expiry=True, claim_times=True, user_version=0),
}

# (sub_id, seq, body, visible_at, claim_id, expires_at); events in queue order get ids 1..n.
ROWS = [
    ("a", 1, b'{"n":"a1"}', 0.0, None, NOW + 100),
    ("a", 2, b'{"n":"a2"}', NOW + 50, "clm-1", None),
    ("b", 1, b'{"n":"b1"}', 0.0, None, None),
]


def _ddl(layout: Layout, *, pg: bool) -> str:
    blob, real, integer = (
        ("BYTEA", "DOUBLE PRECISION", "BIGINT") if pg else ("BLOB", "REAL", "INTEGER")
    )
    body = f"event {blob} NOT NULL" if layout.body_in_row else f"event_id {integer} NOT NULL"
    expiry = f", expires_at {real}" if layout.expiry else ""
    times = (
        f", created_at {real} NOT NULL DEFAULT 0, ttl {real} NOT NULL DEFAULT 0"
        if layout.claim_times
        else ""
    )
    events = (
        ""
        if layout.body_in_row
        else f"CREATE TABLE events (id {integer} PRIMARY KEY, body {blob} NOT NULL);"
    )
    if pg and not layout.body_in_row:
        events = "CREATE TABLE events (id BIGSERIAL PRIMARY KEY, body BYTEA NOT NULL);"
    return f"""
CREATE TABLE subscriptions (
    id TEXT PRIMARY KEY, project TEXT NOT NULL, body TEXT NOT NULL,
    last_seq {integer} NOT NULL DEFAULT 0, first_seq {integer} NOT NULL DEFAULT 1,
    dropped {integer} NOT NULL DEFAULT 0, max_messages {integer}, max_age_s {real}
);
{events}
CREATE TABLE messages (
    sub_id TEXT NOT NULL, seq {integer} NOT NULL, {body}, state TEXT NOT NULL,
    deliveries {integer} NOT NULL DEFAULT 0, visible_at {real} NOT NULL DEFAULT 0,
    claim_id TEXT, enqueued_at {real} NOT NULL{expiry}, PRIMARY KEY (sub_id, seq)
);
CREATE INDEX messages_state ON messages (sub_id, state, seq);
CREATE TABLE claims (id TEXT PRIMARY KEY, sub_id TEXT NOT NULL, expires_at {real} NOT NULL{times});
CREATE TABLE ingested (event_id TEXT PRIMARY KEY, at {real} NOT NULL);
"""


def _inserts(layout: Layout) -> list[tuple[str, tuple[object, ...]]]:
    """The statements (SQLite's ``?`` placeholders) that fill a layout."""
    out: list[tuple[str, tuple[object, ...]]] = []
    for sub_id, last in (("a", 2), ("b", 1)):
        sub = Subscription(id=sub_id, project="p", user="u", spec={}, created_at=NOW)
        body = msgspec.json.encode(sub).decode()
        out.append(
            (
                "INSERT INTO subscriptions (id, project, body, last_seq, max_messages, max_age_s) "
                "VALUES (?, ?, ?, ?, NULL, NULL)",
                (sub_id, "p", body, last),
            )
        )
    for n, (sub_id, seq, body, visible, claim, expires) in enumerate(ROWS, 1):
        cols = ["sub_id", "seq", "state", "deliveries", "visible_at", "claim_id", "enqueued_at"]
        values: list[object] = [sub_id, seq, "ready", 1 if claim else 0, visible, claim, NOW]
        if layout.body_in_row:
            cols.append("event")
            values.append(body)
        else:
            out.append(("INSERT INTO events (id, body) VALUES (?, ?)", (n, body)))
            cols.append("event_id")
            values.append(n)
        if layout.expiry:
            cols.append("expires_at")
            values.append(expires)
        marks = ", ".join("?" * len(cols))
        out.append((f"INSERT INTO messages ({', '.join(cols)}) VALUES ({marks})", tuple(values)))
    claim_cols, claim_values = ["id", "sub_id", "expires_at"], ["clm-1", "a", NOW + 50]
    if layout.claim_times:
        claim_cols += ["created_at", "ttl"]
        claim_values += [NOW - 10, 60.0]
    marks = ", ".join("?" * len(claim_cols))
    out.append(
        (f"INSERT INTO claims ({', '.join(claim_cols)}) VALUES ({marks})", tuple(claim_values))
    )
    return out


def _pg(sql: str) -> str:
    n = 0
    out = []
    for ch in sql:
        if ch == "?":
            n += 1
            out.append(f"${n}")
        else:
            out.append(ch)
    return "".join(out)


async def _old_sqlite(tmp: Path, layout: Layout) -> Store:
    path = tmp / "hub.db"
    db = sqlite3.connect(path)
    db.executescript(_ddl(layout, pg=False))
    for sql, args in _inserts(layout):
        db.execute(sql, args)
    db.execute(f"PRAGMA user_version={layout.user_version}")
    db.commit()
    db.close()
    return SQLiteStore(path)


async def _old_postgres(tmp: Path, layout: Layout) -> Store:
    schema = f"m_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(server_url("postgres"))
    try:
        await conn.execute(f"CREATE SCHEMA {schema}; SET search_path TO {schema}")
        await conn.execute(_ddl(layout, pg=True))
        for sql, args in _inserts(layout):
            await conn.execute(_pg(sql), *args)
        if not layout.body_in_row:
            await conn.execute("SELECT setval(pg_get_serial_sequence('events', 'id'), 3)")
    finally:
        await conn.close()
    return PostgresStore(server_url("postgres"), schema=schema)


async def _columns(store: Store, table: str) -> set[str]:
    if isinstance(store, SQLiteStore):
        db = sqlite3.connect(store.path)
        try:
            return {r[1] for r in db.execute(f"PRAGMA table_info({table})")}
        finally:
            db.close()
    assert isinstance(store, PostgresStore)
    conn = await asyncpg.connect(store.url)
    try:
        rows = await conn.fetch(
            "SELECT column_name FROM information_schema.columns "
            "WHERE table_schema = $1 AND table_name = $2",
            store.schema,
            table,
        )
    finally:
        await conn.close()
    return {r[0] for r in rows}


@pytest.fixture(params=sorted(LAYOUTS))
def layout(request: pytest.FixtureRequest) -> Layout:
    return LAYOUTS[request.param]


@pytest.fixture(params=["sqlite", "postgres"])
async def old_store(
    request: pytest.FixtureRequest, tmp_path: Path, layout: Layout
) -> AsyncIterator[Store]:
    make = _old_sqlite if request.param == "sqlite" else _old_postgres
    store = await make(tmp_path, layout)
    yield store
    await store.close()
    if isinstance(store, PostgresStore):
        conn = await asyncpg.connect(store.url)
        await conn.execute(f"DROP SCHEMA {store.schema} CASCADE")
        await conn.close()


async def _bodies(store: Store, sub_id: str) -> list[str]:
    _, messages = await store.read(sub_id, after=0, limit=10)
    return [msgspec.json.decode(bytes(m.event))["n"] for m in messages]


async def test_an_earlier_layout_opens_as_the_current_one(old_store: Store, layout: Layout) -> None:
    await old_store.open()
    assert await _bodies(old_store, "a") == ["a1", "a2"]
    assert await _bodies(old_store, "b") == ["b1"]
    _, messages = await old_store.read("a", after=0, limit=10)
    assert messages[0].expires_at == (NOW + 100 if layout.expiry else None)
    claim = await old_store.get_claim("a", "clm-1", now=NOW)
    assert [m.seq for m in claim.messages] == [2]
    assert (claim.ttl, claim.created_at) == ((60.0, NOW - 10) if layout.claim_times else (0, 0))
    assert "event" not in await _columns(old_store, "messages")
    assert {"event_id", "expires_at"} <= await _columns(old_store, "messages")
    assert {"created_at", "ttl"} <= await _columns(old_store, "claims")
    # New events get bodies of their own, never one of the migrated rows'.
    new = msgspec.json.encode({"n": "new"})
    await old_store.append([Routed("e-new", new, ("a", "b"), ttl=30)], now=NOW)
    assert await _bodies(old_store, "a") == ["a1", "a2", "new"]
    assert await _bodies(old_store, "b") == ["b1", "new"]
    # The clean-up of unreferenced bodies keeps every body a queue holds.
    await old_store.enforce_retention(now=NOW + 1)
    assert await _bodies(old_store, "a") == ["a1", "a2", "new"]
    # A second open finds the current layout and changes nothing.
    if isinstance(old_store, SQLiteStore):
        await old_store.close()
        again: Store = SQLiteStore(old_store.path)
    else:
        assert isinstance(old_store, PostgresStore)
        again = PostgresStore(old_store.url, schema=old_store.schema)
    await again.open()
    try:
        assert await _bodies(again, "b") == ["b1", "new"]
    finally:
        await again.close()
    if isinstance(old_store, SQLiteStore):
        db = sqlite3.connect(old_store.path)
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        db.close()
