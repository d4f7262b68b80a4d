"""The Zaqar face under a hostile tenant and an outsider, on every store.

Property tests (hypothesis) over every parser of ``/v2``: bodies (queue metadata, JSON-patch
documents, posts, claims, subscriptions, shares, purges), query parameters and headers
(``Client-ID``, ``X-Project-Id``, the ``URL-*`` signed-URL headers, ``Last-Event-ID``), with
deep nesting, huge and non-ASCII numerals, NaN, overflow, empty and repeated fields. Each
answer is a 4xx in Zaqar's shape (``title``, ``description``) or a success, never a 5xx;
after each example a second tenant is still served within 100 ms and RSS stays bounded.
Then signed URLs: forgery, replay past expiry (also of a stream opened before it), path and
method escapes. Static tokens here (the Keystone path is tests/hub/zaqar/conftest.py's).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import given, reject
from hypothesis import strategies as st

from keel.hub import Hub, HubServer, Principal, StaticTokens, Store
from keel.hub.zaqar import ZaqarConfig, sign
from tests.hub.sse import frames
from tests.hub.test_hostile import (
    DEEP,
    JSON,
    NUMERALS,
    RAW,
    SCALARS,
    SETTINGS,
    rss_mib,
    second_tenant_served,
)

KEY = b"hostile-test-key-0123456789abcdef"
CLIENT_ID = "0e9b0f37-6d2d-4c9a-9a57-1a9a35e7b2a1"
TOKENS = {
    "tok-alice": Principal("alice", "p-one", ("member",)),
    "tok-bob": Principal("bob", "p-two", ("member",)),
}
PATCH_TYPE = "application/openstack-messaging-v2.0-json-patch"


class Face:
    def __init__(self, server: HubServer) -> None:
        self.server = server
        self.url = server.url
        self.alice = self.client("tok-alice")
        self.bob = self.client("tok-bob")
        self.rss_start = rss_mib()

    def client(self, token: str | None, **headers: str) -> httpx.AsyncClient:
        base = {"Client-ID": CLIENT_ID, **({"X-Auth-Token": token} if token else {})}
        return httpx.AsyncClient(base_url=self.url, headers={**base, **headers}, timeout=10)

    async def second_tenant_served(self) -> None:
        await second_tenant_served(self.bob, "/v2/queues/bob-q/messages?echo=true", self.rss_start)


@pytest.fixture
async def face(store: Store) -> AsyncIterator[Face]:
    hub = Hub(store, StaticTokens(TOKENS), quota_subscriptions=10_000)
    await hub.start()
    try:
        async with HubServer(hub, heartbeat=0.5, zaqar=ZaqarConfig(secret_key=KEY)) as server:
            f = Face(server)
            r = await f.bob.post("/v2/queues/bob-q/messages", json={"messages": [{"body": 1}]})
            assert r.status_code == 201, r.text
            r = await f.alice.post("/v2/queues/q/messages", json={"messages": [{"body": 1}]})
            assert r.status_code == 201, r.text
            try:
                yield f
            finally:
                await f.alice.aclose()
                await f.bob.aclose()
    finally:
        await hub.stop()


def zaqar_refused(r: httpx.Response) -> None:
    """A client error in Zaqar's shape, or a success: never a server error."""
    assert r.status_code < 500, (r.status_code, r.text[:300])
    if r.status_code >= 400:
        body = r.json()
        assert set(body) == {"title", "description"}, r.text[:300]
        assert "Traceback" not in r.text


# --- bodies ----------------------------------------------------------------------------------

