"""The HTTP API over real sockets on 127.0.0.1: subscriptions, claims, dead letters, errors."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from keel.hub import Hub, HubServer, _server
from keel.hub._http_protocol import JsonErrorsH11
from tests.hub.conftest import Clients

EVENT = {"specversion": "1.0", "source": "compute.host-a", "type": "compute.instance.create.end"}


def cloudevent(n: int, tenant: str | None = "p-one", **extra: Any) -> dict[str, Any]:
    e = {**EVENT, "id": f"ev-{n}", "subject": f"i-{n}", "data": {"n": n}, **extra}
    if tenant is not None:
        e["tenant"] = tenant
    return e


async def publish(admin: httpx.AsyncClient, *events: dict[str, Any]) -> None:
    for e in events:
        r = await admin.post("/v1/events", json=e)
        assert r.status_code == 202, r.text


def error_code(r: httpx.Response) -> str:
    assert r.headers["content-type"].startswith("application/json")
    return str(r.json()["error"]["code"])


async def test_create_show_list_delete(alice: httpx.AsyncClient) -> None:
    r = await alice.post("/v1/subscriptions", json={"types": ["compute.*"]})
    assert r.status_code == 201
    sub = r.json()
    assert (sub["project"], sub["filter"], sub["last_seq"]) == (
        "p-one",
        {"types": ["compute.*"]},
        0,
    )
    assert (await alice.get(f"/v1/subscriptions/{sub['id']}")).json()["id"] == sub["id"]
    listed = (await alice.get("/v1/subscriptions")).json()
    assert [s["id"] for s in listed["subscriptions"]] == [sub["id"]]
    assert (await alice.delete(f"/v1/subscriptions/{sub['id']}")).status_code == 204
    assert (await alice.get(f"/v1/subscriptions/{sub['id']}")).status_code == 404


async def test_pagination(alice: httpx.AsyncClient) -> None:
    ids = [(await alice.post("/v1/subscriptions", json={})).json()["id"] for _ in range(5)]
    seen: list[str] = []
    marker = None
    while True:
        params: dict[str, Any] = {"limit": 2}
        if marker:
            params["marker"] = marker
        page = (await alice.get("/v1/subscriptions", params=params)).json()
        seen += [s["id"] for s in page["subscriptions"]]
        marker = page["next"]
        if marker is None:
            break
    assert seen == sorted(ids)


async def test_quota(alice: httpx.AsyncClient) -> None:
    for _ in range(5):
        assert (await alice.post("/v1/subscriptions", json={})).status_code == 201
    r = await alice.post("/v1/subscriptions", json={})
    assert r.status_code == 409
    assert error_code(r) == "quota_exceeded"


async def test_other_tenant_sees_404_never_403_or_data(
    alice: httpx.AsyncClient, bob: httpx.AsyncClient, clients: Clients, admin: httpx.AsyncClient
) -> None:
    sub = (await alice.post("/v1/subscriptions", json={})).json()
    await publish(admin, cloudevent(1))
    base = f"/v1/subscriptions/{sub['id']}"
    probes = [
        bob.get(base),
        bob.delete(base),
        bob.get(base + "/events"),
        bob.get(base + "/stream"),
        bob.post(base + "/claims", json={}),
        bob.get(base + "/dead-letters"),
        bob.post(base + "/dead-letters/redrive", json={}),
        bob.post(base + "/claims/clm-x/ack", json={}),
        admin.get(base),  # an admin of another project too
    ]
    for r in await asyncio.gather(*probes):
        assert r.status_code == 404, r.text
        assert error_code(r) == "not_found"
        assert "ev-1" not in r.text
    assert (await bob.get("/v1/subscriptions")).json()["subscriptions"] == []
    carol = clients("tok-carol")  # same project, another user: the project owns it
    assert (await carol.get(base)).status_code == 200


async def test_events_route_by_tenant_and_filter(
    alice: httpx.AsyncClient, bob: httpx.AsyncClient, admin: httpx.AsyncClient
) -> None:
    a = (await alice.post("/v1/subscriptions", json={"types": ["compute.instance.*"]})).json()
    b = (await bob.post("/v1/subscriptions", json={})).json()
    every = (await admin.post("/v1/subscriptions", json={"all_projects": True})).json()
    await publish(admin, cloudevent(1), cloudevent(2, tenant="p-two"), cloudevent(3, tenant=None))
    await publish(admin, cloudevent(4, type="volume.attach"))

    async def ids(client: httpx.AsyncClient, sub: dict[str, Any]) -> list[str]:
        body = (await client.get(f"/v1/subscriptions/{sub['id']}/events")).json()
        return [m["event"]["id"] for m in body["messages"]]

    assert await ids(alice, a) == ["ev-1"]
    assert await ids(bob, b) == ["ev-2"]
    assert await ids(admin, every) == ["ev-1", "ev-2", "ev-3", "ev-4"]


async def test_all_projects_is_for_admins(bob: httpx.AsyncClient) -> None:
    r = await bob.post("/v1/subscriptions", json={"all_projects": True})
    assert r.status_code == 403
    assert error_code(r) == "forbidden"
    r = await bob.post("/v1/events", json=cloudevent(1))
    assert r.status_code == 403


async def test_claims_ack_release_extend_and_dead_letters(
    alice: httpx.AsyncClient, admin: httpx.AsyncClient
) -> None:
    sub = (await alice.post("/v1/subscriptions", json={"max_deliveries": 2})).json()
    base = f"/v1/subscriptions/{sub['id']}"
    await publish(admin, *(cloudevent(n) for n in range(1, 4)))
    r = await alice.post(base + "/claims", json={"limit": 2, "ttl": 30})
    assert r.status_code == 201
    claim = r.json()
    assert [m["seq"] for m in claim["messages"]] == [1, 2]
    cbase = f"{base}/claims/{claim['claim_id']}"
    assert (await alice.post(cbase + "/ack", json={"seqs": [1]})).json() == {"acked": 1}
    assert (await alice.patch(cbase, json={"ttl": 60})).status_code == 200
    assert (await alice.post(cbase + "/release")).json() == {"released": 1}
    again = (await alice.post(base + "/claims", json={"limit": 5, "ttl": 1})).json()
    assert [m["seq"] for m in again["messages"]] == [2, 3]
    await asyncio.sleep(1.1)  # the claim expires
    r = await alice.post(f"{base}/claims/{again['claim_id']}/ack", json={})
    assert r.status_code == 409
    assert error_code(r) == "claim_expired"
    # seq 2 has had its 2 deliveries: the next claim dead-letters it and hands out seq 3.
    third = (await alice.post(base + "/claims", json={"ttl": 30})).json()
    assert [(m["seq"], m["deliveries"]) for m in third["messages"]] == [(3, 2)]
    dead = (await alice.get(base + "/dead-letters")).json()["messages"]
    assert [m["seq"] for m in dead] == [2]
    redriven = (await alice.post(base + "/dead-letters/redrive", json={"seqs": [2]})).json()
    assert redriven == {"redriven": 1}
    back = (await alice.post(base + "/claims", json={"ttl": 30})).json()
    assert [(m["seq"], m["deliveries"]) for m in back["messages"]] == [(2, 1)]


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("POST", "/v1/subscriptions", b"{not json", 400),
        ("POST", "/v1/subscriptions", b'{"filters": [{"sql": "x"}]}', 400),
        ("POST", "/v1/subscriptions", b'{"typos": ["x"]}', 400),
        ("POST", "/v1/subscriptions", b'{"max_deliveries": 0}', 400),
        ("POST", "/v1/subscriptions", b'{"retention": {"max_messages": -1}}', 400),
        ("POST", "/v1/subscriptions", b"[]", 400),
        ("POST", "/v1/subscriptions", b"{}" + b" " * 70000, 413),
        ("GET", "/v1/subscriptions?limit=0", None, 400),
        ("GET", "/v1/subscriptions?limit=abc", None, 400),
        ("GET", "/v1/subscriptions/sub-nope", None, 404),
        ("GET", "/v1/nothing", None, 404),
        ("PUT", "/v1/subscriptions", b"{}", 405),
        ("POST", "/v1/events", b'{"id": "x"}', 403),
    ],
)
async def test_bad_input_is_a_json_4xx(
    alice: httpx.AsyncClient, method: str, path: str, body: bytes | None, status: int
) -> None:
    headers = {"content-type": "application/json"}
    r = await alice.request(method, path, content=body, headers=headers)
    assert r.status_code == status, r.text
    assert r.json()["error"]["status"] == status
    assert "Traceback" not in r.text


async def test_bad_claim_requests(alice: httpx.AsyncClient) -> None:
    base = f"/v1/subscriptions/{(await alice.post('/v1/subscriptions', json={})).json()['id']}"
    for body in ({"ttl": 0}, {"limit": 101}, {"ttl": "x"}, {"limit": 1.5}, {"nope": 1}):
        r = await alice.post(base + "/claims", json=body)
        assert r.status_code == 400, (body, r.text)
    r = await alice.post(base + "/claims/clm-nope/ack", json={"seqs": ["x"]})
    assert r.status_code == 400
    r = await alice.post(base + "/claims/clm-nope/ack", json={})
    assert r.status_code == 404


async def test_missing_or_unknown_token_is_401(clients: Clients) -> None:
    for client in (clients(None), clients("tok-wrong")):
        r = await client.get("/v1/subscriptions")
        assert r.status_code == 401
        assert error_code(r) == "unauthorized"


async def test_bad_events_are_400(admin: httpx.AsyncClient) -> None:
    for body in ({"id": "x"}, {**cloudevent(1), "specversion": "0.3"}, {**cloudevent(1), "id": ""}):
        r = await admin.post("/v1/events", json=body)
        assert r.status_code == 400, r.text


async def test_openapi_lists_every_route(server: HubServer, alice: httpx.AsyncClient) -> None:
    from keel.hub._app import create_app  # noqa: PLC0415

    doc = (await alice.get("/v1/openapi.json")).json()
    assert doc["openapi"].startswith("3.1")
    app = create_app(server.hub)
    routes = {r.path for r in app.routes if r.path.startswith("/v1/")}  # type: ignore[attr-defined]
    assert routes - {"/v1/openapi.json"} == set(doc["paths"])


DEEP_FILTER = (
    b'{"filters": [' + b'{"not": ' * 3000 + b'{"exact": {"type": "x"}}' + b"}" * 3000 + b"]}"
)
DEEP_EVENT = (
    b'{"specversion": "1.0", "id": "deep", "source": "s", "type": "t", "tenant": "p-one", '
    b'"data": ' + b"[" * 20000 + b"]" * 20000 + b"}"
)


@pytest.mark.parametrize(
    ("request_line", "body", "headers", "field"),
    [
        ("GET /stream", None, {"Last-Event-ID": b"\xb2"}, "Last-Event-ID"),
        ("GET /stream", None, {"Last-Event-ID": "9" * 5000}, "Last-Event-ID"),
        ("GET /stream", None, {"Last-Event-ID": "99999999999999999999"}, "Last-Event-ID"),
        ("GET /stream?after=\u0663", None, {}, "after"),
        ("GET /events?after=99999999999999999999", None, {}, "after"),
        ("GET /events?after=-1", None, {}, "after"),
        ("GET /events?limit=1&limit=2", None, {}, "limit"),
        ("GET /dead-letters?marker=1e3", None, {}, "marker"),
        ("POST /claims", b'{"limit": 1e300}', {}, "limit"),
        ("POST /claims/clm-x/ack", b'{"seqs": [4611686018427387905]}', {}, "seqs"),
    ],
)
async def test_numbers_from_clients_are_parsed_strictly(
    alice: httpx.AsyncClient,
    request_line: str,
    body: bytes | None,
    headers: dict[str, Any],
    field: str,
) -> None:
    method, path = request_line.split()
    sub = (await alice.post("/v1/subscriptions", json={})).json()["id"]
    r = await alice.request(
        method, f"/v1/subscriptions/{sub}{path}", content=body, headers=headers, timeout=5
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"]["field"] == field


@pytest.mark.parametrize(
    ("path", "body"), [("/v1/subscriptions", DEEP_FILTER), ("/v1/events", DEEP_EVENT)]
)
async def test_deep_nesting_is_a_400_naming_the_limit(
    admin: httpx.AsyncClient, path: str, body: bytes
) -> None:
    assert len(body) < 64 * 1024
    r = await admin.post(path, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["limit"] == 64
    assert "deeper than 64 levels" in r.json()["error"]["message"]


async def test_a_subscription_needs_a_body(alice: httpx.AsyncClient) -> None:
    r = await alice.post("/v1/subscriptions", content=b"")
    assert r.status_code == 400
    assert (await alice.get("/v1/subscriptions")).json()["subscriptions"] == []


async def test_405_says_which_methods_are_allowed(alice: httpx.AsyncClient) -> None:
    r = await alice.put("/v1/subscriptions", json={})
    assert r.status_code == 405
    assert set(r.headers["allow"].replace(" ", "").split(",")) == {"GET", "HEAD", "POST"}


async def test_integers_are_what_json_schema_calls_integers(alice: httpx.AsyncClient) -> None:
    r = await alice.post(
        "/v1/subscriptions", json={"max_deliveries": 3.0, "retention": {"max_messages": 1e3}}
    )
    assert r.status_code == 201, r.text
    assert (r.json()["max_deliveries"], r.json()["retention"]["max_messages"]) == (3, 1000)
    for bad in ({"max_deliveries": 2.5}, {"max_deliveries": True}, {"max_deliveries": "3"}):
        assert (await alice.post("/v1/subscriptions", json=bad)).status_code == 400, bad


async def test_pages_declare_their_icon_so_browsers_ask_for_no_favicon(
    clients: Clients,
) -> None:
    anon = clients(None)
    for path in ("/", "/map"):
        assert '<link rel="icon" href="data:,">' in (await anon.get(path)).text


async def test_unknown_query_parameters_are_refused(alice: httpx.AsyncClient) -> None:
    # A misspelt `limt=1` used to be ignored, and the whole list came back.
    for _ in range(3):
        assert (await alice.post("/v1/subscriptions", json={})).status_code == 201
    r = await alice.get("/v1/subscriptions", params={"limt": "1"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["field"] == "limt"
    assert "limit, marker" in error["message"]
    sub = (await alice.get("/v1/subscriptions", params={"limit": "1"})).json()
    assert len(sub["subscriptions"]) == 1
    r = await alice.get(f"/v1/subscriptions/{sub['subscriptions'][0]['id']}", params={"x": "1"})
    assert r.status_code == 400
    assert r.json()["error"]["field"] == "x"


async def test_the_filter_limits_in_all_are_named_in_the_400(alice: httpx.AsyncClient) -> None:
    # Every piece valid, the sum too large: the body says which limit, for a client to act on.
    many = {"filters": [{"any": [{"exact": {"type": f"t{i}"}} for i in range(60)]}] * 2}
    r = await alice.post("/v1/subscriptions", json=many)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["limit"] == 100
    long = {"filters": [{"exact": {f"a{i}": "x" * 1000}} for i in range(5)]}
    r = await alice.post("/v1/subscriptions", json=long)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["limit"] == 4096


@pytest.fixture(params=["httptools", "h11"])
async def raw_server(
    request: pytest.FixtureRequest, hub: Hub, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[HubServer]:
    """The hub's server on each of uvicorn's HTTP protocols (h11 is the one used where
    httptools is not installed)."""
    if request.param == "h11":
        monkeypatch.setattr(_server, "HTTP_PROTOCOL", JsonErrorsH11)
    async with HubServer(hub) as srv:
        yield srv


async def test_a_request_that_is_not_http_gets_a_json_400(raw_server: HubServer) -> None:
    # uvicorn answers these itself, before the application, and answered in text/plain.
    host, port = raw_server.url.removeprefix("http://").split(":")
    for raw in (
        b"POST /v1/subscriptions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: nil\r\n\r\n",
        b"GET /\x00 HTTP/1.1\r\n\r\n",
    ):
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(raw)
        answer = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400"), answer
        assert b"content-type: application/json" in head.lower()
        assert json.loads(body)["error"]["status"] == 400
    # Under /v2, the Zaqar face's clients read Zaqar's shape.
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"GET /v2/queues HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: nil\r\n\r\n")
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert set(json.loads(answer.partition(b"\r\n\r\n")[2])) == {"title", "description"}
