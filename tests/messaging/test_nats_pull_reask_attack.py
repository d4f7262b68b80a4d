"""Attacks on the NATS puller's silent-pull re-ask (`_Puller.ask_again_if_silent`, riding
`NatsTransport._keep_alive`; commits 925051e, 86705ea): credit after a re-ask, loop stalls,
JetStream status replies, deleted consumers, many listeners, a broker restart.

Two reviewers wrote these at once and found the same three bugs (fixed since): the
over-credit after a loop stall, the tight loop of pulls refused 409, the consumer deleted
server-side and never declared again."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import pytest

from keel.messaging import connect
from keel.messaging.transports import nats as nats_transport
from keel.messaging.transports.base import Delivery, Transport
from tests import servers
from tests.helpers import eventually
from tests.servers import server_url

_NEXT = "$JS.API.CONSUMER.MSG.NEXT."


@dataclass
class Pulls:
    """Every pull request the transport publishes: (when, batch)."""

    sent: list[tuple[float, int]] = field(default_factory=list)

    def batches(self) -> list[int]:
        return [batch for _, batch in self.sent]

    def since(self, t: float) -> int:
        return sum(1 for at, _ in self.sent if at >= t)


def _spy_pulls(transport: Transport) -> Pulls:
    pulls = Pulls()
    nc = transport.nc  # type: ignore[attr-defined]
    publish = nc.publish

    async def spying(subject: str, payload: bytes = b"", **kwargs: Any) -> None:
        if subject.startswith(_NEXT):
            pulls.sent.append((time.monotonic(), int(json.loads(payload)["batch"])))
        await publish(subject, payload, **kwargs)

    nc.publish = spying
    return pulls


@pytest.fixture
def transport(nats_transport: Transport) -> Transport:
    return nats_transport


def _queue() -> str:
    return f"pr-{uuid.uuid4().hex[:8]}"


async def test_an_idle_listener_hears_heartbeats_and_does_not_ask_again(
    transport: Transport,
) -> None:
    """Held: NATS 2.9.10 answers idle_heartbeat, so an idle puller's one request stands."""
    queue = _queue()
    await transport.declare_queue(queue, durable=True)
    pulls = _spy_pulls(transport)
    consumer = await transport.consume(queue, lambda d: None, prefetch=4)
    await asyncio.sleep(4.5)  # more than 3 heartbeat periods, several keep-alive ticks
    assert pulls.batches() == [4]
    assert consumer.requested == 4  # type: ignore[attr-defined]
    await consumer.cancel()
    await transport.delete_queue(queue)


async def test_a_blocked_loop_does_not_over_credit_a_slow_listener(
    transport: Transport,
) -> None:
    """Was a bug (fixed: one round trip before a re-ask). A handler that blocks the loop
    for 5 s leaves the heartbeats of a live request
    unread in the socket; the keep-alive tick wakes before nats-py's reader hands them to
    `_on_msg`, takes the live request for dead, zeroes ``requested`` and asks again on top
    of it. Both requests are live on the server: a listener holding its messages gets
    more than its prefetch (measured: 7 unsettled with prefetch 4)."""
    queue = _queue()
    prefetch = 4
    await transport.declare_queue(queue, durable=True)
    held: list[Delivery] = []
    most = 0

    def handle(delivery: Delivery) -> None:
        nonlocal most
        held.append(delivery)  # never settled: a slow listener
        most = max(most, sum(1 for d in held if not d.settled))
        if len(held) == 1:
            time.sleep(5)  # a synchronous stall on the loop

    consumer = await transport.consume(queue, handle, prefetch=prefetch)
    try:
        await transport.send(queue, b"first", durable=True)
        await eventually(lambda: len(held) >= 1, timeout=10)
        await asyncio.sleep(1.5)  # the keep-alive tick and the late heartbeats run
        for i in range(3 * prefetch):
            await transport.send(queue, b"m%d" % i, durable=True)
        await asyncio.sleep(2)
        assert most <= prefetch, f"{most} unsettled deliveries, prefetch {prefetch}"
    finally:
        await consumer.cancel()
        await transport.delete_queue(queue)


async def test_a_consumer_deleted_server_side_is_not_pulled_in_a_tight_loop(
    transport: Transport,
) -> None:
    """Held (no spin): the waiting pull ends with 409 Consumer Deleted, the puller asks
    again once, nothing answers (nats-py gets no 503 for it), and it re-asks once per
    3 silent heartbeats."""
    queue = _queue()
    await transport.declare_queue(queue, durable=True)
    pulls = _spy_pulls(transport)
    consumer = await transport.consume(queue, lambda d: None, prefetch=4)
    admin = await connect(server_url("nats"))
    try:
        stream = transport.streams[queue]  # type: ignore[attr-defined]
        await admin.js.delete_consumer(stream.stream, stream.consumer)  # type: ignore[attr-defined]
        started = time.monotonic()
        await asyncio.sleep(2)
        assert pulls.since(started) < 10, pulls.sent
    finally:
        await consumer.cancel()
        await transport.delete_queue(queue)
        await admin.close()