DATES = st.one_of(
    st.sampled_from(
        [
            "0001-01-01T00:00:00+01:00",
            "9999-12-31T23:59:59-01:00",
            "9999-12-31T23:59:59",
            "2000-01-01T00:00:00",
            "\uff12\uff10\uff13\uff10-01-01T00:00:00",
            "2030-02-30T00:00:00",
            "1" * 5000,
            "",
        ]
    ),
    st.text(max_size=30),
)
MESSAGE = st.fixed_dictionaries(
    {},
    optional={
        "body": st.one_of(JSON, DEEP.map(json.loads) if False else JSON),
        "ttl": st.one_of(SCALARS, st.integers(-(2**70), 2**70)),
        "delay": st.one_of(SCALARS, st.integers(-(2**70), 2**70)),
    },
)
PATCH_OP = st.fixed_dictionaries(
    {},
    optional={
        "op": st.one_of(st.sampled_from(["add", "remove", "replace", "move"]), SCALARS),
        "path": st.one_of(
            st.sampled_from(
                ["/metadata/a", "/metadata", "/metadata/a/b", "/x/a", "", "/metadata/~1"]
            ),
            SCALARS,
        ),
        "value": JSON,
    },
)
SUBSCRIPTION = st.fixed_dictionaries(
    {},
    optional={
        "subscriber": st.one_of(
            st.sampled_from(["http://127.0.0.1:9/x", "https://example.com/", "mailto:a@b"]),
            SCALARS,
        ),
        "ttl": st.one_of(SCALARS, st.integers(-(2**70), 2**70)),
        "options": st.one_of(
            SCALARS,
            st.fixed_dictionaries(
                {},
                optional={
                    "post_data": st.one_of(st.just('{"m": "$zaqar_message$"}'), SCALARS),
                    "post_headers": st.one_of(
                        SCALARS, st.dictionaries(st.text(max_size=20), SCALARS, max_size=3)
                    ),
                },
            ),
        ),
    },
)
SHARE = st.fixed_dictionaries(
    {},
    optional={
        "paths": st.one_of(
            st.lists(st.sampled_from(["messages", "claims", "subscriptions", "..", "/"])), SCALARS
        ),
        "methods": st.one_of(st.lists(st.sampled_from(["GET", "POST", "é", ""])), SCALARS),
        "expires": st.one_of(DATES, SCALARS),
    },
)
ZAQAR_RAW = st.one_of(
    RAW,
    st.fixed_dictionaries({"messages": st.lists(MESSAGE, max_size=3)}).map(json.dumps),
    st.lists(PATCH_OP, max_size=3).map(json.dumps),
    SUBSCRIPTION.map(json.dumps),
    SHARE.map(json.dumps),
    st.fixed_dictionaries({}, optional={"ttl": SCALARS, "grace": SCALARS}).map(json.dumps),
    st.fixed_dictionaries({}, optional={"resource_types": JSON}).map(json.dumps),
    st.fixed_dictionaries({}, optional={"confirmed": JSON}).map(json.dumps),
    # Duplicate fields: which one counts would be a guess.
    st.just('{"messages": [{"body": 1}], "messages": [{"body": 2}]}'),
    st.just('{"ttl": 60, "ttl": 100000}'),
    st.just('{"_keel_filter": {}, "_keel_filter": {"types": ["x"]}}'),
    st.just('{"messages": [{"body": NaN}]}'),
    st.just('{"messages": [{"body": 1e999999}]}'),
    st.just('{"ttl": 1e400}'),
).map(lambda v: v if isinstance(v, bytes) else v.encode())

ROUTES = [
    ("PUT", "/v2/queues/q", "application/json"),
    ("PATCH", "/v2/queues/q", PATCH_TYPE),
    ("POST", "/v2/queues/q/messages", "application/json"),
    ("POST", "/v2/queues/q/claims", "application/json"),
    ("PATCH", "/v2/queues/q/claims/clm-x", "application/json"),
    ("POST", "/v2/queues/q/subscriptions", "application/json"),
    ("PATCH", "/v2/queues/q/subscriptions/nope", "application/json"),
    ("PUT", "/v2/queues/q/subscriptions/nope/confirm", "application/json"),
    ("POST", "/v2/queues/q/share", "application/json"),
    ("POST", "/v2/queues/q/purge", "application/json"),
]


@SETTINGS
@given(route=st.sampled_from(ROUTES), body=ZAQAR_RAW)
async def test_every_body(face: Face, route: tuple[str, str, str], body: bytes) -> None:
    method, path, ctype = route
    r = await face.alice.request(method, path, content=body, headers={"content-type": ctype})
    zaqar_refused(r)
    await face.second_tenant_served()


