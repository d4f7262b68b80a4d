"""What the NATS transport adds to the contract: its name mapping, its limits, its errors."""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import pytest
from hypothesis import given
from hypothesis import strategies as st

from keel import errors
from keel.messaging import RequestContext, RPCClient, RPCServer, Target, connect
from keel.messaging._target import rpc_queue
from keel.messaging.transports import nats as nats_transport
from keel.messaging.transports.base import Delivery
from keel.messaging.transports.nats import _token
from tests.coord_support import CutProxy
from tests.helpers import eventually
from tests.servers import server_url

NAMES = st.text(alphabet="abcXYZ019_.-ü>*", min_size=1, max_size=300)


@given(NAMES, NAMES)
def test_jetstream_names_are_injective_and_valid(a: str, b: str) -> None:
    assert (_token(a) == _token(b)) == (a == b)
    assert len(_token(a)) <= 200
    assert not set(_token(a)) & set(". *>/\\")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def test_unreachable_server_is_a_transport_error_in_bounded_time() -> None:
    started = time.monotonic()
    with pytest.raises(errors.TransportError, match="cannot reach NATS"):
        await connect(f"nats://127.0.0.1:{_free_port()}?connect_timeout=1")
    assert time.monotonic() - started < 5


async def test_requeue_counts_deliveries_and_dead_letters_carry_the_body() -> None:
    transport = await connect(server_url("nats"))
    queue = f"nats-{uuid.uuid4().hex[:8]}"
    await transport.declare_queue(queue, durable=True)
    await transport.declare_queue(queue + ".dlq", durable=True)
    counts: list[int] = []
    dead: list[bytes] = []

    def on_message(delivery: Delivery) -> None:
        counts.append(delivery.delivery_count)
        settle = delivery.requeue() if len(counts) < 3 else delivery.dead_letter("enough")
        asyncio.get_running_loop().create_task(settle)

    def on_dead(delivery: Delivery) -> None:
        dead.append(delivery.body)
        asyncio.get_running_loop().create_task(delivery.ack())

    await transport.consume(queue, on_message, prefetch=1)
    await transport.consume(queue + ".dlq", on_dead, prefetch=1)
    await transport.send(queue, b"payload", durable=True)
    await eventually(lambda: dead == [b"payload"])
    assert counts == [1, 2, 3]
    await transport.close()


async def test_a_call_sent_before_any_consumer_waits_in_the_stream() -> None:
    transport = await connect(server_url("nats"))
    queue = f"nats-{uuid.uuid4().hex[:8]}"
    await transport.declare_queue(queue, durable=True)
    await transport.send(queue, b"early", durable=False)  # core first, nobody there: 503
    got: list[Any] = []
    await asyncio.sleep(0.2)
    await transport.consume(queue, lambda d: got.append(d.body), prefetch=4)
    await eventually(lambda: got == [b"early"])
    await transport.close()


async def test_limits_are_typed_errors() -> None:
    transport = await connect(server_url("nats"))
    with pytest.raises(errors.MessageTooLarge):
        await transport.send("anything", b"x" * (transport.max_message_bytes + 1), durable=True)
    with pytest.raises(errors.ConfigError, match="one subject"):
        await transport.declare_queue("two-bindings", durable=True, bindings=["a.b", "c.d"])
    await transport.close()


async def test_a_core_flood_past_the_backlog_waits_in_the_stream_not_in_memory() -> None:
    """Core NATS has no credit: what a busy consumer holds beyond it is bounded, the rest
    goes to the queue's stream and still arrives, with credit, once the consumer settles."""
    transport = await connect(server_url("nats"))
    sender = await connect(server_url("nats"))
    queue = f"nats-{uuid.uuid4().hex[:8]}"
    await transport.declare_queue(queue, durable=True)
    held: list[Delivery] = []
    consumer = await transport.consume(queue, held.append, prefetch=1)
    total = nats_transport._BACKLOG_LIMIT + 500
    for i in range(total):
        await sender.send(queue, b"%d" % i, durable=False)
    await eventually(lambda: len(held) == 1, timeout=10)
    backlog = consumer._backlog  # type: ignore[union-attr]
    await eventually(lambda: len(backlog) == nats_transport._BACKLOG_LIMIT, timeout=20)
    await asyncio.sleep(0.5)
    assert len(backlog) == nats_transport._BACKLOG_LIMIT
    seen = 0
    while seen < total:  # settle each as it comes: everything arrives
        await eventually(lambda n=seen: len(held) > n, timeout=20)
        await held[seen].ack()
        seen += 1
    assert sorted(int(d.body) for d in held) == list(range(total))
    await sender.close()
    await transport.close()