async def test_a_listener_resumes_after_its_consumer_is_deleted_server_side(
    transport: Transport,
) -> None:
    """Was a gap (fixed). After 409 Consumer Deleted the puller keeps asking a consumer
    that is gone
    (every ~3 s, an INFO line each time, forever); the messages sent to the queue wait in
    its stream unread. Only a reconnect's replay would declare the consumer again."""
    queue = _queue()
    await transport.declare_queue(queue, durable=True)
    got: list[bytes] = []
    acks: set[asyncio.Future[None]] = set()

    def handle(delivery: Delivery) -> None:
        got.append(delivery.body)
        acks.add(asyncio.ensure_future(delivery.ack()))

    consumer = await transport.consume(queue, handle, prefetch=4)
    admin = await connect(server_url("nats"))
    try:
        stream = transport.streams[queue]  # type: ignore[attr-defined]
        await admin.js.delete_consumer(stream.stream, stream.consumer)  # type: ignore[attr-defined]
        await asyncio.sleep(0.5)
        await admin.send(queue, b"after", durable=True)
        await eventually(lambda: got == [b"after"], timeout=10)
    finally:
        await asyncio.gather(*acks)
        await consumer.cancel()
        await transport.delete_queue(queue)
        await admin.close()


async def test_exceeded_max_waiting_is_not_answered_by_a_tight_loop_of_pulls(
    transport: Transport,
) -> None:
    """Was a bug (fixed; the status path, older than the re-ask). Other clients hold the
    consumer's 512
    waiting-request slots: the listener's pull is answered 409 Exceeded MaxWaiting at once,
    with no Nats-Pending-Messages; `_on_status` zeroes ``requested`` and `_on_msg` refills
    at once, and so on (measured: 2,000-2,900 pull requests a second, an INFO line each)."""
    queue = _queue()
    await transport.declare_queue(queue, durable=True)
    stream = transport.streams[queue]  # type: ignore[attr-defined]
    hog = await connect(server_url("nats"))
    nc = hog.nc  # type: ignore[attr-defined]
    inbox = nc.new_inbox()

    async def ignore(msg: Any) -> None:
        return None

    sub = await nc.subscribe(inbox, cb=ignore)
    request = json.dumps({"batch": 1, "expires": 20_000_000_000}).encode()
    for _ in range(600):  # past the default max_waiting, 512
        await nc.publish(f"{_NEXT}{stream.stream}.{stream.consumer}", request, reply=inbox)
    await nc.flush()
    pulls = _spy_pulls(transport)
    consumer = await transport.consume(queue, lambda d: None, prefetch=4)
    try:
        started = time.monotonic()
        await asyncio.sleep(2)
        rate = pulls.since(started) / 2
        assert rate < 20, f"{rate:.0f} pull requests a second refused with 409"
    finally:
        await consumer.cancel()
        await sub.unsubscribe()
        await hog.close()
        await transport.delete_queue(queue)