async def test_nesting_past_the_limit_is_refused_everywhere(face: Face) -> None:
    """A body the hub would hand to every reader (a message, a queue's metadata, a
    subscription's options) nests at most the hub's limit, as the native API's do."""
    deep = {"a": 1}
    for _ in range(70):
        deep = {"a": deep}
    cases = [
        ("POST", "/v2/queues/q/messages", {"messages": [{"body": deep}]}, "application/json"),
        ("PUT", "/v2/queues/deep", {"x": deep}, "application/json"),
        (
            "PATCH",
            "/v2/queues/q",
            [{"op": "add", "path": "/metadata/x", "value": deep}],
            PATCH_TYPE,
        ),
        (
            "POST",
            "/v2/queues/q/subscriptions",
            {"subscriber": "http://example.com/", "options": {"x": deep}},
            "application/json",
        ),
    ]
    for method, path, doc, ctype in cases:
        r = await face.alice.request(
            method, path, content=json.dumps(doc), headers={"content-type": ctype}
        )
        assert r.status_code == 400, (method, path, r.status_code, r.text[:200])
        zaqar_refused(r)


async def test_duplicate_fields_are_refused(face: Face) -> None:
    for method, path, body in (
        ("POST", "/v2/queues/q/messages", '{"messages": [{"body": 1}], "messages": []}'),
        ("POST", "/v2/queues/q/messages", '{"messages": [{"body": 1, "ttl": 60, "ttl": 999}]}'),
        ("POST", "/v2/queues/q/claims", '{"ttl": 60, "ttl": 100000}'),
        ("PUT", "/v2/queues/dup", '{"_default_message_ttl": 60, "_default_message_ttl": "x"}'),
    ):
        r = await face.alice.request(
            method, path, content=body, headers={"content-type": "application/json"}
        )
        assert r.status_code == 400, (path, body, r.status_code, r.text)
        zaqar_refused(r)


# --- query parameters and headers ------------------------------------------------------------

QUERY_PATHS = [
    ("GET", "/v2/queues"),
    ("GET", "/v2/queues/q/messages"),
    ("DELETE", "/v2/queues/q/messages"),
    ("POST", "/v2/queues/q/claims"),
    ("GET", "/v2/queues/q/subscriptions"),
    ("GET", "/v2/queues/q/stats"),
]
QUERY_NAMES = st.sampled_from(
    [
        "limit",
        "marker",
        "detailed",
        "echo",
        "include_claimed",
        "include_delayed",
        "ids",
        "claim_ids",
        "pop",
        "with_count",
        "name",
        "_default_message_ttl",
        "claim_id",
    ]
)


@SETTINGS
@given(
    route=st.sampled_from(QUERY_PATHS),
    params=st.lists(st.tuples(QUERY_NAMES, NUMERALS), min_size=1, max_size=3),
)
async def test_query_parameters(
    face: Face, route: tuple[str, str], params: list[tuple[str, str]]
) -> None:
    method, path = route
    query = "&".join(f"{k}={quote(v)}" for k, v in params)
    kwargs: dict[str, Any] = {"json": {}} if method == "POST" else {}
    r = await face.alice.request(method, f"{path}?{query}", **kwargs)
    zaqar_refused(r)
    await face.second_tenant_served()


async def test_repeated_single_valued_parameters_are_refused(face: Face) -> None:
    for method, url in (
        ("GET", "/v2/queues/q/messages?limit=1&limit=20"),
        ("GET", "/v2/queues/q/messages?echo=true&echo=false"),
        ("GET", "/v2/queues?limit=1&limit=2"),
        ("DELETE", "/v2/queues/q/messages?pop=1&pop=2"),
        ("POST", "/v2/queues/q/claims?limit=1&limit=2"),
    ):
        r = await face.alice.request(method, url, **({"json": {}} if method == "POST" else {}))
        assert r.status_code == 400, (url, r.status_code, r.text)
        zaqar_refused(r)
    # Lists may repeat, as Zaqar parses them.
    r = await face.alice.get("/v2/queues/q/messages?ids=a&ids=b")
    assert r.status_code == 404


HEADER_VALUES = st.one_of(
    NUMERALS,
    st.text(max_size=40).map(lambda s: s.encode("utf-8")),
    st.binary(max_size=60).filter(lambda b: b"\r" not in b and b"\n" not in b and b"\0" not in b),
    st.sampled_from(
        [
            b"{0e9b0f37-6d2d-4c9a-9a57-1a9a35e7b2a1}",
            b"urn:uuid:0e9b0f37-6d2d-4c9a-9a57-1a9a35e7b2a1",
            b"-" * 2000 + b"0e9b0f376d2d4c9a9a571a9a35e7b2a1",
            "\u00e9".encode("latin-1") * 64,
            b"p-one",
            b"p-two",
        ]
    ),
)
HEADER_NAMES = st.sampled_from(
    [
        "Client-ID",
        "X-Project-Id",
        "URL-Signature",
        "URL-Expires",
        "URL-Methods",
        "URL-Paths",
        "Last-Event-ID",
        "Content-Length",
    ]
)


