"""Server-Sent Events: live delivery, Last-Event-ID resume without loss, gaps, heartbeats."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from tests.hub.sse import Frame, frames
from tests.hub.test_api import cloudevent, publish


async def collect(
    client: httpx.AsyncClient,
    path: str,
    n: int,
    *,
    headers: dict[str, str] | None = None,
    kinds: tuple[str, ...] = ("cloudevent", "gap"),
) -> list[Frame]:
    got: list[Frame] = []
    async with client.stream("GET", path, headers=headers or {}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        async for f in frames(r):
            if f.event in kinds:
                got.append(f)
                if len(got) == n:
                    break
    return got


async def make(client: httpx.AsyncClient, body: dict[str, Any] | None = None) -> str:
    r = await client.post("/v1/subscriptions", json=body or {})
    return str(r.json()["id"])


async def test_live_events_arrive_in_order(
    alice: httpx.AsyncClient, admin: httpx.AsyncClient
) -> None:
    sub = await make(alice)
    reader = asyncio.create_task(collect(alice, f"/v1/subscriptions/{sub}/stream", 5))
    await asyncio.sleep(0.2)  # the stream starts at the end of the queue
    await publish(admin, *(cloudevent(n) for n in range(5)))
    got = await asyncio.wait_for(reader, 10)
    assert [f.id for f in got] == ["1", "2", "3", "4", "5"]
    assert [f.json()["id"] for f in got] == [f"ev-{n}" for n in range(5)]


async def test_reconnect_with_last_event_id_misses_nothing(
    alice: httpx.AsyncClient, admin: httpx.AsyncClient
) -> None:
    sub = await make(alice)
    path = f"/v1/subscriptions/{sub}/stream"
    received: list[str] = []
    publisher = asyncio.create_task(publish(admin, *(cloudevent(n) for n in range(60))))
    last = "0"
    while len(received) < 60:
        # Read a few events, drop the connection, resume from the last id seen.
        want = min(7, 60 - len(received))
        batch = await asyncio.wait_for(
            collect(alice, path, want, headers={"Last-Event-ID": last}), 10
        )
        received += [f.json()["id"] for f in batch]
        last = batch[-1].id or last
    await publisher
    assert received == [f"ev-{n}" for n in range(60)]


async def test_resume_past_retention_gets_an_explicit_gap(
    alice: httpx.AsyncClient, admin: httpx.AsyncClient
) -> None:
    sub = await make(alice, {"retention": {"max_messages": 3, "max_age_s": None}})
    await publish(admin, *(cloudevent(n) for n in range(6)))
    got = await asyncio.wait_for(collect(alice, f"/v1/subscriptions/{sub}/stream?after=1", 4), 10)
    assert got[0].event == "gap"
    assert got[0].json() == {"from": 2, "to": 3, "count": 2}
    assert [f.id for f in got[1:]] == ["4", "5", "6"]
    events = (await alice.get(f"/v1/subscriptions/{sub}/events?after=0")).json()
    assert events["gap"] == {"from": 1, "to": 3, "count": 3}


async def test_heartbeats_flow_when_idle(alice: httpx.AsyncClient) -> None:
    sub = await make(alice)
    got = await asyncio.wait_for(
        collect(alice, f"/v1/subscriptions/{sub}/stream", 2, kinds=("comment",)), 5
    )
    assert [f.data for f in got] == ["hb", "hb"]


async def test_stream_takes_the_token_as_a_query_parameter(
    alice: httpx.AsyncClient, clients: Any, admin: httpx.AsyncClient
) -> None:
    sub = await make(alice)
    await publish(admin, cloudevent(1))
    anon = clients(None)
    got = await asyncio.wait_for(
        collect(anon, f"/v1/subscriptions/{sub}/stream?after=0&access_token=tok-alice", 1), 5
    )
    assert got[0].json()["id"] == "ev-1"
    r = await anon.get(f"/v1/subscriptions/{sub}/stream?access_token=tok-bob")
    assert r.status_code == 404


async def test_slow_client_is_resumed_from_the_store(
    alice: httpx.AsyncClient, admin: httpx.AsyncClient, hub: Any
) -> None:
    hub.fanout.client_queue = 4  # tiny queues make this client lag at once
    sub = await make(alice)
    path = f"/v1/subscriptions/{sub}/stream?after=0"
    got: list[str] = []
    async with alice.stream("GET", path) as r:
        stream = frames(r)
        await publish(admin, *(cloudevent(n) for n in range(40)))
        async for f in stream:
            if f.event == "cloudevent":
                got.append(f.json()["id"])
                if len(got) == 40:
                    break
    assert got == [f"ev-{n}" for n in range(40)]
