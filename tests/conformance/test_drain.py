"""The drain and versioning contract (docs/drain-and-upgrades.md) on every transport."""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import pytest

from keel import errors
from keel.messaging import (
    RequestContext,
    RPCClient,
    RPCServer,
    ServerState,
    Target,
    Transport,
    remote,
)
from keel.messaging._target import rpc_queue
from keel.wire import decode_request
from tests.conformance.conftest import REDELIVERY_WINDOW, TransportFactory
from tests.helpers import eventually


class Worker:
    def __init__(self, name: str) -> None:
        self.name = name
        self.done: list[Any] = []
        self.gate = asyncio.Event()

    async def slow(self, ctx: RequestContext) -> str:
        await self.gate.wait()
        return self.name

    async def whoami(self, ctx: RequestContext) -> str:
        return self.name

    async def note(self, ctx: RequestContext, value: Any) -> None:
        self.done.append(value)

    async def continue_self(self, ctx: RequestContext) -> str:
        # Work in flight sends itself a follow-up cast and waits for it: drain must let it in.
        client = RPCClient(self.transport, Target(self.topic, server=self.name))  # type: ignore[attr-defined]
        await self.gate.wait()  # the test opens the gate once the server is draining
        await client.cast(ctx, "note", value="continuation")
        for _ in range(200):
            if "continuation" in self.done:
                return "continued"
            await asyncio.sleep(0.01)
        return "stuck"


async def start(
    transport: Transport, topic: str, name: str, **options: Any
) -> tuple[RPCServer, Worker]:
    worker = Worker(name)
    worker.transport = transport  # type: ignore[attr-defined]
    worker.topic = topic  # type: ignore[attr-defined]
    server = RPCServer(transport, Target(topic, server=name), [worker], **options)
    await server.start()
    return server, worker


async def test_states_and_drain_order(make_transport: TransportFactory, topic: str) -> None:
    server, worker = await start(await make_transport(), topic, "a")
    assert server.state is ServerState.SERVING
    client = RPCClient(await make_transport(), Target(topic), timeout=10)
    running = asyncio.ensure_future(client.call(None, "slow"))
    await eventually(lambda: server.running == 1)
    draining = asyncio.ensure_future(server.drain(timeout=10))
    await eventually(lambda: server.state is ServerState.DRAINING)
    assert server.gauges()["keel_rpc_server_serving"] == 0
    other, _ = await start(await make_transport(), topic, "b")
    assert await client.call(None, "whoami") == "b"  # new work goes elsewhere
    worker.gate.set()
    assert await running == "a"  # running work finished and its reply arrived
    await draining
    assert server.state is ServerState.STOPPED
    await other.stop()


async def test_continuations_reach_a_draining_server(
    make_transport: TransportFactory, topic: str
) -> None:
    server, worker = await start(await make_transport(), topic, "a")
    client = RPCClient(await make_transport(), Target(topic), timeout=10)
    call = asyncio.ensure_future(client.call(None, "continue_self"))
    await eventually(lambda: server.running == 1)
    draining = asyncio.ensure_future(server.drain(timeout=10))
    await eventually(lambda: server.state is ServerState.DRAINING)
    worker.gate.set()  # now the running handler sends its continuation to the draining server
    assert await call == "continued"
    await draining


async def test_new_direct_work_waits_for_the_successor(
    make_transport: TransportFactory, topic: str
) -> None:
    server, worker = await start(await make_transport(), topic, "host-1")
    client = RPCClient(await make_transport(), Target(topic, server="host-1"), timeout=10)
    blocker = asyncio.ensure_future(
        RPCClient(server.transport, Target(topic), timeout=10).call(None, "slow")
    )
    await eventually(lambda: server.running == 1)
    draining = asyncio.ensure_future(server.drain(timeout=10))
    await eventually(lambda: server.state is ServerState.DRAINING)
    call = asyncio.ensure_future(client.call(None, "whoami"))
    await client.cast(None, "note", value="for-successor")
    await asyncio.sleep(0.3)
    worker.gate.set()
    await blocker
    await draining
    assert worker.done == []
    successor, new_worker = await start(await make_transport(), topic, "host-1")
    assert await call == "host-1"  # retried by the client until the successor answered
    await eventually(lambda: new_worker.done == ["for-successor"])
    assert client.counts["keel_rpc_client_requests", "call", "whoami", "retried"] >= 1
    await successor.stop()