# Bytes HTTP forbids in a header value: the server's parser answers before any route runs.


@SETTINGS
@given(
    headers=st.dictionaries(HEADER_NAMES, HEADER_VALUES, min_size=1, max_size=4),
    token=st.booleans(),
    path=st.sampled_from(["/v2/queues/q/messages", "/v2/queues/q", "/v2/queues/q/stats"]),
    stream=st.booleans(),
)
async def test_headers(
    face: Face, headers: dict[str, Any], token: bool, path: str, stream: bool
) -> None:
    values = {k: v if isinstance(v, bytes) else v.encode() for k, v in headers.items()}
    if stream:
        values["Accept"] = b"text/event-stream"
    if "Content-Length" in values:
        values.pop("Content-Length")  # httpx frames the request itself
    async with face.client("tok-alice" if token else None) as c:
        c.headers.pop("Client-ID", None)
        try:
            async with c.stream("GET", path, headers=values, timeout=5) as r:
                if r.status_code != 200 or not stream:
                    await r.aread()
                    zaqar_refused(r)  # also what the HTTP parser itself refuses
        except httpx.LocalProtocolError:
            reject()  # a value h11 will not put on the wire (it never reaches the hub)
    await face.second_tenant_served()


# --- signed URLs -----------------------------------------------------------------------------


def signed_headers(
    project: str, paths: list[str], methods: list[str], expires: str
) -> dict[str, str]:
    s = sign(KEY, paths, project=project, methods=methods, expires=expires)
    return {
        "URL-Signature": s.signature,
        "URL-Expires": s.expires,
        "URL-Methods": ",".join(s.methods),
        "URL-Paths": ",".join(s.paths),
        "X-Project-Id": s.project,
    }


def later(seconds: float) -> str:
    return (datetime.now(UTC).replace(tzinfo=None) + timedelta(seconds=seconds)).strftime(
        "%Y-%m-%dT%H:%M:%S"
    )


async def test_forged_signed_urls_open_nothing(face: Face) -> None:
    good = signed_headers("p-one", ["/v2/queues/q/messages"], ["GET"], later(600))
    async with face.client(None) as c:
        r = await c.get("/v2/queues/q/messages?echo=true", headers=good)
        assert r.status_code == 200, r.text
        assert len(r.json()["messages"]) == 1
        forgeries = [
            {"X-Project-Id": "p-two"},
            {"URL-Methods": "GET,POST"},
            {"URL-Paths": "/v2/queues/q"},
            {"URL-Paths": "/v2/queues/q/messages,/v2/queues/q/claims"},
            {"URL-Expires": later(7200)},
            {"URL-Expires": "2000-01-01T00:00:00"},
            {"URL-Expires": "0001-01-01T00:00:00+01:00"},
            {"URL-Expires": "9999-12-31T23:59:59-01:00"},
            {"URL-Expires": "\uff12\uff10\uff13\uff10-01-01T00:00:00"},
            {"URL-Expires": "9" * 5000},
            # One hex digit changed (a "0" put in place of a "0" was the good signature).
            {
                "URL-Signature": good["URL-Signature"][:-1]
                + ("1" if good["URL-Signature"][-1] == "0" else "0")
            },
            {"URL-Signature": good["URL-Signature"].upper()},
            {"URL-Signature": ""},
            {"URL-Signature": "\u00e9" * 64},
            {"URL-Signature": good["URL-Signature"] + "\u00e9"},
        ]
        for change in forgeries:
            headers = {
                k: v.encode() if isinstance(v, str) else v  # UTF-8 on the wire, as sent
                for k, v in {**good, **change}.items()
            }
            r = await c.get("/v2/queues/q/messages", headers=headers)
            assert r.status_code in (400, 404), (change, r.status_code, r.text[:200])
            zaqar_refused(r)
        # The same fields as query parameters (the browser stream's form).
        q = {
            "signature": good["URL-Signature"],
            "expires": good["URL-Expires"],
            "paths": good["URL-Paths"],
            "methods": good["URL-Methods"],
            "project_id": "p-one",
        }
        for change in (
            {"project_id": "p-two"},
            {"signature": "\u00e9" * 64},
            {"expires": "9" * 40},
        ):
            r = await c.get(
                "/v2/queues/q/messages",
                params={**q, **change},
                headers={"accept": "text/event-stream"},
            )
            assert r.status_code in (400, 404), (change, r.status_code, r.text[:200])
            zaqar_refused(r)


