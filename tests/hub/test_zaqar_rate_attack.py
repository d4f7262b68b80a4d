"""Attacks on 40d8470 (a Zaqar subscription on a new queue counts both writes first; the
rate-limit table pruned only once it doubles): bypasses, one tenant against another, the
table's size, 429 in Zaqar's shape, and what a refused request leaves behind."""

from __future__ import annotations

import tracemalloc
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest

from keel.errors import TooManyRequests
from keel.hub import CloudEvent, Hub, HubServer, StaticTokens, Store, _core
from keel.hub._core import _WriteRate
from keel.hub.zaqar import ZaqarConfig
from tests.hub.conftest import TOKENS

BOB = TOKENS["tok-bob"]  # p-two; alice and carol are p-one
TEE = {"subscriber": "http://example.com/hook", "ttl": 3600}


def _event(tenant: str) -> CloudEvent:
    return CloudEvent(id=uuid.uuid4().hex, source="t", type="t.e", tenant=tenant, data={})


@asynccontextmanager
async def _zaqar(
    store: Store, *, burst: int = 2, quota: int = 100
) -> AsyncIterator[tuple[Hub, httpx.AsyncClient, httpx.AsyncClient]]:
    """A hub allowing one subscription write a second after ``burst``, bob active all along;
    alice's and bob's Zaqar clients."""
    hub = Hub(
        store,
        StaticTokens(TOKENS),
        quota_subscriptions=quota,
        subscription_rate=1,
        subscription_burst=burst,
        fair_window=30,
        refusal_delay=0,  # the bucket's arithmetic, not the tarpit (test_refusal_tarpit.py)
    )
    await hub.start()
    try:
        config = ZaqarConfig(
            secret_key=b"rate-attack-test-key-0123456789ab", require_confirmation=False
        )
        async with HubServer(hub, heartbeat=0.5, zaqar=config) as server:
            await hub.ingest(_event(BOB.project))

            def client(token: str) -> httpx.AsyncClient:
                headers = {"X-Auth-Token": token, "Client-ID": str(uuid.uuid4())}
                return httpx.AsyncClient(base_url=server.url, headers=headers)

            async with client("tok-alice") as alice, client("tok-bob") as bob:
                yield hub, alice, bob
    finally:
        await hub.stop()


async def _queues(client: httpx.AsyncClient) -> list[str]:
    r = await client.get("/v2/queues", params={"limit": 20})
    assert r.status_code == 200, r.text
    return sorted(q["name"] for q in r.json()["queues"])


def _is_zaqar_429(r: httpx.Response) -> None:
    assert r.status_code == 429, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert set(r.json()) == {"title", "description"}
    assert int(r.headers["Retry-After"]) >= 1


async def test_distinct_queue_names_and_case_variants_share_one_bucket(store: Store) -> None:
    async with _zaqar(store, burst=3) as (_, alice, _bob):
        made = [(await alice.put(f"/v2/queues/{n}")).status_code for n in ("q", "Q", "q_")]
        assert made == [201, 201, 201]  # three distinct Zaqar queues, three tokens
        for name in ("QQ", "qQ", "q-1", "q.1"):
            _is_zaqar_429(await alice.put(f"/v2/queues/{name}"))
            _is_zaqar_429(await alice.post(f"/v2/queues/{name}/subscriptions", json=TEE))
        # Non-ASCII names are refused before anything counts (Zaqar's name pattern).
        r = await alice.put("/v2/queues/q%C3%A9")
        assert r.status_code == 400, r.text
        assert await _queues(alice) == ["Q", "q", "q_"]


async def test_a_refused_subscription_on_a_new_queue_is_429_and_makes_nothing(
    store: Store,
) -> None:
    async with _zaqar(store, burst=2) as (hub, alice, _bob):
        assert (await alice.put("/v2/queues/first")).status_code == 201  # one of two left
        for _ in range(3):  # refused again and again: still nothing, still nothing spent
            r = await alice.post("/v2/queues/second/subscriptions", json=TEE)
            _is_zaqar_429(r)
        assert await _queues(alice) == ["first"]
        assert (await alice.get("/v2/queues/second/subscriptions")).json()["subscriptions"] == []
        # The refusals spent nothing: the one token left still takes a one-write request.
        r = await alice.post("/v2/queues/first/subscriptions", json=TEE)
        assert r.status_code == 201, r.text
        listed, _ = await hub.list_subscriptions(TOKENS["tok-alice"], limit=100, marker=None)
        assert len(listed) == 2  # the queue and its tee


