"""The Zaqar v2 API driven by the real python-zaqarclient, authenticated by the real Keystone,
on every store: queues, messages, claims and signed URLs, call by call, with what the server
answers checked beside what the client makes of it."""

from __future__ import annotations

from typing import Any

import pytest
from zaqarclient.queues.v2 import core
from zaqarclient.transport import errors as zerrors

from keel.hub import CloudEvent
from tests.hub.test_keystone import Tenant
from tests.hub.zaqar.conftest import Zaqar, sync


async def test_queues_create_get_patch_list_stats_purge_delete(zq: Zaqar, alice: Tenant) -> None:
    c = zq.heat(alice, await alice.token())

    def run() -> dict[str, Any]:
        out: dict[str, Any] = {}
        q = c.queue("jobs", force_create=True)
        out["exists"] = q.exists()
        out["missing"] = c.queue("nope", auto_create=False).exists()
        q.metadata(new_meta={"color": "blue", "_default_message_ttl": 120})
        out["meta"] = q.metadata(force_reload=True)
        q.metadata(new_meta={"color": "red"})
        out["meta2"] = q.metadata(force_reload=True)
        for n in range(5):
            c.queue(f"q{n}", force_create=True)
        out["names"] = [x.name for x in c.queues(limit=2)[0].stream()]
        detailed, count = c.queues(detailed=True, with_count=True)
        out["detailed"] = {x.name: x._metadata for x in detailed}
        out["count"] = count
        q.post([{"body": n, "ttl": 300} for n in range(3)])
        out["stats"] = q.stats
        q.purge(resource_types=["messages"])
        out["purged"] = q.stats
        q.delete()
        out["deleted"] = q.exists()
        return out

    out = await sync(run)
    assert out["exists"] is True
    assert out["missing"] is False
    assert out["meta"]["color"] == "blue"
    assert out["meta"]["_default_message_ttl"] == 120
    assert out["meta"]["_max_messages_post_size"] == 256 * 1024  # reserved defaults shown
    assert out["meta2"]["color"] == "red"
    assert out["meta2"]["_default_message_ttl"] == 3600  # removed, so the default again
    assert out["names"] == ["jobs", "q0", "q1", "q2", "q3", "q4"]  # paged by 2, followed
    assert out["detailed"]["jobs"]["color"] == "red"
    assert out["count"] == 6
    assert out["stats"]["messages"]["total"] == 3
    assert out["stats"]["messages"]["free"] == 3
    assert out["stats"]["messages"]["oldest"]["href"].startswith("/v2/queues/jobs/messages/")
    assert out["purged"]["messages"] == {"claimed": 0, "free": 0, "total": 0}
    assert out["deleted"] is False


async def test_messages_post_list_get_delete_pop(zq: Zaqar, alice: Tenant) -> None:
    token = await alice.token()
    poster, reader = zq.heat(alice, token), zq.heat(alice, token)

    def run() -> dict[str, Any]:
        out: dict[str, Any] = {}
        q = poster.queue("work")
        posted = q.post([{"body": {"n": n}, "ttl": 600} for n in range(4)])
        q.post({"body": "later", "ttl": 600, "delay": 60})
        ids = [href.rsplit("/", 1)[-1] for href in posted["resources"]]
        out["ids"] = ids
        out["own"] = [m.body for m in q.messages()]  # echo=false: not the poster's own
        out["echo"] = [m.body for m in q.messages(echo=True)]
        r = reader.queue("work")
        page = list(r.messages(limit=2))
        out["page"] = [m.body for m in page]
        out["next"] = [m.body for m in r.messages(limit=2, marker=page[-1].id)]
        out["all"] = [m.body for m in r.messages(limit=2).stream()]
        one = r.message(ids[1])
        out["one"] = (one.id, one.body, one.ttl, one.age)
        out["many"] = sorted(m.body["n"] for m in r.messages(ids[0], ids[2]))
        r.message(ids[0]).delete()
        r.delete_messages(ids[1], ids[2])
        out["left"] = [m.body for m in r.messages()]
        out["popped"] = [m.body for m in r.pop(5)]
        out["after_pop"] = [m.body for m in r.messages(include_delayed=True)]
        try:
            r.message(ids[0])
        except zerrors.ResourceNotFound:
            out["gone"] = True
        return out

    out = await sync(run)
    assert out["own"] == []
    assert out["echo"] == [{"n": n} for n in range(4)]  # the delayed one is not listed
    assert out["page"] == [{"n": 0}, {"n": 1}]
    assert out["next"] == [{"n": 2}, {"n": 3}]
    assert out["all"] == [{"n": n} for n in range(4)]
    assert out["one"][:3] == (out["ids"][1], {"n": 1}, 600)
    assert out["many"] == [0, 2]
    assert out["left"] == [{"n": 3}]
    assert out["popped"] == [{"n": 3}]  # the delayed message is not popped either
    assert out["after_pop"] == ["later"]
    assert out["gone"] is True


