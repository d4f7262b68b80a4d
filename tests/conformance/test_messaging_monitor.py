"""The call monitor, remote exceptions rebuilt as raised, credit, and the notifier's window,
on every transport.

Points of docs/messaging-contract.md the oslo.messaging driver leans on (its
``call_monitor_timeout``, ``allowed_remote_exmods`` and batch listeners) and which native
Keel services get the same way. (Apart from test_messaging.py while that module is being
reworked; one contract, to be merged into it.)
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from keel import errors
from keel.messaging import (
    NotificationListener,
    Notifier,
    RequestContext,
    RPCClient,
    RPCServer,
    Target,
    Transport,
)
from keel.messaging._server import MIN_HEARTBEAT_INTERVAL
from keel.messaging._target import rpc_queue
from keel.wire import CALL, ENVELOPE_VERSION, Reply, Request, decode_reply, encode
from tests.conformance.conftest import TransportFactory
from tests.helpers import eventually

pytestmark = pytest.mark.timeout(60)


class Quota(Exception):
    """An application exception in oslo's style: keyword arguments in ``kwargs``."""

    def __init__(self, message: str = "", **kwargs: Any) -> None:
        super().__init__(message)
        self.kwargs = kwargs


class Slow:
    async def sleep(self, ctx: RequestContext, seconds: float) -> float:
        await asyncio.sleep(seconds)
        return seconds

    async def disk(self, ctx: RequestContext) -> None:
        raise TimeoutError("the disk did not answer")

    async def quota(self, ctx: RequestContext) -> None:
        raise Quota("over quota", resource="cores", limit=8)


async def test_heartbeats_keep_a_call_past_its_monitor_window(
    make_transport: TransportFactory, topic: str
) -> None:
    server = RPCServer(await make_transport(), Target(topic), [Slow()])
    await server.start()
    client = RPCClient(await make_transport(), Target(topic), timeout=60)
    monitored = client.prepare(monitor_timeout=0.5)
    assert await monitored.call(None, "sleep", seconds=1.6) == 1.6
    await server.stop()


async def test_a_silent_server_fails_the_call_after_one_window(
    transport: Transport, topic: str
) -> None:
    client = RPCClient(transport, Target(topic, server="gone"), timeout=60)
    started = time.monotonic()
    with pytest.raises(errors.CallTimeout, match="no heartbeat") as caught:
        await client.prepare(monitor_timeout=0.5).call(None, "sleep", seconds=0)
    assert time.monotonic() - started < 5
    assert caught.value.timeout == 0.5  # type: ignore[attr-defined]


@pytest.mark.parametrize("window", [0.0, -1.0, float("nan"), float("inf")])
async def test_a_monitor_window_must_be_positive(
    transport: Transport, topic: str, window: float
) -> None:
    with pytest.raises(errors.ConfigError):
        RPCClient(transport, Target(topic), monitor_timeout=window)


async def test_a_method_raising_timeout_error_answers_its_caller(
    make_transport: TransportFactory, topic: str
) -> None:
    server = RPCServer(await make_transport(), Target(topic), [Slow()])
    await server.start()
    client = RPCClient(await make_transport(), Target(topic), timeout=10)
    started = time.monotonic()
    with pytest.raises(errors.RemoteError, match="the disk did not answer") as caught:
        await client.call(None, "disk")
    assert caught.value.exc_type == "builtins.TimeoutError"  # type: ignore[attr-defined]
    assert time.monotonic() - started < 5  # not the caller's own timeout
    await server.stop()


async def test_an_allowed_exception_comes_back_as_raised(
    make_transport: TransportFactory, topic: str
) -> None:
    server = RPCServer(await make_transport(), Target(topic), [Slow()])
    await server.start()
    transport = await make_transport()
    allowed = RPCClient(transport, Target(topic), timeout=10, allowed_exceptions=[Quota])
    with pytest.raises(Quota) as caught:
        await allowed.call(None, "quota")
    assert caught.value.kwargs == {"resource": "cores", "limit": 8}
    plain = RPCClient(transport, Target(topic), timeout=10)
    with pytest.raises(errors.RemoteError) as remote:
        await plain.call(None, "quota")
    assert remote.value.remote_args == ["over quota"]  # type: ignore[attr-defined]
    assert remote.value.remote_kwargs == {"resource": "cores", "limit": 8}  # type: ignore[attr-defined]
    await server.stop()


async def test_free_credit_is_used_while_deliveries_are_held(
    transport: Transport, topic: str
) -> None:
    """A consumer holding its whole window, then settling it, gets the rest at once (a
    batch listener waits for a full window before it settles anything)."""
    queue = f"{topic}.credit"
    window = 10
    await transport.declare_queue(queue, durable=True)
    held: list[Any] = []
    taken: list[bytes] = []

    def on_delivery(delivery: Any) -> None:
        taken.append(delivery.body)
        held.append(delivery)
        if len(held) == window:
            batch = list(held)
            held.clear()
            for one in batch:
                asyncio.get_running_loop().create_task(one.ack())

    await transport.consume(queue, on_delivery, prefetch=window)
    for i in range(3 * window):
        await transport.send(queue, b"%d" % i, durable=True)
    await eventually(lambda: len(taken) == 3 * window, timeout=10)


async def test_a_notification_window_keeps_order_and_reports_failures(
    make_transport: TransportFactory, topic: str
) -> None:
    seen: list[Any] = []

    class Sink:
        async def info(self, ctx: Any, publisher: str, event: str, payload: Any, md: Any) -> None:
            seen.append(payload)

    listener = NotificationListener(
        await make_transport(), [Target(topic)], [Sink()], max_concurrency=1
    )
    await listener.start()
    sending = await make_transport()
    notifier = Notifier(sending, "pub", topics=[topic], window=8)
    for i in range(40):
        await notifier.info(None, "tick", i)
    await notifier.flush()
    await eventually(lambda: seen == list(range(40)), timeout=10)
    await sending.close()
    await notifier.info(None, "tick", 99)  # on its way: the failure comes at flush()
    with pytest.raises(errors.TransportError):
        await notifier.flush()
    await notifier.flush()  # reported once
    await listener.stop()


@pytest.mark.parametrize("window", [float("nan"), -1.0, 0.0, float("inf"), 1e-9])
async def test_a_hostile_monitor_window_neither_breaks_nor_floods_the_server(
    make_transport: TransportFactory, topic: str, window: float
) -> None:
    server = RPCServer(await make_transport(), Target(topic), [Slow()])
    await server.start()
    transport = await make_transport()
    replies: list[Reply] = []
    reply_queue = f"keel.reply.{topic}"
    await transport.declare_queue(reply_queue, durable=False, exclusive=True)
    await transport.consume(
        reply_queue, lambda d: replies.append(decode_reply(d.body)), prefetch=0, auto_ack=True
    )
    ctx = RequestContext(deadline=time.time() + 10)
    request = Request(
        ENVELOPE_VERSION, CALL, "r-1", "sleep", ctx, {"seconds": 0.6}, None, "1.0",
        reply_queue, None, 1, window,
    )  # fmt: skip
    await transport.send(rpc_queue(topic), encode(request, 1 << 20), durable=False)
    await eventually(lambda: any(not r.heartbeat for r in replies), timeout=10)
    beats = [r for r in replies if r.heartbeat]
    assert len(beats) <= 0.6 / MIN_HEARTBEAT_INTERVAL + 2
    assert [r.result for r in replies if not r.heartbeat] == [0.6]
    await server.stop()
