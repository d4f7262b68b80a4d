"""OpenStack notifications from the real oslo.messaging, through a real RabbitMQ, into the hub.

The services' side is oslo.messaging's own Notifier (drivers ``messaging``, the legacy bare
dict, and ``messagingv2``, the 2.0 envelope), on oslo's default non-durable exchange
``openstack``; the hub's side is `keel.hub.oslo_listener` on every store.
"""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from keel.hub import (
    Hub,
    Principal,
    SQLiteStore,
    StaticTokens,
    from_notification,
    oslo_listener,
    oslo_url,
)
from keel.messaging import RequestContext, Transport, connect
from keel.messaging.oslo import decode_message
from tests import oslo as oslo_fixtures
from tests.helpers import eventually
from tests.oslo import EXCHANGE, oslo_context, oslo_messaging

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),  # oslo's stack about itself
]

# The shared fixtures: scripts/servers' RabbitMQ and oslo's notification transport on it.
rabbit = oslo_fixtures.rabbit
oslo_transport = oslo_fixtures.oslo_transport

ALICE = Principal("alice", "p-one", ("member",))
BOB = Principal("bob", "p-two", ("member",))
ADMIN = Principal("root", "p-admin", ("admin",))

# doc/notification_samples/instance-create-end.json in openstack/nova, trimmed; the initiator
# is an admin of another project, the owner is tenant_id.
NOVA_INSTANCE_CREATE_END = {
    "nova_object.name": "InstanceActionPayload",
    "nova_object.namespace": "nova",
    "nova_object.version": "1.1",
    "nova_object.data": {
        "uuid": "178b0921-8f85-4257-88b6-2e743b5a975c",
        "tenant_id": "p-one",
        "user_id": "fake",
        "state": "active",
        "host": "compute",
        "action_initiator_project": "p-admin",
        "ip_addresses": [
            {
                "nova_object.name": "IpPayload",
                "nova_object.data": {"port_uuid": "ce531f90-199f-48c0-816c-13e38010b442"},
            }
        ],
    },
}
# doc/notification_samples/common_payloads/ServiceStatusPayload.json: no project at all.
NOVA_SERVICE_UPDATE = {
    "nova_object.name": "ServiceStatusPayload",
    "nova_object.namespace": "nova",
    "nova_object.version": "1.1",
    "nova_object.data": {
        "host": "host2",
        "binary": "nova-compute",
        "disabled": False,
        "uuid": "fa69c544-906b-4a6a-a9c6-c1f7a8078c73",
    },
}


def _md(timestamp: str = "2026-11-25 17:43:04.123456") -> dict[str, Any]:
    return {"message_id": "m-1", "timestamp": timestamp, "priority": "info"}


# --- mapping (pure) -------------------------------------------------------------------------


def test_versioned_nova_instance_event() -> None:
    admin_ctx = RequestContext(user="admin", project="p-admin")
    e = from_notification(
        admin_ctx,
        "nova-compute:compute",
        "instance.create.end",
        NOVA_INSTANCE_CREATE_END,
        _md(),
    )
    assert (e.source, e.type, e.subject, e.tenant, e.priority) == (
        "nova-compute:compute",
        "instance.create.end",
        "178b0921-8f85-4257-88b6-2e743b5a975c",
        "p-one",  # the owner, not the admin who acted
        "info",
    )
    assert e.time == "2026-11-25T17:43:04.123456+00:00"  # oslo's naive UTC, as RFC 3339
    assert e.data == NOVA_INSTANCE_CREATE_END


@pytest.mark.parametrize(
    ("event_type", "payload", "subject", "tenant"),
    [
        (  # nova, legacy
            "compute.instance.create.end",
            {"instance_id": "i-1", "tenant_id": "p-one", "image_ref_url": "http://g/i"},
            "i-1",
            "p-one",
        ),
        (  # cinder: the volume is the subject even when an instance is named too
            "volume.attach.end",
            {"volume_id": "v-1", "tenant_id": "p-two", "instance_uuid": "i-1"},
            "v-1",
            "p-two",
        ),
        ("snapshot.create.end", {"snapshot_id": "s-1", "tenant_id": "p-two"}, "s-1", "p-two"),
        (  # neutron: the resource is a dict named after it
            "port.create.end",
            {"port": {"id": "port-1", "project_id": "p-one", "tenant_id": "p-one"}},
            "port-1",
            "p-one",
        ),
        ("port.delete.end", {"port_id": "port-2", "port": {"id": "port-2"}}, "port-2", "p-ctx"),
        ("service.update", NOVA_SERVICE_UPDATE, "fa69c544-906b-4a6a-a9c6-c1f7a8078c73", "p-ctx"),
    ],
)
def test_legacy_payloads(event_type: str, payload: Any, subject: str, tenant: str) -> None:
    ctx = RequestContext(project="p-ctx")
    e = from_notification(ctx, "svc.host", event_type, payload, _md())
    assert (e.subject, e.tenant) == (subject, tenant)


