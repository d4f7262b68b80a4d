"""What the Zaqar face stores is a CloudEvent as the hub's own: a message posted through
``/v2`` to a Keel subscription's queue reaches that subscription's replay and streams as an
event the CloudEvents SDK's strict parsers take (tests/hub/ce.py), and so does the Zaqar
queue's browser stream."""

from __future__ import annotations

import asyncio
import json

from tests.hub import ce
from tests.hub.sse import frames
from tests.hub.zaqar.conftest import Member, Zaqar

BODIES = [{"n": 1, "deep": {"a": [1, 2]}}, "plain text, ünïcode", 3, None]


async def test_posted_messages_are_cloudevents_on_every_keel_path(zq: Zaqar, alice: Member) -> None:
    token = await alice.token()
    async with zq.raw(token) as h:
        sub = (await h.post("/v1/subscriptions", json={"types": ["nothing.*"]})).json()["id"]
        r = await h.post(
            f"/v2/queues/{sub}/messages",
            json={"messages": [{"body": b, "ttl": 300} for b in BODIES]},
        )
        assert r.status_code == 201, r.text
        replay = (await h.get(f"/v1/subscriptions/{sub}/events")).json()["messages"]
        assert len(replay) == len(BODIES)
        for message, body in zip(replay, BODIES, strict=True):
            parsed = ce.structured(json.dumps(message["event"]))
            assert parsed.get_data() == body
            assert parsed.get_extension("tenant") == alice.project_id
        got = []
        async with (
            h.stream(
                "GET", f"/v2/queues/{sub}/messages", headers={"accept": "text/event-stream"}
            ) as stream,
            asyncio.timeout(10),
        ):
            assert stream.status_code == 200
            await h.post(f"/v2/queues/{sub}/messages", json={"messages": [{"body": "live"}]})
            async for frame in frames(stream):
                if frame.event == "cloudevent":
                    got.append(ce.structured(frame.data))
                    break
        assert got[0].get_data() == "live"