async def test_expiring_pulls_keep_the_credit_count_and_are_not_asked_again(
    transport: Transport, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Held: a 408 Request Timeout carries Nats-Pending-Messages, so each expiry returns
    exactly the unfilled credit and one new request replaces it (no silent re-ask on top)."""
    monkeypatch.setattr(nats_transport, "_PULL_EXPIRES_NS", 2_500_000_000)
    queue = _queue()
    await transport.declare_queue(queue, durable=True)
    pulls = _spy_pulls(transport)
    consumer = await transport.consume(queue, lambda d: None, prefetch=4)
    await asyncio.sleep(6.5)
    assert pulls.batches() == [4, 4, 4], pulls.sent  # the first, then one per 408
    assert consumer.requested == 4  # type: ignore[attr-defined]
    await consumer.cancel()
    await transport.delete_queue(queue)


async def test_slow_acks_while_messages_flow_keep_the_window(transport: Transport) -> None:
    """Held: messages handled for 0.3 s each over several heartbeat periods: no re-ask
    (the waiting part of a request is heard), never more than prefetch unsettled, each
    message once."""
    queue = _queue()
    prefetch = 4
    await transport.declare_queue(queue, durable=True)
    for i in range(24):
        await transport.send(queue, b"%d" % i, durable=True)
    got: list[bytes] = []
    unsettled: set[Delivery] = set()
    most = 0
    tasks: set[asyncio.Task[None]] = set()

    async def settle_later(delivery: Delivery) -> None:
        await asyncio.sleep(0.3)
        unsettled.discard(delivery)
        await delivery.ack()

    def handle(delivery: Delivery) -> None:
        nonlocal most
        got.append(delivery.body)
        unsettled.add(delivery)
        most = max(most, len(unsettled))
        tasks.add(asyncio.get_running_loop().create_task(settle_later(delivery)))

    pulls = _spy_pulls(transport)
    consumer = await transport.consume(queue, handle, prefetch=prefetch)
    await eventually(lambda: len(got) >= 24, timeout=15)
    await asyncio.gather(*tasks)
    await asyncio.sleep(0.5)
    assert sorted(got) == sorted(b"%d" % i for i in range(24))
    assert most <= prefetch
    assert all(batch <= prefetch for batch in pulls.batches())
    await consumer.cancel()
    await transport.delete_queue(queue)


async def test_fifty_listeners_on_one_connection(transport: Transport) -> None:
    """Held: 50 idle pullers of one queue on one connection send 50 requests and no
    re-ask; the keep-alive tick's pass over them is cheap; 200 messages all arrive once."""
    queue = _queue()
    await transport.declare_queue(queue, durable=True)
    pulls = _spy_pulls(transport)
    got: list[bytes] = []
    acks: set[asyncio.Future[None]] = set()

    def handle(delivery: Delivery) -> None:
        got.append(delivery.body)
        acks.add(asyncio.ensure_future(delivery.ack()))

    consumers = [await transport.consume(queue, handle, prefetch=2) for _ in range(50)]
    await asyncio.sleep(4.5)
    assert len(pulls.sent) == 50, len(pulls.sent)
    started = time.perf_counter()
    await transport._ask_silent_pulls_again()  # type: ignore[attr-defined]
    assert time.perf_counter() - started < 0.05
    for i in range(200):
        await transport.send(queue, b"%d" % i, durable=True)
    await eventually(lambda: len(got) >= 200, timeout=20)
    await asyncio.gather(*acks)
    assert sorted(got) == sorted(b"%d" % i for i in range(200))
    for consumer in consumers:
        await consumer.cancel()
    await transport.delete_queue(queue)


async def test_no_pull_is_sent_after_cancel_while_a_re_ask_is_due(transport: Transport) -> None:
    """Held: a silent puller (every pull lost) cancelled before its re-ask never pulls again
    and leaves the transport's pullers."""
    queue = _queue()
    await transport.declare_queue(queue, durable=True)
    nc = transport.nc  # type: ignore[attr-defined]
    publish = nc.publish
    pulls: list[float] = []

    async def lossy(subject: str, payload: bytes = b"", **kwargs: Any) -> None:
        if subject.startswith(_NEXT):
            pulls.append(time.monotonic())
            return  # lost: the puller stays silent
        await publish(subject, payload, **kwargs)

    nc.publish = lossy
    try:
        consumer = await transport.consume(queue, lambda d: None, prefetch=4)
        await asyncio.sleep(2.8)
        await consumer.cancel()
        cancelled = time.monotonic()
        await asyncio.sleep(4)
        assert not [t for t in pulls if t > cancelled], pulls
        assert consumer not in transport.pullers  # type: ignore[attr-defined]
    finally:
        nc.publish = publish
        await transport.delete_queue(queue)


async def test_a_broker_restart_mid_load_loses_nothing_and_the_listener_resumes() -> None:
    """Held: a single server restarted while a listener drains its queue: every message
    sent (confirmed) before and after arrives (at least once), the last ones within a few
    heartbeats of the server's return."""
    listener = await connect(server_url("nats"))
    sender = await connect(server_url("nats"))
    queue = _queue()
    got: set[bytes] = set()
    acks: set[asyncio.Future[None]] = set()

    def handle(delivery: Delivery) -> None:
        got.add(delivery.body)
        acks.add(asyncio.ensure_future(delivery.ack()))

    try:
        await listener.declare_queue(queue, durable=True)
        await sender.declare_queue(queue, durable=True)
        consumer = await listener.consume(queue, handle, prefetch=8)
        sent = [b"before-%d" % i for i in range(50)]
        for body in sent:
            await sender.send(queue, body, durable=True)
        await asyncio.to_thread(servers.restart, "nats")
        back = time.monotonic()
        after = [b"after-%d" % i for i in range(20)]
        for body in after:
            await sender.send(queue, body, durable=True)
        await eventually(lambda: got >= set(sent + after), timeout=15)
        assert time.monotonic() - back < 15
        await asyncio.gather(*acks, return_exceptions=True)
        await consumer.cancel()
        await listener.delete_queue(queue)
    finally:
        await sender.close()
        await listener.close()