def test_no_project_anywhere_means_no_tenant() -> None:
    e = from_notification(
        RequestContext(),
        "nova-compute:h",
        "service.update",
        NOVA_SERVICE_UPDATE,
        _md(),
    )
    assert e.tenant is None


def test_oslo_url_names_the_exchange_and_refuses_other_brokers() -> None:
    url = oslo_url("rabbit://u:p@127.0.0.1:5672/?heartbeat=5", "nova")
    assert url == "rabbit://u:p@127.0.0.1:5672/?heartbeat=5&exchange=nova&exchange_durable=false"
    assert "exchange_durable=true" in oslo_url("rabbit://h/", "nova", durable=True)
    with pytest.raises(ValueError, match="RabbitMQ"):
        oslo_url("nats://127.0.0.1:4222", "nova")


# --- through oslo.messaging and RabbitMQ ------------------------------------------------------


@pytest.fixture
def topics() -> tuple[str, str]:
    """This test's own "notifications" and "versioned_notifications" topics: oslo's notifier
    declares ``<topic>.<priority>`` queues and queue names are global on the broker."""
    run = uuid.uuid4().hex[:8]
    return f"notifications-{run}", f"versioned_notifications-{run}"


@pytest.fixture
async def keel_transport(rabbit: str) -> AsyncIterator[Transport]:
    transport = await connect(oslo_url(rabbit, EXCHANGE))
    yield transport
    await transport.close()


async def _events(hub: Hub, who: Principal, sub_id: str) -> list[dict[str, Any]]:
    import msgspec  # noqa: PLC0415

    _, messages = await hub.read(who, sub_id, after=0, limit=None)
    return [msgspec.json.decode(m.event) for m in messages]


