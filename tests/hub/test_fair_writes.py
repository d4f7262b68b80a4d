"""Two more guards of one tenant against another's flood, on every store:

- subscription creates are rate-limited per project while another project is active (a
  token bucket; a project alone, and every delete, is never held back);
- on a store that commits in parallel, another tenant's event does not wait for the
  commits a flooding tenant keeps busy: one more commit starts for it.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import httpx

from keel.errors import TooManyRequests
from keel.hub import CloudEvent, Hub, HubServer, StaticTokens, Store
from keel.hub._core import _WriteRate
from keel.hub.stores.base import Appended, Routed
from keel.hub.zaqar import ZaqarConfig
from tests.hub.conftest import TOKENS

ALICE = TOKENS["tok-alice"]  # p-one
BOB = TOKENS["tok-bob"]  # p-two


def event(tenant: str) -> CloudEvent:
    return CloudEvent(id=uuid.uuid4().hex, source="t", type="t.e", tenant=tenant, data={})


async def test_subscription_creates_are_rate_limited_only_while_another_project_is_active(
    store: Store,
) -> None:
    hub = Hub(
        store,
        StaticTokens(TOKENS),
        quota_subscriptions=100,
        subscription_rate=2,
        subscription_burst=3,
        fair_window=30,  # bob stays active for the whole test
    )
    await hub.start()
    try:
        alone = [await hub.create_subscription(ALICE, {}) for _ in range(8)]  # nobody else
        await hub.ingest(event(BOB.project))  # bob is active from now on
        for _ in range(3):  # the burst
            await hub.create_subscription(ALICE, {})
        try:
            await hub.create_subscription(ALICE, {})
        except TooManyRequests as exc:
            refused = exc
        else:
            raise AssertionError("the fourth create of the burst was accepted")
        assert refused.retry_after == 1  # type: ignore[attr-defined]
        assert "nothing was changed" in refused.message
        listed, _ = await hub.list_subscriptions(ALICE, limit=100, marker=None)
        assert len(listed) == 11  # the refused create made nothing
        for sub in alone:  # deletes are never held back
            await hub.delete_subscription(ALICE, sub.id)
        await hub.create_subscription(BOB, {})  # bob's own bucket is full
        await asyncio.sleep(0.6)  # 2/s: one token back
        await hub.create_subscription(ALICE, {})
    finally:
        await hub.stop()


async def one_create_a_second(store: Store, burst: int = 1) -> Hub:
    """A started hub allowing one subscription create per second (after a burst of
    ``burst``) while another project is active (each test makes bob active for the whole
    test)."""
    hub = Hub(
        store,
        StaticTokens(TOKENS),
        quota_subscriptions=100,
        subscription_rate=1,
        subscription_burst=burst,
        fair_window=30,
    )
    await hub.start()
    return hub


async def test_a_refused_create_over_http_is_429_with_retry_after(store: Store) -> None:
    hub = await one_create_a_second(store)
    try:
        async with HubServer(hub, heartbeat=0.5) as server:
            await hub.ingest(event(BOB.project))
            base = f"http://127.0.0.1:{server.port}"
            async with httpx.AsyncClient(
                base_url=base, headers={"X-Auth-Token": "tok-alice"}
            ) as alice:
                assert (await alice.post("/v1/subscriptions", json={})).status_code == 201
                r = await alice.post("/v1/subscriptions", json={})
                assert r.status_code == 429, r.text
                assert r.headers["Retry-After"] == "1"
                error = r.json()["error"]
                assert error["code"] == "too_many_requests"
                assert error["retry_after"] == 1
    finally:
        await hub.stop()


def flood_event() -> CloudEvent:
    return CloudEvent(
        id=uuid.uuid4().hex, source="t", type="t.f", tenant=ALICE.project, data="flood-marker"
    )


class _HeldStore:
    """The real store, with the commits of one tenant's events held until released: the
    flooding tenant's commits occupy every slot for as long as the test wants."""

    def __init__(self, store: Store, held_body: bytes) -> None:
        self._store = store
        self._held_body = held_body
        self.release = asyncio.Event()
        self.holding: asyncio.Queue[None] = asyncio.Queue()  # one item per held commit
        self.append_concurrency = 2  # as a store that commits in parallel (PostgreSQL)

    def __getattr__(self, name: str) -> object:
        return getattr(self._store, name)

    async def append(self, batch: list[Routed], *, now: float) -> list[Appended]:
        if any(self._held_body in item.body for item in batch):
            self.holding.put_nowait(None)
            await self.release.wait()
        return await self._store.append(batch, now=now)


