"""The per-project subscription quota holds under concurrent creates: in one hub on every
store, and from two hub processes sharing one multi-process store (over HTTP)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from keel.errors import QuotaExceeded
from keel.hub import Hub, HubServer, StaticTokens, Store
from tests.hub.conftest import MULTI_PROCESS, STORES, TOKENS, another_view, drop

QUOTA = 4
CREATES = 16


async def test_concurrent_creates_never_pass_the_quota(store: Store) -> None:
    hub = Hub(store, StaticTokens(TOKENS), quota_subscriptions=QUOTA)
    await hub.start()
    try:
        alice = TOKENS["tok-alice"]
        results = await asyncio.gather(
            *(hub.create_subscription(alice, {}) for _ in range(CREATES)), return_exceptions=True
        )
        created = [r for r in results if not isinstance(r, BaseException)]
        refused = [r for r in results if isinstance(r, QuotaExceeded)]
        assert len(created) == QUOTA
        assert len(refused) == CREATES - QUOTA
        assert await store.count_subscriptions("p-one") == QUOTA
        # Another project has its own quota.
        await hub.create_subscription(TOKENS["tok-bob"], {})
    finally:
        await hub.stop()


@pytest.mark.parametrize("name", MULTI_PROCESS)
async def test_two_hubs_share_the_quota_over_http(name: str, tmp_path: Path) -> None:
    store = await STORES[name](tmp_path)
    other = await another_view(store)
    hubs = [Hub(s, StaticTokens(TOKENS), quota_subscriptions=QUOTA) for s in (store, other)]
    for h in hubs:
        await h.start()
    try:
        async with HubServer(hubs[0]) as one, HubServer(hubs[1]) as two:
            clients = [
                httpx.AsyncClient(base_url=s.url, headers={"X-Auth-Token": "tok-alice"})
                for s in (one, two)
            ]
            try:
                answers = await asyncio.gather(
                    *(
                        clients[n % 2].post("/v1/subscriptions", json={"types": [f"t{n}"]})
                        for n in range(CREATES)
                    )
                )
            finally:
                for c in clients:
                    await c.aclose()
        statuses = sorted(r.status_code for r in answers)
        assert statuses == [201] * QUOTA + [409] * (CREATES - QUOTA)
        for r in answers:
            if r.status_code == 409:
                assert r.json()["error"]["code"] == "quota_exceeded"
                assert "quota" in r.json()["error"]["message"]
        assert await store.count_subscriptions("p-one") == QUOTA
    finally:
        for h in hubs:
            await h.stop()
        await other.close()
        await drop(store)