class _Named:
    def __init__(self, name: str) -> None:
        self.name = name

    async def whoami(self, ctx: RequestContext) -> str:
        return self.name


async def test_a_call_routed_to_a_draining_server_after_its_unsubscribe_is_handed_back() -> None:
    """nats-server 2.9 may write a message it matched before a consumer's UNSUB after the
    UNSUB's PONG (a call published as the drain began: CI's rolling upgrade lost one that
    way, under CPU load). nats-py drops a message for a subscription it forgot, so the
    draining server must still be listening then and hand the call to another server."""
    topic = f"straggler-{uuid.uuid4().hex[:8]}"
    draining_transport, other_transport, client_transport = [
        await connect(server_url("nats")) for _ in range(3)
    ]
    draining = RPCServer(draining_transport, Target(topic, server="a"), [_Named("a")])
    other = RPCServer(other_transport, Target(topic, server="b"), [_Named("b")])
    await draining.start()
    await other.start()
    client = RPCClient(client_transport, Target(topic), timeout=3)
    assert await client.call(None, "whoami") in ("a", "b")  # reply queue and cap set up
    # The next call leaves the client but reaches the broker "too late": the test delivers
    # it to the draining server's call subscription right after the UNSUB's round trip.
    nc = client_transport.nc  # type: ignore[attr-defined]
    calls_subject = nats_transport._call_subject(rpc_queue(topic))
    held: list[tuple[str, bytes, str]] = []
    publish = nc.publish

    async def hold(subject: str, payload: bytes = b"", reply: str = "", **kw: Any) -> None:
        if subject == calls_subject and not held:
            held.append((subject, payload, reply))
            return
        await publish(subject, payload, reply=reply, **kw)

    nc.publish = hold
    call = asyncio.ensure_future(client.call(None, "whoami"))
    await eventually(lambda: bool(held))
    nc.publish = publish
    server_nc = draining_transport.nc  # type: ignore[attr-defined]
    [puller] = [p for p in draining_transport.pullers if p.queue == rpc_queue(topic)]  # type: ignore[attr-defined]
    sid = puller._calls._id
    flush = server_nc.flush
    injected: list[asyncio.Task[None]] = []

    async def flush_then_straggle(*args: Any, **kw: Any) -> None:
        await flush(*args, **kw)
        if not injected and not puller.active:  # the UNSUB's round trip is done
            subject, payload, reply = held[0]
            straggler = server_nc._process_msg(sid, subject.encode(), reply.encode(), payload, b"")
            injected.append(asyncio.ensure_future(straggler))

    server_nc.flush = flush_then_straggle
    await draining.drain(timeout=5)
    assert injected
    await injected[0]
    assert await call == "b"  # handed back, not dropped with the subscription
    await other.stop()
    for transport in (draining_transport, other_transport, client_transport):
        await transport.close()


