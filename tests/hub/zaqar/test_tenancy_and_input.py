"""A second project never sees the first one's queues, messages or claims through the Zaqar
API; hostile and malformed input gets Zaqar's 4xx error body, never a 5xx."""

from __future__ import annotations

import json
from typing import Any

import httpx
from zaqarclient.transport import errors as zerrors

from tests.hub.zaqar.conftest import Member, Zaqar, sync


async def test_a_second_project_sees_nothing_of_the_first(
    zq: Zaqar, alice: Member, bob: Member
) -> None:
    a, b = zq.heat(alice, await alice.token()), zq.heat(bob, await bob.token())

    def run() -> dict[str, Any]:
        out: dict[str, Any] = {}
        qa = a.queue("shared-name")
        posted = qa.post([{"body": "secret", "ttl": 300}, {"body": "other", "ttl": 300}])
        mid = posted["resources"][0].rsplit("/", 1)[-1]
        claim = qa.claim(ttl=60, grace=60, limit=1)
        list(claim)
        signed = qa.signed_url(["messages"], methods=["GET", "DELETE"])
        out["b_queues"] = [q.name for q in b.queues()[0]]
        qb = b.queue("shared-name")
        out["b_exists"] = qb.exists()
        out["b_messages"] = list(qb.messages(echo=True, include_claimed=True))
        out["b_stats"] = qb.stats
        for name, call in (
            ("message", lambda: qb.message(mid)),
            ("claim", lambda: qb.claim(id=claim.id).ttl),
            ("metadata", lambda: qb.metadata(force_reload=True)),
        ):
            try:
                call()
                out[name] = "seen"
            except zerrors.ResourceNotFound:
                out[name] = "404"
        out["b_pop"] = list(qb.pop(5))
        qb.delete_messages(mid)  # names a message of another project: nothing happens
        b.queue("shared-name").delete()
        # Alice's signed URL with Bob's project id: the signature covers the project.
        forged = dict(signed, project=bob.project_id)
        try:
            list(zq.signed(forged).queue("shared-name").messages())
            out["forged"] = "seen"
        except zerrors.ResourceNotFound:
            out["forged"] = "404"
        out["a_left"] = [m.body for m in qa.messages(echo=True, include_claimed=True)]
        out["a_claim_ttl"] = qa.claim(id=claim.id).ttl
        return out

    out = await sync(run)
    assert out["b_queues"] == []
    assert out["b_exists"] is False
    assert out["b_messages"] == []
    assert out["b_stats"]["messages"]["total"] == 0
    assert (out["message"], out["claim"], out["metadata"]) == ("404", "404", "404")
    assert out["b_pop"] == []
    assert out["forged"] == "404"
    assert out["a_left"] == ["secret", "other"]  # Bob's deletes changed nothing
    assert out["a_claim_ttl"] == 60


async def test_the_same_name_is_two_queues(zq: Zaqar, alice: Member, bob: Member) -> None:
    a, b = zq.heat(alice, await alice.token()), zq.heat(bob, await bob.token())
    await sync(lambda: a.queue("jobs").post({"body": "a"}))
    await sync(lambda: b.queue("jobs").post({"body": "b"}))
    assert await sync(lambda: [m.body for m in a.queue("jobs").messages(echo=True)]) == ["a"]
    assert await sync(lambda: [m.body for m in b.queue("jobs").messages(echo=True)]) == ["b"]


