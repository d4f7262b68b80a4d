"""A noisy neighbour: one tenant floods ingest, subscriptions and WebSocket frames while
another tenant's publish-to-SSE delay stays under 100 ms at the 99th percentile. On every
store; every loop is bounded in time and stops by itself.

The quiet tenant is measured alone first, in the same run: on a machine other work loads
(a shared CI host, a PostgreSQL whose fsync waits behind other processes' I/O) its p99 alone
can pass 100 ms, and what the hub answers for is the flood's effect. So the bound is 100 ms,
or twice the quiet tenant's own p99 alone where that is above 50 ms."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import websockets

from keel.hub import CloudEvent, Hub, HubServer
from tests.hub.sse import frames

SECONDS = 3.0
QUIET_RATE = 20  # events/s of the measured tenant
P99_MS = 100


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q / 100))]


async def quiet_alone(
    bob: httpx.AsyncClient, sub: str, ingest: Callable[[str], Awaitable[None]]
) -> float:
    """The quiet tenant's publish-to-SSE p99 with nobody else about."""
    hub_sent: dict[str, float] = {}
    got: list[float] = []
    async with bob.stream("GET", f"/v1/subscriptions/{sub}/stream", timeout=30) as r:
        lines = frames(r)
        ingests = []
        for n in range(int(1.5 * QUIET_RATE)):
            event_id = f"alone-{n}"
            hub_sent[event_id] = time.perf_counter()
            ingests.append(asyncio.create_task(ingest(event_id)))
            await asyncio.sleep(1 / QUIET_RATE)
        async with asyncio.timeout(20):
            async for frame in lines:
                if frame.event == "cloudevent":
                    got.append((time.perf_counter() - hub_sent[frame.json()["id"]]) * 1000)
                    if len(got) == len(hub_sent):
                        break
        await asyncio.gather(*ingests)
    return percentile(got, 99)


async def test_a_flooding_tenant_does_not_slow_another_tenants_stream(
    server: HubServer, alice: httpx.AsyncClient, bob: httpx.AsyncClient
) -> None:
    hub = server.hub

    async def ingest_quiet(event_id: str) -> None:
        await hub.ingest(CloudEvent(id=event_id, source="s", type="t", tenant="p-two"))

    quiet_sub = (await bob.post("/v1/subscriptions", json={})).json()["id"]
    # The noisy tenant's own subscriptions: adversarial patterns, and one matching all.
    noisy_subs = [
        (await alice.post("/v1/subscriptions", json=spec)).json()["id"]
        for spec in (
            {"types": ["*" * 200 + "x", "a*" * 100 + "b"]},
            {"filters": [{"not": {"any": [{"prefix": {"type": "z" * 150}}] * 20}}]},
            {},
        )
    ]
    deadline = time.monotonic() + SECONDS
    sent: dict[str, float] = {}
    delays: list[float] = []
    streaming = asyncio.Event()
    done = asyncio.Event()  # every quiet event is published

    async def read_quiet_stream() -> None:
        async with bob.stream("GET", f"/v1/subscriptions/{quiet_sub}/stream", timeout=30) as r:
            streaming.set()
            async for frame in frames(r):
                if frame.event == "cloudevent":
                    event_id = frame.json()["id"]
                    delays.append((time.perf_counter() - sent[event_id]) * 1000)
                    if done.is_set() and len(delays) == len(sent):
                        return

    async def publish_quiet() -> None:
        # At a steady rate, each ingest on its own (as a bus listener runs its handlers).
        n = 0
        start = time.monotonic()
        pending = []
        while time.monotonic() < deadline:
            await asyncio.sleep(max(0.0, start + n / QUIET_RATE - time.monotonic()))
            event_id = f"quiet-{n}"
            sent[event_id] = time.perf_counter()
            pending.append(asyncio.create_task(ingest_quiet(event_id)))
            n += 1
        await asyncio.gather(*pending)

    async def flood_ingest() -> None:
        while time.monotonic() < deadline:
            await hub.ingest(
                CloudEvent(
                    id=uuid.uuid4().hex,
                    source="s",
                    type="a" * 400,
                    tenant="p-one",
                    data={"pad": "x" * 500},
                )
            )

    async def flood_subscriptions() -> None:
        while time.monotonic() < deadline:
            r = await alice.post("/v1/subscriptions", json={"types": ["*" * 250]})
            if r.status_code == 201:
                await alice.delete(f"/v1/subscriptions/{r.json()['id']}")
            await alice.post("/v1/subscriptions", content=b"[" * 60000)

    async def flood_websocket() -> None:
        url = f"ws://127.0.0.1:{server.port}/v1/subscriptions/{noisy_subs[2]}/ws"
        async with websockets.connect(url + "?access_token=tok-alice") as ws:
            n = 0
            while time.monotonic() < deadline:
                junk = ["[" * 4000, "not json", json.dumps({"type": "ack", "seq": 10**30})]
                await ws.send(junk[n % 3] if n % 4 else json.dumps({"type": "ack", "seq": n}))
                n += 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(ws.recv(), 0.5)

    baseline = await quiet_alone(bob, quiet_sub, ingest_quiet)
    deadline = time.monotonic() + SECONDS
    reader = asyncio.create_task(read_quiet_stream())
    await asyncio.wait_for(streaming.wait(), 10)
    noise = [
        *(asyncio.create_task(flood_ingest()) for _ in range(64)),
        asyncio.create_task(flood_subscriptions()),
        *(asyncio.create_task(flood_websocket()) for _ in range(3)),
    ]
    await publish_quiet()
    done.set()
    await asyncio.gather(*noise)
    await asyncio.wait_for(reader, 20)
    assert len(delays) == len(sent) >= SECONDS * QUIET_RATE * 0.8
    p99 = percentile(delays, 99)
    noisy = (await alice.get(f"/v1/subscriptions/{noisy_subs[2]}")).json()["last_seq"]
    assert noisy > len(sent), "the flood did not flood"
    bound = max(P99_MS, 2 * baseline)
    assert p99 < bound, (
        f"quiet tenant p99 {p99:.0f} ms under a flood of {noisy} events ({baseline:.0f} ms alone)"
    )