async def test_a_busy_drain_hands_back_waiting_requests_at_once(
    make_transport: TransportFactory, topic: str
) -> None:
    """A draining server with every slot taken gives back the requests waiting for a slot
    the moment the drain begins, not when its running handlers end."""
    busy, worker = await start(await make_transport(), topic, "a", max_concurrency=4)
    client = RPCClient(await make_transport(), Target(topic), timeout=30)
    calls = [asyncio.ensure_future(client.call(None, "slow")) for _ in range(8)]
    await eventually(lambda: busy.running == 4)
    await asyncio.sleep(0.5)  # the other four reach the busy server and wait for a slot
    idle, idle_worker = await start(await make_transport(), topic, "b")
    idle_worker.gate.set()
    draining = asyncio.ensure_future(busy.drain(timeout=30))
    began = time.monotonic()
    await eventually(lambda: sum(call.done() for call in calls) == 4, timeout=5)
    handed_back = time.monotonic() - began
    assert sorted(call.result() for call in calls if call.done()) == ["b"] * 4
    assert busy.running == 4  # the running ones are still running
    worker.gate.set()
    assert sorted(await asyncio.gather(*calls)) == ["a"] * 4 + ["b"] * 4
    await draining
    assert handed_back < 3, f"waiting calls handed back {handed_back:.1f}s after the drain"
    await idle.stop()


class Long:
    def __init__(self, name: str) -> None:
        self.name = name
        self.runs: list[str] = []
        self.done: list[str] = []

    async def long(self, ctx: RequestContext, key: str, seconds: float) -> None:
        self.runs.append(key)
        await asyncio.sleep(seconds)
        self.done.append(key)


async def test_a_cast_longer_than_the_redelivery_timer_runs_once_through_a_drain(
    make_transport: TransportFactory, topic: str, quick_redelivery: dict[str, float]
) -> None:
    """A delivery's keep-alive lasts until it is settled, even after its consumer was
    cancelled by the drain: no other server runs the cast a second time."""
    first, second = Long("a"), Long("b")
    draining = RPCServer(await make_transport(**quick_redelivery), Target(topic), [first])
    await draining.start()
    client = RPCClient(await make_transport(), Target(topic))
    await client.cast(None, "long", key="k", seconds=2.5 * REDELIVERY_WINDOW)
    await eventually(lambda: first.runs == ["k"])
    other = RPCServer(await make_transport(**quick_redelivery), Target(topic), [second])
    await other.start()
    await draining.drain(timeout=30)
    assert first.done == ["k"]
    await asyncio.sleep(1.5 * REDELIVERY_WINDOW)  # a redelivery would have come by now
    assert second.runs == []
    await other.stop()


class V10:
    target = Target(version="1.0")

    def __init__(self) -> None:
        self.casts: list[str] = []

    async def get(self, ctx: RequestContext, key: str) -> str:
        return f"v1.0:{key}"

    async def put(self, ctx: RequestContext, key: str) -> None:
        self.casts.append(key)


class V11(V10):
    target = Target(version="1.1")

    @remote(since="1.1")
    async def get_many(self, ctx: RequestContext, keys: list[str]) -> list[str]:
        return [f"v1.1:{k}" for k in keys]


async def test_version_caps(make_transport: TransportFactory, topic: str) -> None:
    transport = await make_transport()
    server = RPCServer(transport, Target(topic), [V11()])
    await server.start()
    pinned = RPCClient(transport, Target(topic), timeout=5, version_cap="1.0")
    assert not await pinned.can_send_version("1.1")
    with pytest.raises(errors.UnsupportedVersion, match="cap"):
        await pinned.prepare(version="1.1").call(None, "get_many", keys=["a"])
    with pytest.raises(errors.UnsupportedVersion, match=r"appeared in version 1\.1"):
        await RPCClient(transport, Target(topic), timeout=5).call(None, "get_many", keys=["a"])
    client = RPCClient(transport, Target(topic, version="1.1"), timeout=5)
    assert await client.call(None, "get_many", keys=["a"]) == ["v1.1:a"]
    with pytest.raises(errors.ConfigError):
        RPCClient(transport, Target(topic), version_cap="latest")
    await server.stop()