@pytest.mark.parametrize("driver", ["messaging", "messagingv2"])
async def test_oslo_notifications_land_in_their_tenants_subscriptions(
    hub: Hub,
    oslo_transport: Any,
    keel_transport: Transport,
    topics: tuple[str, str],
    driver: str,
) -> None:
    alice = await hub.create_subscription(ALICE, {})
    bob = await hub.create_subscription(BOB, {"types": ["volume.*"]})
    admin = await hub.create_subscription(ADMIN, {"all_projects": True})
    pool = f"keel-hub-{uuid.uuid4().hex[:8]}"  # this test's own queue on the shared exchange
    lis = oslo_listener(hub, keel_transport, topics=topics, pool=pool)
    await lis.start()
    try:
        legacy = oslo_messaging.Notifier(
            oslo_transport, publisher_id="compute.host1", driver=driver, topics=[topics[0]]
        )
        versioned = oslo_messaging.Notifier(
            oslo_transport,
            publisher_id="nova-compute:compute",
            driver=driver,
            topics=[topics[1]],
        )
        as_alice = oslo_context.RequestContext(user_id="alice", project_id="p-one")
        as_admin = oslo_context.RequestContext(user_id="root", project_id="p-admin")
        service = oslo_context.RequestContext()  # periodic task: no user, no project
        before = datetime.now(UTC)
        await asyncio.to_thread(
            legacy.info,
            as_alice,
            "compute.instance.create.end",
            {"instance_id": "i-1", "tenant_id": "p-one", "state": "active"},
        )
        await asyncio.to_thread(
            legacy.info, as_admin, "volume.delete.end", {"volume_id": "v-1", "tenant_id": "p-two"}
        )
        await asyncio.to_thread(
            versioned.info, as_admin, "instance.create.end", NOVA_INSTANCE_CREATE_END
        )
        await asyncio.to_thread(versioned.info, service, "service.update", NOVA_SERVICE_UPDATE)
        await asyncio.to_thread(
            legacy.error, service, "compute.instance.create.error", {"instance_id": "i-1"}
        )

        seen: list[dict[str, Any]] = []

        async def all_in() -> None:
            while len(seen) < 5:
                seen[:] = await _events(hub, ADMIN, admin.id)
                await asyncio.sleep(0.02)

        await asyncio.wait_for(all_in(), 20)
        await eventually(
            lambda: sum(n for k, n in lis.counts.items() if k[2] == "handled") == 5, timeout=5
        )
    finally:
        await lis.stop()
    by_type = {e["type"]: e for e in seen}
    assert set(by_type) == {
        "compute.instance.create.end",
        "volume.delete.end",
        "instance.create.end",
        "service.update",
        "compute.instance.create.error",
    }
    legacy_event = by_type["compute.instance.create.end"]
    assert legacy_event["source"] == "compute.host1"
    assert (legacy_event["subject"], legacy_event["tenant"]) == ("i-1", "p-one")
    assert legacy_event["priority"] == "info"
    assert legacy_event["data"]["state"] == "active"
    time = datetime.fromisoformat(legacy_event["time"])
    assert time.tzinfo is not None
    assert abs((time - before).total_seconds()) < 30
    v = by_type["instance.create.end"]
    assert (v["source"], v["subject"], v["tenant"]) == (
        "nova-compute:compute",
        "178b0921-8f85-4257-88b6-2e743b5a975c",
        "p-one",
    )
    assert v["data"] == NOVA_INSTANCE_CREATE_END
    assert (by_type["volume.delete.end"]["subject"], by_type["volume.delete.end"]["tenant"]) == (
        "v-1",
        "p-two",
    )
    assert "tenant" not in by_type["service.update"]
    assert by_type["compute.instance.create.error"]["priority"] == "error"
    assert "tenant" not in by_type["compute.instance.create.error"]

    alice_types = sorted(e["type"] for e in await _events(hub, ALICE, alice.id))
    assert alice_types == ["compute.instance.create.end", "instance.create.end"]
    bob_types = [e["type"] for e in await _events(hub, BOB, bob.id)]
    assert bob_types == ["volume.delete.end"]


async def test_a_commit_that_keeps_failing_is_dead_lettered_with_the_reason(
    tmp_path: Path,
    rabbit: str,
    oslo_transport: Any,
    keel_transport: Transport,
    topics: tuple[str, str],
) -> None:
    import aio_pika  # noqa: PLC0415

    store = SQLiteStore(tmp_path / "hub.db")
    await store.open()
    hub = Hub(store, StaticTokens({}))
    await hub.start()
    sub = await hub.create_subscription(ALICE, {})
    pool = f"keel-hub-{uuid.uuid4().hex[:8]}"
    lis = oslo_listener(hub, keel_transport, topics=topics, pool=pool, commit_patience=0.5)
    lock = sqlite3.connect(tmp_path / "hub.db", isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")  # every commit of the hub fails: "database is locked"
    connection = await aio_pika.connect(rabbit)
    try:
        await lis.start()
        notifier = oslo_messaging.Notifier(
            oslo_transport,
            publisher_id="compute.host1",
            driver="messagingv2",
            topics=[topics[0]],
        )
        ctxt = oslo_context.RequestContext(project_id="p-one")
        await asyncio.to_thread(
            notifier.info, ctxt, "compute.instance.delete.end", {"instance_id": "i-3"}
        )
        channel = await connection.channel()
        dlq = await channel.get_queue(f"{pool}.dlq")
        dead: aio_pika.abc.AbstractIncomingMessage | None = None
        async with asyncio.timeout(30):
            while dead is None:
                dead = await dlq.get(fail=False)
                await asyncio.sleep(0.05)
        await dead.ack()
        reason = str((dead.headers or {}).get("x-keel-reason"))
        assert "database is locked" in reason, reason
        assert decode_message(dead.body).event_type == "compute.instance.delete.end"
        assert (await hub.read(ALICE, sub.id, after=0, limit=None))[1] == []
    finally:
        await connection.close()
        lock.execute("ROLLBACK")
        lock.close()
        await lis.stop()
        await hub.stop()
        await store.close()
