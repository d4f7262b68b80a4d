"""Poison on every transport: no body a publisher can put on a Keel queue stops a service.

docs/messaging-contract.md, "Bad input from the network": a body Keel cannot read is
dead-lettered with the reason (or, on an auto-acknowledged reply, fanout or presence queue,
counted and dropped), counted in ``keel_messages_malformed_total`` and logged; a delivery
whose handling fails in any unexpected way is settled the same way; the consumer goes on.
The `transport` fixture chooses the backend; nothing here names one.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import os
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import msgspec
import pytest
from prometheus_client import REGISTRY

from keel import errors, wire
from keel.messaging import (
    NotificationListener,
    Notifier,
    RequestContext,
    RPCClient,
    RPCServer,
    Target,
    Transport,
)
from keel.messaging._link import link
from keel.messaging._presence import subject as presence_subject
from keel.messaging._target import fanout_subject, notify_queue, notify_subject, rpc_queue
from keel.messaging.oslo import OsloNotificationListener
from tests import poison
from tests.conformance.conftest import TransportFactory
from tests.helpers import eventually

pytestmark = pytest.mark.timeout(180)

LIMIT = 256 * 1024  # the readers' max_message_bytes; the publisher keeps the default 1 MiB
PREFETCH = 4
ROUNDS = 4  # floods of at least 10 x PREFETCH bodies per queue; RSS is measured over the last 3
RSS_GROWTH_LIMIT = 8 * 1024 * 1024  # a flood brings ~5 MiB; keeping it would show


class Endpoint:
    def __init__(self) -> None:
        self.casts: list[Any] = []
        self.notes: list[Any] = []

    async def echo(self, ctx: RequestContext, value: Any) -> Any:
        return value

    async def record(self, ctx: RequestContext, value: Any) -> None:
        self.casts.append(value)

    async def deep(self, ctx: RequestContext, levels: int) -> Any:
        value: Any = None
        for _ in range(levels):
            value = [value]
        return value

    async def info(
        self, ctx: RequestContext, publisher_id: str, event_type: str, payload: Any, md: Any
    ) -> None:
        self.notes.append(payload)


def digest(body: bytes) -> bytes:
    """Who a body is, without keeping it (the test must not hold what it measures)."""
    return hashlib.blake2b(body, digest_size=16).digest() + len(body).to_bytes(4, "big")


class DeadLetters:
    """What arrives on some dead-letter queues: (queue, digest of the body, reason), acked."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, bytes, str | None]] = []
        self._acks: set[asyncio.Task[None]] = set()

    async def watch(self, transport: Transport, queue: str) -> None:
        dlq = queue + ".dlq"
        await transport.declare_queue(dlq, durable=True)

        def on_dead(delivery: Any) -> None:
            self.seen.append((queue, digest(delivery.body), delivery.dead_letter_reason))
            task = asyncio.get_running_loop().create_task(delivery.ack())
            self._acks.add(task)
            task.add_done_callback(self._acks.discard)

        await transport.consume(dlq, on_dead, prefetch=64)

    def bodies(self, queue: str) -> Counter[bytes]:
        return Counter(body for q, body, _ in self.seen if q == queue)


def malformed_total(**labels: str) -> float:
    """``keel_messages_malformed_total`` summed over the samples matching ``labels``."""
    total = 0.0
    for family in REGISTRY.collect():
        if family.name != "keel_messages_malformed":
            continue
        for sample in family.samples:
            if sample.name.endswith("_total") and all(
                sample.labels.get(k) == v for k, v in labels.items()
            ):
                total += sample.value
    return total


