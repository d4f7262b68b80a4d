"""Attacks on this stop's hub changes: undeclared query parameters and the parser's JSON 400."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

import httpx
import pytest

from keel.hub import Hub, HubServer, _server
from keel.hub._http_protocol import MAX_HEAD, JsonErrorsH11
from tests.hub.conftest import Clients


async def _raw(server: HubServer, data: bytes, *, timeout: float = 5) -> bytes:
    host, port = server.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(data)
    try:
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()


async def _still_serves(server: HubServer) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=5) as client:
        assert (await client.get("/healthz")).status_code == 200


def _json_400(answer: bytes, *, or_431: bool = False) -> dict[str, object]:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith((b"HTTP/1.1 400", b"HTTP/1.1 431") if or_431 else b"HTTP/1.1 400"), (
        answer[:300]
    )
    assert b"content-type: application/json" in head.lower(), answer[:300]
    doc = json.loads(body)
    assert isinstance(doc, dict)
    return doc


GARBAGE = [
    b"\x00\x01\x02\x03\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS ClientHello to the plain port
    b"GET\r\n\r\n",
    b"GET / HTTP/9.9\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + b"X-A: " + b"a" * 200_000 + b"\r\n\r\n",
    b"POST /v1/events HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n",
    b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nabcde",
    b"GET /v2/queues HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"\r\n\r\n\x00",
]


@pytest.mark.parametrize("data", GARBAGE, ids=range(len(GARBAGE)))
async def test_garbage_gets_a_json_400_or_a_close_and_the_hub_serves_on(
    server: HubServer, data: bytes
) -> None:
    answer = await _raw(server, data)
    # A close without a word is acceptable; anything said must be a JSON 400 (or, for the huge
    # but well-formed header, an ordinary answer, or the JSON 431 past the hub's head bound:
    # which depends on how much of it one read brought).
    if answer and not (b"X-A: " in data and answer.startswith(b"HTTP/1.1 200")):
        _json_400(answer, or_431=b"X-A: " in data)
    await _still_serves(server)


async def test_garbage_after_a_good_pipelined_request_gets_a_json_400(server: HubServer) -> None:
    good = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    answer = await _raw(server, good + b"\x00garbage\r\n\r\n")
    # uvicorn may close before the good request's answer is written (as stock uvicorn does);
    # whatever comes last is the JSON 400.
    first, _, rest = answer.partition(b"HTTP/1.1 400")
    assert not first or first.startswith(b"HTTP/1.1 200"), answer[:300]
    _json_400(b"HTTP/1.1 400" + rest)
    await _still_serves(server)


async def test_a_bad_v2_request_after_a_good_v1_one_answers_in_zaqar_shape(
    server: HubServer,
) -> None:
    good = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    bad = b"GET /v2/queues HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: nil\r\n\r\n"
    answer = await _raw(server, good + bad)
    _, _, rest = answer.partition(b"HTTP/1.1 400")
    assert set(_json_400(b"HTTP/1.1 400" + rest)) == {"title", "description"}


async def test_the_dashboards_own_urls_are_not_refused(clients: Clients) -> None:
    alice = clients("tok-alice")
    page = await alice.get("/v1/subscriptions?limit=100")
    assert page.status_code == 200, page.text
    page = await alice.get("/v1/subscriptions", params={"limit": "100", "marker": "x"})
    assert page.status_code not in {400, 500}, page.text  # an unknown marker is no 400
    sub = (await alice.post("/v1/subscriptions", json={"types": ["x.*"]})).json()
    r = await alice.head(f"/v1/subscriptions/{sub['id']}/events?after=0&limit=5")
    assert r.status_code in (200, 405), r.status_code
    r = await alice.get(f"/v1/subscriptions/{sub['id']}/events?after=0&limit=5")
    assert r.status_code == 200, r.text
    anon = clients(None)
    url = f"/v1/subscriptions/{sub['id']}/stream?after=0&access_token=tok-alice"
    async with anon.stream("GET", url) as s:
        assert s.status_code == 200
    async with anon.stream("GET", "/v1/map/stream?access_token=tok-alice") as s:
        assert s.status_code in (200, 404)  # 404: this hub records no service map
        assert s.status_code != 400


@pytest.mark.parametrize(
    "query",
    [
        "limt=5",
        "%ff%fe=1",
        "%00=1",
        "a" * 60_000 + "=1",
        "\u00e9\u00e9=1",
        "=1",
        "&&&",
        "limit=5&" + "&".join(f"x{i}=1" for i in range(2000)),
    ],
    ids=["misspelt", "bad-utf8", "nul", "long", "unicode", "empty-name", "empty", "many"],
)
async def test_an_undeclared_query_parameter_is_a_bounded_json_400(
    clients: Clients, query: str
) -> None:
    r = await clients("tok-alice").get("/v1/subscriptions?" + query)
    assert r.status_code in (200, 400, 414, 431), r.status_code
    if r.status_code == 400:
        body = r.json()
        assert body["error"]["status"] == 400
        assert len(r.content) < 1024, len(r.content)


async def test_an_undeclared_websocket_query_parameter_is_refused_as_documented(
    server: HubServer, clients: Clients
) -> None:
    # docs/hub-api.md: a query parameter the OpenAPI document does not declare for the
    # operation is a 400; the document declares /ws with access_token and after only. A
    # misspelt `aftr=0` must not silently start the stream from the acked position.
    import websockets  # noqa: PLC0415

    sub = (await clients("tok-alice").post("/v1/subscriptions", json={})).json()["id"]
    url = f"ws://127.0.0.1:{server.port}/v1/subscriptions/{sub}/ws?aftr=0&access_token=tok-alice"
    async with websockets.connect(url) as ws:
        reply = json.loads(await asyncio.wait_for(ws.recv(), 5))
        assert reply["type"] == "error", reply
        assert reply["error"]["status"] == 400, reply
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 5)
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 4400


_HANDSHAKE = (
    b"Host: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
)


@pytest.mark.parametrize(
    ("request_head", "status"),
    [
        (
            b"GET /v1/subscriptions/x/ws HTTP/1.1\r\n" + _HANDSHAKE.replace(b"Key: dGhl", b"Kez: "),
            400,
        ),
        (b"GET /v1/subscriptions/x/ws HTTP/1.1\r\n" + _HANDSHAKE.replace(b"n: 13", b"n: 99"), 400),
        (b"GET /v1/subscriptions/x/ws HTTP/1.1\r\n" + _HANDSHAKE.replace(b"dGhl", b"%%"), 400),
        (b"GET /no/such/socket HTTP/1.1\r\n" + _HANDSHAKE, 403),
    ],
    ids=["no-key", "bad-version", "bad-key", "no-route"],
)
async def test_a_refused_websocket_handshake_answers_in_json(
    server: HubServer, request_head: bytes, status: int
) -> None:
    # The websockets library refused these in text/plain ("Failed to open a WebSocket
    # connection: ..."), and uvicorn's 403 for a path with no WebSocket route had an empty
    # text/plain body: a 4xx a client of the hub cannot read as the promised JSON error.
    answer = await _raw(server, request_head + b"\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d" % status), answer[:300]
    assert b"content-type: application/json" in head.lower(), answer[:300]
    assert json.loads(body)["error"]["status"] == status
    await _still_serves(server)


async def test_a_refused_websocket_handshake_under_v2_answers_in_zaqar_shape(
    server: HubServer,
) -> None:
    answer = await _raw(server, b"GET /v2/queues HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                        b"Connection: Upgrade\r\n\r\n")  # fmt: skip
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), answer[:300]
    assert set(json.loads(body)) == {"title", "description"}


@pytest.fixture(params=["httptools", "h11"])
async def both_protocols(
    request: pytest.FixtureRequest, hub: Hub, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[HubServer]:
    if request.param == "h11":
        monkeypatch.setattr(_server, "HTTP_PROTOCOL", JsonErrorsH11)
    async with HubServer(hub) as srv:
        yield srv


async def test_an_endless_request_head_is_cut_off_with_a_json_error(
    both_protocols: HubServer,
) -> None:
    # httptools keeps every header it is sent, and uvicorn sets no bound: one client sending
    # headers without end (64 MiB were taken in silence) grew the hub's memory without bound.
    server = both_protocols
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    received: list[bytes] = []

    async def read() -> None:
        with contextlib.suppress(ConnectionError):
            while block := await reader.read(65536):
                received.append(block)

    reading = asyncio.create_task(read())
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
    line = b"X-A: " + b"a" * 8000 + b"\r\n"
    sent = 0
    try:
        while sent < 8 * 2**20 and not received:  # far past any bound a hub may set
            writer.write(line)
            sent += len(line)
            await asyncio.wait_for(writer.drain(), 5)
    except (ConnectionError, TimeoutError):
        pass  # the hub hung up: it must have said why first
    try:
        await asyncio.wait_for(reading, 5)
    except TimeoutError:
        reading.cancel()
    finally:
        writer.close()
    answer = b"".join(received)
    assert sent < 8 * 2**20, "the hub read 8 MiB of headers and did not refuse them"
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith((b"HTTP/1.1 431", b"HTTP/1.1 400")), answer[:300]
    assert b"content-type: application/json" in head.lower(), answer[:300]
    assert json.loads(body)["error"]["status"] in (400, 431)
    await _still_serves(server)


async def test_a_head_just_under_the_bound_is_served(both_protocols: HubServer) -> None:
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
    filler = b"X-A: " + b"a" * (MAX_HEAD - len(head) - 200) + b"\r\n"
    answer = await _raw(both_protocols, head + filler + b"\r\n")
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
