"""The memory:// call path with its helpers inlined keeps what they did: fresh ids of the
usual shapes per call, nothing left waiting in the reply router after answered calls, the
counts per outcome, and a drain that still waits for a running call."""

from __future__ import annotations

import asyncio
import re
import threading
import uuid
from typing import Any

import pytest

from keel.messaging import RequestContext, RPCClient, RPCServer, Target, connect
from keel.messaging._link import link

pytestmark = pytest.mark.timeout(30)

TRACEPARENT = re.compile(r"^00-[0-9a-f]{32}-[0-9a-f]{16}-01$")


class Echo:
    def __init__(self) -> None:
        self.contexts: list[RequestContext] = []
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.release.set()

    async def echo(self, ctx: RequestContext, i: int) -> int:
        self.contexts.append(ctx)
        self.started.set()
        await self.release.wait()
        return i


async def test_calls_leave_nothing_behind_and_carry_fresh_ids() -> None:
    url = f"memory://call-path-{uuid.uuid4().hex}"
    server_transport, client_transport = await connect(url), await connect(url)
    endpoint = Echo()
    server = RPCServer(server_transport, Target("hot"), [endpoint])
    await server.start()
    client = RPCClient(client_transport, Target("hot"), timeout=10)
    try:
        results = await asyncio.gather(*(client.call(None, "echo", i=i) for i in range(200)))
        assert results == list(range(200))
        router = link(client_transport)
        assert not router._pending
        assert not router._beats
        request_ids = {ctx.request_id for ctx in endpoint.contexts}
        traces = {ctx.trace_id for ctx in endpoint.contexts}
        assert len(request_ids) == len(traces) == 200
        for ctx in endpoint.contexts:
            assert re.fullmatch(r"req-[0-9a-f]{32}", ctx.request_id)
            assert TRACEPARENT.match(ctx.traceparent)
            assert ctx.deadline is not None
            assert ctx.depth == 0
        assert server.counts["keel_rpc_server_requests", "call", "echo", "ok"] == 200
        assert client.counts["keel_rpc_client_requests", "call", "echo", "ok"] == 200
    finally:
        await server.stop()
        await client_transport.close()
        await server_transport.close()


async def test_drain_waits_for_the_running_call() -> None:
    url = f"memory://call-path-{uuid.uuid4().hex}"
    server_transport, client_transport = await connect(url), await connect(url)
    endpoint = Echo()
    endpoint.release.clear()
    server = RPCServer(server_transport, Target("hot"), [endpoint], stop_timeout=10)
    await server.start()
    client = RPCClient(client_transport, Target("hot"), timeout=10)
    try:
        call = asyncio.ensure_future(client.call(None, "echo", i=7))
        await asyncio.wait_for(endpoint.started.wait(), 5)
        draining = asyncio.ensure_future(server.drain())
        await asyncio.sleep(0.05)
        assert not draining.done()  # the running call holds the drain
        endpoint.release.set()
        assert await call == 7
        await asyncio.wait_for(draining, 5)
        assert server.running == 0
    finally:
        await server.stop()
        await client_transport.close()
        await server_transport.close()


async def test_calls_between_loops_on_two_threads_cross_over() -> None:
    # A delivery to a consumer whose loop runs on another thread goes through that loop
    # (call_soon_threadsafe), never runs here: the send asks the consumer's loop which thread
    # runs it, not asyncio (one getpid() per send on 3.11).
    url = f"memory://call-path-{uuid.uuid4().hex}"
    ready = threading.Event()
    stop: asyncio.Future[None] | None = None
    server_loop: asyncio.AbstractEventLoop | None = None
    seen_threads: set[int] = set()

    class Where(Echo):
        async def echo(self, ctx: RequestContext, i: int) -> int:
            seen_threads.add(threading.get_ident())
            return i

    async def serve() -> None:
        nonlocal stop, server_loop
        transport = await connect(url)
        server = RPCServer(transport, Target("threads"), [Where()])
        await server.start()
        server_loop = asyncio.get_running_loop()
        stop = server_loop.create_future()
        ready.set()
        await stop
        await server.stop()
        await transport.close()

    thread = threading.Thread(target=asyncio.run, args=(serve(),))
    thread.start()
    try:
        assert await asyncio.to_thread(ready.wait, 5)
        client_transport = await connect(url)
        client = RPCClient(client_transport, Target("threads"), timeout=10)
        results = await asyncio.gather(*(client.call(None, "echo", i=i) for i in range(50)))
        assert results == list(range(50))
        assert seen_threads == {thread.ident}
        assert not link(client_transport)._pending
        await client_transport.close()
    finally:
        if server_loop is not None and stop is not None:
            server_loop.call_soon_threadsafe(stop.set_result, None)
        await asyncio.to_thread(thread.join, 10)


async def test_a_delivery_runs_on_its_consumers_loop_whichever_thread_sends() -> None:
    url = f"memory://call-path-{uuid.uuid4().hex}"
    transport = await connect(url)
    got: list[tuple[bytes, int]] = []
    arrived = asyncio.Event()

    def handler(delivery: Any) -> None:
        got.append((delivery.body, threading.get_ident()))
        arrived.set()

    await transport.declare_queue("q", durable=False)
    await transport.consume("q", handler, prefetch=0, auto_ack=True)
    await transport.send("q", b"here", durable=False)
    assert got == [(b"here", threading.get_ident())]  # same loop: handed over at once

    async def send_from_elsewhere() -> None:
        other = await connect(url)
        await other.send("q", b"there", durable=False)

    await asyncio.to_thread(asyncio.run, send_from_elsewhere())
    arrived.clear()
    if len(got) < 2:
        await asyncio.wait_for(arrived.wait(), 5)
    assert got[1] == (b"there", threading.get_ident())
    await transport.close()
