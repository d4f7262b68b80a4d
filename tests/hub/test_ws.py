"""The WebSocket stream: live events, gaps, heartbeats, acks over the socket, resume."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import struct
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
import websockets

from keel.hub import HubServer
from tests.helpers import eventually
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


def rss_bytes() -> int:
    """This process's resident set (the hub runs in it)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def closed_with(ws: Any) -> tuple[list[Any], int | None]:
    """Every message until the close, and the close code the server sent."""
    got = []
    try:
        async with asyncio.timeout(5):
            while True:
                got.append(json.loads(await ws.recv()))
    except websockets.ConnectionClosed as closed:
        return got, closed.rcvd.code if closed.rcvd is not None else None


@pytest.mark.parametrize("after", ["\u00b2", "99999999999999999999", "1" * 5000, "-1", "1.0", ""])
async def test_bad_after_is_an_error_frame_and_close_4400(
    server: HubServer, alice: httpx.AsyncClient, after: str
) -> None:
    sub = (await alice.post("/v1/subscriptions", json={})).json()["id"]
    query = "?" + urlencode({"after": after, "access_token": "tok-alice"})
    async with websockets.connect(ws_url(server, sub, query)) as ws:
        got, code = await closed_with(ws)
    assert code == 4400
    assert [m["type"] for m in got] == ["error"]
    assert got[0]["error"]["status"] == 400
    assert got[0]["error"]["field"] == "after"
    assert server.hub.fanout.client_count == 0


@pytest.mark.parametrize("seq", [10**30, -1, 1.5, "3", True, None, 2**62 + 1])
async def test_bad_ack_seq_is_an_error_frame_and_the_socket_stays(
    server: HubServer, alice: httpx.AsyncClient, admin: httpx.AsyncClient, seq: Any
) -> None:
    sub = (await alice.post("/v1/subscriptions", json={})).json()["id"]
    headers = {"X-Auth-Token": "tok-alice"}
    async with websockets.connect(ws_url(server, sub), additional_headers=headers) as ws:
        await ws.send(json.dumps({"type": "ack", "seq": seq}))
        error = (await receive(ws, 1, ("error",)))[0]["error"]
        assert (error["status"], error["field"]) == (400, "seq")
        await publish(admin, cloudevent(1))
        assert [m["seq"] for m in await receive(ws, 1)] == [1]


async def test_deep_and_oversize_messages_are_refused(
    server: HubServer, alice: httpx.AsyncClient
) -> None:
    sub = (await alice.post("/v1/subscriptions", json={})).json()["id"]
    headers = {"X-Auth-Token": "tok-alice"}
    async with websockets.connect(ws_url(server, sub), additional_headers=headers) as ws:
        await ws.send("[" * 4000)
        error = (await receive(ws, 1, ("error",)))[0]["error"]
        assert error["status"] == 400
        assert "64 levels" in error["message"]
        await ws.send(b"binary")
        assert (await receive(ws, 1, ("error",)))[0]["error"]["status"] == 400
        await ws.send("x" * 5000)  # past the server's frame limit: closed before buffering
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await receive(ws, 1)
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 1009


async def test_every_way_out_leaves_the_fanout(
    server: HubServer, alice: httpx.AsyncClient, bob: httpx.AsyncClient
) -> None:
    sub = (await alice.post("/v1/subscriptions", json={})).json()["id"]
    for n in range(50):
        query = [
            "?after=\u00b2&access_token=tok-alice",
            "?access_token=nope",
            "?access_token=tok-bob",
        ]
        async with websockets.connect(ws_url(server, sub, query[n % 3])) as ws:
            await closed_with(ws)
    # A client that vanishes without a close frame, and one that closes cleanly.
    async with websockets.connect(ws_url(server, sub, "?access_token=tok-alice")) as ws:
        await receive(ws, 0)
        assert server.hub.fanout.client_count == 1
        ws.transport.abort()
    async with websockets.connect(ws_url(server, sub, "?access_token=tok-alice")) as ws:
        await ws.close()
    await eventually(lambda: server.hub.fanout.client_count == 0)


async def test_a_clean_close_logs_no_error(
    server: HubServer, alice: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    sub = (await alice.post("/v1/subscriptions", json={})).json()["id"]
    with caplog.at_level(logging.INFO):
        for code in (1000, 1001, 4000):
            async with websockets.connect(ws_url(server, sub, "?access_token=tok-alice")) as ws:
                await ws.send(json.dumps({"type": "ack", "seq": 0}))
                await receive(ws, 1, ("acked",))
                await ws.close(code)
        await eventually(lambda: server.hub.fanout.client_count == 0)
        await asyncio.sleep(0.2)
    errors = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert errors == [], [r.getMessage() for r in errors]


def _frame_header(size: int) -> bytes:
    # A masked text frame (clients must mask) with an all-zero key, so the payload goes as is.
    return bytes([0x81, 0x80 | 127]) + struct.pack("!Q", size) + b"\0\0\0\0"


async def test_sixteen_mib_frames_are_refused_before_they_are_buffered(
    server: HubServer, alice: httpx.AsyncClient
) -> None:
    sub = (await alice.post("/v1/subscriptions", json={})).json()["id"]
    chunk = b"x" * (1 << 20)
    gc.collect()
    before = rss_bytes()
    peak = before
    clients = []
    for _ in range(10):
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(
            f"GET /v1/subscriptions/{sub}/ws?access_token=tok-alice HTTP/1.1\r\n"
            "Host: hub\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        await reader.readuntil(b"\r\n\r\n")
        clients.append((reader, writer))

    async def flood(writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            writer.write(_frame_header(16 << 20))
            for _ in range(16):
                writer.write(chunk)
                await writer.drain()

    async def sample() -> None:
        nonlocal peak
        while True:
            peak = max(peak, rss_bytes())
            await asyncio.sleep(0.01)

    sampler = asyncio.create_task(sample())
    await asyncio.gather(*(flood(w) for _, w in clients))
    await asyncio.sleep(0.3)
    sampler.cancel()
    for _, writer in clients:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    grown = (max(peak, rss_bytes()) - before) >> 20
    assert grown < 40, f"RSS grew by {grown} MiB"
    await eventually(lambda: server.hub.fanout.client_count == 0)
