"""Floods on every transport: what one hostile publisher costs everyone else on a process.

docs/messaging-contract.md, "Bad input from the network" (floods): a body's decoding cost is
bounded by its size and large bodies take turns with the rest of the event loop, so a flood
of container bombs leaves other calls of the process their latency; an auto-acknowledged
queue (fanout, replies) that has no credit window holds a bounded backlog whatever arrives.
The `transport` fixture chooses the backend; nothing here names one.
"""

from __future__ import annotations

import asyncio
import gc
import time
from typing import Any

import pytest

from keel.messaging import RequestContext, RPCClient, RPCServer, Target, Transport
from keel.messaging._link import link
from keel.messaging._target import fanout_subject, rpc_queue
from tests import poison
from tests.conformance.conftest import TransportFactory
from tests.conformance.test_messaging_poison import DeadLetters, malformed_total, rss
from tests.helpers import eventually

pytestmark = pytest.mark.timeout(180)

BOMBS = 6  # per target: the topic queue (window of 4), a fanout queue, a reply queue


def calm_latency() -> float:
    """The slowest a call may be while bombs arrive: a few bombs' decodes on this machine now.

    Measured against making the bomb's lists in Python (collector off), which costs about
    what refusing a bomb now costs, and a twelfth of what it cost before: a call that waits
    behind one bomb at each hop takes a few of these; one behind one bomb read as before, 12.
    """
    gc.disable()
    try:
        started = time.perf_counter()
        made = [[] for _ in range(poison.WIDE)]
        spent = time.perf_counter() - started
        del made
    finally:
        gc.enable()
    return 0.3 + 6 * spent


class Echo:
    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.fanouts = 0

    async def echo(self, ctx: RequestContext, value: Any) -> Any:
        return value

    async def slow_fanout(self, ctx: RequestContext, blob: bytes) -> None:
        self.fanouts += 1
        await self.gate.wait()


async def test_container_bombs_leave_other_calls_their_latency(
    make_transport: TransportFactory, topic: str
) -> None:
    """Half a million empty lists in one body took seconds of the event loop to refuse (the
    collector walking every new list, then a Python walk of them), four in a row for a
    window of four: every other call of the process waited that long."""
    reader = await make_transport()
    publisher = await make_transport()
    bombed = RPCServer(reader, Target(f"{topic}-bombed"), [Echo()], max_concurrency=4)
    served = RPCServer(reader, Target(topic), [Echo()])
    await bombed.start()
    await served.start()
    client = RPCClient(reader, Target(topic), timeout=30)
    assert await client.call(None, "echo", value=0) == 0
    dead = DeadLetters()
    await dead.watch(publisher, rpc_queue(f"{topic}-bombed"))
    bomb = poison.wide_bomb()
    assert len(bomb) < reader.max_message_bytes  # bounded by the cost, not refused by size
    reply_to = await link(reader).reply_queue()

    latencies: list[float] = []
    flooding = True

    async def calls() -> None:
        i = 0
        while flooding:
            started = time.monotonic()
            assert await client.call(None, "echo", value=i) == i
            latencies.append(time.monotonic() - started)
            i += 1

    caller = asyncio.ensure_future(calls())
    await asyncio.sleep(0.2)
    for _ in range(BOMBS):
        await publisher.send(rpc_queue(f"{topic}-bombed"), bomb, durable=True)
        await publisher.publish(fanout_subject(topic), bomb, durable=False)
        await publisher.send(reply_to, bomb, durable=False)
    await eventually(lambda: len(dead.seen) == BOMBS, timeout=90)
    await eventually(
        lambda: malformed_total(kind="fanout", queue=fanout_subject(topic)) >= BOMBS, timeout=30
    )
    flooding = False
    await caller
    assert all(reason and "lists and maps" in reason for _, _, reason in dead.seen), dead.seen
    assert latencies
    calm = calm_latency()
    assert max(latencies) < calm, (
        f"{len(latencies)} calls during the flood, slowest {max(latencies):.2f}s (at most "
        f"{calm:.2f}s here)"
    )
    await served.stop()
    await bombed.stop()


async def test_a_fanout_flood_holds_a_bounded_backlog(
    make_transport: TransportFactory, topic: str
) -> None:
    """A fanout queue has no credit window: each fanout waiting for a slot used to be a task
    holding its body, as many as a publisher sent."""
    reader = await make_transport()
    publisher = await make_transport()
    echo = Echo()
    server = RPCServer(reader, Target(topic), [echo], max_concurrency=4)
    await server.start()
    fanout = RPCClient(publisher, Target(topic))
    blob = b"x" * (48 * 1024)
    sent = 600  # ~29 MiB of fanouts, most of them arriving while every slot is taken
    gc.collect()
    before = rss()
    for _ in range(sent):
        await fanout.fanout(None, "slow_fanout", blob=blob)
    key = ("keel_rpc_server_requests", "fanout", "?", "dropped")
    # All of it arrived (or the broker itself dropped some of a flood to a slow consumer):
    # four running, at most four waiting, the rest dropped.
    await eventually(lambda: echo.fanouts == 4 and server.counts[key] > 0, timeout=60)
    await asyncio.sleep(1.0)
    gc.collect()
    grown = rss() - before
    assert len(server._tasks) <= 2 * 4, len(server._tasks)
    assert echo.fanouts + server.counts[key] <= sent
    assert grown < 12 * 2**20, f"RSS grew {grown / 2**20:.1f} MiB for {sent} fanouts"
    echo.gate.set()
    await eventually(lambda: server._fanouts == 0, timeout=30)
    handled = echo.fanouts
    await fanout.fanout(None, "slow_fanout", blob=b"after")
    await eventually(lambda: echo.fanouts == handled + 1, timeout=30)
    await server.stop()


async def test_junk_on_a_reply_queue_costs_waiting_calls_nothing(
    make_transport: TransportFactory, topic: str, transport: Transport
) -> None:
    """Large bodies naming no waiting call are dropped unread; calls waiting meanwhile get
    their replies."""
    server = RPCServer(transport, Target(topic), [Echo()])
    await server.start()
    client_t = await make_transport()
    client = RPCClient(client_t, Target(topic), timeout=30)
    assert await client.call(None, "echo", value=0) == 0
    reply_to = await link(client_t).reply_queue()
    publisher = await make_transport()
    junk = [poison.wide_bomb(), poison._with_args_raw(poison.nested_array(poison.DEEP))]
    before = malformed_total(kind="reply", queue=reply_to)
    waiting = [asyncio.ensure_future(client.call(None, "echo", value=i)) for i in range(20)]
    for _ in range(10):
        for body in junk:
            await publisher.send(reply_to, body, durable=False)
    assert await asyncio.gather(*waiting) == list(range(20))
    await eventually(lambda: malformed_total(kind="reply", queue=reply_to) - before >= 20)
    await server.stop()
