"""Keel's side of the RPC benchmark, the same code on every transport URL."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from bench._timing import time_calls
from keel.messaging import (
    NotificationListener,
    Notifier,
    RequestContext,
    RPCClient,
    RPCServer,
    Target,
    Transport,
    connect,
)

# Notifications on their way to the broker at once, as a service emitting them from many
# requests would have (see Notifier's window): durable brokers write them in batches.
NOTIFY_WINDOW = 64


class Bench:
    def __init__(self) -> None:
        self.casts = 0
        self.cast_done = asyncio.Event()
        self.cast_goal = 0

    async def echo(self, ctx: RequestContext, i: int) -> int:
        return i

    async def count(self, ctx: RequestContext, i: int) -> None:
        self.casts += 1
        if self.casts >= self.cast_goal:
            self.cast_done.set()


class Sink:
    def __init__(self) -> None:
        self.seen = 0
        self.goal = 0
        self.done = asyncio.Event()

    async def info(
        self, ctx: Any, publisher_id: str, event_type: str, payload: Any, metadata: Any
    ) -> None:
        self.seen += 1
        if self.seen >= self.goal:
            self.done.set()


async def measure(url: str, params: dict[str, Any]) -> dict[str, float]:
    calls, concurrency = params["calls"], params["concurrency"]
    server_transport = await connect(url)
    client_transport = await connect(url)
    endpoint = Bench()
    topic = f"bench-{time.monotonic_ns()}"
    server = RPCServer(server_transport, Target(topic), [endpoint], max_concurrency=64)
    await server.start()
    client = RPCClient(client_transport, Target(topic), timeout=30)

    async def call(i: int) -> Any:
        return await client.call(None, "echo", i=i)

    timed = await time_calls(call, calls, concurrency)

    casts = max(1000, calls // 2)
    endpoint.cast_goal = casts
    started = time.perf_counter()
    for i in range(casts):
        await client.cast(None, "count", i=i)
    await asyncio.wait_for(endpoint.cast_done.wait(), 300)
    cast_elapsed = time.perf_counter() - started
    await server.stop()

    notify_rate = await _notifications(
        server_transport, client_transport, f"{topic}-n", casts, window=NOTIFY_WINDOW
    )
    # The same, each notify() waiting for the broker (durable: one disk flush per
    # notification on RabbitMQ), on a quarter as many.
    notify_seq_rate = await _notifications(
        server_transport, client_transport, f"{topic}-ns", max(250, casts // 4), window=0
    )
    await client_transport.close()
    await server_transport.close()
    return {
        **timed,
        "casts_per_s": casts / cast_elapsed,
        "notifications_per_s": notify_rate,
        "notifications_seq_per_s": notify_seq_rate,
    }


async def _notifications(
    server_transport: Transport, client_transport: Transport, topic: str, count: int, *, window: int
) -> float:
    """Notifications per second, from the first notify() until the listener handled all."""
    sink = Sink()
    sink.goal = count
    listener = NotificationListener(server_transport, [Target(topic)], [sink], max_concurrency=64)
    await listener.start()
    notifier = Notifier(client_transport, "bench", topics=[topic], window=window)
    started = time.perf_counter()
    for i in range(count):
        await notifier.info(None, "bench.tick", i)
    await notifier.flush()
    await asyncio.wait_for(sink.done.wait(), 300)
    elapsed = time.perf_counter() - started
    await listener.stop()
    return count / elapsed