async def test_claims_create_get_update_release_and_delete_by_claim(
    zq: Zaqar, alice: Tenant
) -> None:
    c = zq.mistral(alice)

    def run() -> dict[str, Any]:
        out: dict[str, Any] = {}
        q = c.queue("tasks")
        q.post([{"body": f"t{n}", "ttl": 300} for n in range(3)])
        claim = q.claim(ttl=60, grace=60, limit=2)
        msgs = list(claim)
        out["claimed"] = [(m.body, m.claim_id) for m in msgs]
        out["claim_id"] = claim.id
        again = q.claim(id=claim.id)
        out["get"] = (again.ttl, again.age, [m.body for m in again])
        claim.update(ttl=120, grace=60)
        out["updated_ttl"] = q.claim(id=claim.id).ttl
        out["listed"] = [m.body for m in q.messages(echo=True)]
        out["with_claimed"] = [m.body for m in q.messages(echo=True, include_claimed=True)]
        req, trans = c._request_and_transport()
        try:
            core.message_delete(trans, req, "tasks", msgs[0].id)  # no claim id: refused
        except zerrors.ForbiddenError:
            out["refused"] = True
        msgs[0].delete()  # the claim id from its href
        claim.delete()  # released: the other comes back
        out["after"] = [m.body for m in q.messages(echo=True)]
        out["empty"] = list(q.claim(ttl=60, grace=60, limit=5))
        out["none"] = list(q.claim(ttl=60, grace=60, limit=5))
        return out

    out = await sync(run)
    assert [b for b, _ in out["claimed"]] == ["t0", "t1"]
    assert {cid for _, cid in out["claimed"]} == {out["claim_id"]}
    assert out["get"][0] == 60
    assert out["get"][2] == ["t0", "t1"]
    assert out["updated_ttl"] == 120
    assert out["listed"] == ["t2"]
    assert out["with_claimed"] == ["t0", "t1", "t2"]
    assert out["refused"] is True
    assert out["after"] == ["t1", "t2"]
    assert [m.body for m in out["empty"]] == ["t1", "t2"]
    assert out["none"] == []  # 204: nothing to claim


async def test_claim_answers_201_with_location_and_204(zq: Zaqar, alice: Tenant) -> None:
    async with zq.raw(await alice.token()) as h:
        assert (await h.post("/v2/queues/c/claims", json={})).status_code == 204  # no queue
        r = await h.post("/v2/queues/c/messages", json={"messages": [{"body": 1}]})
        assert r.status_code == 201
        assert r.headers["location"].startswith("/v2/queues/c/messages?ids=")
        r = await h.post("/v2/queues/c/claims?limit=1", json={"ttl": 60, "grace": 60})
        assert r.status_code == 201
        claim = r.headers["location"]
        assert claim.startswith("/v2/queues/c/claims/")
        assert r.json()["messages"][0]["href"].endswith("?claim_id=" + claim.rsplit("/", 1)[1])
        assert (await h.post("/v2/queues/c/claims", json={})).status_code == 204
        assert (await h.get(claim)).status_code == 200
        assert (await h.delete(claim)).status_code == 204
        assert (await h.delete(claim)).status_code == 204  # gone: still 204
        assert (await h.get(claim)).status_code == 404
        assert (await h.patch(claim, json={"ttl": 60})).status_code == 404


