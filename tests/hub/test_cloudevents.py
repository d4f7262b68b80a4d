"""Every event the hub emits, on every push path and the pull path, parsed by the official
CloudEvents SDK's strict parsers (tests/hub/ce.py): SSE, both WebSocket framings (the hub's
messages and the CloudEvents WebSocket binding), webhooks in structured and binary mode, and
the replay API. The events cover data as JSON, as text and as base64, no data, extension
attributes of each JSON type, and a notification mapped by the hub itself."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import websockets

from keel.hub import Hub, HubServer, StaticTokens, Store, from_notification
from keel.wire import RequestContext
from tests.hub import ce
from tests.hub.conftest import TOKENS
from tests.hub.receiver import Receiver
from tests.hub.sse import frames
from tests.hub.test_ws import ws_url

BASE = {"specversion": "1.0", "source": "compute.host-a", "tenant": "p-one"}
BINARY = b"\x00\x01\xfe binary"
EVENTS: list[dict[str, Any]] = [
    {
        **BASE,
        "id": "ce-json",
        "type": "compute.instance.create.end",
        "subject": "i-1",
        "time": "2026-01-02T03:04:05Z",
        "data": {"n": 1, "name": 'vm "one" 100%'},
    },
    {
        **BASE,
        "id": "ce-text",
        "type": "compute.instance.update",
        "datacontenttype": "text/plain",
        "data": "plain text, ünïcode",
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "retries": 3,
        "urgent": True,
    },
    {
        **BASE,
        "id": "ce-b64",
        "type": "image.upload",
        "datacontenttype": "application/octet-stream",
        "data_base64": base64.b64encode(BINARY).decode(),
    },
    {**BASE, "id": "ce-none", "type": "service.ping"},
]
NOTIFICATION_ID = "n-versioned"
IDS = [e["id"] for e in EVENTS] + [NOTIFICATION_ID]


async def emit(hub: Hub, admin: httpx.AsyncClient) -> None:
    for event in EVENTS:
        r = await admin.post("/v1/events", json=event)
        assert r.status_code == 202, r.text
    payload = {
        "nova_object.name": "InstanceActionPayload",
        "nova_object.data": {"uuid": "i-9", "tenant_id": "p-one", "state": "active"},
        "nova_object.version": "1.8",
    }
    meta = {"message_id": NOTIFICATION_ID, "timestamp": "2026-11-25 17:43:04.123456"}
    await hub.ingest(
        from_notification(
            RequestContext(project="p-admin"),
            "nova-compute:host-a",
            "instance.create.end",
            payload,
            {**meta, "priority": "INFO"},
        )
    )


def check(parsed: Any, index: int) -> None:
    """What the SDK parsed is what was sent."""
    assert parsed.get_id() == IDS[index]
    if index == 0:
        assert parsed.get_data() == EVENTS[0]["data"]
        assert parsed.get_subject() == "i-1"
        assert parsed.get_time().year == 2026
    elif index == 1:
        assert str(parsed.get_extension("retries")) == "3"  # headers carry strings
        assert parsed.get_extension("traceparent") == EVENTS[1]["traceparent"]
    elif index == len(EVENTS):
        assert parsed.get_extension("tenant") == "p-one"
        assert parsed.get_datacontenttype() == "application/json"


async def test_sse_and_replay(
    server: HubServer, alice: httpx.AsyncClient, admin: httpx.AsyncClient
) -> None:
    sub = (await alice.post("/v1/subscriptions", json={})).json()["id"]
    await emit(server.hub, admin)
    replay = (await alice.get(f"/v1/subscriptions/{sub}/events")).json()["messages"]
    for i, message in enumerate(replay):
        check(ce.structured(json.dumps(message["event"])), i)
    assert len(replay) == len(IDS)
    got = []
    async with alice.stream("GET", f"/v1/subscriptions/{sub}/stream?after=0") as r:
        async with asyncio.timeout(10):
            async for frame in frames(r):
                if frame.event == "cloudevent":
                    got.append(ce.structured(frame.data))
                    if len(got) == len(IDS):
                        break
    for i, parsed in enumerate(got):
        check(parsed, i)


async def test_websocket_messages_and_the_cloudevents_binding(
    server: HubServer, alice: httpx.AsyncClient, admin: httpx.AsyncClient
) -> None:
    sub = (await alice.post("/v1/subscriptions", json={})).json()["id"]
    await emit(server.hub, admin)
    url = ws_url(server, sub, "?after=0&access_token=tok-alice")
    async with websockets.connect(url) as ws:
        assert ws.subprotocol is None
        for i in range(len(IDS)):
            message = json.loads(await asyncio.wait_for(ws.recv(), 10))
            check(ce.structured(json.dumps(message["event"])), i)
    async with websockets.connect(
        url, subprotocols=[websockets.Subprotocol("cloudevents.json")]
    ) as ws:
        assert ws.subprotocol == "cloudevents.json"
        for i in range(len(IDS)):
            parsed = ce.structured(await asyncio.wait_for(ws.recv(), 10))
            check(parsed, i)
            assert parsed.get_extension("hubseq") == str(i + 1)
        ack = {
            "specversion": "1.0",
            "id": "a-1",
            "source": "/client",
            "type": "org.keel.hub.ack",
            "datacontenttype": "application/json",
            "data": {"seq": 2},
        }
        await ws.send(json.dumps(ack))
        acked = ce.structured(await asyncio.wait_for(ws.recv(), 10))
        assert acked.get_type() == "org.keel.hub.acked"
        assert acked.get_data() == {"seq": 2, "count": 2}
        await ws.send(json.dumps({"type": "ack", "seq": 3}))  # the hub's framing: refused here
        error = ce.structured(await asyncio.wait_for(ws.recv(), 10))
        assert error.get_type() == "org.keel.hub.error"
        assert error.get_data()["status"] == 400


@pytest.fixture
async def webhook_hub(store: Store) -> AsyncIterator[Hub]:
    hub = Hub(store, StaticTokens(TOKENS), allow_private_webhooks=True, webhook_idle_check=0.02)
    await hub.start()
    yield hub
    await hub.stop()


@pytest.mark.parametrize("mode", ["structured", "binary"])
async def test_webhooks_in_both_content_modes(webhook_hub: Hub, mode: str) -> None:
    async with Receiver(lambda n, h, b: 200) as rx:
        who = TOKENS["tok-alice"]
        await webhook_hub.create_subscription(who, {"webhook": {"url": rx.url, "mode": mode}})
        async with (
            HubServer(webhook_hub) as server,
            httpx.AsyncClient(base_url=server.url, headers={"X-Auth-Token": "tok-admin"}) as admin,
        ):
            await emit(webhook_hub, admin)
        await rx.wait_for(len(IDS))
    for i, request in enumerate(rx.requests):
        parsed = ce.http(request.headers, request.body)
        check(parsed, i)
        if mode == "binary":
            assert "ce-specversion" in request.headers
            if IDS[i] == "ce-b64":
                assert request.body == BINARY
                assert request.headers["content-type"] == "application/octet-stream"
            if IDS[i] == "ce-text":
                assert request.body.decode() == EVENTS[1]["data"]
        else:
            assert request.headers["content-type"] == "application/cloudevents+json"
