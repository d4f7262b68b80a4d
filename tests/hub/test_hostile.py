"""The hub under a hostile tenant: property tests over every input it parses.

Alice (project p-one) sends whatever the strategies make: deep nesting, huge and non-ASCII
numerals, long and adversarial patterns, oversize bodies and frames, to every HTTP body,
query parameter, header and WebSocket message the hub reads. Each answer must be a 4xx with
a JSON error (or a WebSocket error message / close), never a 5xx; after each example Bob
(project p-two) must still be served within 100 ms, and the process's RSS must stay bounded.
Runs on every store.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import websockets
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keel.hub import HubServer
from tests.hub.conftest import Clients

SETTINGS = settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
SECOND_TENANT_MS = 100
RSS_GROWTH_MIB = 150


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


async def second_tenant_served(client: httpx.AsyncClient, path: str, rss_start: float) -> None:
    """The other tenant's read answers within the bound (best of five, 50 ms apart: one
    scheduling hiccup of a loaded machine is not the hub stalling; a stall holds all five),
    and RSS grew less than the bound since ``rss_start``."""
    best = float("inf")
    for attempt in range(5):
        if attempt:
            await asyncio.sleep(0.05)
        started = time.perf_counter()
        r = await client.get(path)
        assert r.status_code == 200, r.text
        best = min(best, (time.perf_counter() - started) * 1000)
        if best < SECOND_TENANT_MS:
            break
    assert best < SECOND_TENANT_MS, f"the second tenant waited {best:.0f} ms"
    grown = rss_mib() - rss_start
    assert grown < RSS_GROWTH_MIB, f"RSS grew by {grown:.0f} MiB"


# --- strategies ----------------------------------------------------------------------------

NUMERALS = st.one_of(
    st.integers(-(10**30), 10**30).map(str),
    st.text(alphabet="0123456789\u00b2\u00b3\u0663\u09ea\uff11-+.eE", min_size=0, max_size=30),
    st.sampled_from(["9" * 5000, "99999999999999999999", "NaN", "1e400", "0x10", " 1", "1.0"]),
)


def deep(depth: int, open_: str = "[", close: str = "]", inner: str = "") -> str:
    return open_ * depth + inner + close * depth


DEEP = st.integers(50, 100_000).flatmap(
    lambda n: st.sampled_from(
        [deep(n), deep(n, '{"a":', "}", "1"), deep(n, '{"not":', "}", '{"exact":{"type":"x"}}')]
    )
)
PATTERNS = st.one_of(
    st.text(alphabet="*ax.", max_size=400),
    st.integers(1, 400).map(lambda n: "*" * n + "x"),
    st.integers(1, 200).map(lambda n: "a*" * n + "b"),
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False),
    st.text(max_size=40),
    PATTERNS,
)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=12,
)
SPEC_KEYS = st.sampled_from(
    [
        "types",
        "source",
        "subject",
        "priority",
        "filters",
        "all_projects",
        "retention",
        "max_deliveries",
        "webhook",
        "nope",
    ]
)
FILTER = st.recursive(
    st.builds(
        lambda d, k, v: {d: {k: v}},
        st.sampled_from(["exact", "prefix", "suffix", "sql", "Exact"]),
        st.sampled_from(["type", "subject", "Type", "x" * 30, ""]),
        st.one_of(PATTERNS, SCALARS),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=5).map(lambda f: {"all": f}),
        st.lists(inner, max_size=5).map(lambda f: {"any": f}),
        inner.map(lambda f: {"not": f}),
    ),
    max_leaves=20,
)
SPEC = st.fixed_dictionaries(
    {},
    optional={
        "types": st.lists(PATTERNS, max_size=120),
        "filters": st.lists(FILTER, max_size=4),
        "max_deliveries": st.one_of(st.integers(-(2**70), 2**70), st.floats(), SCALARS),
        "retention": st.dictionaries(
            st.sampled_from(["max_age_s", "max_messages", "x"]), SCALARS, max_size=2
        ),
        "priority": st.one_of(SCALARS, st.lists(SCALARS, max_size=3)),
    },
)
RAW = st.one_of(
    DEEP.map(str.encode),
    JSON.map(lambda v: json.dumps(v).encode()),
    st.dictionaries(SPEC_KEYS, JSON, max_size=4).map(lambda v: json.dumps(v).encode()),
    SPEC.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=200),
    st.just(b"x" * (70 * 1024)),
    st.just(b""),
)


# --- fixtures and checks -------------------------------------------------------------------


class Tenants:
    def __init__(self, server: HubServer, alice: httpx.AsyncClient, bob: httpx.AsyncClient) -> None:
        self.server = server
        self.alice = alice
        self.bob = bob
        self.bob_sub = ""
        self.alice_sub = ""
        self.rss_start = rss_mib()

    async def second_tenant_served(self) -> None:
        """Bob's read answers within the bound, and the hub's RSS stayed bounded."""
        await second_tenant_served(
            self.bob, f"/v1/subscriptions/{self.bob_sub}/events?limit=1", self.rss_start
        )

    async def cleanup(self) -> None:
        """Alice's quota is 5: delete whatever an example created, but her probe queue."""
        page = (await self.alice.get("/v1/subscriptions")).json()["subscriptions"]
        for sub in page:
            if sub["id"] != self.alice_sub:
                await self.alice.delete(f"/v1/subscriptions/{sub['id']}")


