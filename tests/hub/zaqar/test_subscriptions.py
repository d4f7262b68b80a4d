"""Zaqar subscriptions through python-zaqarclient: http(s) subscribers get each message as
Zaqar sends it, signed as Keel's webhooks are, under the same SSRF policy; with confirmation
required they get the notice first and nothing else until they confirm."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest
from zaqarclient.transport import errors as zerrors

from keel.hub import CloudEvent, Store
from keel.hub._webhooks import verify
from keel.hub.zaqar import ZaqarConfig
from tests.hub.receiver import Receiver
from tests.hub.zaqar.conftest import Member, Zaqar, serve, sync


async def test_create_list_get_update_delete_and_deliveries(zq: Zaqar, alice: Member) -> None:
    c = zq.heat(alice, await alice.token())
    async with Receiver(lambda n, h, b: 200) as rx, Receiver(lambda n, h, b: 200) as rx2:

        def create() -> dict[str, Any]:
            out: dict[str, Any] = {}
            sub = c.subscription("news", subscriber=rx.url, ttl=3600, options={"k": "v"})
            out["id"] = sub.id
            out["listed"] = [
                (s.id, s.subscriber, s.ttl, s.options) for s in c.subscriptions("news")
            ]
            got = c.subscription("news", id=sub.id, auto_create=False)
            got.ensure_exists()
            out["got"] = (got.subscriber, got.ttl, got.options, got.confirmed)
            try:
                c.subscription("news", subscriber=rx.url, ttl=3600)
            except zerrors.ConflictError:
                out["duplicate"] = "409"
            c.queue("news").post({"body": {"headline": "hi"}, "ttl": 300})
            return out

        out = await sync(create)
        assert out["listed"] == [(out["id"], rx.url, 3600, {"k": "v"})]
        assert out["got"] == (rx.url, 3600, {"k": "v"}, False)
        assert out["duplicate"] == "409"
        await rx.wait_for(1)
        got = rx.requests[0]
        assert msgspec.json.decode(got.body) == {
            "body": {"headline": "hi"},
            "ttl": 300,
            "Message_Type": "Notification",
            "queue_name": "news",
        }
        async with zq.raw(await alice.token()) as h:
            secret = (await h.get(f"/v2/queues/news/subscriptions/{out['id']}")).json()["secret"]
        assert verify(secret, got.headers, got.body)

        def update() -> tuple[str, int]:
            sub = c.subscription("news", id=out["id"], auto_create=False)
            sub.update({"subscriber": rx2.url, "ttl": 600})
            fresh = c.subscription("news", id=out["id"], auto_create=False)
            fresh.ensure_exists()
            c.queue("news").post({"body": 2})
            return fresh.subscriber, fresh.ttl

        assert await sync(update) == (rx2.url, 600)
        await rx2.wait_for(1)
        assert msgspec.json.decode(rx2.requests[0].body)["body"] == 2
        await sync(lambda: c.subscription("news", id=out["id"], auto_create=False).delete())
        assert await sync(lambda: list(c.subscriptions("news"))) == []
        await sync(lambda: c.queue("news").post({"body": 3}))
        await asyncio.sleep(0.5)
        assert len(rx2.requests) == 1
        # The subscriptions never show as queues.
        assert await sync(lambda: [q.name for q in c.queues()[0]]) == ["news"]


async def test_post_data_and_headers_options(zq: Zaqar, alice: Member) -> None:
    c = zq.heat(alice, await alice.token())
    async with Receiver(lambda n, h, b: 200) as rx:
        options = {
            "post_data": '{"workflow": "w1", "input": {"msg": "$zaqar_message$"}}',
            "post_headers": {
                "X-Trace": "t1",
                "Host": "evil",
                "Content-Length": "1",
                "Content-Type": "text/plain",
                "Webhook-Id": "forged",
                "ce-specversion": "1.0",
                "CE-Type": "forged",
            },
        }
        await sync(lambda: c.subscription("wf", subscriber=rx.url, ttl=600, options=options))
        await sync(lambda: c.queue("wf").post({"body": "go"}))
        await rx.wait_for(1)
        sent = rx.requests[0]
        assert msgspec.json.decode(sent.body)["input"]["msg"]["body"] == "go"
        assert sent.headers["x-trace"] == "t1"
        assert sent.headers["host"] != "evil"
        # Zaqar's body, not a CloudEvent: plain JSON, no CloudEvents header whatever the
        # options say, and the signature's own headers.
        assert sent.headers["content-type"] == "application/json"
        assert not [k for k in sent.headers if k.lower().startswith("ce-")]
        assert sent.headers["webhook-id"].startswith("msg_")


async def test_a_keel_subscription_queue_feeds_its_zaqar_subscribers(
    zq: Zaqar, alice: Member
) -> None:
    token = await alice.token()
    async with zq.raw(token) as h, Receiver(lambda n, h, b: 200) as rx:
        sub_id = (await h.post("/v1/subscriptions", json={"types": ["volume.*"]})).json()["id"]
        c = zq.heat(alice, token)
        await sync(lambda: c.subscription(sub_id, subscriber=rx.url, ttl=600))
        await zq.hub.ingest(
            CloudEvent(id="v1", source="cinder", type="volume.attach.end", tenant=alice.project_id)
        )
        await rx.wait_for(1)
        body = msgspec.json.decode(rx.requests[0].body)
        assert body["body"]["type"] == "volume.attach.end"
        assert body["queue_name"] == sub_id


async def test_private_subscribers_are_refused_by_default(
    store: Store, keystone: str, alice: Member
) -> None:
    async for z in serve(store, keystone, ZaqarConfig()):
        c = z.heat(alice, await alice.token())
        for url in (
            "http://127.0.0.1:9/hook",
            "http://[::ffff:10.0.0.1]/x",
            "http://169.254.169.254/",
        ):
            with pytest.raises(zerrors.MalformedRequest):
                await sync(c.subscription, "q", subscriber=url, ttl=600)
        assert await sync(lambda client=c: list(client.subscriptions("q"))) == []


@pytest.fixture
async def confirming(store: Store, keystone: str) -> AsyncIterator[Zaqar]:
    config = ZaqarConfig(require_confirmation=True, public_url="http://zaqar.example")
    async for z in serve(store, keystone, config, allow_private_webhooks=True):
        yield z


async def test_confirmation_where_it_is_required(confirming: Zaqar, alice: Member) -> None:
    z = confirming
    c = z.heat(alice, await alice.token())
    async with Receiver(lambda n, h, b: 200) as rx:
        sub = await sync(lambda: c.subscription("orders", subscriber=rx.url, ttl=600))
        await rx.wait_for(1)
        notice = msgspec.json.decode(rx.requests[0].body)
        assert notice["Message_Type"] == "SubscriptionConfirmation"
        path = f"/v2/queues/orders/subscriptions/{sub.id}/confirm"
        assert notice["URL-Paths"] == path
        assert notice["WSGISubscribeURL"] == "http://zaqar.example" + path
        assert notice["SubscribeBody"] == {"confirmed": True}
        await sync(lambda: c.queue("orders").post({"body": "early"}))
        await asyncio.sleep(0.6)
        assert len(rx.requests) == 1  # nothing until confirmed
        signed = {
            "URL-Signature": notice["URL-Signature"],
            "URL-Methods": notice["URL-Methods"],
            "URL-Paths": notice["URL-Paths"],
            "URL-Expires": notice["URL-Expires"],
            "X-Project-Id": notice["X-Project-ID"],
        }
        async with z.raw(**signed) as subscriber:
            r = await subscriber.put(path, json={"confirmed": "yes"})
            assert r.status_code == 400
            r = await subscriber.put(path, json=notice["SubscribeBody"])
            assert r.status_code == 204, r.text
            # The signed URL is for that one path and method.
            r = await subscriber.get("/v2/queues/orders/messages")
            assert r.status_code == 404
        fresh = c.subscription("orders", id=sub.id, auto_create=False)
        await sync(fresh.ensure_exists)
        assert fresh.confirmed is True
        await sync(lambda: c.queue("orders").post({"body": "after"}))
        await rx.wait_for(2)
        assert msgspec.json.decode(rx.requests[1].body)["body"] == "after"
        async with z.raw(**signed) as subscriber:
            r = await subscriber.put(path, json=notice["UnsubscribeBody"])
            assert r.status_code == 204
        await rx.wait_for(3)
        assert msgspec.json.decode(rx.requests[2].body)["Message_Type"] == "UnsubscribeConfirmation"
        await sync(lambda: c.queue("orders").post({"body": "ignored"}))
        await asyncio.sleep(0.6)
        assert len(rx.requests) == 3
