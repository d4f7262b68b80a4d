"""Attacks on Keel's hand-packed ``Basic.Publish`` (keel.messaging.transports._amqp_publish):
edge values against pamqp's bytes, cancellation at each await point (queue room, confirm),
nacks and returns among many publishers on both paths, and the connection failing under
publishers (through a local proxy, so the shared broker is never blocked or restarted)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiormq
import aiormq.exceptions as amqp_errors
import pytest
from aiormq.abc import ChannelFrame
from pamqp import commands as spec

import servers
from keel import errors
from keel.messaging import connect
from keel.messaging.transports import _amqp_publish
from keel.messaging.transports.rabbitmq import RabbitTransport
from tests.messaging.test_amqp_publish import _pamqp

pytestmark = pytest.mark.timeout(60)


def _amqp_url() -> str:
    return servers.server_url("rabbitmq").replace("rabbit://", "amqp://", 1)


@pytest.fixture(autouse=True)
def _no_unretrieved_future(caplog: pytest.LogCaptureFixture) -> Any:
    yield
    gc.collect()
    records = [*caplog.get_records("call"), *caplog.records]
    never = [r for r in records if "never retrieved" in r.getMessage()]
    assert not never, never


# --- bytes ---------------------------------------------------------------------------------


def _kw(**over: object) -> dict[str, object]:
    kw: dict[str, object] = {
        "exchange": "",
        "routing_key": "k",
        "delivery_mode": 1,
        "message_id": "m-1",
        "content_type": None,
        "content_encoding": None,
        "mandatory": False,
    }
    kw.update(over)
    return kw


@pytest.mark.parametrize(
    ("content_type", "content_encoding"), [("", None), (None, ""), ("", ""), ("", "gzip")]
)
def test_an_empty_property_is_left_out_as_pamqp_does(
    content_type: str | None, content_encoding: str | None
) -> None:
    """pamqp leaves a property that is ``""`` out of the header (no flag), so a consumer
    reads it as absent; the packed frames must do the same."""
    kw = _kw(content_type=content_type, content_encoding=content_encoding)
    mine = _amqp_publish.frames(3, 4088, body=b"x", **kw)  # type: ignore[arg-type]
    assert mine == _pamqp(3, 4088, b"x", **kw)


@pytest.mark.parametrize("size", [0, 4087, 4088, 4089, 2 * 4088, 2 * 4088 + 1, 1 << 20])
def test_bodies_around_and_far_over_the_frame_size(size: int) -> None:
    body = bytes(i % 251 for i in range(size))
    kw = _kw(content_type="application/json", content_encoding="utf-8", mandatory=True)
    assert _amqp_publish.frames(1, 4088, body=body, **kw) == _pamqp(1, 4088, body, **kw)  # type: ignore[arg-type]


def test_names_are_counted_in_utf8_bytes() -> None:
    fits = "é" * 127 + "a"  # 255 bytes, 128 characters
    kw = _kw(routing_key=fits, content_type=fits, content_encoding=fits)
    assert _amqp_publish.frames(9, 4088, body=b"", **kw) == _pamqp(9, 4088, b"", **kw)  # type: ignore[arg-type]
    over = "é" * 128  # 256 bytes, 128 characters
    for name in ("routing_key", "content_type", "content_encoding"):
        assert _amqp_publish.frames(9, 4088, body=b"", **_kw(**{name: over})) is None  # type: ignore[arg-type]


# --- one channel, driven directly ----------------------------------------------------------


@pytest.fixture
async def amqp() -> AsyncIterator[aiormq.Connection]:
    connection = await aiormq.connect(_amqp_url())
    try:
        yield connection
    finally:
        await connection.close()


def _store(channel: Any) -> set[Any]:
    return channel._Base__future_store.futures  # type: ignore[no-any-return]


async def _publish(
    channel: Any,
    queue: str,
    body: bytes,
    *,
    mandatory: bool = False,
    timeout: float = 30,
    exchange: str = "",
) -> Any:
    return await _amqp_publish.publish(
        channel,
        body,
        exchange=exchange,
        routing_key=queue,
        delivery_mode=1,
        content_type=None,
        content_encoding=None,
        mandatory=mandatory,
        timeout=timeout,
    )


class _Gate:
    """Stands in for the connection's write queue: holds ``room`` frames, and passes them
    on to the real queue only once opened."""

    def __init__(self, channel: Any, room: int) -> None:
        self.real: asyncio.Queue[Any] = channel.write_queue
        self.queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=room)
        self.pump: asyncio.Task[None] | None = None
        channel.write_queue = self.queue

    def open(self) -> None:
        async def pump() -> None:
            while True:
                await self.real.put(await self.queue.get())

        self.pump = asyncio.get_running_loop().create_task(pump())

    async def close(self) -> None:
        if self.pump is not None:
            self.pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.pump


@pytest.mark.parametrize("confirm", [True, False])
async def test_cancelled_while_waiting_for_queue_room_leaves_nothing(
    amqp: aiormq.Connection, confirm: bool
) -> None:
    """Publishers cancelled (or timed out) while one waits for room in the write queue and the
    others for the channel lock: the tags of the rest still match the broker's count (each
    gets its own ack), exactly their messages reach the queue, and neither the channel's
    maps nor its future store keep anything of the cancelled ones."""
    channel: Any = await amqp.channel(publisher_confirms=confirm)
    queue = f"attack-room-{uuid.uuid4().hex[:8]}"
    await channel.queue_declare(queue, auto_delete=False)
    base = len(_store(channel))
    gate = _Gate(channel, 2)
    try:
        tasks = [
            asyncio.create_task(_publish(channel, queue, str(i).encode(), mandatory=confirm))
            for i in range(12)
        ]
        for _ in range(5):
            await asyncio.sleep(0)
        assert gate.queue.full()  # 0 and 1 queued, 2 waits for room, the rest for the lock
        doomed = {2, 5, 6, 11}
        for i in doomed:
            tasks[i].cancel()
        timed_out = asyncio.create_task(
            _publish(channel, queue, b"late", mandatory=confirm, timeout=0.05)
        )
        await asyncio.sleep(0.2)  # the timeout fires while it waits for the lock or room
        assert timed_out.done()
        with pytest.raises(TimeoutError):
            await timed_out
        gate.open()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for i, result in enumerate(results):
            if i in doomed:
                assert isinstance(result, asyncio.CancelledError), (i, result)
            elif confirm:
                assert isinstance(result, spec.Basic.Ack), (i, result)
            else:
                assert result is None, (i, result)
        assert channel.delivery_tag == 12 - len(doomed)
        assert not channel.confirmations
        assert not channel.message_id_delivery_tag
        assert len(_store(channel)) == base, _store(channel)
        got = []
        for _ in range(50):
            message = await channel.basic_get(queue, no_ack=True)
            if isinstance(message.delivery, spec.Basic.GetEmpty):
                if len(got) == 12 - len(doomed):
                    break
                await asyncio.sleep(0.05)
                continue
            got.append(int(message.body))
        assert got == [i for i in range(12) if i not in doomed]
    finally:
        await gate.close()
        channel.write_queue = gate.real
        await channel.queue_delete(queue)


async def test_cancelled_while_waiting_for_the_confirm(amqp: aiormq.Connection) -> None:
    """Publishers cancelled after their frames went out: the message is the broker's, the
    late ack goes nowhere, and the next publishers get their own acks."""
    channel: Any = await amqp.channel(publisher_confirms=True)
    queue = f"attack-confirm-{uuid.uuid4().hex[:8]}"
    await channel.queue_declare(queue, auto_delete=False)
    try:
        first = [
            asyncio.create_task(_publish(channel, queue, b"a", mandatory=True)) for _ in range(20)
        ]
        for _ in range(3):
            await asyncio.sleep(0)
        for t in first[::2]:
            t.cancel()
        second = await asyncio.gather(*(_publish(channel, queue, b"b") for _ in range(20)))
        assert all(isinstance(a, spec.Basic.Ack) for a in second)
        done = await asyncio.gather(*first, return_exceptions=True)
        assert all(isinstance(d, spec.Basic.Ack | asyncio.CancelledError) for d in done)
        await asyncio.sleep(0.1)
        assert not channel.confirmations
        assert not channel.message_id_delivery_tag
        # a publish cancelled before its frames were queued gave its tag back: the broker
        # holds as many messages as tags were taken
        ok = await channel.queue_declare(queue, passive=True)
        assert ok.message_count == channel.delivery_tag
        assert channel.delivery_tag >= 20 + sum(isinstance(d, spec.Basic.Ack) for d in done)
    finally:
        await channel.queue_delete(queue)


@pytest.mark.parametrize("confirm", [True, False])
async def test_the_connection_closing_under_a_publisher_waiting_for_room(confirm: bool) -> None:
    """The connection closes while one publisher waits for room in the write queue (holding
    the channel lock) and another for the lock: both fail at once with aiormq's closed-channel
    error, rather than waiting out their timeout (a dead connection's writer takes nothing)."""
    connection = await aiormq.connect(_amqp_url())
    channel: Any = await connection.channel(publisher_confirms=confirm)
    gate = _Gate(channel, 1)
    gate.queue.put_nowait(ChannelFrame(b"", False, None))  # never written
    try:
        waiting = [asyncio.create_task(_publish(channel, "nowhere", b"x")) for _ in range(2)]
        for _ in range(3):
            await asyncio.sleep(0)
        assert not any(t.done() for t in waiting)
        await connection.close()
        done, _ = await asyncio.wait(waiting, timeout=5)
        assert len(done) == 2, "a publisher waits out its timeout on a dead connection"
        for t in waiting:
            assert isinstance(t.exception(), amqp_errors.ChannelInvalidStateError), t
        assert channel.delivery_tag == 0
        assert not channel.confirmations
    finally:
        await connection.close()


async def test_aiormqs_publish_waiting_for_room_when_the_connection_closes() -> None:
    """aiormq's basic_publish (Keel's path for a message with headers) waits for room in the
    write queue without watching the channel, and Keel's publishes (which hold the lock only
    while queueing) can fill it: the transport waits for it through ``until_closed``, which
    ends it when the connection dies rather than at its timeout."""
    connection = await aiormq.connect(_amqp_url())
    channel: Any = await connection.channel(publisher_confirms=True)
    gate = _Gate(channel, 1)
    gate.queue.put_nowait(ChannelFrame(b"", False, None))  # never written
    try:
        theirs = asyncio.create_task(
            _amqp_publish.until_closed(
                channel,
                channel.basic_publish(
                    b"x",
                    routing_key="nowhere",
                    properties=spec.Basic.Properties(headers={"h": 1}),
                    timeout=8,
                ),
            )
        )
        for _ in range(3):
            await asyncio.sleep(0)
        await connection.close()
        done, _ = await asyncio.wait([theirs], timeout=3)
        assert done, "aiormq's publish waits out its timeout on a dead connection"
        closed = (amqp_errors.AMQPError, amqp_errors.ChannelInvalidStateError)
        assert isinstance(theirs.exception(), closed), theirs
    finally:
        await connection.close()
        with contextlib.suppress(BaseException):
            await theirs


def test_an_exchange_name_pamqp_refuses_is_left_to_aiormq() -> None:
    """aiormq (pamqp) raises ValueError for such a name; sent, the broker would close the
    channel (404), failing every publish in flight on it."""
    assert _amqp_publish.frames(1, 4088, body=b"", **_kw(exchange="bad!name")) is None  # type: ignore[arg-type]
    assert _amqp_publish.frames(1, 4088, body=b"", **_kw(exchange="e" * 128)) is None  # type: ignore[arg-type]
    assert _amqp_publish.frames(1, 4088, body=b"", **_kw(exchange="e" * 127)) is not None  # type: ignore[arg-type]
    assert _amqp_publish.frames(1, 4088, body=b"", **_kw(exchange="amq.topic")) is not None  # type: ignore[arg-type]


async def test_a_refused_exchange_name_raises_as_aiormq_does(amqp: aiormq.Connection) -> None:
    channel: Any = await amqp.channel(publisher_confirms=True)
    with pytest.raises(ValueError, match="exchange"):
        await _publish(channel, "k", b"x", exchange="bad!name", timeout=5)
    assert not channel.is_closed
    assert isinstance(await _publish(channel, "nowhere", b"x"), spec.Basic.Ack)


async def test_nacks_and_returns_reach_their_own_publishers(amqp: aiormq.Connection) -> None:
    """A queue that rejects publishes beyond five (``x-overflow=reject-publish``) nacks them,
    a routing key without a queue returns mandatory ones: among publishers on both paths,
    each gets its own answer."""
    channel: Any = await amqp.channel(publisher_confirms=True)
    tag = uuid.uuid4().hex[:8]
    full, ok = f"attack-full-{tag}", f"attack-ok-{tag}"
    await channel.queue_declare(full, arguments={"x-max-length": 5, "x-overflow": "reject-publish"})
    await channel.queue_declare(ok)

    async def theirs(queue: str, mandatory: bool) -> Any:
        return await channel.basic_publish(
            b"t",
            routing_key=queue,
            mandatory=mandatory,
            properties=spec.Basic.Properties(headers={"h": 1}),
        )

    plan: list[tuple[str, bool, bool]] = []  # queue, mandatory, hand-packed
    for i in range(90):
        queue = (full, ok, f"nobody-{tag}")[i % 3]
        plan.append((queue, i % 3 == 2 or i % 4 == 0, i % 2 == 0))
    try:
        answers = await asyncio.gather(
            *(
                _publish(channel, q, b"k", mandatory=m) if mine else theirs(q, m)
                for q, m, mine in plan
            ),
            return_exceptions=True,
        )
        to_full = 0
        for (queue, mandatory, _mine), answer in zip(plan, answers, strict=True):
            if queue == ok:
                assert isinstance(answer, spec.Basic.Ack), answer
            elif queue == full:
                to_full += 1
                expect = spec.Basic.Ack if to_full <= 5 else amqp_errors.DeliveryError
                assert isinstance(answer, expect), (to_full, answer)
            elif mandatory:
                assert isinstance(answer, amqp_errors.PublishError), answer
            else:
                assert isinstance(answer, spec.Basic.Ack), answer
        await asyncio.sleep(0.1)
        assert not channel.confirmations
        assert not channel.message_id_delivery_tag
    finally:
        await channel.queue_delete(full)
        await channel.queue_delete(ok)


# --- the transport, through a proxy that can stall or cut the connection -------------------


class _Proxy:
    """A TCP relay to the broker: ``stall`` stops reading what the client writes (a broker
    that blocked publishers), ``cut`` aborts every relayed connection."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.flowing = asyncio.Event()  # client to broker
        self.flowing.set()
        self.answering = asyncio.Event()  # broker to client
        self.answering.set()
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self.writers += [writer, up_writer]

        async def pipe(
            src: asyncio.StreamReader, dst: asyncio.StreamWriter, gate: asyncio.Event
        ) -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await src.read(65536):
                    await gate.wait()
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(
            pipe(reader, up_writer, self.flowing), pipe(up_reader, writer, self.answering)
        )

    def cut(self) -> None:
        for w in self.writers:
            w.transport.abort()
        self.writers.clear()

    async def close(self) -> None:
        self.flowing.set()
        self.answering.set()
        self.cut()
        if self.server is not None:
            self.server.close()


@pytest.fixture
async def proxy() -> AsyncIterator[_Proxy]:
    url = servers.server_url("rabbitmq")
    hostport = url.split("@", 1)[1].split("/", 1)[0]
    host, port = hostport.rsplit(":", 1)
    relay = _Proxy(host, int(port))
    await relay.start()
    try:
        yield relay
    finally:
        await relay.close()


async def _transport(proxy: _Proxy, **query: object) -> RabbitTransport:
    assert proxy.server is not None
    port = proxy.server.sockets[0].getsockname()[1]
    options = "&".join(f"{k}={v}" for k, v in query.items())
    transport = await connect(f"rabbit://guest:guest@127.0.0.1:{port}/?{options}")
    assert isinstance(transport, RabbitTransport)
    return transport


@pytest.mark.parametrize("headers", [None, {"h": 1}])
async def test_a_publish_timeout_is_a_transport_error(
    proxy: _Proxy, headers: dict[str, Any] | None
) -> None:
    """A broker that stops reading (memory alarm) makes a confirmed publish time out: the
    caller gets Keel's TransportError, on either path, not asyncio's TimeoutError."""
    transport = await _transport(proxy, publish_timeout=0.5, reconnect_wait=1)
    queue = f"attack-stall-{uuid.uuid4().hex[:8]}"
    try:
        await transport.declare_queue(queue, durable=True)
        proxy.flowing.clear()
        results = await asyncio.wait_for(
            asyncio.gather(
                *(
                    transport.publish_raw("", queue, b"x" * 1000, durable=True, headers=headers)
                    for _ in range(30)
                ),
                return_exceptions=True,
            ),
            10,
        )
        assert all(isinstance(r, errors.TransportError) for r in results), results[:3]
    finally:
        proxy.flowing.set()
        with contextlib.suppress(errors.KeelError):
            await transport.delete_queue(queue)
        await transport.close()


async def test_a_stalled_broker_holds_up_publishers_not_the_socket_buffer(
    proxy: _Proxy,
) -> None:
    """A broker that stops reading: confirmed publishes wait for room in the write queue (the
    writer drains after each), so one that times out there was never sent. Before, every
    publish in flight went into the socket's buffer (13.7 MB for 200 of 100 kB) and all of
    them reached the queue once the broker read again, though each had timed out."""
    transport = await _transport(proxy, publish_timeout=2, reconnect_wait=1)
    queue = f"attack-pile-{uuid.uuid4().hex[:8]}"
    try:
        await transport.declare_queue(queue, durable=True)
        proxy.flowing.clear()
        results = await asyncio.gather(
            *(transport.publish_raw("", queue, b"z" * 100_000, durable=True) for _ in range(200)),
            return_exceptions=True,
        )
        assert all(isinstance(r, errors.TransportError) for r in results), results[:3]
        proxy.flowing.set()
        connection = await aiormq.connect(_amqp_url())
        try:
            channel = await connection.channel()
            await asyncio.sleep(1)
            ok = await channel.queue_declare(queue, passive=True)
            assert ok.message_count < 100, ok.message_count
        finally:
            await connection.close()
    finally:
        proxy.flowing.set()
        with contextlib.suppress(errors.KeelError):
            await transport.delete_queue(queue)
        await transport.close()


async def test_a_channel_closed_by_the_broker_under_a_full_queue(proxy: _Proxy) -> None:
    """The broker closes a channel (a publish to a missing exchange) while the socket is slow
    and publishers on another channel of the connection wait: aiormq's Close-Ok still finds
    room in the write queue (it is dropped when the queue is full), so the next channel,
    which gets the closed one's number, opens. Before, the broker still held that number
    and closed the whole connection: "second 'channel.open' seen"."""
    assert proxy.server is not None
    port = proxy.server.sockets[0].getsockname()[1]
    connection = await aiormq.connect(f"amqp://guest:guest@127.0.0.1:{port}/")
    try:
        filler: Any = await connection.channel(publisher_confirms=True)
        victim: Any = await connection.channel(publisher_confirms=True)
        queue = f"attack-closeok-{uuid.uuid4().hex[:8]}"
        await filler.queue_declare(queue, auto_delete=True)
        proxy.answering.clear()  # the broker's Channel.Close waits in the proxy
        bad = asyncio.create_task(
            _publish(victim, "k", b"x", exchange=f"missing-{uuid.uuid4().hex[:8]}", timeout=20)
        )
        await asyncio.sleep(0.3)  # it reached the broker
        proxy.flowing.clear()  # now the socket is slow: the writer stops at its drain
        fill = [
            asyncio.create_task(_publish(filler, queue, b"f" * 1_000_000, timeout=20))
            for _ in range(40)
        ]
        await asyncio.sleep(1)
        assert not any(t.done() for t in fill)  # the writer is held up
        assert connection.write_queue.qsize() <= connection.write_queue.maxsize - 2
        proxy.answering.set()  # Channel.Close arrives; Close-Ok is queued
        with pytest.raises(amqp_errors.ChannelNotFoundEntity):
            await bad
        proxy.flowing.set()
        await asyncio.wait_for(asyncio.gather(*fill), 15)
        again: Any = await asyncio.wait_for(connection.channel(publisher_confirms=True), 5)
        assert again.number == victim.number
        assert isinstance(await _publish(again, queue, b"y", timeout=5), spec.Basic.Ack)
        assert not connection.is_closed
    finally:
        proxy.flowing.set()
        proxy.answering.set()
        await connection.close()


@pytest.mark.parametrize("durable", [True, False])
async def test_the_connection_cut_under_publishers(proxy: _Proxy, durable: bool) -> None:
    """The connection dies with publishers in flight, some waiting for queue room: each fails
    with a TransportError well before its publish timeout (no hang), and every message
    reported confirmed is on the queue."""
    transport = await _transport(proxy, publish_timeout=20, reconnect_wait=2)
    queue = f"attack-cut-{uuid.uuid4().hex[:8]}"
    body = b"y" * 200_000
    tasks: list[asyncio.Task[None]] = []
    try:
        await transport.declare_queue(queue, durable=True)
        proxy.flowing.clear()  # the frames pile up: the queue fills, publishers wait for room
        tasks += [
            asyncio.create_task(
                transport.publish_raw("", queue, str(i).encode() + body, durable=durable)
            )
            for i in range(60)
        ]
        await asyncio.sleep(0.3)
        proxy.cut()
        proxy.flowing.set()
        loop = asyncio.get_running_loop()
        start = loop.time()
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 15)
        assert loop.time() - start < 10
        failures = [r for r in results if r is not None]
        assert failures, "the cut failed nobody"
        assert all(isinstance(r, errors.TransportError) for r in failures), failures[:3]
        if durable:
            confirmed = {i for i, r in enumerate(results) if r is None}
            connection = await aiormq.connect(_amqp_url())
            try:
                channel = await connection.channel()
                on_queue = set()
                while True:
                    got = await channel.basic_get(queue, no_ack=True)
                    if isinstance(got.delivery, spec.Basic.GetEmpty):
                        break
                    on_queue.add(int(got.body[: -len(body)]))
                assert confirmed <= on_queue
            finally:
                await connection.close()
    finally:
        for t in tasks:
            t.cancel()
        with contextlib.suppress(errors.KeelError):
            await transport.delete_queue(queue)
        await transport.close()