@pytest.fixture
async def tenants(server: HubServer, alice: httpx.AsyncClient, bob: httpx.AsyncClient) -> Tenants:
    t = Tenants(server, alice, bob)
    t.bob_sub = (await bob.post("/v1/subscriptions", json={})).json()["id"]
    t.alice_sub = (await alice.post("/v1/subscriptions", json={})).json()["id"]
    return t


def refused(r: httpx.Response) -> None:
    """A client error with a JSON body that says so, or a success: never a server error."""
    assert r.status_code < 500, (r.status_code, r.text[:300])
    if r.status_code >= 400:
        body = r.json()
        assert body["error"]["status"] == r.status_code
        assert "Traceback" not in r.text


# --- HTTP ----------------------------------------------------------------------------------


@SETTINGS
@given(body=RAW, content_type=st.sampled_from(["application/json", "text/plain", "x" * 300]))
async def test_subscription_bodies(tenants: Tenants, body: bytes, content_type: str) -> None:
    r = await tenants.alice.post(
        "/v1/subscriptions", content=body, headers={"content-type": content_type}
    )
    refused(r)
    await tenants.cleanup()
    await tenants.second_tenant_served()


@SETTINGS
@given(
    path=st.sampled_from(["/events", "/dead-letters", "/stream"]),
    name=st.sampled_from(["after", "limit", "marker", "access_token"]),
    values=st.lists(NUMERALS, min_size=1, max_size=2),
    last_event_id=st.one_of(st.none(), NUMERALS),
)
async def test_query_parameters_and_headers(
    tenants: Tenants, path: str, name: str, values: list[str], last_event_id: str | None
) -> None:
    query = "&".join(f"{name}={quote(v)}" for v in values)
    headers: dict[str, bytes] = {}
    if last_event_id is not None:
        # Bytes: any octets go. Less the spaces around it: they are no part of a field value
        # (RFC 9110's OWS) and h11 refuses to send them (" 1" failed client-side, not the hub).
        headers["Last-Event-ID"] = last_event_id.strip(" ").encode("utf-8")
    url = f"/v1/subscriptions/{tenants.alice_sub}{path}?{query}"
    async with tenants.alice.stream("GET", url, headers=headers, timeout=5) as r:
        if r.status_code >= 400:
            await r.aread()
        refused(r)
    await tenants.second_tenant_served()


@SETTINGS
@given(
    path=st.sampled_from(
        [
            "/claims",
            "/claims/clm-x",
            "/claims/clm-x/ack",
            "/claims/clm-x/release",
            "/dead-letters/redrive",
        ]
    ),
    body=st.one_of(
        RAW,
        st.fixed_dictionaries(
            {}, optional={"ttl": SCALARS, "limit": SCALARS, "seqs": st.lists(SCALARS, max_size=5)}
        ).map(lambda v: json.dumps(v).encode()),
    ),
)
async def test_claim_and_ack_bodies(tenants: Tenants, path: str, body: bytes) -> None:
    method = "PATCH" if path == "/claims/clm-x" else "POST"
    r = await tenants.alice.request(
        method,
        f"/v1/subscriptions/{tenants.alice_sub}{path}",
        content=body,
        headers={"content-type": "application/json"},
    )
    refused(r)
    await tenants.second_tenant_served()


