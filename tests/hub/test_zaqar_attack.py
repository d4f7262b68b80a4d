"""Attacks on the Zaqar v2 face over the hub's store schema (events + queue rows), on every
store: ids and markers that name sequence numbers no store column holds, Last-Event-ID of
any length, claim and message edges around a queue deleted while claimed, TTL and grace at
and past their bounds, and hostile bodies. Every answer is a 2xx or a 4xx with Zaqar's JSON
shape; never a 5xx."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx
import pytest

from keel.hub import Hub, HubServer, Principal, StaticTokens, Store
from keel.hub.zaqar import ZaqarConfig

pytestmark = pytest.mark.timeout(120)

CID = "0e9b0f37-6d2d-4c9a-9a57-1a9a35e7b2a1"


@pytest.fixture
async def api(store: Store) -> AsyncIterator[httpx.AsyncClient]:
    auth = StaticTokens({"tok": Principal("u", "p1", ("member",))})
    hub = Hub(store, auth)
    await hub.start()
    try:
        async with HubServer(hub, heartbeat=0.5, zaqar=ZaqarConfig()) as server:
            headers = {"Client-ID": CID, "X-Auth-Token": "tok"}
            async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=30) as c:
                yield c
    finally:
        await hub.stop()


def _ok(response: httpx.Response) -> httpx.Response:
    assert response.status_code < 500, (response.status_code, response.text[:300])
    if response.status_code >= 400:
        doc = response.json()
        assert "title" in doc, doc
        assert "description" in doc, doc
    return response


async def _posted(api: httpx.AsyncClient, queue: str, n: int = 1) -> list[str]:
    r = _ok(
        await api.post(
            f"/v2/queues/{queue}/messages",
            json={"messages": [{"body": {"i": i}, "ttl": 300} for i in range(n)]},
        )
    )
    assert r.status_code == 201
    return [href.rsplit("/", 1)[1] for href in r.json()["resources"]]


async def test_ids_and_markers_past_any_stored_sequence(api: httpx.AsyncClient) -> None:
    """A message id is 16 hex digits of sequence number and 8 of the queue's tag, which a
    client sees in every id: one with the largest sequence (2^64 - 1, past SQLite's and
    PostgreSQL's BIGINT) is a miss, not a 500."""
    [mid] = await _posted(api, "q-ids")
    tag = mid[16:]
    for seq in ("ffffffffffffffff", "8000000000000000", "7fffffffffffffff"):
        big = seq + tag
        q = "/v2/queues/q-ids"
        assert _ok(await api.get(f"{q}/messages/{big}")).status_code == 404
        _ok(await api.get(f"{q}/messages", params={"ids": big}))
        _ok(await api.get(f"{q}/messages", params={"marker": big, "echo": "true"}))
        _ok(await api.delete(f"{q}/messages/{big}"))
        _ok(await api.delete(f"{q}/messages", params={"ids": big}))
    # the real message is untouched
    assert _ok(await api.get(f"/v2/queues/q-ids/messages/{mid}")).status_code == 200


@pytest.mark.parametrize("resume", ["9" * 19, "9" * 30, "9" * 5000, "١٢٣"])
async def test_last_event_id_of_any_length(api: httpx.AsyncClient, resume: str) -> None:
    """Only ASCII digits pass; a number past the store's BIGINT, or past Python's int()
    digit limit, is a 400 before the stream starts."""
    await _posted(api, "q-sse")
    headers = {"Accept": "text/event-stream", "Last-Event-ID": resume.encode()}
    async with api.stream("GET", "/v2/queues/q-sse/messages", headers=headers) as r:
        if r.status_code >= 400:
            await r.aread()
            _ok(r)
        else:
            # A stream that starts must stay up (no error mid-stream): read its first bytes.
            async for _ in r.aiter_bytes():
                break


async def test_queue_deleted_while_claimed(api: httpx.AsyncClient) -> None:
    q = "/v2/queues/q-del"
    mids = await _posted(api, "q-del", 3)
    r = _ok(await api.post(f"{q}/claims", json={"ttl": 60, "grace": 60}))
    assert r.status_code == 201
    claim = r.headers["location"].rsplit("/", 1)[1]
    assert _ok(await api.delete(q)).status_code == 204
    assert _ok(await api.get(f"{q}/claims/{claim}")).status_code == 404
    assert _ok(await api.patch(f"{q}/claims/{claim}", json={"ttl": 60})).status_code == 404
    _ok(await api.delete(f"{q}/messages/{mids[0]}", params={"claim_id": claim}))
    _ok(await api.delete(f"{q}/messages", params={"ids": mids[1], "claim_ids": claim}))
    assert _ok(await api.delete(f"{q}/claims/{claim}")).status_code == 204
    stats = _ok(await api.get(f"{q}/stats")).json()
    assert stats["messages"]["total"] == 0, stats
    # the same name again is a new queue: the old ids and claim name nothing in it
    await _posted(api, "q-del")
    assert _ok(await api.get(f"{q}/messages/{mids[0]}")).status_code == 404
    assert _ok(await api.get(f"{q}/claims/{claim}")).status_code == 404


CLAIM_TIMES = [
    ("ttl", 59, 400),
    ("ttl", 60, 201),
    ("ttl", 43_200, 201),
    ("ttl", 43_201, 400),
    ("grace", 59, 400),
    ("grace", 43_201, 400),
    ("ttl", 10**30, 400),
    ("ttl", -(10**30), 400),
    ("ttl", 60.5, 400),
    ("ttl", "60", 400),
    ("ttl", True, 400),
    ("ttl", [], 400),
]


async def test_claim_ttl_and_grace_edges(api: httpx.AsyncClient) -> None:
    for field, value, status in CLAIM_TIMES:
        await _posted(api, "q-edge")
        r = _ok(await api.post("/v2/queues/q-edge/claims", json={field: value}))
        assert r.status_code == status, (field, value, r.text)


POST_BODIES = [
    b"[" * 100_000 + b"]" * 100_000,
    b'{"messages": [{"body": ' + b"[" * 100_000 + b"]" * 100_000 + b"}]}",
    b'{"messages": [{"body": 1, "ttl": NaN}]}',
    b'{"messages": [{"body": 1, "ttl": 1e400}]}',
    b'{"messages": [{"body": 1, "ttl": 99999999999999999999999999}]}',
    b'{"messages": [{"body": 1, "ttl": 60, "ttl": 99999999999}]}',
    b'{"messages": [{"body": 1, "delay": -1}]}',
    b'{"messages": [{"body": 1, "ttl": "\xd9\xa1\xd9\xa2\xd9\xa3"}]}',
    b'{"messages": []}',
    b'{"messages": {}}',
    b"\xff\xfe",
    b"",
    b'{"messages": [{"body": "' + b"x" * 300_000 + b'"}]}',
]


async def test_hostile_post_bodies(api: httpx.AsyncClient) -> None:
    for raw in POST_BODIES:
        r = _ok(
            await api.post(
                "/v2/queues/q-hostile/messages",
                content=raw,
                headers={"Content-Type": "application/json"},
            )
        )
        assert r.status_code == 400, (raw[:80], r.text[:200])


@pytest.mark.parametrize(
    "raw",
    [
        b"[" * 100_000 + b"]" * 100_000,
        b'{"ttl": NaN}',
        b'{"ttl": 60, "ttl": 10000000000000000000000}',
        b'{"grace": 1e400}',
    ],
)
async def test_hostile_claim_bodies(api: httpx.AsyncClient, raw: bytes) -> None:
    await _posted(api, "q-hclaim")
    r = _ok(
        await api.post(
            "/v2/queues/q-hclaim/claims", content=raw, headers={"Content-Type": "application/json"}
        )
    )
    assert r.status_code == 400, r.text[:200]


CLAIM_IDS = ["x" * 2000, "é", "0", "-1", "99999999999999999999999", "%00", "a%00b", "null"]


async def test_odd_claim_ids(api: httpx.AsyncClient) -> None:
    for claim_id in CLAIM_IDS:
        q = "/v2/queues/q-cid"
        [mid] = await _posted(api, "q-cid")
        _ok(await api.post(f"{q}/claims", json={"ttl": 60}))
        assert _ok(await api.get(f"{q}/claims/{claim_id}")).status_code == 404
        assert _ok(await api.patch(f"{q}/claims/{claim_id}", json={"ttl": 60})).status_code == 404
        assert _ok(await api.delete(f"{q}/claims/{claim_id}")).status_code == 204
        _ok(await api.delete(f"{q}/messages/{mid}", params={"claim_id": claim_id}))
        _ok(await api.delete(f"{q}/messages", params={"ids": mid, "claim_ids": claim_id}))
        assert _ok(await api.get(f"{q}/messages/{mid}")).status_code == 200


LISTING_PARAMS = [
    ("limit", "١٠"),
    ("limit", "9" * 30),
    ("limit", "0"),
    ("limit", "-1"),
    ("marker", "z" * 10_000),
    ("marker", "ffffffffffffffff00000000"),
    ("marker", "a\x00b"),
    ("marker", "sub-\x00"),
    ("name", "\x00"),
    ("x\x00", "1"),
    ("echo", "maybe"),
    ("ids", ","),
    ("ids", ",".join(["a"] * 1000)),
]


async def test_odd_listing_params(api: httpx.AsyncClient) -> None:
    for name, value in LISTING_PARAMS:
        await _posted(api, "q-params")
        _ok(await api.get("/v2/queues/q-params/messages", params={name: value}))
        _ok(await api.get("/v2/queues", params={name: value}))


async def test_pagination_markers_walk_every_message_once(api: httpx.AsyncClient) -> None:
    mids = await _posted(api, "q-page", 7)
    seen: list[str] = []
    params: dict[str, str] = {"limit": "3", "echo": "true"}
    for _ in range(10):
        r = _ok(await api.get("/v2/queues/q-page/messages", params=params))
        doc = r.json()
        if not doc["messages"]:
            break
        seen += [m["id"] for m in doc["messages"]]
        href = doc["links"][0]["href"]
        params = dict(httpx.URL(href).params)
    assert seen == mids
    # a claimed message is hidden unless include_claimed, and stats count it
    _ok(await api.post("/v2/queues/q-page/claims", params={"limit": "2"}, json={"ttl": 60}))
    listed = _ok(await api.get("/v2/queues/q-page/messages", params={"echo": "true"})).json()
    assert len(listed["messages"]) == 5
    stats = _ok(await api.get("/v2/queues/q-page/stats")).json()["messages"]
    assert (stats["claimed"], stats["free"], stats["total"]) == (2, 5, 7), stats
    assert json.dumps(stats)


QUEUE_METADATA = [
    b'{"x": 100000000000000000000000000000, "y": [1e308, -0.0, 5e-324]}',
    b'{"x": "\\u0000\\ud800", "\xc3\xa9": "\xf0\x9f\x98\x80"}',
    b'{"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    b'{"x": NaN}',
    b'{"_default_message_ttl": 1e400}',
    b'{"_default_message_ttl": 60.0}',
    b'{"_max_claim_count": 99999999999999999999}',
    b'{"_keel_filter": {"types": ' + b"[" * 5000 + b"]" * 5000 + b"}}",
    b'{"_keel_filter": {"types": ["' + b"*" * 10_000 + b'a"]}}',
    b'{"_keel_filter": "x"}',
    b'{"a": 1, "a": 2}',
    b"[]",
]


async def test_hostile_queue_metadata(api: httpx.AsyncClient) -> None:
    for raw in QUEUE_METADATA:
        q = "/v2/queues/q-meta"
        r = _ok(await api.put(q, content=raw, headers={"Content-Type": "application/json"}))
        if r.status_code < 300:
            _ok(await api.get(q))
            _ok(await api.get("/v2/queues", params={"detailed": "true"}))
            await _posted(api, "q-meta")
            _ok(await api.get(f"{q}/stats"))
        patch = [
            {"op": "replace", "path": "/metadata/x", "value": json.loads(b"[" * 500 + b"]" * 500)}
        ]
        _ok(
            await api.patch(
                q,
                content=json.dumps(patch).encode(),
                headers={"Content-Type": "application/openstack-messaging-v2.0-json-patch"},
            )
        )
        _ok(await api.delete(q))


async def test_stats_of_a_missing_queue_and_odd_names(api: httpx.AsyncClient) -> None:
    _ok(await api.get("/v2/queues/nope/stats"))
    for name in ("a" * 65, "é", "a b", "a%00", "%2e%2e"):
        _ok(await api.get(f"/v2/queues/{name}/stats"))
        _ok(await api.put(f"/v2/queues/{name}", json={}))


class _Clock:
    def __init__(self) -> None:
        self.t = 1_800_000_000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
async def timed(store: Store) -> AsyncIterator[tuple[httpx.AsyncClient, _Clock]]:
    clock = _Clock()
    auth = StaticTokens({"tok": Principal("u", "p1", ("member",))})
    hub = Hub(store, auth, clock=clock)
    await hub.start()
    try:
        async with HubServer(hub, heartbeat=0.5, zaqar=ZaqarConfig()) as server:
            headers = {"Client-ID": CID, "X-Auth-Token": "tok"}
            async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=30) as c:
                yield c, clock
    finally:
        await hub.stop()