async def test_a_keel_subscription_is_a_zaqar_queue(zq: Zaqar, alice: Tenant) -> None:
    """The cloud's events, read with python-zaqarclient from a Keel subscription's queue."""
    token = await alice.token()
    async with zq.raw(token) as h:
        r = await h.post("/v1/subscriptions", json={"types": ["compute.instance.*"]})
        assert r.status_code == 201, r.text
        sub_id = r.json()["id"]
    for n in range(2):
        await zq.hub.ingest(
            CloudEvent(
                id=f"ev-{sub_id}-{n}",
                source="compute.host-a",
                type="compute.instance.create.end",
                subject=f"i-{n}",
                data={"instance_id": f"i-{n}"},
                tenant=alice.project_id,
            )
        )
    c = zq.heat(alice, token)

    def run() -> tuple[list[str], list[Any], list[Any]]:
        names = [q.name for q in c.queues()[0]]
        q = c.queue(sub_id)
        bodies = [m.body for m in q.messages()]
        claimed = list(q.claim(ttl=60, grace=60, limit=5))
        for m in claimed:
            m.delete()
        return names, bodies, [m.body["subject"] for m in claimed]

    names, bodies, subjects = await sync(run)
    assert sub_id in names
    assert [b["type"] for b in bodies] == ["compute.instance.create.end"] * 2
    assert subjects == ["i-0", "i-1"]
    # Deleted through Zaqar = acked in the hub's queue.
    _, msgs = await zq.hub.store.read(sub_id, after=0, limit=10)
    assert [m.state for m in msgs] == ["acked", "acked"]


async def test_a_queue_with_a_keel_filter_gets_the_clouds_events(zq: Zaqar, alice: Tenant) -> None:
    c = zq.heat(alice, await alice.token())
    await sync(lambda: c.queue("events", force_create=True))

    def patch() -> None:
        c.queue("events").metadata(new_meta={"_keel_filter": {"types": ["volume.*"]}})

    await sync(patch)
    for kind in ("volume.attach.end", "compute.instance.create.end"):
        await zq.hub.ingest(
            CloudEvent(id=f"e-{kind}", source="s", type=kind, tenant=alice.project_id)
        )
    bodies = await sync(lambda: [m.body["type"] for m in c.queue("events").messages()])
    assert bodies == ["volume.attach.end"]


async def test_signed_url_then_pop_with_it(zq: Zaqar, alice: Tenant) -> None:
    owner = zq.heat(alice, await alice.token())

    def run() -> dict[str, Any]:
        out: dict[str, Any] = {}
        q = owner.queue("signals")
        signed = q.signed_url(["messages"], methods=["GET", "DELETE"], ttl_seconds=600)
        out["signed"] = signed
        q.post({"body": {"status": "COMPLETE"}, "ttl": 600})
        agent = zq.signed(signed)
        out["popped"] = [m.body for m in agent.queue("signals").pop()]
        try:
            agent.queue("signals").post({"body": 1})  # POST was not signed
        except zerrors.ResourceNotFound:
            out["post_refused"] = True
        try:
            list(agent.queue("other").messages())  # another queue
        except zerrors.ResourceNotFound:
            out["other_refused"] = True
        return out

    out = await sync(run)
    assert out["signed"]["paths"] == ["/v2/queues/signals/messages"]
    assert out["signed"]["methods"] == ["DELETE", "GET"]
    assert out["signed"]["project"] == alice.project_id
    assert out["popped"] == [{"status": "COMPLETE"}]
    assert out["post_refused"] is True
    assert out["other_refused"] is True