async def test_a_pull_request_lost_with_its_server_is_asked_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A pull request held by a stream leader that dies gets no 408, ever (found in
    tests/topology/test_nats_stream_leader_loss.py: the stream held every notification, the
    listener never got the last one). Here the first pull request never reaches the server;
    the puller, hearing no idle heartbeat for it, asks again and gets the message."""
    monkeypatch.setattr(nats_transport, "_PULL_HEARTBEAT_S", 0.2)
    transport = await connect(server_url("nats"))
    queue = f"nats-{uuid.uuid4().hex[:8]}"
    publish = transport.nc.publish  # type: ignore[attr-defined]
    dropped: list[str] = []

    async def lossy(subject: str, payload: bytes = b"", **kwargs: Any) -> None:
        if subject.startswith("$JS.API.CONSUMER.MSG.NEXT.") and not dropped:
            dropped.append(subject)  # sent to a server that died with it
            return
        await publish(subject, payload, **kwargs)

    try:
        await transport.declare_queue(queue, durable=True)
        transport.nc.publish = lossy  # type: ignore[attr-defined]
        got: list[bytes] = []
        acks: set[asyncio.Future[None]] = set()

        def handle(delivery: Delivery) -> None:
            got.append(delivery.body)
            acks.add(asyncio.ensure_future(delivery.ack()))

        consumer = await transport.consume(queue, handle, prefetch=4)
        assert dropped, "the first pull request was not sent through nc.publish"
        await transport.send(queue, b"after", durable=True)
        await eventually(lambda: got == [b"after"], timeout=10)
        await consumer.cancel()
        await transport.delete_queue(queue)
    finally:
        transport.nc.publish = publish  # type: ignore[attr-defined]
        await transport.close()


# --- a queue deleted under its users (docs/messaging-contract.md) -------------------------


def _acking(got: list[bytes]) -> Callable[[Delivery], None]:
    """A handler that records each body in ``got`` and acknowledges it."""
    acks: set[asyncio.Task[None]] = set()

    def on_message(delivery: Delivery) -> None:
        got.append(delivery.body)
        task = asyncio.ensure_future(delivery.ack())
        acks.add(task)
        task.add_done_callback(acks.discard)

    return on_message


async def test_delete_queue_deletes_a_queue_another_connection_declared() -> None:
    """Unbound (its own KQ_ stream) and bound (a consumer on its subject's KS_ stream): the
    operator's connection never declared either, and still deletes both, as every other
    transport does. Before, this was a no-op on NATS."""
    owner, operator = await connect(server_url("nats")), await connect(server_url("nats"))
    try:
        plain, bound = f"del-{uuid.uuid4().hex[:8]}", f"del-{uuid.uuid4().hex[:8]}"
        subject = f"keel.test.{uuid.uuid4().hex[:8]}"
        await owner.declare_queue(plain, durable=True)
        await owner.declare_queue(bound, durable=True, bindings=[subject])
        streams = owner.streams  # type: ignore[attr-defined]
        js = owner.js  # type: ignore[attr-defined]
        await operator.delete_queue(plain)
        await operator.delete_queue(bound)
        with pytest.raises(Exception, match="not found"):
            await js.stream_info(streams[plain].stream)
        with pytest.raises(Exception, match="not found"):
            await js.consumer_info(streams[bound].stream, streams[bound].consumer)
        await js.stream_info(streams[bound].stream)  # the subject's stream is shared: kept
        await operator.delete_queue(f"never-{uuid.uuid4().hex[:8]}")  # nothing: no error
    finally:
        await owner.close()
        await operator.close()


async def test_a_bound_consumer_made_again_starts_after_what_it_had_seen() -> None:
    """A notification published (and confirmed: the subject's stream keeps it) after an
    operator deleted the listener's consumer, before the listener made it again, is
    delivered: the consumer is made again from the last sequence seen, not "new"."""
    listener, publisher = await connect(server_url("nats")), await connect(server_url("nats"))
    operator = await connect(server_url("nats"))
    queue, subject = f"bnd-{uuid.uuid4().hex[:8]}", f"keel.test.{uuid.uuid4().hex[:8]}"
    got: list[bytes] = []
    on_message = _acking(got)

    try:
        await listener.declare_queue(queue, durable=True, bindings=[subject])
        await publisher.declare_queue(queue, durable=True, bindings=[subject])
        consumer = await listener.consume(queue, on_message, prefetch=8)
        await publisher.publish(subject, b"before", durable=True)
        await eventually(lambda: got == [b"before"], 10)
        await operator.delete_queue(queue)
        # Into the gap: the stream takes it; no consumer exists for the next half second.
        await publisher.publish(subject, b"in the gap", durable=True)
        await eventually(lambda: b"in the gap" in got, 15)
        await publisher.publish(subject, b"after", durable=True)
        await eventually(lambda: b"after" in got, 10)
        assert got.count(b"before") == 1  # not delivered again from the stream's start
        await consumer.cancel()
    finally:
        for transport in (listener, publisher, operator):
            await transport.close()


@pytest.mark.parametrize("rounds", [4])
async def test_a_stream_deleted_and_declared_again_stores_and_delivers(rounds: int) -> None:
    """nats-server 2.9 answered a stream's deletion before removing its files: made again at
    once, the stream lost its block file (publishes 503 for the whole publish_timeout) or
    acked a message its consumer never delivered, in 5 of 6 probes. Declared again after
    `_REDECLARE_PAUSE_S`, each round's durable send is stored and delivered."""
    owner, operator = await connect(server_url("nats")), await connect(server_url("nats"))
    queue = f"again-{uuid.uuid4().hex[:8]}"
    got: list[bytes] = []
    on_message = _acking(got)

    try:
        await owner.declare_queue(queue, durable=True)
        consumer = await owner.consume(queue, on_message, prefetch=4)
        for round_ in range(rounds):
            await operator.delete_queue(queue)
            started = time.monotonic()
            body = f"round {round_}".encode()
            await owner.send(queue, body, durable=True)
            assert time.monotonic() - started < 3, "the send waited for its publish_timeout"
            await eventually(lambda b=body: b in got, 10)  # type: ignore[misc]
        await consumer.cancel()
    finally:
        await owner.close()
        await operator.close()


@pytest.mark.parametrize("exclusive", [True, False], ids=["core", "pulled"])
async def test_a_consume_that_fails_part_way_leaves_no_subscription(exclusive: bool) -> None:
    """The server did not confirm the new subscriptions (a flush timed out): consume raises,
    and what it subscribed before the failure is gone, not calling a handler nobody holds."""
    transport = await connect(server_url("nats"))
    sender = await connect(server_url("nats"))
    queue = f"nats-{uuid.uuid4().hex[:8]}"
    subject = f"{queue}.fan"
    await transport.declare_queue(
        queue, durable=not exclusive, exclusive=exclusive, bindings=[subject] if exclusive else ()
    )
    nc = transport.nc  # type: ignore[attr-defined]
    before = len(nc._subs)
    real = transport.subscribed  # type: ignore[attr-defined]

    async def unconfirmed() -> None:
        raise errors.TransportError("nats: subscribe failed: flush timeout (injected)")

    transport.subscribed = unconfirmed  # type: ignore[attr-defined]
    heard: list[Delivery] = []
    with pytest.raises(errors.TransportError):
        await transport.consume(queue, heard.append, prefetch=1, auto_ack=exclusive)
    transport.subscribed = real  # type: ignore[attr-defined]
    await eventually(lambda: len(nc._subs) == before, timeout=5)
    if exclusive:
        await sender.publish(subject, b"x", durable=False)
    else:
        await sender.send(queue, b"x", durable=False)
    await asyncio.sleep(0.3)
    assert heard == []
    await sender.close()
    await transport.close()


async def test_a_consume_on_a_server_that_stopped_answering_fails_within_connect_timeout() -> None:
    """consume waits for the server's routing as long as the transport's ``connect_timeout``
    in all, then raises a retryable error and leaves no subscription: not nats-py's own 10 s
    per round trip (20 s for the two a consume makes)."""
    upstream = urlsplit(server_url("nats"))
    proxy = CutProxy(upstream.hostname or "127.0.0.1", upstream.port or 4222)
    transport = await connect(f"nats://127.0.0.1:{proxy.port}?connect_timeout=1")
    try:
        queue = f"nats-{uuid.uuid4().hex[:8]}"
        await transport.declare_queue(
            queue, durable=False, exclusive=True, bindings=[f"{queue}.fan"]
        )
        nc = transport.nc  # type: ignore[attr-defined]
        before = len(nc._subs)
        proxy.stall()
        started = time.monotonic()
        with pytest.raises(errors.TransportError):
            await transport.consume(queue, lambda d: None, prefetch=1, auto_ack=True)
        assert time.monotonic() - started < 3
        assert len(nc._subs) == before
    finally:
        proxy.close()
        await transport.close()
