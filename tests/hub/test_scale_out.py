"""Stores that declare ``multi_process``: two hub processes' views of one store append with
gapless, unique sequence numbers, claim disjoint messages, and each hub routes and streams
what the other committed (change notifications)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import msgspec
import pytest

from keel.hub import CloudEvent, Hub, HubServer, StaticTokens
from keel.hub.stores.base import Routed, Store, Subscription
from tests.helpers import eventually
from tests.hub.conftest import MULTI_PROCESS, STORES, TOKENS, another_view, drop
from tests.hub.sse import frames

NOW = 2_000_000.0


@pytest.fixture(params=MULTI_PROCESS)
async def shared(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    store = await STORES[request.param](tmp_path)
    assert type(store).multi_process
    yield store
    await drop(store)


async def test_two_views_append_and_claim_without_collisions(shared: Store) -> None:
    other = await another_view(shared)
    try:
        sub = Subscription(id="s", project="p", user="u", spec={}, created_at=NOW)
        await shared.create_subscription(sub)

        async def writer(view: Store, tag: str) -> None:
            for n in range(40):
                body = msgspec.json.encode({"id": f"{tag}{n}"})
                await view.append(
                    [Routed(f"{tag}{n}-{k}", body, ("s",)) for k in range(5)], now=NOW
                )

        await asyncio.gather(writer(shared, "a"), writer(other, "b"))
        _, messages = await shared.read("s", after=0, limit=1000)
        assert [m.seq for m in messages] == list(range(1, 401))

        claimed: dict[str, list[int]] = {"a": [], "b": []}

        async def claimer(view: Store, tag: str) -> None:
            while True:
                claim = await view.claim("s", limit=7, ttl=60, now=NOW, max_deliveries=5)
                if claim is None:
                    return
                claimed[tag] += [m.seq for m in claim.messages]

        await asyncio.gather(claimer(shared, "a"), claimer(other, "b"))
        assert not set(claimed["a"]) & set(claimed["b"])
        assert sorted(claimed["a"] + claimed["b"]) == list(range(1, 401))
    finally:
        await other.close()


async def test_two_hubs_route_and_stream_what_the_other_committed(
    shared: Store, tmp_path: Path
) -> None:
    other = await another_view(shared)
    alice = TOKENS["tok-alice"]
    a, b = Hub(shared, StaticTokens(TOKENS)), Hub(other, StaticTokens(TOKENS))
    await a.start()
    await b.start()
    try:
        async with HubServer(a) as server:
            sub = await a.create_subscription(alice, {})  # b learns of it by notification

            probe = CloudEvent(id="x", source="s", type="t", tenant="p-one")
            await eventually(lambda: sub.id in b.route(probe))
            headers = {"X-Auth-Token": "tok-alice"}
            async with (
                httpx.AsyncClient(base_url=server.url, headers=headers, timeout=10) as c,
                c.stream("GET", f"/v1/subscriptions/{sub.id}/stream") as r,
            ):
                got = []
                stream = frames(r)
                await b.ingest(CloudEvent(id="from-b", source="s", type="t", tenant="p-one"))
                async with asyncio.timeout(5):
                    async for f in stream:
                        if f.event == "cloudevent":
                            got.append(f.json()["id"])
                            break
                assert got == ["from-b"]
    finally:
        await a.stop()
        await b.stop()
        await other.close()