async def test_signed_urls_refused_when_tampered_or_expired(zq: Zaqar, alice: Tenant) -> None:
    async with zq.raw(await alice.token()) as h:
        r = await h.post("/v2/queues/s/share", json={"methods": ["GET"]})
        assert r.status_code == 200, r.text
        signed = r.json()
        r = await h.post("/v2/queues/s/share", json={"expires": "2001-01-01T00:00:00"})
        assert r.status_code == 400
        assert (await h.post("/v2/queues/s/share", json={"project_id": "x"})).status_code == 400
        assert (await h.post("/v2/queues/s/share", json={"paths": ["x"]})).status_code == 400
        assert (
            await h.post("/v2/queues/s/share", json={"expires": "1700000000"})
        ).status_code == 400

    def headers(**change: str) -> dict[str, str]:
        base = {
            "URL-Signature": signed["signature"],
            "URL-Expires": signed["expires"],
            "URL-Methods": ",".join(signed["methods"]),
            "URL-Paths": ",".join(signed["paths"]),
            "X-Project-Id": signed["project"],
        }
        return {**base, **change}

    async with zq.raw() as anon:
        assert (await anon.get("/v2/queues/s/messages", headers=headers())).status_code == 200
        for bad in (
            {"X-Project-Id": "another"},
            {"URL-Paths": "/v2/queues"},
            {"URL-Methods": "GET,DELETE"},
            {"URL-Expires": "2999-01-01T00:00:00"},
            {"URL-Signature": "0" * 64},
            {"URL-Paths": "(a+)+$" * 50},  # a pattern: never used as a regex
        ):
            r = await anon.get("/v2/queues/s/messages", headers=headers(**bad))
            assert r.status_code == 404, bad
            assert set(r.json()) == {"title", "description"}
        r = await anon.delete("/v2/queues/s/messages?pop=1", headers=headers())
        assert r.status_code == 404  # DELETE was not signed
        assert (await anon.get("/v2/queues/s/messages")).status_code == 401


async def test_static_tokens_and_the_project_header(store: Any, keystone: str) -> None:
    from zaqarclient.queues.v2 import client as zaqar  # noqa: PLC0415

    from keel.hub import Hub, HubServer, Principal, StaticTokens  # noqa: PLC0415
    from keel.hub.zaqar import ZaqarConfig  # noqa: PLC0415

    hub = Hub(store, StaticTokens({"tok-p": Principal("u", "p-one", ("member",))}))
    await hub.start()
    try:
        async with HubServer(hub, zaqar=ZaqarConfig()) as server:
            opts = {"os_auth_token": "tok-p", "os_project_id": "p-one"}
            c = zaqar.Client(
                url=server.url, conf={"auth_opts": {"backend": "keystone", "options": opts}}
            )
            await sync(lambda: c.queue("a").post({"body": 1}))
            assert await sync(lambda: [m.body for m in c.queue("a").messages(echo=True)]) == [1]
            wrong = zaqar.Client(
                url=server.url,
                conf={
                    "auth_opts": {
                        "backend": "keystone",
                        "options": {"os_auth_token": "tok-p", "os_project_id": "p-two"},
                    }
                },
            )
            with pytest.raises(zerrors.ForbiddenError):
                await sync(lambda: list(wrong.queue("a").messages()))
    finally:
        await hub.stop()


async def test_ttl_and_grace_through_the_api(zq: Zaqar, alice: Tenant) -> None:
    async with zq.raw(await alice.token()) as h:
        r = await h.post("/v2/queues/t/messages", json={"messages": [{"body": 1, "ttl": 60}]})
        assert r.status_code == 201
        href = r.json()["resources"][0]
        m = (await h.get(href)).json()
        assert (m["ttl"], m["body"]) == (60, 1)
        assert set(m) == {"id", "href", "ttl", "age", "body"}
        r = await h.post("/v2/queues/t/claims", json={"ttl": 300, "grace": 120})
        assert r.status_code == 201
        m = (await h.get(href)).json()
        assert m["ttl"] >= 419  # lives at least the claim's ttl plus its grace
        assert "?claim_id=" in m["href"]
        stats = (await h.get("/v2/queues/t/stats")).json()["messages"]
        assert (stats["claimed"], stats["free"], stats["total"]) == (1, 0, 1)
