"""Attacks on the RPC server with ``_run`` inlined into ``_handle`` (the running count, the
running contexts and the slot released in one ``finally``; ``_idle`` set only while
draining) and the rewritten task sweep, on memory://: every way a handler can end, at every
await, must leave the counters as they were, and a drain must end as soon as the last
running request does (docs/drain-and-upgrades.md)."""

from __future__ import annotations

import asyncio
import logging
import random
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest

from keel import errors
from keel.messaging import RequestContext, RPCClient, RPCServer, Target, Transport, connect
from keel.messaging._link import link
from keel.messaging.transports.base import Delivery
from tests.helpers import eventually

pytestmark = pytest.mark.timeout(30)

TOPIC = "attack"


class Endpoint:
    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.gate.set()
        self.started: list[str] = []
        self.entered = asyncio.Event()
        self.seen: list[Any] = []

    async def work(self, ctx: RequestContext, i: int) -> int:
        self.started.append(f"work{i}")
        self.entered.set()
        await self.gate.wait()
        return i

    async def note(self, ctx: RequestContext, value: Any) -> None:
        self.started.append(f"note{value}")
        self.entered.set()
        await self.gate.wait()
        self.seen.append(value)

    async def jitter(self, ctx: RequestContext, i: int) -> int:
        await asyncio.sleep(random.random() * 0.003)
        return i * 2

    async def sleepy(self, ctx: RequestContext) -> None:
        await asyncio.sleep(10)

    async def boom(self, ctx: RequestContext) -> None:
        raise ValueError("the method's own error")


@dataclass
class Setup:
    server: RPCServer
    client: RPCClient
    endpoint: Endpoint
    server_transport: Transport
    client_transport: Transport


Make = Callable[..., Any]


@pytest.fixture
async def make() -> AsyncIterator[Make]:
    url = f"memory://inline-{uuid.uuid4().hex}"
    made: list[Setup] = []
    transports: list[Transport] = []

    async def build(*, start: bool = True, timeout: float = 10, **options: Any) -> Setup:
        server_transport, client_transport = await connect(url), await connect(url)
        transports.extend([server_transport, client_transport])
        endpoint = Endpoint()
        options.setdefault("stop_timeout", 10)
        server = RPCServer(server_transport, Target(TOPIC), [endpoint], **options)
        if start:
            await server.start()
        client = RPCClient(client_transport, Target(TOPIC), timeout=timeout)
        setup = Setup(server, client, endpoint, server_transport, client_transport)
        made.append(setup)
        return setup

    yield build
    for setup in made:
        await setup.server.stop(timeout=0)
    for transport in transports:
        await transport.close()


def assert_quiet(server: RPCServer) -> None:
    """Nothing runs, nothing waits, every slot is free."""
    assert server.running == 0
    assert server._running_ctx == {}
    assert server._slots.free == server.max_concurrency
    assert server.waiting == 0
    assert server._deadlines == {}


def handlers(server: RPCServer) -> list[asyncio.Task[None]]:
    return [t for t in server._tasks if not t.done()]


# --- drain -----------------------------------------------------------------------------------


@pytest.mark.parametrize("turns", range(6))
async def test_drain_right_after_the_last_handler_finishes_ends_at_once(
    make: Make, turns: int
) -> None:
    s = await make()
    s.endpoint.gate.clear()
    call = asyncio.ensure_future(s.client.call(None, "work", i=1))
    await asyncio.wait_for(s.endpoint.entered.wait(), 5)
    s.endpoint.gate.set()
    for _ in range(turns):  # the drain starts at each step of the handler's way out
        await asyncio.sleep(0)
    loop = asyncio.get_running_loop()
    began = loop.time()
    await asyncio.wait_for(s.server.drain(), 5)
    assert loop.time() - began < 2  # not the 10 s stop_timeout
    assert await call == 1
    assert_quiet(s.server)


@pytest.mark.parametrize("turns", range(6))
async def test_the_last_handler_finishing_during_the_drain_ends_it(make: Make, turns: int) -> None:
    s = await make()
    s.endpoint.gate.clear()
    calls = [asyncio.ensure_future(s.client.call(None, "work", i=i)) for i in range(3)]
    await eventually(lambda: s.server.running == 3)
    draining = asyncio.ensure_future(s.server.drain())
    for _ in range(turns):  # the handlers finish at each step of the drain's way in
        await asyncio.sleep(0)
    loop = asyncio.get_running_loop()
    began = loop.time()
    s.endpoint.gate.set()
    await asyncio.wait_for(draining, 5)
    assert loop.time() - began < 2
    assert await asyncio.gather(*calls) == [0, 1, 2]
    assert_quiet(s.server)