async def test_errors_are_zaqars_shape_and_never_5xx(zq: Zaqar, alice: Member) -> None:
    token = await alice.token()
    post = "/v2/queues/q/messages"
    async with zq.raw(token) as h, zq.raw(token, **{"Client-ID": ""}) as no_id:
        cases: list[tuple[str, str, dict[str, Any], int]] = [
            ("POST", post, {"content": b'{"messages": [{"body": 1, "ttl": 10}]}'}, 400),
            ("POST", post, {"content": b'{"messages": [{"body": 1, "ttl": true}]}'}, 400),
            ("POST", post, {"content": b'{"messages": [{"body": 1, "ttl": 1e400}]}'}, 400),
            (
                "POST",
                post,
                {"content": b'{"messages": [{"body": 1, "ttl": 99999999999999999999999}]}'},
                400,
            ),
            ("POST", post, {"content": b'{"messages": [{"ttl": 60}]}'}, 400),
            ("POST", post, {"content": b'{"messages": []}'}, 400),
            ("POST", post, {"content": b'{"other": []}'}, 400),
            ("POST", post, {"content": b"[1, 2]"}, 400),
            ("POST", post, {"content": b"{not json"}, 400),
            (
                "POST",
                post,
                {"content": b'{"messages": [{"body": ' + b"[" * 100_000 + b"]" * 100_000 + b"}]}"},
                400,
            ),
            (
                "POST",
                post,
                {"content": json.dumps({"messages": [{"body": "x" * 300_000}]}).encode()},
                400,
            ),
            ("POST", post, {"content": b'{"messages": [{"body": 1, "delay": 901}]}'}, 400),
            ("GET", post + "?limit=\u0661", {}, 400),  # an Arabic-Indic one passes isdigit()
            ("GET", post + "?limit=21", {}, 400),
            ("GET", post + "?limit=99999999999999999999999999", {}, 400),
            ("GET", post + "?echo=maybe", {}, 400),
            ("GET", "/v2/queues/" + "x" * 65, {}, 400),
            ("GET", "/v2/queues/bad%20name", {}, 400),
            ("DELETE", post, {}, 400),
            ("DELETE", post + "?ids=a&pop=1", {}, 400),
            ("DELETE", post + "?pop=21", {}, 400),
            ("POST", "/v2/queues/q/claims?limit=0", {"json": {}}, 400),
            ("POST", "/v2/queues/q/claims", {"json": {"ttl": 59}}, 400),
            ("POST", "/v2/queues/q/claims", {"json": {"grace": "x"}}, 400),
            (
                "PATCH",
                "/v2/queues/q",
                {"json": [{"op": "add", "path": "/metadata/a", "value": 1}]},
                415,
            ),
            ("PUT", "/v2/queues/q", {"json": {"_default_message_ttl": "x"}}, 400),
            ("PUT", "/v2/queues/q", {"json": {"_keel_filter": {"sql": "1=1"}}}, 400),
            ("PUT", "/v2/queues/q", {"json": {"_keel_filter": {"filters": [{"sql": "x"}]}}}, 400),
            ("PUT", "/v2/queues/q", {"content": b"[]"}, 400),
            ("PUT", "/v2/queues/sub-nope", {}, 400),
            ("POST", "/v2/queues/q/purge", {"json": {"resource_types": ["queues"]}}, 400),
            ("POST", "/v2/queues/q/subscriptions", {"json": {"subscriber": "mailto:a@b"}}, 400),
            (
                "POST",
                "/v2/queues/q/subscriptions",
                {"json": {"subscriber": "http://x", "ttl": 1}},
                400,
            ),
            ("POST", "/v2/queues/q/subscriptions", {"json": {}}, 400),
            (
                "POST",
                post,
                {
                    "content": b"a=b",
                    "headers": {"Content-Type": "application/x-www-form-urlencoded"},
                },
                400,
            ),
        ]
        for method, url, kwargs, status in cases:
            r = await h.request(method, url, **kwargs)
            assert r.status_code == status, (method, url, r.status_code, r.text[:200])
            assert set(r.json()) == {"title", "description"}, r.text[:200]
        r = await no_id.get(post)
        assert (r.status_code, r.json()["title"]) == (400, "Wrong UUID value")
        r = await h.get(post, headers={"Client-ID": "not-a-uuid"})
        assert (r.status_code, r.json()["title"]) == (400, "Wrong UUID value")
        async with httpx.AsyncClient(base_url=zq.url, headers={"X-Auth-Token": token}) as bare:
            r = await bare.get(post)
        assert (r.status_code, r.json()["title"]) == (400, "Missing header value")
        r = await h.get(post, headers={"X-Auth-Token": "nope"})
        assert r.status_code == 401
        assert set(r.json()) == {"title", "description"}
