"""oslo.messaging and Keel exchange real OpenStack notifications through a real RabbitMQ.

Both directions, with oslo.messaging's own rabbit driver on the other side: an oslo Notifier
(``messagingv2`` and the legacy ``messaging`` driver) read by Keel's listener, and Keel's
OsloNotifier read by an oslo NotificationListener.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from keel.messaging import RequestContext, Target, Transport, connect
from keel.messaging.oslo import OsloNotificationListener, OsloNotifier
from tests import oslo as oslo_fixtures
from tests.helpers import eventually
from tests.oslo import EXCHANGE, oslo_context, oslo_messaging

pytestmark = [
    pytest.mark.timeout(120),
    # oslo's stack (kombu, eventlet, oslo.service) warns about its own deprecations
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

# The shared fixtures: scripts/servers' RabbitMQ and oslo's notification transport on it.
rabbit = oslo_fixtures.rabbit
oslo_transport = oslo_fixtures.oslo_transport


@pytest.fixture
async def keel_transport(rabbit: str) -> AsyncIterator[Transport]:
    # oslo declares its exchange non-durable (amqp_durable_queues defaults to False)
    transport = await connect(f"{rabbit}?exchange={EXCHANGE}&exchange_durable=false")
    yield transport
    await transport.close()


@pytest.fixture
def topic() -> str:
    return f"notifications-{uuid.uuid4().hex[:8]}"


class Sink:
    def __init__(self) -> None:
        self.seen: list[tuple[RequestContext, str, str, Any, dict[str, Any]]] = []

    async def info(
        self, ctx: RequestContext, publisher_id: str, event_type: str, payload: Any, md: Any
    ) -> None:
        self.seen.append((ctx, publisher_id, event_type, payload, md))

    async def error(
        self, ctx: RequestContext, publisher_id: str, event_type: str, payload: Any, md: Any
    ) -> None:
        self.seen.append((ctx, publisher_id, event_type, payload, md))


@pytest.mark.parametrize("driver", ["messagingv2", "messaging"])
async def test_oslo_notifier_to_keel_listener(
    oslo_transport: Any, keel_transport: Transport, topic: str, driver: str
) -> None:
    sink = Sink()
    listener = OsloNotificationListener(keel_transport, [Target(topic)], [sink])
    await listener.start()
    notifier = oslo_messaging.Notifier(
        oslo_transport, publisher_id="compute.host1", driver=driver, topics=[topic]
    )
    ctxt = oslo_context.RequestContext(
        user_id="u-1", project_id="p-1", roles=["member"], request_id="req-1", auth_token="x"
    )
    legacy = {"instance_id": "i-1", "state": "active"}
    versioned = {
        "nova_object.name": "InstanceActionPayload",
        "nova_object.namespace": "nova",
        "nova_object.version": "1.8",
        "nova_object.data": {"uuid": "i-1"},
    }
    await asyncio.to_thread(notifier.info, ctxt, "compute.instance.create.end", legacy)
    await asyncio.to_thread(notifier.error, ctxt, "instance.create.error", versioned)
    await eventually(lambda: len(sink.seen) == 2, timeout=10)
    await listener.stop()
    by_type = {
        event_type: (ctx, pub, payload, md) for ctx, pub, event_type, payload, md in sink.seen
    }
    ctx, publisher, payload, metadata = by_type["compute.instance.create.end"]
    assert (publisher, payload) == ("compute.host1", legacy)
    assert (ctx.user, ctx.project, ctx.roles, ctx.request_id) == (
        "u-1",
        "p-1",
        ("member",),
        "req-1",
    )
    assert "auth_token" not in ctx.extra
    assert metadata["priority"] == "info"
    assert metadata["message_id"]
    assert by_type["instance.create.error"][2] == versioned


async def test_keel_notifier_to_oslo_listener(
    oslo_transport: Any, keel_transport: Transport, topic: str
) -> None:
    seen: list[tuple[dict[str, Any], str, str, Any, dict[str, Any]]] = []
    arrived = threading.Event()

    class Endpoint:
        def info(
            self, ctxt: Any, publisher_id: str, event_type: str, payload: Any, md: Any
        ) -> None:
            seen.append((ctxt, publisher_id, event_type, payload, md))
            arrived.set()

    listener = oslo_messaging.get_notification_listener(
        oslo_transport, [oslo_messaging.Target(topic=topic)], [Endpoint()], executor="threading"
    )
    await asyncio.to_thread(listener.start)
    try:
        notifier = OsloNotifier(keel_transport, "keel.host2", topics=[topic])
        ctx = RequestContext(user="u-2", project="p-2", roles=("admin",), extra={"x": 1})
        await notifier.info(ctx, "compute.instance.delete.end", {"instance_id": "i-2"})
        assert await asyncio.to_thread(arrived.wait, 10)
    finally:
        await asyncio.to_thread(listener.stop)
        await asyncio.to_thread(listener.wait)
    ctxt, publisher, event_type, payload, metadata = seen[0]
    assert (publisher, event_type, payload) == (
        "keel.host2",
        "compute.instance.delete.end",
        {"instance_id": "i-2"},
    )
    assert (ctxt["user_id"], ctxt["project_id"], ctxt["roles"]) == ("u-2", "p-2", ["admin"])
    assert ctxt["request_id"] == ctx.request_id
    assert ctxt["x"] == 1
    assert metadata["message_id"]
    assert oslo_context.RequestContext.from_dict(ctxt).project_id == "p-2"


async def test_keel_notifications_wait_for_an_oslo_pool_listener(
    oslo_transport: Any, keel_transport: Transport, topic: str
) -> None:
    # Keel declares oslo's default queue; a pool listener started later gets its own copy
    # only from then on, the default queue keeps what was sent before.
    await OsloNotifier(keel_transport, "keel", topics=[topic]).info(None, "early", {"n": 1})
    sink = Sink()
    listener = OsloNotificationListener(keel_transport, [Target(topic)], [sink])
    await listener.start()
    await eventually(lambda: [s[3] for s in sink.seen] == [{"n": 1}], timeout=10)
    await listener.stop()


async def test_malformed_oslo_input_is_dead_lettered(keel_transport: Transport, topic: str) -> None:
    sink = Sink()
    listener = OsloNotificationListener(keel_transport, [Target(topic)], [sink])
    await listener.start()
    dead: list[bytes] = []
    queue = f"{topic}.info.dlq"
    await keel_transport.declare_queue(queue, durable=True)

    def on_dead(delivery: Any) -> None:
        dead.append(delivery.body)
        asyncio.get_running_loop().create_task(delivery.ack())

    await keel_transport.consume(queue, on_dead, prefetch=10)
    await keel_transport.publish(f"{topic}.info", b"not json", durable=True)
    await OsloNotifier(keel_transport, "keel", topics=[topic]).info(None, "fine", 1)
    await eventually(lambda: dead == [b"not json"] and len(sink.seen) == 1, timeout=10)
    await listener.stop()