async def test_claim_expiry_and_grace_on_the_clock(
    timed: tuple[httpx.AsyncClient, _Clock],
) -> None:
    """Zaqar: a claimed message lives at least until its claim ends plus the grace; an
    expired claim is a 404 and its messages are free again (a delete with its id is 400)."""
    api, clock = timed
    q = "/v2/queues/q-clock"
    r = _ok(await api.post(f"{q}/messages", json={"messages": [{"body": 1, "ttl": 60}]}))
    mid = r.json()["resources"][0].rsplit("/", 1)[1]
    r = _ok(await api.post(f"{q}/claims", json={"ttl": 100, "grace": 60}))
    assert r.status_code == 201
    claim = r.headers["location"].rsplit("/", 1)[1]
    clock.t += 99
    assert _ok(await api.get(f"{q}/claims/{claim}")).status_code == 200
    clock.t += 2  # 101 s: the claim ended; the message (ttl 60) lives on by the grace
    assert _ok(await api.get(f"{q}/claims/{claim}")).status_code == 404
    assert _ok(await api.get(f"{q}/messages/{mid}")).status_code == 200
    r = _ok(await api.delete(f"{q}/messages/{mid}", params={"claim_id": claim}))
    assert r.status_code == 400, r.text
    assert _ok(await api.patch(f"{q}/claims/{claim}", json={"ttl": 60})).status_code == 404
    r = _ok(await api.post(f"{q}/claims", json={"ttl": 60, "grace": 60}))
    assert r.status_code == 201, "an expired claim's message is claimable again"
    clock.t += 60 + 60 + 1  # past the second claim and its grace
    assert _ok(await api.get(f"{q}/messages/{mid}")).status_code == 404