async def test_unsupported_cast_is_dead_lettered(transport: Transport, topic: str) -> None:
    server = RPCServer(transport, Target(topic), [V10()])
    await server.start()
    dead: list[bytes] = []
    await transport.declare_queue(rpc_queue(topic) + ".dlq", durable=True)

    def on_dead(delivery: Any) -> None:
        dead.append(delivery.body)
        asyncio.get_running_loop().create_task(delivery.ack())

    await transport.consume(rpc_queue(topic) + ".dlq", on_dead, prefetch=10)
    await RPCClient(transport, Target(topic, version="2.0")).cast(None, "put", key="k")
    await eventually(lambda: len(dead) == 1)
    assert decode_request(dead[0]).version == "2.0"
    assert server.counts["keel_rpc_server_requests", "cast", "put", "dead_lettered"] == 1
    await server.stop()


async def test_auto_cap_follows_the_running_servers(
    make_transport: TransportFactory, topic: str
) -> None:
    old = RPCServer(
        await make_transport(), Target(topic, server="old"), [V10()], presence_interval=0.2
    )
    new = RPCServer(
        await make_transport(), Target(topic, server="new"), [V11()], presence_interval=0.2
    )
    await old.start()
    await new.start()
    client = RPCClient(await make_transport(), Target(topic), timeout=5, version_cap="auto")
    assert not await client.can_send_version("1.1")
    await old.stop()
    for _ in range(100):
        if await client.can_send_version("1.1"):
            break
        await asyncio.sleep(0.05)
    assert await client.prepare(version="1.1").call(None, "get_many", keys=["x"]) == ["v1.1:x"]
    await new.stop()


async def test_rolling_upgrade_under_load_loses_nothing(
    make_transport: TransportFactory, topic: str
) -> None:
    """Three 1.0 servers replaced one by one by 1.1 under calls and casts from four clients."""
    endpoints: list[V10] = []
    servers: list[RPCServer] = []

    async def launch(cls: type[V10], name: str) -> RPCServer:
        endpoint = cls()
        endpoints.append(endpoint)
        server = RPCServer(
            await make_transport(), Target(topic, server=name), [endpoint], presence_interval=0.2
        )
        await server.start()
        return server

    servers.extend([await launch(V10, f"s{i}") for i in range(3)])
    clients = [
        RPCClient(await make_transport(), Target(topic), timeout=10, version_cap="auto")
        for _ in range(4)
    ]
    failures: list[BaseException] = []
    sent: list[str] = []
    answered = {"1.0": 0, "1.1": 0}
    stop = asyncio.Event()

    async def load(client: RPCClient, n: int) -> None:
        for i in range(5_000):  # bounded; stopped by the test
            if stop.is_set():
                return
            key = f"c{n}-{i}"
            try:
                if await client.can_send_version("1.1"):
                    got = await client.prepare(version="1.1").call(None, "get_many", keys=[key])
                    answered["1.1"] += got == [f"v1.1:{key}"]
                else:
                    answered["1.0"] += await client.call(None, "get", key=key) == f"v1.0:{key}"
                await client.prepare(idempotency_key=key).cast(None, "put", key=key)
                sent.append(key)
            except Exception as exc:
                failures.append(exc)
            await asyncio.sleep(random.uniform(0, 0.004))

    tasks = [asyncio.ensure_future(load(c, n)) for n, c in enumerate(clients)]
    await asyncio.sleep(0.3)
    for i in range(3):
        await servers[i].drain(timeout=10)
        servers[i] = await launch(V11, f"s{i}")
        await asyncio.sleep(0.3)
    await eventually(lambda: answered["1.1"] > 20, timeout=10)
    stop.set()
    await asyncio.gather(*tasks)
    await eventually(lambda: len([k for e in endpoints for k in e.casts]) >= len(sent), timeout=10)
    executed = [key for endpoint in endpoints for key in endpoint.casts]
    assert failures == []
    assert answered["1.0"] > 0
    assert sorted(executed) == sorted(sent)  # every cast exactly once
    for server in servers:
        await server.stop()
