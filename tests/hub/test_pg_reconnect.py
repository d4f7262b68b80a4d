"""PostgreSQL store: the change-notification (LISTEN) connection comes back after its backend
is terminated and after a server restart; the hub then resyncs (what the other hub did
meanwhile is routed and streamed), and requests during the outage are a 503 JSON error."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TypeVar

import asyncpg
import httpx

from keel.errors import BackendUnavailable
from keel.hub import CloudEvent, Hub, HubServer, StaticTokens
from keel.hub.stores.postgres import PostgresStore
from tests.helpers import eventually
from tests.hub.conftest import TOKENS, drop
from tests.hub.sse import frames
from tests.servers import server_url, start, stop

T = TypeVar("T")
ALICE = TOKENS["tok-alice"]
PROBE = CloudEvent(id="probe", source="s", type="t", tenant="p-one")


def fast_store(url: str, schema: str) -> PostgresStore:
    return PostgresStore(url, schema=schema, listen_check_s=0.5, reconnect_max_s=0.5)


async def retrying(op: Callable[[], Awaitable[T]], timeout: float = 20) -> T:
    """The store's pool comes back on its own; a caller retries `BackendUnavailable`."""
    async with asyncio.timeout(timeout):
        while True:
            try:
                return await op()
            except BackendUnavailable:
                await asyncio.sleep(0.2)


async def collect(response: httpx.Response, into: list[str]) -> None:
    async for f in frames(response):
        if f.event == "cloudevent":
            into.append(f.json()["id"])  # noqa: PERF401 - the test reads the list meanwhile


@asynccontextmanager
async def hubs(url: str) -> AsyncIterator[tuple[PostgresStore, Hub, Hub]]:
    schema = f"t_{uuid.uuid4().hex[:12]}"
    sa, sb = fast_store(url, schema), fast_store(url, schema)
    await sa.open()
    await sb.open()
    a, b = Hub(sa, StaticTokens(TOKENS)), Hub(sb, StaticTokens(TOKENS))
    await a.start()
    await b.start()
    try:
        yield sa, a, b
    finally:
        await a.stop()
        await b.stop()
        await sb.close()
        await drop(sa)


async def test_listen_reconnects_and_resyncs_after_terminate_and_restart() -> None:
    url = server_url("postgres")
    async with (
        hubs(url) as (sa, a, b),
        HubServer(a, heartbeat=0.5) as server,
        httpx.AsyncClient(
            base_url=server.url, headers={"X-Auth-Token": "tok-alice"}, timeout=10
        ) as client,
    ):
        # 1. The listen backend is terminated: what hub B does next reaches hub A.
        pid = sa.listener_pid
        assert pid is not None
        admin = await asyncpg.connect(url)
        try:
            assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
        finally:
            await admin.close()
        first = await b.create_subscription(ALICE, {})
        await eventually(lambda: sa.listen_reconnects >= 1, 10)
        await eventually(lambda: first.id in a.route(PROBE), 10)
        assert sa.listener_pid not in (None, pid)

        got: list[str] = []
        async with client.stream("GET", f"/v1/subscriptions/{first.id}/stream") as r:
            reader = asyncio.create_task(collect(r, got))
            await asyncio.sleep(0.2)  # the stream has joined the fan-out
            await b.ingest(CloudEvent(id="after-terminate", source="s", type="t", tenant="p-one"))
            await eventually(lambda: got == ["after-terminate"], 10)

            # 2. The server stops: requests are a 503 JSON error, not a traceback.
            await asyncio.to_thread(stop, "postgres")
            down = await client.get(f"/v1/subscriptions/{first.id}")
            assert down.status_code == 503
            assert down.json()["error"]["code"] == "unavailable"
            down = await client.post("/v1/subscriptions", json={})
            assert down.status_code == 503
            down = await client.post(
                "/v1/events",
                json={"specversion": "1.0", "id": "lost", "source": "s", "type": "t"},
                headers={"X-Auth-Token": "tok-admin"},
            )
            assert down.status_code == 503  # not acknowledged: the publisher retries
            assert down.json()["error"]["code"] == "unavailable"

            # 3. It comes back: the pool and the LISTEN connection recover, hub A resyncs.
            await asyncio.to_thread(start, "postgres")
            second = await retrying(lambda: b.create_subscription(ALICE, {}))
            await eventually(lambda: sa.listen_reconnects >= 2, 20)
            await eventually(lambda: second.id in a.route(PROBE), 20)
            # The stream opened before the restart still gets what hub B ingests.
            await retrying(
                lambda: b.ingest(
                    CloudEvent(id="after-restart", source="s", type="t", tenant="p-one")
                )
            )
            await eventually(lambda: got == ["after-terminate", "after-restart"], 10)
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
        again = await client.get(f"/v1/subscriptions/{second.id}")
        assert again.status_code == 200
        await a.ingest(CloudEvent(id="from-a", source="s", type="t", tenant="p-one"))
