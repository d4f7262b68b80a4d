"""Ingest: notifications on a Keel transport become CloudEvents in every matching queue."""

from __future__ import annotations

import asyncio
import uuid

from keel.hub import Hub, Principal, from_notification, listener
from keel.messaging import Notifier, RequestContext, connect
from tests.helpers import eventually

ALICE = Principal("alice", "p-one", ("member",))
BOB = Principal("bob", "p-two", ("member",))
ADMIN = Principal("root", "p-admin", ("admin",))


def test_cloudevent_from_a_legacy_notification() -> None:
    ctx = RequestContext(user="u", project="p-one")
    e = from_notification(
        ctx,
        "compute.host-a",
        "compute.instance.create.end",
        {"instance_id": "i-1", "state": "active"},
        {"message_id": "m1", "timestamp": "2026-01-01T00:00:00+00:00", "priority": "info"},
    )
    assert (e.id, e.source, e.type, e.subject, e.tenant, e.priority) == (
        "m1",
        "compute.host-a",
        "compute.instance.create.end",
        "i-1",
        "p-one",
        "info",
    )
    assert e.time == "2026-01-01T00:00:00+00:00"


def test_tenant_and_subject_from_a_versioned_payload() -> None:
    payload = {"nova_object.data": {"uuid": "i-9", "project_id": "p-two"}}
    e = from_notification(None, "nova", "instance.update", payload, {"message_id": "m2"})
    assert (e.subject, e.tenant) == ("i-9", "p-two")


def test_no_tenant_means_none() -> None:
    e = from_notification(None, "nova", "service.update", {"host": "h"}, {"message_id": "m3"})
    assert e.tenant is None


async def test_listener_commits_to_every_matching_queue_only(hub: Hub) -> None:
    a1 = await hub.create_subscription(ALICE, {"types": ["compute.instance.*"]})
    a2 = await hub.create_subscription(ALICE, {"types": ["volume.*"]})
    b1 = await hub.create_subscription(BOB, {"types": ["compute.*"]})
    everyone = await hub.create_subscription(ADMIN, {"all_projects": True})
    transport = await connect(f"memory://hub-{uuid.uuid4().hex[:8]}")
    lis = listener(hub, transport)
    await lis.start()
    try:
        notifier = Notifier(transport, "compute.host-a")
        ctx = RequestContext(project="p-one")
        await notifier.info(ctx, "compute.instance.create.end", {"instance_id": "i-1"})
        await notifier.info(None, "service.update", {"host": "host-a"})

        async def count(who: Principal, sub_id: str) -> int:
            return len((await hub.read(who, sub_id, after=0, limit=None))[1])

        counts: dict[str, int] = {}

        async def settled() -> None:
            while True:
                counts["a1"] = await count(ALICE, a1.id)
                counts["all"] = await count(ADMIN, everyone.id)
                if counts["a1"] == 1 and counts["all"] == 2:
                    return
                await asyncio.sleep(0.01)

        await asyncio.wait_for(settled(), 5)
        assert await count(ALICE, a2.id) == 0
        assert await count(BOB, b1.id) == 0  # another tenant's event, and an untenanted one
    finally:
        await lis.stop()
        await transport.close()


async def test_ingest_returns_after_commit(hub: Hub) -> None:
    sub = await hub.create_subscription(ALICE, {})
    e = from_notification(
        RequestContext(project="p-one"), "x", "t", {}, {"message_id": "only-once"}
    )
    await asyncio.gather(*(hub.ingest(e) for _ in range(3)))
    _, msgs = await hub.read(ALICE, sub.id, after=0, limit=None)
    assert len(msgs) == 1
    await eventually(lambda: hub.ingested == 3)