async def test_another_tenants_event_commits_while_a_flood_holds_every_commit_slot(
    store: Store,
) -> None:
    held = _HeldStore(store, b"flood-marker")
    hub = Hub(held, StaticTokens(TOKENS), quota_subscriptions=100)  # type: ignore[arg-type]
    await hub.start()
    flood: list[asyncio.Task[None]] = []
    try:
        await hub.create_subscription(ALICE, {})
        await hub.create_subscription(BOB, {})
        for _ in range(2):  # one commit each: both slots busy with the flood
            flood.append(asyncio.create_task(hub.ingest(flood_event())))
            async with asyncio.timeout(5):
                await held.holding.get()
        start = time.perf_counter()
        async with asyncio.timeout(5):
            await hub.ingest(event(BOB.project))
        assert time.perf_counter() - start < 1
        assert not any(t.done() for t in flood)
        held.release.set()
        async with asyncio.timeout(10):
            await asyncio.gather(*flood)
    finally:
        held.release.set()
        await hub.stop()
        await asyncio.gather(*flood, return_exceptions=True)


async def test_a_refused_zaqar_queue_create_is_429_in_zaqars_shape(store: Store) -> None:
    hub = await one_create_a_second(store)
    try:
        config = ZaqarConfig(secret_key=b"fair-writes-test-key-0123456789ab")
        async with HubServer(hub, heartbeat=0.5, zaqar=config) as server:
            await hub.ingest(event(BOB.project))
            headers = {"X-Auth-Token": "tok-alice", "Client-ID": str(uuid.uuid4())}
            async with httpx.AsyncClient(base_url=server.url, headers=headers) as alice:
                assert (await alice.put("/v2/queues/first")).status_code == 201
                r = await alice.put("/v2/queues/second")
                assert r.status_code == 429, r.text
                assert r.headers["Retry-After"] == "1"
                assert set(r.json()) == {"title", "description"}
                listed = (await alice.get("/v2/queues")).json()["queues"]
                assert [q["name"] for q in listed] == ["first"]  # the refused one made nothing
    finally:
        await hub.stop()


async def test_a_zaqar_subscription_refused_half_way_leaves_no_queue_behind(store: Store) -> None:
    # A subscription on a queue that does not exist yet is two writes (the queue, then its
    # subscription): with one token left, both are refused, not the second one after the
    # first was made.
    hub = await one_create_a_second(store, burst=2)
    try:
        config = ZaqarConfig(
            secret_key=b"fair-writes-test-key-0123456789ab", require_confirmation=False
        )
        async with HubServer(hub, heartbeat=0.5, zaqar=config) as server:
            await hub.ingest(event(BOB.project))
            headers = {"X-Auth-Token": "tok-alice", "Client-ID": str(uuid.uuid4())}
            async with httpx.AsyncClient(base_url=server.url, headers=headers) as alice:
                assert (await alice.put("/v2/queues/first")).status_code == 201  # 1 of 2
                tee = {"subscriber": "http://example.com/hook", "ttl": 3600}
                r = await alice.post("/v2/queues/second/subscriptions", json=tee)
                assert r.status_code == 429, r.text
                listed = (await alice.get("/v2/queues")).json()["queues"]
                assert [q["name"] for q in listed] == ["first"]
                # On a queue that exists it is one write, and the one token left takes it.
                r = await alice.post("/v2/queues/first/subscriptions", json=tee)
                assert r.status_code == 201, r.text
    finally:
        await hub.stop()


def test_a_request_of_more_writes_than_the_burst_still_passes_a_full_bucket() -> None:
    rate = _WriteRate(rate=1, burst=1)
    rate.take("p-one", True, 2)  # a Zaqar subscription on a new queue, burst 1
    try:
        rate.take("p-one", True, 1)
    except TooManyRequests:
        pass
    else:
        raise AssertionError("the bucket was not emptied")
    for i in range(3000):  # many projects: pruned now and then, never wrong
        rate.take(f"p-{i}", True, 1)
    assert len(rate._buckets) <= 3001