async def test_a_project_header_naming_another_project_spends_nothing_and_touches_no_one(
    store: Store,
) -> None:
    async with _zaqar(store, burst=1) as (_, alice, bob):
        for _ in range(20):  # 403 before any counting
            r = await alice.put("/v2/queues/x", headers={"X-Project-Id": BOB.project})
            assert r.status_code == 403, r.text
            r = await alice.put("/v2/queues/x", headers={"X-Project-Id": "P-ONE"})
            assert r.status_code == 403, r.text
        assert (await alice.put("/v2/queues/mine")).status_code == 201
        # alice's own flood of refusals does not reach bob's bucket.
        for _ in range(20):
            _is_zaqar_429(await alice.put("/v2/queues/more"))
        assert (await bob.put("/v2/queues/bobs")).status_code == 201
        assert await _queues(bob) == ["bobs"]


async def test_a_burst_of_one_lets_a_subscription_on_a_new_queue_make_two_writes(
    store: Store,
) -> None:
    # By design (40d8470: "a burst smaller than one request's writes must still pass it"):
    # with burst 1 the two writes cost one token, so at most twice the writes per token.
    async with _zaqar(store, burst=1) as (_, alice, _bob):
        r = await alice.post("/v2/queues/new/subscriptions", json=TEE)
        assert r.status_code == 201, r.text
        _is_zaqar_429(await alice.put("/v2/queues/other"))  # and the bucket is empty after


async def test_a_subscription_refused_by_the_quota_leaves_no_queue_behind(store: Store) -> None:
    # Quota 1: the queue (a Keel subscription) fits, its tee does not. Before the fix the
    # request answered 409 and the queue it made first stayed.
    async with _zaqar(store, burst=10, quota=1) as (_, alice, _bob):
        r = await alice.post("/v2/queues/new/subscriptions", json=TEE)
        assert r.status_code == 409, r.text
        assert await _queues(alice) == []


async def test_a_bad_message_post_to_a_new_queue_makes_no_queue_and_spends_nothing(
    store: Store,
) -> None:
    # Before the fix the post made the lazy queue (and spent a token) before it read the
    # body: a 400 left the queue behind and took alice's only token.
    async with _zaqar(store, burst=1) as (_, alice, _bob):
        bad = [
            {"nothing": []},
            {"messages": []},
            {"messages": [{"body": "x", "ttl": 1}]},
            {"messages": [{"body": "x", "delay": -1}]},
        ]
        for doc in bad:
            r = await alice.post("/v2/queues/lazy/messages", json=doc)
            assert r.status_code == 400, r.text
        r = await alice.post("/v2/queues/lazy/messages", content=b"{not json")
        assert r.status_code == 400, r.text
        assert await _queues(alice) == []
        # The one token left makes the queue of a good post; the next new queue is refused.
        r = await alice.post("/v2/queues/lazy/messages", json={"messages": [{"body": 1}]})
        assert r.status_code == 201, r.text
        assert await _queues(alice) == ["lazy"]
        r = await alice.post("/v2/queues/lazy2/messages", json={"messages": [{"body": 1}]})
        _is_zaqar_429(r)
        r = await alice.post("/v2/queues/lazy/messages", json={"messages": [{"body": 2}]})
        assert r.status_code == 201, r.text  # an existing queue: no write, never refused
        assert await _queues(alice) == ["lazy"]


def test_the_table_stays_bounded_for_100k_tenants(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(_core.time, "monotonic", lambda: now[0])
    rate = _WriteRate(rate=1, burst=20)
    # 100k tenants, none limited (no one else active): full buckets, pruned as they come.
    for i in range(100_000):
        rate.take(f"quiet-{i}", False)
    assert len(rate._buckets) <= 1025
    # 100k tenants each spending one write while others are active: all kept (none full).
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        for i in range(100_000):
            rate.take(f"busy-{i}", True)
        grown = sum(s.size_diff for s in tracemalloc.take_snapshot().compare_to(before, "filename"))
    finally:
        tracemalloc.stop()
    assert 100_000 <= len(rate._buckets) <= 101_025
    assert grown < 40 * 1024 * 1024, grown  # about 20 MB: names, tuples, the dict
    # A second later they are full again: the next pass (once the table has doubled past
    # the last prune's size) drops them all, and a busy tenant keeps its spent bucket.
    now[0] += 30
    rate.take("stays", True)
    for i in range(2 * len(rate._buckets)):
        rate.take(f"late-{i}", False)
        if len(rate._buckets) < 5000:
            break
    assert len(rate._buckets) < 5000
    assert "stays" in rate._buckets
    for _ in range(19):
        rate.take("stays", True)
    with pytest.raises(TooManyRequests):
        rate.take("stays", True)  # its bucket was not reset by the prunes