async def test_a_share_with_an_unrepresentable_expiry_is_refused(face: Face) -> None:
    for expires in ("0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00", "9" * 5000, "x"):
        r = await face.alice.post("/v2/queues/q/share", json={"expires": expires})
        assert r.status_code == 400, (expires, r.status_code, r.text)
        zaqar_refused(r)


async def test_signed_urls_never_escape_their_paths_and_methods(face: Face) -> None:
    grant = signed_headers("p-one", ["/v2/queues/q/messages"], ["GET"], later(600))
    escapes = [
        ("POST", "/v2/queues/q/messages"),
        ("DELETE", "/v2/queues/q/messages?pop=1"),
        ("POST", "/v2/queues/q/claims"),
        ("POST", "/v2/queues/q/share"),
        ("GET", "/v2/queues/q"),
        ("PATCH", "/v2/queues/q"),
        ("DELETE", "/v2/queues/q"),
        ("GET", "/v2/queues/q/stats"),
        ("POST", "/v2/queues/q/purge"),
        ("GET", "/v2/queues/q/subscriptions"),
        ("GET", "/v2/queues"),
        ("GET", "/v2/queues/q2/messages"),
        ("GET", "/v2/queues/q/messages2"),
        ("GET", "/v2/queues/q/messages/../../q2/messages"),
        ("GET", "/v2/queues/q/messages/%2e%2e/%2e%2e/q2/messages"),
        ("GET", "/v2/queues/q%2fmessages/../q2/messages"),
        ("GET", "/v2/queues/q2/messages?x=/v2/queues/q/messages"),
        ("GET", "/v1/subscriptions"),
        ("GET", "/v2/health"),
    ]
    async with face.client(None) as c:
        for method, path in escapes:
            kwargs: dict[str, Any] = {"json": {}} if method in ("POST", "PATCH") else {}
            r = await c.request(method, path, headers=grant, **kwargs)
            assert r.status_code in (400, 401, 404, 405, 415), (method, path, r.status_code, r.text)
        # The grant itself, and what is below it.
        r = await c.get("/v2/queues/q/messages", headers=grant)
        assert r.status_code == 200
        mid = (await face.alice.get("/v2/queues/q/messages?echo=true")).json()["messages"][0]["id"]
        r = await c.get(f"/v2/queues/q/messages/{mid}", headers=grant)
        assert r.status_code == 200


async def test_a_signed_url_past_its_expiry_opens_nothing_not_even_an_open_stream(
    face: Face,
) -> None:
    expires = later(3)
    grant = signed_headers("p-one", ["/v2/queues/q/messages"], ["GET"], expires)
    query = {
        "signature": grant["URL-Signature"],
        "expires": grant["URL-Expires"],
        "paths": grant["URL-Paths"],
        "methods": grant["URL-Methods"],
        "project_id": "p-one",
    }
    async with face.client(None) as c:
        assert (await c.get("/v2/queues/q/messages", headers=grant)).status_code == 200
        got: list[str] = []
        async with c.stream(
            "GET", "/v2/queues/q/messages", params=query, headers={"accept": "text/event-stream"}
        ) as r:
            assert r.status_code == 200
            ended = False
            async with asyncio.timeout(15):
                async for frame in frames(r):
                    if frame.event == "cloudevent":
                        got.append(frame.data)
                    if not got:
                        await face.alice.post(
                            "/v2/queues/q/messages", json={"messages": [{"body": "live"}]}
                        )
                ended = True
            assert ended  # the server ended it at the expiry, not the timeout
        assert got
        r = await c.get("/v2/queues/q/messages", headers=grant)
        assert r.status_code == 404
        r = await c.get(
            "/v2/queues/q/messages", params=query, headers={"accept": "text/event-stream"}
        )
        assert r.status_code == 404
        # Posted after the expiry: the ended stream never carried it.
        await face.alice.post("/v2/queues/q/messages", json={"messages": [{"body": "later"}]})
        assert all("later" not in g for g in got)