EVENT = st.fixed_dictionaries(
    {"specversion": st.sampled_from(["1.0", "1.0", "0.3", 1])},
    optional={
        "id": st.one_of(st.text(max_size=600), SCALARS),
        "source": st.one_of(st.just("s"), SCALARS),
        "type": st.one_of(st.just("compute.instance.create.end"), PATTERNS),
        "time": st.one_of(st.just("2026-01-02T03:04:05Z"), st.text(max_size=30), SCALARS),
        "data": JSON,
        "data_base64": st.one_of(st.just("AAEC"), SCALARS),
        "tenant": st.sampled_from(["p-one", "p-two"]),
        "Bad_Name": SCALARS,
        "hubseq": SCALARS,
        "ext": SCALARS,
    },
)


@SETTINGS
@given(event=st.one_of(EVENT.map(lambda v: json.dumps(v).encode()), RAW))
async def test_posted_events(tenants: Tenants, clients: Clients, event: bytes) -> None:
    admin = clients("tok-admin")
    r = await admin.post("/v1/events", content=event, headers={"content-type": "application/json"})
    refused(r)
    await tenants.second_tenant_served()


@SETTINGS
@given(
    types=st.lists(PATTERNS, min_size=1, max_size=100),
    event_type=st.text(alphabet="ax.", max_size=512),
)
async def test_adversarial_patterns_never_stall_ingest(
    tenants: Tenants, clients: Clients, types: list[str], event_type: str
) -> None:
    r = await tenants.alice.post("/v1/subscriptions", json={"types": types})
    refused(r)
    admin = clients("tok-admin")
    event = {
        "specversion": "1.0",
        "id": f"p-{time.monotonic_ns()}",
        "source": "s",
        "type": event_type or "t",
        "tenant": "p-one",
    }
    started = time.perf_counter()
    refused(await admin.post("/v1/events", json=event))
    assert (time.perf_counter() - started) * 1000 < 1000
    await tenants.cleanup()
    await tenants.second_tenant_served()


# --- WebSocket ------------------------------------------------------------------------------

WS_MESSAGES = st.lists(
    st.one_of(
        DEEP.filter(lambda s: len(s) <= 4096),
        JSON.map(json.dumps),
        st.builds(
            lambda seq: json.dumps({"type": "ack", "seq": seq}), st.one_of(SCALARS, NUMERALS)
        ),
        st.binary(max_size=64),
        st.just("x" * 5000),
    ),
    max_size=5,
)


@SETTINGS
@given(after=st.one_of(st.none(), NUMERALS), messages=WS_MESSAGES)
async def test_websocket_inputs(tenants: Tenants, after: str | None, messages: list[Any]) -> None:
    query = "access_token=tok-alice" + ("" if after is None else f"&after={quote(after)}")
    url = f"ws://127.0.0.1:{tenants.server.port}/v1/subscriptions/{tenants.alice_sub}/ws?{query}"
    async with websockets.connect(url) as ws:
        try:
            for message in messages:
                await ws.send(message)
                async with asyncio.timeout(5):
                    while True:
                        reply = json.loads(await ws.recv())
                        assert isinstance(reply, dict)
                        if reply["type"] in ("acked", "error"):
                            break
                if reply["type"] == "error":
                    assert reply["error"]["status"] < 500, reply
        except websockets.ConnectionClosed as closed:
            code = closed.rcvd.code if closed.rcvd is not None else None
            # Refused at the handshake's position (4400) or a frame past the limit (1009).
            assert code in (4400, 1009), code
    await tenants.second_tenant_served()
    await asyncio.sleep(0)
    assert tenants.server.hub.fanout.client_count <= 1