async def test_drain_hands_back_waiting_requests_and_waits_for_the_running_one(
    make: Make,
) -> None:
    busy = await make(max_concurrency=1)
    busy.endpoint.gate.clear()
    first = asyncio.ensure_future(busy.client.call(None, "work", i=0))
    await asyncio.wait_for(busy.endpoint.entered.wait(), 5)
    # Calls are acknowledged as they start, so the credit window lets one more in: it waits.
    waiting = [asyncio.ensure_future(busy.client.call(None, "work", i=i)) for i in (1, 2, 3)]
    await eventually(lambda: busy.server.waiting == 1)
    draining = asyncio.ensure_future(busy.server.drain())
    await eventually(lambda: busy.server.waiting == 0)
    assert busy.server.running == 1
    successor = await make()  # the handed-back calls go to another server of the topic
    assert sorted(await asyncio.gather(*waiting)) == [1, 2, 3]
    assert not draining.done()
    busy.endpoint.gate.set()
    assert await first == 0
    await asyncio.wait_for(draining, 5)
    assert busy.endpoint.started == ["work0"]  # the waiting ones never started here
    assert_quiet(busy.server)
    assert successor.server.counts["keel_rpc_server_requests", "call", "work", "ok"] == 3


async def test_a_hurried_drain_cancels_running_calls_and_the_counters_stay_right(
    make: Make,
) -> None:
    s = await make()
    s.endpoint.gate.clear()
    calls = [asyncio.ensure_future(s.client.call(None, "work", i=i)) for i in range(4)]
    await eventually(lambda: s.server.running == 4)
    draining = asyncio.ensure_future(s.server.drain())
    await asyncio.sleep(0.05)
    await asyncio.wait_for(s.server.drain(timeout=0), 5)  # the second stop: hurry
    await asyncio.wait_for(draining, 5)
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert all(isinstance(r, errors.ServerDraining) for r in results), results
    assert_quiet(s.server)


# --- cancellation at every await --------------------------------------------------------------


class GatedDelivery:
    """A delivery whose settling (after it took effect) waits at a gate."""

    def __init__(self, inner: Delivery, gate: asyncio.Event, arrived: asyncio.Event) -> None:
        self._inner = inner
        self._gate = gate
        self._arrived = arrived
        self.body = inner.body

    @property
    def delivery_count(self) -> int:
        return self._inner.delivery_count

    @property
    def settled(self) -> bool:
        return self._inner.settled

    @property
    def dead_letter_reason(self) -> str | None:
        return self._inner.dead_letter_reason

    async def _wait(self) -> None:
        self._arrived.set()
        await self._gate.wait()

    async def ack(self) -> None:
        await self._inner.ack()
        await self._wait()

    async def requeue(self) -> None:
        await self._inner.requeue()

    async def dead_letter(self, reason: str) -> None:
        await self._inner.dead_letter(reason)


async def _gate_acks(server: RPCServer) -> tuple[asyncio.Event, asyncio.Event]:
    gate, arrived = asyncio.Event(), asyncio.Event()
    plain = server._on_shared

    def on_shared(delivery: Delivery) -> None:
        plain(GatedDelivery(delivery, gate, arrived))

    server._on_shared = on_shared  # type: ignore[method-assign]
    await server.start()
    return gate, arrived


