"""Hub fixtures: stores parametrized over every backend, and a hub serving on 127.0.0.1.

Adding a store means adding it to STORES, nothing else: no test names a store.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from keel.hub import CloudEvent, Hub, HubServer, Principal, SQLiteStore, StaticTokens, Store
from keel.hub.stores.base import Retention, Subscription
from tests.servers import server_url

if TYPE_CHECKING:
    from keel.hub.stores.postgres import PostgresStore

StoreFactory = Callable[[Path], Awaitable[Store]]


async def _sqlite(tmp: Path) -> Store:
    store = SQLiteStore(tmp / "hub.db")
    await store.open()
    return store


async def _postgres(tmp: Path) -> Store:
    from keel.hub.stores.postgres import PostgresStore  # noqa: PLC0415 - needs the server

    store = PostgresStore(server_url("postgres"), schema=f"t_{uuid.uuid4().hex[:12]}")
    await store.open()
    return store


STORES: dict[str, StoreFactory] = {"sqlite": _sqlite, "postgres": _postgres}


def _classes() -> dict[str, type]:
    from keel.hub.stores.postgres import PostgresStore  # noqa: PLC0415

    return {"sqlite": SQLiteStore, "postgres": PostgresStore}


# The stores that declare several hub processes may share them (tests/hub/test_scale_out.py).
MULTI_PROCESS = sorted(name for name, cls in _classes().items() if cls.multi_process)


async def drop(store: Store) -> None:
    await store.close()
    schema = getattr(store, "schema", None)
    if schema is not None:  # PostgreSQL: each test had its own schema; drop it
        import asyncpg  # noqa: PLC0415

        conn = await asyncpg.connect(server_url("postgres"))
        await conn.execute(f"DROP SCHEMA {schema} CASCADE")
        await conn.close()


def plain_sub(
    sub_id: str,
    *,
    max_messages: int | None = None,
    max_age_s: float | None = Retention().max_age_s,
    max_deliveries: int = 5,
) -> Subscription:
    """A subscription record as the store tests make them: no webhook, project "p"."""
    return Subscription(
        id=sub_id,
        webhook=None,
        project="p",
        user="u",
        spec={},
        retention=Retention(max_messages=max_messages, max_age_s=max_age_s),
        max_deliveries=max_deliveries,
        created_at=0.0,
    )


@asynccontextmanager
async def fresh_pg_store(**options: Any) -> AsyncIterator[PostgresStore]:
    """A PostgreSQL store open on a schema of its own, dropped afterwards."""
    from keel.hub.stores.postgres import PostgresStore  # noqa: PLC0415 - needs the server

    store = PostgresStore(server_url("postgres"), schema=f"t_{uuid.uuid4().hex[:12]}", **options)
    await store.open()
    try:
        yield store
    finally:
        await drop(store)


async def another_view(store: Store) -> Store:
    """The same store opened again, as a second hub process would (multi-process stores)."""
    from keel.hub.stores.postgres import PostgresStore  # noqa: PLC0415

    assert isinstance(store, PostgresStore)
    other = PostgresStore(store.url, schema=store.schema)
    await other.open()
    return other


TOKENS = {
    "tok-alice": Principal("alice", "p-one", ("member",)),
    "tok-bob": Principal("bob", "p-two", ("member",)),
    "tok-carol": Principal("carol", "p-one", ("member",)),
    "tok-admin": Principal("root", "p-admin", ("admin",)),
}


@pytest.fixture(params=sorted(STORES))
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    s = await STORES[request.param](tmp_path)
    yield s
    await drop(s)


@pytest.fixture
async def hub(store: Store) -> AsyncIterator[Hub]:
    h = Hub(store, StaticTokens(TOKENS), quota_subscriptions=5)
    await h.start()
    yield h
    await h.stop()


@pytest.fixture
async def server(hub: Hub) -> AsyncIterator[HubServer]:
    async with HubServer(hub, heartbeat=0.5) as srv:
        yield srv


class Clients:
    def __init__(self, base: str) -> None:
        self.base = base
        self._open: list[httpx.AsyncClient] = []

    def __call__(self, token: str | None) -> httpx.AsyncClient:
        headers = {"X-Auth-Token": token} if token else {}
        client = httpx.AsyncClient(base_url=self.base, headers=headers, timeout=10)
        self._open.append(client)
        return client

    async def close(self) -> None:
        for c in self._open:
            await c.aclose()


@pytest.fixture
async def clients(server: HubServer) -> AsyncIterator[Clients]:
    c = Clients(server.url)
    yield c
    await c.close()


@pytest.fixture
def alice(clients: Clients) -> httpx.AsyncClient:
    return clients("tok-alice")


@pytest.fixture
def bob(clients: Clients) -> httpx.AsyncClient:
    return clients("tok-bob")


@pytest.fixture
def admin(clients: Clients) -> httpx.AsyncClient:
    return clients("tok-admin")


def tenant_event(tenant: str) -> CloudEvent:
    """An event of ``tenant`` whose id names it (read back by `Commits`)."""
    return CloudEvent(id=f"{tenant}/{uuid.uuid4().hex}", source="t", type="t.e", tenant=tenant)


class Commits:
    """Every append the hub makes on ``store``: when it started and ended, and whose events
    (`tenant_event`) it held."""

    def __init__(self, store: Store) -> None:
        self.log: list[tuple[float, float, set[str]]] = []
        self._append = store.append
        store.append = self._recorded  # type: ignore[method-assign]

    async def _recorded(self, batch: Sequence[Any], *, now: float) -> Any:
        start = time.monotonic()
        out = await self._append(batch, now=now)
        self.log.append((start, time.monotonic(), {r.event_id.split("/")[0] for r in batch}))
        return out

    def of_only(self, tenants: set[str]) -> list[tuple[float, float, set[str]]]:
        return [c for c in self.log if c[2] <= tenants]
