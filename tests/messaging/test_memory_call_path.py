"""The memory:// call path with its helpers inlined keeps what they did: fresh ids of the
usual shapes per call, nothing left waiting in the reply router after answered calls, the
counts per outcome, and a drain that still waits for a running call."""

from __future__ import annotations

import asyncio
import re
import uuid

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