@pytest.mark.parametrize("point", ["ack", "method", "reply"])
async def test_a_call_cancelled_at_each_await_leaves_the_counters_right(
    make: Make, point: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = await make(start=False, timeout=1)
    gate, arrived = asyncio.Event(), asyncio.Event()
    if point == "ack":
        gate, arrived = await _gate_acks(s.server)
    else:
        await s.server.start()
    if point == "method":
        s.endpoint.gate.clear()
        arrived = s.endpoint.entered
    if point == "reply":
        send = s.server_transport.send

        async def gated_send(queue: str, body: bytes, *, durable: bool) -> None:
            arrived.set()
            await gate.wait()
            await send(queue, body, durable=durable)

        monkeypatch.setattr(s.server_transport, "send", gated_send)
        # The memory transport's reply is sent without an await (send_nowait): take the path
        # of a transport whose send waits, the await this case cancels at.
        monkeypatch.setattr(s.server, "_send_nowait", None)
    call = asyncio.ensure_future(s.client.call(None, "work", i=1))
    await asyncio.wait_for(arrived.wait(), 5)
    assert s.server.running == 1
    (task,) = handlers(s.server)
    task.cancel()
    await asyncio.wait([task], timeout=5)
    assert task.cancelled()
    assert_quiet(s.server)
    with pytest.raises(errors.CallTimeout):
        await call  # cancelled outside a drain: no reply, the caller times out
    gate.set()
    s.endpoint.gate.set()
    assert await s.client.call(None, "work", i=2) == 2  # and the server goes on
    assert_quiet(s.server)


async def test_a_request_cancelled_while_it_waits_for_a_slot_goes_back_unstarted(
    make: Make,
) -> None:
    s = await make(max_concurrency=1)
    s.endpoint.gate.clear()
    first = asyncio.ensure_future(s.client.call(None, "work", i=0))
    await asyncio.wait_for(s.endpoint.entered.wait(), 5)
    second = asyncio.ensure_future(s.client.call(None, "work", i=1))
    await eventually(lambda: s.server.waiting == 1)
    victims = [t for t in handlers(s.server) if _awaiting(t, "acquire")]
    assert len(victims) == 1
    for task in victims:
        task.cancel()
    await asyncio.wait(victims, timeout=5)
    assert all(t.cancelled() for t in victims)
    assert s.server.running == 1  # the running call is untouched
    assert len(s.server._running_ctx) == 1
    # Handed back unstarted: the broker delivers it again at once, and it waits again.
    await eventually(lambda: s.server.waiting == 1)
    assert not set(victims) & set(handlers(s.server))
    s.endpoint.gate.set()
    assert await first == 0
    assert await second == 1  # requeued unstarted, delivered again, run once
    assert s.endpoint.started == ["work0", "work1"]
    await eventually(lambda: s.server.running == 0)
    assert_quiet(s.server)


def _awaiting(task: asyncio.Task[None], function: str) -> bool:
    """Whether ``task`` is suspended somewhere inside ``function`` (down its await chain)."""
    coro: Any = task.get_coro()
    while coro is not None:
        code = getattr(coro, "cr_code", None)
        if code is not None and code.co_name == function:
            return True
        coro = getattr(coro, "cr_await", None)
    return False


async def test_a_cast_cancelled_in_its_method_is_requeued_and_runs_again(make: Make) -> None:
    s = await make()
    s.endpoint.gate.clear()
    await s.client.cast(None, "note", value="v")
    await asyncio.wait_for(s.endpoint.entered.wait(), 5)
    (task,) = handlers(s.server)
    task.cancel()
    await asyncio.wait([task], timeout=5)
    assert task.cancelled()
    # Requeued at once and delivered again: it runs (waits at the gate) a second time.
    await eventually(lambda: s.endpoint.started == ["notev", "notev"])
    assert s.server.running == 1
    assert len(s.server._running_ctx) == 1
    s.endpoint.gate.set()
    await eventually(lambda: s.endpoint.seen == ["v"])
    assert s.endpoint.started == ["notev", "notev"]
    await eventually(lambda: s.server.running == 0)
    assert_quiet(s.server)


async def test_a_call_past_its_deadline_is_cancelled_by_the_sweeper_cleanly(
    make: Make,
) -> None:
    s = await make()
    with pytest.raises(errors.CallTimeout):
        await s.client.prepare(timeout=0.2).call(None, "sleepy")
    key = ("keel_rpc_server_requests", "call", "sleepy", "deadline_exceeded")
    await eventually(lambda: s.server.counts[key] == 1)
    await eventually(lambda: s.server.running == 0)
    await asyncio.sleep(0.25)  # a sweep after the handler ended
    assert_quiet(s.server)
    assert s.server._expired_tasks == set()
    assert await s.client.call(None, "work", i=3) == 3


# --- exceptions ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["call", "cast", "fanout"])
async def test_a_bug_in_the_request_path_dead_letters_and_frees_the_slot(
    make: Make, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    s = await make(start=False, timeout=0.5)

    async def broken(*args: Any) -> None:
        raise RuntimeError("a bug in Keel")

    setattr(s.server, f"_do_{kind}", broken)
    await s.server.start()
    if kind == "call":
        with pytest.raises(errors.CallTimeout):
            await s.client.call(None, "work", i=1)
    elif kind == "cast":
        await s.client.cast(None, "note", value=1)
    else:
        await s.client.fanout(None, "note", value=1)
    key = ("keel_rpc_server_requests", "?", "?", "malformed")
    await eventually(lambda: s.server.counts[key] == 1)
    await eventually(lambda: s.server.running == 0)
    assert_quiet(s.server)
    assert "a bug in Keel" in caplog.text


async def test_a_settle_failure_is_logged_and_frees_the_slot(
    make: Make, caplog: pytest.LogCaptureFixture
) -> None:
    s = await make(start=False, timeout=0.5)
    calls = 0

    async def failing(request: Any, delivery: Delivery, task: Any = None) -> None:
        nonlocal calls
        calls += 1
        await delivery.ack()
        raise errors.TransportError("the broker went away")

    s.server._do_call = failing
    await s.server.start()
    with caplog.at_level(logging.WARNING, logger="keel.messaging.server"):
        with pytest.raises(errors.CallTimeout):
            await s.client.call(None, "work", i=1)
        await eventually(lambda: "request.settle_failed" in caplog.text)
    assert calls == 1
    assert_quiet(s.server)


async def test_a_method_error_reaches_the_caller_and_frees_the_slot(make: Make) -> None:
    s = await make(max_concurrency=2)
    for _ in range(5):
        with pytest.raises(errors.RemoteError, match="own error"):
            await s.client.call(None, "boom")
    assert_quiet(s.server)
    assert s.server.counts["keel_rpc_server_requests", "call", "boom", "error"] == 5


# --- the sweep ---------------------------------------------------------------------------------


async def test_the_sweep_logs_a_failed_handler_once_and_keeps_running_ones(
    make: Make, caplog: pytest.LogCaptureFixture
) -> None:
    s = await make()

    async def fails() -> None:
        raise RuntimeError("escaped _handle")

    async def waits() -> None:
        await asyncio.sleep(10)

    async def ends() -> None:
        return None

    failed, running, ended, cancelled = (
        asyncio.ensure_future(fails()),
        asyncio.ensure_future(waits()),
        asyncio.ensure_future(ends()),
        asyncio.ensure_future(waits()),
    )
    cancelled.cancel()
    s.server._tasks.update({failed, running, ended, cancelled})
    await asyncio.sleep(0.01)
    with caplog.at_level(logging.ERROR, logger="keel.messaging.server"):
        s.server._forget_done()
        s.server._forget_done()
        await asyncio.sleep(0.25)  # and the sweeper's own passes
    failures = [r for r in caplog.records if "task.failed" in r.getMessage()]
    assert len(failures) == 1
    assert "escaped _handle" in failures[0].getMessage()
    assert running in s.server._tasks
    assert not {failed, ended, cancelled} & s.server._tasks
    running.cancel()
    await asyncio.wait([running])


async def test_nothing_is_lost_when_every_task_is_still_running(make: Make) -> None:
    s = await make()
    tasks = {asyncio.ensure_future(asyncio.sleep(10)) for _ in range(5)}
    s.server._tasks.update(tasks)
    s.server._forget_done()
    assert tasks <= s.server._tasks
    for task in tasks:
        task.cancel()
    await asyncio.wait(tasks)
    s.server._forget_done()
    assert not tasks & s.server._tasks


# --- memory:// under concurrency ---------------------------------------------------------------


async def test_many_concurrent_calls_casts_and_fanouts_on_few_slots(make: Make) -> None:
    s = await make(max_concurrency=4)
    other = await make(max_concurrency=3)  # a second server of the topic shares the calls
    results = await asyncio.gather(*(s.client.call(None, "jitter", i=i) for i in range(300)))
    assert results == [i * 2 for i in range(300)]
    await asyncio.gather(*(s.client.cast(None, "note", value=i) for i in range(100)))
    await s.client.fanout(None, "note", value="all")
    await eventually(
        lambda: (
            len(s.endpoint.seen) + len(other.endpoint.seen) == 102
            and "all" in s.endpoint.seen
            and "all" in other.endpoint.seen
        )
    )
    assert sorted(v for v in s.endpoint.seen + other.endpoint.seen if v != "all") == list(
        range(100)
    )
    ok = ("keel_rpc_server_requests", "call", "jitter", "ok")
    assert s.server.counts[ok] + other.server.counts[ok] == 300
    assert not link(s.client_transport)._pending
    for server in (s.server, other.server):
        await eventually(lambda server=server: server.running == 0)  # type: ignore[misc]
        assert_quiet(server)
    # A drain in the middle of a burst: every call still gets its answer (handed back to the
    # other server or finished here).
    burst = [asyncio.ensure_future(s.client.call(None, "jitter", i=i)) for i in range(200)]
    await asyncio.sleep(0.005)
    await asyncio.wait_for(s.server.drain(), 10)
    assert await asyncio.gather(*burst) == [i * 2 for i in range(200)]
    assert_quiet(s.server)
    await eventually(lambda: other.server.running == 0)
    assert_quiet(other.server)
