"""The messaging contract (docs/messaging-contract.md), one test per point, on every transport.

The `transport` fixture chooses the backend; nothing here names one.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from typing import Any

import msgspec
import pytest

from keel import errors
from keel.messaging import (
    NotificationFilter,
    NotificationListener,
    NotificationResult,
    Notifier,
    RequestContext,
    RPCClient,
    RPCServer,
    Target,
    Transport,
    current_context,
)
from keel.messaging._target import notify_queue, rpc_queue
from keel.wire import decode_request
from tests.conformance.conftest import TransportFactory
from tests.helpers import eventually


class Recorder:
    """An endpoint that records what it ran, async and sync methods both."""

    def __init__(self, name: str = "s") -> None:
        self.name = name
        self.calls: list[tuple[str, Any]] = []
        self.contexts: list[RequestContext] = []
        self.running = 0
        self.peak = 0
        self.cancelled = 0
        self.release = asyncio.Event()

    async def echo(self, ctx: RequestContext, value: Any) -> Any:
        self.calls.append(("echo", value))
        self.contexts.append(ctx)
        return value

    def sync_echo(self, ctx: RequestContext, value: Any) -> dict[str, Any]:
        self.calls.append(("sync_echo", value))
        return {"value": value, "thread": threading.current_thread().name}

    async def whoami(self, ctx: RequestContext) -> str:
        self.calls.append(("whoami", None))
        return self.name

    async def record(self, ctx: RequestContext, value: Any) -> None:
        self.calls.append(("record", value))

    async def fail(self, ctx: RequestContext, kind: str) -> None:
        if kind == "value":
            raise ValueError("bad value 42")
        if kind == "notfound":
            raise errors.NotFound("instance i-1 not found", resource="i-1")
        if kind == "type":
            raise TypeError("raised inside the method")
        raise RuntimeError("boom")

    async def hang(self, ctx: RequestContext, seconds: float) -> str:
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            await asyncio.sleep(seconds)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.running -= 1
        return "done"

    async def wait_release(self, ctx: RequestContext) -> str:
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            await self.release.wait()
        finally:
            self.running -= 1
        return "released"

    async def unserializable(self, ctx: RequestContext) -> object:
        return object()

    async def big(self, ctx: RequestContext, size: int) -> bytes:
        return b"x" * size

    async def ask_other(self, ctx: RequestContext, topic: str) -> dict[str, Any]:
        client = RPCClient(self.transport, Target(topic), timeout=5)  # type: ignore[attr-defined]
        inner = await client.call(None, "context_of")
        return {"outer": _ctx_dict(ctx), "inner": inner}

    async def context_of(self, ctx: RequestContext) -> dict[str, Any]:
        assert current_context() is ctx
        return _ctx_dict(ctx)

    async def call_self(self, ctx: RequestContext) -> Any:
        client = RPCClient(self.transport, Target(self.topic), timeout=2)  # type: ignore[attr-defined]
        return await client.call(None, "echo", value=1)


def _ctx_dict(ctx: RequestContext) -> dict[str, Any]:
    return msgspec.structs.asdict(ctx)


async def serve(
    transport: Transport, topic: str, endpoint: object | None = None, **options: Any
) -> tuple[RPCServer, Any]:
    endpoint = endpoint or Recorder()
    endpoint.transport = transport  # type: ignore[attr-defined]
    endpoint.topic = topic  # type: ignore[attr-defined]
    server = RPCServer(
        transport, Target(topic, server=options.pop("name", None)), [endpoint], **options
    )
    await server.start()
    return server, endpoint


# --- call ------------------------------------------------------------------------------------


async def test_call_returns_the_result(transport: Transport, topic: str) -> None:
    server, _ = await serve(transport, topic)
    client = RPCClient(transport, Target(topic), timeout=5)
    value = {"a": [1, 2.5, None, True], "b": b"\x00bytes", "c": "ü"}
    assert await client.call(None, "echo", value=value) == value
    await server.stop()


async def test_sync_methods_run_in_the_bounded_thread_pool(
    transport: Transport, topic: str
) -> None:
    server, _ = await serve(transport, topic, thread_pool_size=2)
    client = RPCClient(transport, Target(topic), timeout=5)
    results = await asyncio.gather(*(client.call(None, "sync_echo", value=i) for i in range(8)))
    assert [r["value"] for r in results] == list(range(8))
    threads = {r["thread"] for r in results}
    assert all(t.startswith(f"keel-{topic}") for t in threads)
    assert len(threads) <= 2
    await server.stop()


async def test_context_travels_with_the_call(transport: Transport, topic: str) -> None:
    server, rec = await serve(transport, topic)
    client = RPCClient(transport, Target(topic), timeout=5, service="api")
    ctx = RequestContext(user="alice", project="p1", roles=("member",), extra={"k": "v"})
    await client.call(ctx, "echo", value=1)
    seen = rec.contexts[0]
    assert (seen.user, seen.project, seen.roles, seen.extra) == (
        "alice",
        "p1",
        ("member",),
        {"k": "v"},
    )
    assert seen.request_id == ctx.request_id
    assert seen.trace_id == ctx.trace_id
    assert seen.traceparent != ctx.traceparent
    assert seen.service == "api"
    assert seen.deadline is not None
    assert 0 < seen.deadline - time.time() <= 5
    await server.stop()


async def test_nested_call_inherits_trace_and_deadline(transport: Transport, topic: str) -> None:
    outer, _ = await serve(transport, topic)
    inner, _ = await serve(transport, topic + "-inner")
    client = RPCClient(transport, Target(topic), timeout=3)
    got = await client.call(RequestContext(user="bob"), "ask_other", topic=topic + "-inner")
    assert got["inner"]["user"] == "bob"
    assert got["inner"]["traceparent"].split("-")[1] == got["outer"]["traceparent"].split("-")[1]
    assert got["inner"]["depth"] == got["outer"]["depth"] + 1
    assert got["inner"]["deadline"] <= got["outer"]["deadline"]
    await outer.stop()
    await inner.stop()


async def test_calls_compete_across_servers(make_transport: TransportFactory, topic: str) -> None:
    a, _ = await serve(await make_transport(), topic, Recorder("a"))
    b, _ = await serve(await make_transport(), topic, Recorder("b"))
    client = RPCClient(await make_transport(), Target(topic), timeout=5)
    names = Counter(await asyncio.gather(*(client.call(None, "whoami") for _ in range(40))))
    assert sum(names.values()) == 40
    assert set(names) == {"a", "b"}
    await a.stop()
    await b.stop()


async def test_call_to_a_named_server(make_transport: TransportFactory, topic: str) -> None:
    a, _ = await serve(await make_transport(), topic, Recorder("a"), name="host-a")
    b, _ = await serve(await make_transport(), topic, Recorder("b"), name="host-b")
    client = RPCClient(await make_transport(), Target(topic), timeout=5)
    for _ in range(5):
        assert await client.prepare(server="host-b").call(None, "whoami") == "b"
    await a.stop()
    await b.stop()


async def test_call_to_a_topic_nobody_serves_times_out(transport: Transport, topic: str) -> None:
    client = RPCClient(transport, Target(topic), timeout=0.3)
    started = time.monotonic()
    with pytest.raises(errors.CallTimeout) as info:
        await client.call(None, "echo", value=1)
    assert 0.25 < time.monotonic() - started < 3
    assert info.value.topic == topic
    assert info.value.method == "echo"
    assert topic in str(info.value)
    assert "echo" in str(info.value)
    assert isinstance(info.value, TimeoutError)
    assert info.value.retryable


async def test_handler_past_the_deadline_is_cancelled(transport: Transport, topic: str) -> None:
    server, rec = await serve(transport, topic)
    client = RPCClient(transport, Target(topic), timeout=0.3)
    with pytest.raises(errors.CallTimeout):
        await client.call(None, "hang", seconds=30)
    await eventually(lambda: rec.cancelled == 1)
    await server.stop()


async def test_expired_request_is_never_started(transport: Transport, topic: str) -> None:
    client = RPCClient(transport, Target(topic), timeout=0.2)
    with pytest.raises(errors.CallTimeout):
        await client.call(None, "record", value="late")
    server, rec = await serve(transport, topic)
    assert await client.prepare(timeout=5).call(None, "echo", value="fresh") == "fresh"
    assert ("record", "late") not in rec.calls
    await eventually(
        lambda: server.counts["keel_rpc_server_requests", "call", "record", "expired"] == 1
    )
    await server.stop()


# --- errors ----------------------------------------------------------------------------------


async def test_remote_exception_arrives_as_remote_error(transport: Transport, topic: str) -> None:
    server, _ = await serve(transport, topic)
    client = RPCClient(transport, Target(topic), timeout=5)
    with pytest.raises(errors.RemoteError) as info:
        await client.call(None, "fail", kind="runtime")
    assert info.value.exc_type == "builtins.RuntimeError"
    assert info.value.remote_message == "boom"
    assert "RuntimeError" in info.value.remote_traceback
    await server.stop()


async def test_allowed_exceptions_come_back_as_themselves(transport: Transport, topic: str) -> None:
    server, _ = await serve(transport, topic)
    client = RPCClient(transport, Target(topic), timeout=5, allowed_exceptions=[ValueError])
    with pytest.raises(ValueError, match="bad value 42"):
        await client.call(None, "fail", kind="value")
    with pytest.raises(errors.NotFound, match="i-1") as info:
        await client.call(None, "fail", kind="notfound")
    assert info.value.resource == "i-1"
    await server.stop()


async def test_unknown_method(transport: Transport, topic: str) -> None:
    server, _ = await serve(transport, topic)
    client = RPCClient(transport, Target(topic), timeout=5)
    with pytest.raises(errors.UnknownMethod, match="no_such"):
        await client.call(None, "no_such")
    with pytest.raises(errors.UnknownMethod):
        await client.call(None, "_private")
    await server.stop()


async def test_wrong_arguments(transport: Transport, topic: str) -> None:
    server, _ = await serve(transport, topic)
    client = RPCClient(transport, Target(topic), timeout=5)
    with pytest.raises(errors.InvalidArguments, match="unexpected keyword"):
        await client.call(None, "echo", value=1, extra=2)
    with pytest.raises(errors.InvalidArguments, match="missing"):
        await client.call(None, "echo")
    with pytest.raises(errors.InvalidArguments):
        await client.call(None, "sync_echo", wrong=1)
    with pytest.raises(errors.RemoteError, match="raised inside the method"):
        await client.call(None, "fail", kind="type")
    await server.stop()


async def test_non_serializable_argument_fails_at_the_sender(
    transport: Transport, topic: str
) -> None:
    server, rec = await serve(transport, topic)
    client = RPCClient(transport, Target(topic), timeout=5)
    with pytest.raises(errors.SerializationError, match="object"):
        await client.call(None, "echo", value=object())
    with pytest.raises(errors.SerializationError):
        await client.cast(None, "record", value=1 + 2j)
    assert rec.calls == []
    await server.stop()


async def test_non_serializable_result(transport: Transport, topic: str) -> None:
    server, _ = await serve(transport, topic)
    client = RPCClient(transport, Target(topic), timeout=5)
    with pytest.raises(errors.SerializationError):
        await client.call(None, "unserializable")
    await server.stop()


async def test_oversize_messages(transport: Transport, topic: str) -> None:
    server, rec = await serve(transport, topic)
    client = RPCClient(transport, Target(topic), timeout=5)
    limit = transport.max_message_bytes
    with pytest.raises(errors.MessageTooLarge) as info:
        await client.call(None, "echo", value=b"x" * limit)
    assert info.value.limit == limit
    assert info.value.size > limit
    with pytest.raises(errors.MessageTooLarge):
        await client.cast(None, "record", value=b"x" * limit)
    with pytest.raises(errors.MessageTooLarge):
        await client.call(None, "big", size=limit)
    assert len(await client.call(None, "big", size=limit // 2)) == limit // 2
    assert [c for c in rec.calls if c[0] != "big"] == []
    await server.stop()


# --- cast and fanout -------------------------------------------------------------------------


async def test_cast_runs_on_exactly_one_server(
    make_transport: TransportFactory, topic: str
) -> None:
    a, ra = await serve(await make_transport(), topic)
    b, rb = await serve(await make_transport(), topic)
    client = RPCClient(await make_transport(), Target(topic))
    for i in range(20):
        await client.cast(None, "record", value=i)
    await eventually(lambda: len(ra.calls) + len(rb.calls) == 20)
    await asyncio.sleep(0.1)
    assert sorted(v for _, v in ra.calls + rb.calls) == list(range(20))
    await a.stop()
    await b.stop()


async def test_cast_to_a_named_server(make_transport: TransportFactory, topic: str) -> None:
    a, ra = await serve(await make_transport(), topic, name="host-a")
    b, rb = await serve(await make_transport(), topic, name="host-b")
    client = RPCClient(await make_transport(), Target(topic)).prepare(server="host-a")
    for i in range(5):
        await client.cast(None, "record", value=i)
    await eventually(lambda: len(ra.calls) == 5)
    assert rb.calls == []
    await a.stop()
    await b.stop()


async def test_cast_waits_for_a_server(make_transport: TransportFactory, topic: str) -> None:
    client = RPCClient(await make_transport(), Target(topic))
    await client.cast(None, "record", value="early")
    server, rec = await serve(await make_transport(), topic)
    await eventually(lambda: rec.calls == [("record", "early")])
    await server.stop()


async def test_casts_to_one_server_keep_order(transport: Transport, topic: str) -> None:
    server, rec = await serve(transport, topic, max_concurrency=1)
    client = RPCClient(transport, Target(topic))
    for i in range(50):
        await client.cast(None, "record", value=i)
    await eventually(lambda: len(rec.calls) == 50)
    assert [v for _, v in rec.calls] == list(range(50))
    await server.stop()


async def test_duplicate_cast_runs_once(transport: Transport, topic: str) -> None:
    server, rec = await serve(transport, topic)
    client = RPCClient(transport, Target(topic)).prepare(idempotency_key="resize-i-1-42")
    await client.cast(None, "record", value="first")
    await client.cast(None, "record", value="retry")
    await eventually(
        lambda: server.counts["keel_rpc_server_requests", "cast", "record", "duplicate"] == 1
    )
    assert rec.calls == [("record", "first")]
    await server.stop()


async def test_failing_cast_is_dead_lettered(transport: Transport, topic: str) -> None:
    server, _ = await serve(transport, topic)
    dead = await _collect_dead_letters(transport, rpc_queue(topic))
    client = RPCClient(transport, Target(topic))
    await client.prepare(idempotency_key="k-fail").cast(None, "fail", kind="runtime")
    await client.prepare(idempotency_key="k-unknown").cast(None, "no_such_method")
    await eventually(lambda: len(dead) == 2)
    assert sorted(decode_request(body).id for body in dead) == ["k-fail", "k-unknown"]
    assert await RPCClient(transport, Target(topic), timeout=5).call(None, "echo", value=1) == 1
    await server.stop()


async def test_fanout_reaches_every_server(make_transport: TransportFactory, topic: str) -> None:
    servers = [await serve(await make_transport(), topic) for _ in range(3)]
    client = RPCClient(await make_transport(), Target(topic))
    await client.fanout(None, "record", value="all")
    for _, rec in servers:
        await eventually(lambda rec=rec: rec.calls == [("record", "all")])
    for server, _ in servers:
        await server.stop()


async def test_a_publish_right_after_consume_returned_reaches_the_consumer(
    make_transport: TransportFactory, topic: str
) -> None:
    """A server is live once it started: a fanout sent by another connection the moment
    `consume` returned is heard (NATS lost 18 of 200 before its consume waited for the
    server to route to the new subscription)."""
    mine, other = await make_transport(), await make_transport()
    missed = []
    for i in range(100):
        queue, subject = f"{topic}.q{i}", f"{topic}.fan{i}"
        await mine.declare_queue(queue, durable=False, exclusive=True, bindings=[subject])
        heard = asyncio.Event()
        consumer = await mine.consume(queue, lambda _d, h=heard: h.set(), prefetch=1, auto_ack=True)
        await other.publish(subject, b"x", durable=False)
        try:
            await asyncio.wait_for(heard.wait(), 2)
        except TimeoutError:
            missed.append(i)
        await consumer.cancel()
    assert missed == []


# --- bad input from the network --------------------------------------------------------------


async def test_malformed_message_is_dead_lettered(transport: Transport, topic: str) -> None:
    server, _ = await serve(transport, topic)
    dead = await _collect_dead_letters(transport, rpc_queue(topic))
    await transport.send(rpc_queue(topic), b"\xc1 not msgpack", durable=True)
    await transport.send(
        rpc_queue(topic), msgspec.msgpack.encode([99, "from the future"]), durable=True
    )
    await transport.send(
        rpc_queue(topic), msgspec.json.encode({"oslo.message": "{}"}), durable=True
    )
    await eventually(lambda: len(dead) == 3)
    assert server.counts["keel_rpc_server_requests", "?", "?", "malformed"] == 3
    client = RPCClient(transport, Target(topic), timeout=5)
    assert await client.call(None, "echo", value="still serving") == "still serving"
    await server.stop()


async def _collect_dead_letters(transport: Transport, queue: str) -> list[bytes]:
    dead: list[bytes] = []
    await transport.declare_queue(queue + ".dlq", durable=True)

    def on_dead(delivery: Any) -> None:
        dead.append(delivery.body)
        asyncio.get_running_loop().create_task(delivery.ack())

    await transport.consume(queue + ".dlq", on_dead, prefetch=100)
    return dead


# --- namespaces and versions -----------------------------------------------------------------


class V13:
    target = Target(version="1.3")

    async def version(self, ctx: RequestContext) -> str:
        return "1.3"


class Admin:
    target = Target(namespace="admin", version="2.0")

    async def version(self, ctx: RequestContext) -> str:
        return "admin-2.0"


async def test_namespaces_and_versions(transport: Transport, topic: str) -> None:
    server = RPCServer(transport, Target(topic), [V13(), Admin()])
    await server.start()
    client = RPCClient(transport, Target(topic), timeout=5)
    assert await client.call(None, "version") == "1.3"
    assert await client.prepare(version="1.2").call(None, "version") == "1.3"
    assert (
        await client.prepare(namespace="admin", version="2.0").call(None, "version") == "admin-2.0"
    )
    with pytest.raises(errors.UnsupportedVersion, match=r"1\.4.*1\.3") as info:
        await client.prepare(version="1.4").call(None, "version")
    assert info.value.requested == "1.4"
    assert info.value.served == "1.3"
    with pytest.raises(errors.UnsupportedVersion):
        await client.prepare(version="2.0").call(None, "version")
    with pytest.raises(errors.UnknownMethod, match="namespace"):
        await client.prepare(namespace="nope").call(None, "version")
    with pytest.raises(errors.ConfigError):
        client.prepare(version="one")
    await server.stop()


# --- concurrency, stop and drain guarantees --------------------------------------------------


async def test_concurrency_is_bounded_per_server(transport: Transport, topic: str) -> None:
    server, rec = await serve(transport, topic, max_concurrency=2)
    client = RPCClient(transport, Target(topic), timeout=10)
    await asyncio.gather(*(client.call(None, "hang", seconds=0.1) for _ in range(6)))
    assert rec.peak == 2
    await server.stop()


async def test_stop_finishes_running_calls_and_hands_back_the_rest(
    make_transport: TransportFactory, topic: str
) -> None:
    first, rec1 = await serve(await make_transport(), topic, max_concurrency=1)
    client = RPCClient(await make_transport(), Target(topic), timeout=10)
    running = asyncio.ensure_future(client.call(None, "wait_release"))
    await eventually(lambda: rec1.running == 1)
    queued = [asyncio.ensure_future(client.call(None, "whoami")) for _ in range(3)]
    await asyncio.sleep(0.1)
    stopping = asyncio.ensure_future(first.stop(timeout=10))
    await asyncio.sleep(0.1)
    second, _ = await serve(await make_transport(), topic, Recorder("second"))
    rec1.release.set()
    assert await running == "released"
    assert await asyncio.gather(*queued) == ["second"] * 3
    await stopping
    await second.stop()


async def test_stop_past_its_timeout_tells_the_caller(transport: Transport, topic: str) -> None:
    server, rec = await serve(transport, topic)
    client = RPCClient(transport, Target(topic), timeout=10)
    call = asyncio.ensure_future(client.call(None, "hang", seconds=30))
    await eventually(lambda: rec.running == 1)
    await server.stop(timeout=0.2)
    with pytest.raises(errors.ServerDraining) as info:
        await call
    assert info.value.retryable


# --- anti-patterns ---------------------------------------------------------------------------


async def test_calls_without_a_deadline_are_refused(transport: Transport, topic: str) -> None:
    for timeout in (None, 0, -1, float("inf")):
        with pytest.raises(errors.AntiPatternError, match="call-without-deadline"):
            RPCClient(transport, Target(topic), timeout=timeout)  # type: ignore[arg-type]


async def test_call_into_own_saturated_server_is_refused(transport: Transport, topic: str) -> None:
    server, _ = await serve(transport, topic, max_concurrency=1)
    client = RPCClient(transport, Target(topic), timeout=5)
    with pytest.raises(errors.AntiPatternError, match="call-into-own-saturated-server"):
        await client.call(None, "call_self")
    await server.stop()


async def test_call_loops_are_refused(transport: Transport, topic: str) -> None:
    server, _ = await serve(transport, topic)
    client = RPCClient(transport, Target(topic), timeout=5)
    with pytest.raises(errors.AntiPatternError, match="chatty-call-chain"):
        await client.call(RequestContext(depth=40), "echo", value=1)
    await server.stop()


# --- notifications ---------------------------------------------------------------------------


class Sink:
    def __init__(self, name: str = "sink", requeue_first: bool = False) -> None:
        self.name = name
        self.seen: list[tuple[str, str, Any]] = []
        self.requeue_first = requeue_first
        self.requeued = 0

    async def info(
        self,
        ctx: RequestContext,
        publisher_id: str,
        event_type: str,
        payload: Any,
        metadata: dict[str, Any],
    ) -> NotificationResult | None:
        if self.requeue_first and not self.requeued:
            self.requeued += 1
            return NotificationResult.REQUEUE
        self.seen.append((publisher_id, event_type, payload))
        return None

    def error(
        self,
        ctx: RequestContext,
        publisher_id: str,
        event_type: str,
        payload: Any,
        metadata: dict[str, Any],
    ) -> None:
        if payload == "explode":
            raise RuntimeError("handler failed")
        self.seen.append((publisher_id, event_type, payload))


async def test_notification_reaches_a_listener(transport: Transport, topic: str) -> None:
    sink = Sink()
    async with NotificationListener(transport, [Target(topic)], [sink]):
        notifier = Notifier(transport, "compute.host1", topics=[topic])
        await notifier.info(
            RequestContext(project="p1"), "compute.instance.create.end", {"id": "i-1"}
        )
        await notifier.error(None, "compute.instance.error", {"id": "i-2"})
        await eventually(lambda: len(sink.seen) == 2)
    assert sink.seen[0] == ("compute.host1", "compute.instance.create.end", {"id": "i-1"})


async def test_notifications_wait_for_the_default_listener(
    transport: Transport, topic: str
) -> None:
    notifier = Notifier(transport, "compute.host1", topics=[topic])
    await notifier.info(None, "early", 1)
    sink = Sink()
    async with NotificationListener(transport, [Target(topic)], [sink]):
        await eventually(lambda: sink.seen == [("compute.host1", "early", 1)])


async def test_each_pool_gets_a_copy_and_listeners_in_a_pool_compete(
    make_transport: TransportFactory, topic: str
) -> None:
    pools = {"billing": [Sink("b1"), Sink("b2")], "search": [Sink("s1")]}
    listeners = []
    for pool, sinks in pools.items():
        for sink in sinks:
            listener = NotificationListener(
                await make_transport(), [Target(topic)], [sink], pool=pool
            )
            await listener.start()
            listeners.append(listener)
    notifier = Notifier(await make_transport(), "p", topics=[topic])
    for i in range(20):
        await notifier.info(None, "tick", i)
    await eventually(lambda: sum(len(s.seen) for s in pools["billing"]) == 20)
    await eventually(lambda: len(pools["search"][0].seen) == 20)
    await asyncio.sleep(0.1)
    billing = sorted(p for s in pools["billing"] for _, _, p in s.seen)
    assert billing == list(range(20))
    for listener in listeners:
        await listener.stop()


async def test_notification_filters(transport: Transport, topic: str) -> None:
    sink = Sink()
    sink.filter_rule = NotificationFilter(
        event_type=r"compute\.instance\..*", publisher_id="^compute"
    )  # type: ignore[attr-defined]
    async with NotificationListener(transport, [Target(topic)], [sink]) as listener:
        notifier = Notifier(transport, "compute.h1", topics=[topic])
        await notifier.info(None, "volume.attach", 1)
        await notifier.prepare(publisher_id="network.h1").info(None, "compute.instance.x", 2)
        await notifier.info(None, "compute.instance.update", 3)
        await eventually(lambda: listener.counts["keel_notifications", "info", "handled"] == 3)
    assert [p for _, _, p in sink.seen] == [3]


async def test_a_handler_may_requeue(transport: Transport, topic: str) -> None:
    sink = Sink(requeue_first=True)
    async with NotificationListener(transport, [Target(topic)], [sink]):
        await Notifier(transport, "p", topics=[topic]).info(None, "again", 1)
        await eventually(lambda: sink.seen == [("p", "again", 1)])
    assert sink.requeued == 1


async def test_a_failing_handler_dead_letters(transport: Transport, topic: str) -> None:
    sink = Sink()
    dead = await _collect_dead_letters(transport, notify_queue(topic, "error", None))
    async with NotificationListener(transport, [Target(topic)], [sink]):
        notifier = Notifier(transport, "p", topics=[topic])
        await notifier.error(None, "e", "explode")
        await notifier.error(None, "e", "fine")
        await eventually(lambda: len(dead) == 1 and len(sink.seen) == 1)


async def test_notifications_keep_order_with_one_at_a_time(
    transport: Transport, topic: str
) -> None:
    sink = Sink()
    async with NotificationListener(transport, [Target(topic)], [sink], max_concurrency=1):
        notifier = Notifier(transport, "p", topics=[topic])
        for i in range(30):
            await notifier.info(None, "seq", i)
        await eventually(lambda: len(sink.seen) == 30)
    assert [p for _, _, p in sink.seen] == list(range(30))


async def test_bad_notification_input(transport: Transport, topic: str) -> None:
    notifier = Notifier(transport, "p", topics=[topic])
    with pytest.raises(errors.ConfigError, match="priority"):
        await notifier.notify(None, "x", 1, "loud")
    with pytest.raises(errors.SerializationError):
        await notifier.info(None, "x", object())
    with pytest.raises(errors.MessageTooLarge):
        await notifier.info(None, "x", b"x" * transport.max_message_bytes)