def rss() -> int:
    with open(f"/proc/{os.getpid()}/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


Flood = Callable[[], Any]


async def test_poison_never_stops_a_service(make_transport: TransportFactory, topic: str) -> None:
    reader = await make_transport(max_message_bytes=LIMIT)
    publisher = await make_transport()
    endpoint = Endpoint()
    name = f"{topic}-s1"
    server = RPCServer(reader, Target(topic, server=name), [endpoint], max_concurrency=PREFETCH)
    listener = NotificationListener(reader, [Target(topic)], [endpoint], max_concurrency=PREFETCH)
    await server.start()
    await listener.start()
    dead = DeadLetters()
    targets: list[tuple[str, list[tuple[str, bytes]]]] = [
        (rpc_queue(topic), poison.request_bodies(LIMIT)),
        (rpc_queue(topic, name), poison.request_bodies(LIMIT)),
        (notify_queue(topic, "info", None), poison.notification_bodies(LIMIT)),
    ]
    for queue, _ in targets:
        await dead.watch(publisher, queue)
    client = RPCClient(publisher, Target(topic), timeout=20)
    assert await client.call(None, "echo", value="before") == "before"
    sent: dict[str, Counter[bytes]] = {queue: Counter() for queue, _ in targets}
    digests = {body: digest(body) for _, bodies in targets for _, body in bodies}

    async def flood() -> None:
        for queue, bodies in targets:
            n = 0
            while n < 10 * PREFETCH:
                for _, body in bodies:
                    # Both paths: stored (casts, notifications) and direct (calls, on NATS).
                    durable = n % 2 == 0
                    if queue.startswith(topic + "."):  # the notification queue: by subject
                        await publisher.publish(
                            notify_subject(topic, "info"), body, durable=durable
                        )
                    else:
                        await publisher.send(queue, body, durable=durable)
                    sent[queue][digests[body]] += 1
                    n += 1

    def all_dead() -> bool:
        return all(dead.bodies(queue) == sent[queue] for queue, _ in targets)

    await flood()
    await eventually(all_dead, timeout=60)
    gc.collect()
    before = rss()
    for _ in range(ROUNDS - 1):
        await flood()
        await eventually(all_dead, timeout=60)
    gc.collect()
    grown = rss() - before

    # Everything sent afterwards is served.
    calls = [client.call(None, "echo", value=i) for i in range(5 * PREFETCH)]
    direct = RPCClient(publisher, Target(topic, server=name), timeout=20)
    calls += [direct.call(None, "echo", value=-i) for i in range(1, PREFETCH + 1)]
    assert sorted(await asyncio.gather(*calls)) == sorted(
        [*range(5 * PREFETCH), *range(-PREFETCH, 0)]
    )
    for i in range(3 * PREFETCH):
        await client.cast(None, "record", value=i)
    notifier = Notifier(publisher, "poison-test", topics=[topic])
    for i in range(3 * PREFETCH):
        await notifier.info(None, "after.poison", i)
    await eventually(lambda: sorted(endpoint.casts) == list(range(3 * PREFETCH)), timeout=20)
    await eventually(lambda: sorted(endpoint.notes) == list(range(3 * PREFETCH)), timeout=20)

    # Each poison body is in its dead-letter queue, with a reason; the counters agree.
    assert all(reason for _, _, reason in dead.seen), [r for _, _, r in dead.seen if not r]
    oversize = [r for _, d, r in dead.seen if int.from_bytes(d[-4:], "big") > LIMIT]
    assert oversize
    assert all(r and f"{LIMIT}-byte" in r for r in oversize), oversize[:3]
    to_server = sum(sent[rpc_queue(topic)].values()) + sum(sent[rpc_queue(topic, name)].values())
    to_listener = sum(sent[notify_queue(topic, "info", None)].values())
    assert server.counts["keel_rpc_server_requests", "?", "?", "malformed"] == to_server
    assert listener.counts["keel_notifications", "?", "malformed"] == to_listener
    for queue, _ in targets:
        assert malformed_total(queue=queue) == sum(sent[queue].values()), queue
    assert grown < RSS_GROWTH_LIMIT, f"RSS grew {grown / 2**20:.1f} MiB over {ROUNDS - 1} floods"
    await listener.stop()
    await server.stop()


async def test_poison_on_oslo_notification_queues(
    make_transport: TransportFactory, topic: str
) -> None:
    """The hub's oslo ingest reads with this listener: every oslo poison is dead-lettered."""
    reader = await make_transport(max_message_bytes=LIMIT)
    publisher = await make_transport()
    endpoint = Endpoint()
    listener = OsloNotificationListener(
        reader, [Target(topic)], [endpoint], max_concurrency=PREFETCH
    )
    await listener.start()
    queue = f"{topic}.info"
    dead = DeadLetters()
    await dead.watch(publisher, queue)
    bodies = poison.oslo_bodies(LIMIT)
    sent: Counter[bytes] = Counter()
    while sum(sent.values()) < 10 * PREFETCH:
        for _, body in bodies:
            await publisher.publish(queue, body, durable=True)
            sent[digest(body)] += 1
    await eventually(lambda: dead.bodies(queue) == sent, timeout=60)
    assert all(reason for _, _, reason in dead.seen)
    assert listener.counts["keel_notifications", "?", "malformed"] == sum(sent.values())
    valid = msgspec.json.encode(
        {
            "oslo.version": "2.0",
            "oslo.message": msgspec.json.encode(
                {
                    "message_id": "m-after",
                    "publisher_id": "compute.host1",
                    "event_type": "compute.instance.create.end",
                    "priority": "INFO",
                    "payload": {"after": True},
                    "timestamp": "2026-01-01 00:00:00.000000",
                }
            ).decode(),
        }
    )
    await publisher.publish(queue, valid, durable=True)
    await eventually(lambda: endpoint.notes == [{"after": True}], timeout=20)
    await listener.stop()


async def test_poison_on_reply_fanout_and_presence_queues(
    make_transport: TransportFactory, topic: str
) -> None:
    """Auto-acknowledged queues: nothing to dead-letter, so each bad body is counted and
    dropped, and the consumer (a client's replies, a server's fanout, a client's view of the
    servers) goes on."""
    reader = await make_transport(max_message_bytes=LIMIT)
    publisher = await make_transport()
    endpoint = Endpoint()

    class V11(Endpoint):
        target = Target(version="1.1")

    server = RPCServer(reader, Target(topic), [V11()], presence_interval=0.2)
    await server.start()
    client = RPCClient(reader, Target(topic), timeout=20, version_cap="auto")
    assert await client.call(None, "echo", value=1) == 1
    reply_to = await link(client.transport).reply_queue()
    bodies = poison.keel_bodies(LIMIT)
    for _ in range(2):
        for _, body in bodies:
            await publisher.send(reply_to, body, durable=False)
            await publisher.publish(fanout_subject(topic), body, durable=False)
    for _, body in poison.presence_bodies():
        await publisher.publish(presence_subject(topic), body, durable=False)
    await eventually(
        lambda: (
            malformed_total(kind="reply") >= 2 * len(bodies)
            and malformed_total(kind="fanout", queue=fanout_subject(topic)) == 2 * len(bodies)
            and malformed_total(kind="presence", queue=topic) == len(poison.presence_bodies())
        ),
        timeout=30,
    )
    # The fake servers the bad announcements describe (immortal, or at version 1.0) never
    # hold the cap down: only the real 1.1 server counts.
    assert await client.can_send_version("1.1")
    assert await asyncio.gather(*(client.call(None, "echo", value=i) for i in range(20))) == list(
        range(20)
    )
    await RPCClient(reader, Target(topic)).fanout(None, "record", value="fan")
    await server.stop()
    del endpoint


async def test_an_unreadable_reply_fails_its_call_at_once(
    make_transport: TransportFactory, topic: str
) -> None:
    """A reply that names a waiting call but cannot be read fails that call with
    MalformedMessage now, instead of leaving it to its deadline."""
    fake = await make_transport()
    await fake.declare_queue(rpc_queue(topic), durable=True)
    tasks: set[asyncio.Task[None]] = set()

    def answer(delivery: Any) -> None:
        request = wire.decode_request(delivery.body)
        assert request.reply_to is not None
        bad = msgspec.msgpack.encode(
            [wire.ENVELOPE_VERSION, request.id, msgspec.Raw(poison.nested_array(poison.DEEP))]
        )
        loop = asyncio.get_running_loop()
        tasks.add(loop.create_task(delivery.ack()))
        tasks.add(loop.create_task(fake.send(request.reply_to, bad, durable=False)))

    await fake.consume(rpc_queue(topic), answer, prefetch=10)
    client = RPCClient(await make_transport(), Target(topic), timeout=30)
    started = time.monotonic()
    with pytest.raises(errors.MalformedMessage, match="reply"):
        await client.call(None, "echo", value=1)
    assert time.monotonic() - started < 10


async def test_an_unencodable_result_fails_the_call_at_once(
    transport: Transport, topic: str
) -> None:
    server = RPCServer(transport, Target(topic), [Endpoint()])
    await server.start()
    client = RPCClient(transport, Target(topic), timeout=30)
    started = time.monotonic()
    with pytest.raises(errors.SerializationError, match="deep"):
        await client.call(None, "deep", levels=5000)
    with pytest.raises(errors.SerializationError, match="deep"):
        await client.call(None, "deep", levels=wire.MAX_DEPTH + 1)
    assert await client.call(None, "deep", levels=3) == [[[None]]]
    assert time.monotonic() - started < 10
    await server.stop()


class FailingDedup:
    """A dedup store that breaks (a locked database, a full disk): Keel's own code fails."""

    def seen(self, key: str) -> bool:
        raise RuntimeError("dedup store unavailable")

    def remember(self, key: str) -> None:
        raise RuntimeError("dedup store unavailable")


class FailingRule:
    def match(self, notification: Any) -> bool:
        raise RuntimeError("filter rule broke")


async def test_a_delivery_whose_handling_fails_is_settled_and_frees_its_slot(
    transport: Transport, topic: str
) -> None:
    endpoint = Endpoint()
    server = RPCServer(
        transport, Target(topic), [endpoint], max_concurrency=PREFETCH, dedup=FailingDedup()
    )
    await server.start()
    listening = Endpoint()
    listening.filter_rule = FailingRule()  # type: ignore[attr-defined]
    listener = NotificationListener(
        transport, [Target(topic)], [listening], max_concurrency=PREFETCH
    )
    await listener.start()
    dead = DeadLetters()
    await dead.watch(transport, rpc_queue(topic))
    await dead.watch(transport, notify_queue(topic, "info", None))
    client = RPCClient(transport, Target(topic), timeout=20)
    notifier = Notifier(transport, "p", topics=[topic])
    for i in range(10 * PREFETCH):
        await client.cast(None, "record", value=i)
        await notifier.info(None, "e", i)
    await eventually(lambda: len(dead.seen) == 20 * PREFETCH, timeout=30)
    assert all(reason and "RuntimeError" in reason for _, _, reason in dead.seen)
    # Every slot came back: calls (which need no dedup) are served at full concurrency.
    assert await asyncio.gather(*(client.call(None, "echo", value=i) for i in range(20))) == list(
        range(20)
    )
    assert malformed_total(queue=rpc_queue(topic), problem="internal") == 10 * PREFETCH
    await listener.stop()
    await server.stop()