# --- admission: a tenant's fair share of the hub's work ----------------------------------


def hold_commits(hub: Hub) -> asyncio.Event:
    """Hold every commit until the returned event is set: what is admitted stays in flight."""
    gate = asyncio.Event()
    append = hub.store.append

    async def held(batch: Any, *, now: float) -> Any:
        await gate.wait()
        return await append(batch, now=now)

    hub.store.append = held  # type: ignore[method-assign]
    return gate


def noisy_event(n: int, tenant: str = "p-one") -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": f"{tenant}-{n}",
        "source": "s",
        "type": "t",
        "tenant": tenant,
    }


async def until(condition: Callable[[], bool], timeout: float = 10) -> None:
    for _ in range(int(timeout / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the condition did not come true")


async def committed_ids(client: httpx.AsyncClient, sub: str) -> list[str]:
    r = await client.get(f"/v1/subscriptions/{sub}/events", params={"limit": 1000})
    return [m["event"]["id"] for m in r.json()["messages"]]


async def test_the_default_share_is_four_events_in_flight(hub: Hub) -> None:
    # 4, not 8 (docs/hub-api.md): with SQLite's one writer every commit a flood fills is one
    # another tenant's event can wait behind, and its length grows with the flood's share.
    # `python -m bench hub` measured the quiet tenant's SSE p99 beside the hostile one at
    # 6.4-7.3 ms with 8 and 4.35 ms with 4 (alone: 2.6-3.0 ms).
    assert Hub.__init__.__kwdefaults__["fair_share"] == 4
    assert hub.admission.share == 4


async def test_a_tenant_alone_is_never_refused_past_its_share(
    hub: Hub, alice: httpx.AsyncClient, admin: httpx.AsyncClient
) -> None:
    sub = (await alice.post("/v1/subscriptions", json={})).json()["id"]
    gate = hold_commits(hub)
    n = 4 * hub.admission.share
    posts = [asyncio.create_task(admin.post("/v1/events", json=noisy_event(i))) for i in range(n)]
    await until(lambda: hub.admission.inflight("p-one") >= n)
    gate.set()
    answers = await asyncio.gather(*posts)
    assert [r.status_code for r in answers] == [202] * n
    assert sorted(await committed_ids(alice, sub)) == sorted(f"p-one-{i}" for i in range(n))


async def test_past_its_share_while_another_tenant_waits_http_is_429_and_the_bus_waits(
    hub: Hub, alice: httpx.AsyncClient, bob: httpx.AsyncClient, admin: httpx.AsyncClient
) -> None:
    noisy_sub = (await alice.post("/v1/subscriptions", json={})).json()["id"]
    quiet_sub = (await bob.post("/v1/subscriptions", json={})).json()["id"]
    share = hub.admission.share
    gate = hold_commits(hub)
    # The other tenant's event waits for its commit.
    quiet = asyncio.create_task(
        hub.ingest(CloudEvent(id="quiet-0", source="s", type="t", tenant="p-two"))
    )
    await until(lambda: hub.admission.inflight("p-two") >= 1)
    # Over HTTP: the first `share` are accepted (held), the rest refused at once.
    posts = [
        asyncio.create_task(admin.post("/v1/events", json=noisy_event(i))) for i in range(3 * share)
    ]
    await until(lambda: sum(p.done() for p in posts) >= 2 * share)
    refused = [p.result() for p in posts if p.done()]
    assert len(refused) == 2 * share
    for r in refused:
        assert r.status_code == 429
        assert r.headers["retry-after"] == "1"
        assert r.headers["content-type"] == "application/json"
        error = r.json()["error"]
        assert error["code"] == "too_many_requests"
        assert error["status"] == 429
        assert error["retry_after"] == 1
        assert error["limit"] == share
    # On the bus path the same tenant waits in line instead: nothing is refused.
    bus = [
        asyncio.create_task(
            hub.ingest(CloudEvent(id=f"bus-{i}", source="s", type="t", tenant="p-one"))
        )
        for i in range(share)
    ]
    await asyncio.sleep(0.1)
    assert not any(b.done() for b in bus)
    assert hub.admission.inflight("p-one") == share
    gate.set()
    async with asyncio.timeout(20):
        await quiet
        await asyncio.gather(*bus)
        accepted = [r for r in await asyncio.gather(*posts) if r.status_code != 429]
    assert [r.status_code for r in accepted] == [202] * share
    # Nothing accepted is lost, nothing refused was committed.
    ids = {r.json()["id"] for r in accepted} | {f"bus-{i}" for i in range(share)}
    assert sorted(await committed_ids(alice, noisy_sub)) == sorted(ids)
    assert await committed_ids(bob, quiet_sub) == ["quiet-0"]
    assert hub.admission.inflight("p-one") == hub.admission.inflight("p-two") == 0
    # The refusal said when to come back: then the event is taken.
    again = await admin.post("/v1/events", content=refused[0].request.content)
    assert again.status_code == 202
