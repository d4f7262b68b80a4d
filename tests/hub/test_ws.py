"""The WebSocket stream: live events, gaps, heartbeats, acks over the socket, resume."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
import websockets

from keel.hub import HubServer
from tests.hub.test_api import cloudevent, publish


def ws_url(server: HubServer, sub: str, query: str = "") -> str:
    return f"ws://127.0.0.1:{server.port}/v1/subscriptions/{sub}/ws{query}"


async def receive(ws: Any, n: int, kinds: tuple[str, ...] = ("event", "gap")) -> list[Any]:
    got = []
    async with asyncio.timeout(10):
        while len(got) < n:
            message = json.loads(await ws.recv())
            if message["type"] in kinds:
                got.append(message)
    return got


async def test_events_acks_and_resume_from_the_acked_prefix(
    server: HubServer, alice: httpx.AsyncClient, admin: httpx.AsyncClient
) -> None:
    sub = (await alice.post("/v1/subscriptions", json={})).json()["id"]
    await publish(admin, *(cloudevent(n) for n in range(3)))
    headers = {"X-Auth-Token": "tok-alice"}
    async with websockets.connect(ws_url(server, sub), additional_headers=headers) as ws:
        got = await receive(ws, 3)
        assert [m["seq"] for m in got] == [1, 2, 3]
        assert got[0]["event"]["id"] == "ev-0"
        await ws.send(json.dumps({"type": "ack", "seq": 2}))
        assert (await receive(ws, 1, ("acked",)))[0] == {"type": "acked", "seq": 2, "count": 2}
        await publish(admin, cloudevent(3))
        assert [m["seq"] for m in await receive(ws, 1)] == [4]
        await ws.send("not json")
        assert (await receive(ws, 1, ("error",)))[0]["error"]["status"] == 400
    # Reconnect without a position: everything after the acked prefix (3 and 4) comes again.
    async with websockets.connect(ws_url(server, sub), additional_headers=headers) as ws:
        assert [m["seq"] for m in await receive(ws, 2)] == [3, 4]
        assert len(await receive(ws, 1, ("heartbeat",))) == 1


async def test_gap_and_explicit_position(
    server: HubServer, alice: httpx.AsyncClient, admin: httpx.AsyncClient
) -> None:
    sub = (await alice.post("/v1/subscriptions", json={"retention": {"max_messages": 2}})).json()[
        "id"
    ]
    await publish(admin, *(cloudevent(n) for n in range(5)))
    async with websockets.connect(ws_url(server, sub, "?after=0&access_token=tok-alice")) as ws:
        got = await receive(ws, 3)
        assert got[0] == {"type": "gap", "from": 1, "to": 3, "count": 3}
        assert [m["seq"] for m in got[1:]] == [4, 5]


async def test_other_tenant_and_bad_token_are_closed_with_4404_and_4401(
    server: HubServer, alice: httpx.AsyncClient
) -> None:
    sub = (await alice.post("/v1/subscriptions", json={})).json()["id"]
    for token, code in (("tok-bob", 4404), ("nope", 4401)):
        async with websockets.connect(ws_url(server, sub, f"?access_token={token}")) as ws:
            first = json.loads(await ws.recv())
            assert first["type"] == "error"
            assert first["error"]["status"] == code - 4000
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 5)
            assert closed.value.rcvd is not None
            assert closed.value.rcvd.code == code
