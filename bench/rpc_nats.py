"""Contenders on NATS: Keel's nats:// transport beside raw nats-py request/reply.

The anchor is what a hand-written nats-py service does: a queue-group subscriber answering
``msg.respond`` and a client calling ``nc.request`` (core NATS, at-most-once, no envelope,
no deadline propagation). Casts and notifications have no raw equivalent worth the name
(they would be JetStream publishes without a consumer loop), so the anchor omits them.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import nats
from nats.aio.msg import Msg

from bench._keel_rpc import measure
from bench._servers import url
from bench._stats import percentile


async def keel_nats(params: dict[str, Any]) -> dict[str, float]:
    return await measure(url("nats"), params)


async def natspy_nats(params: dict[str, Any]) -> dict[str, float]:
    calls, concurrency = params["calls"], params["concurrency"]
    server_url = url("nats")
    server_nc = await nats.connect(server_url)
    client_nc = await nats.connect(server_url)
    subject = f"bench.raw.{time.monotonic_ns()}"

    async def echo(msg: Msg) -> None:
        await msg.respond(msg.data)

    await server_nc.subscribe(subject, queue="workers", cb=echo)
    await server_nc.flush()

    async def call(i: int) -> bytes:
        reply = await client_nc.request(subject, str(i).encode(), timeout=30)
        return reply.data

    for i in range(200):
        await call(i)
    samples: list[float] = []
    started = time.perf_counter()
    for i in range(calls):
        t0 = time.perf_counter()
        await call(i)
        samples.append(time.perf_counter() - t0)
    seq = time.perf_counter() - started

    async def worker(n: int) -> None:
        for i in range(n):
            await call(i)

    share = calls // concurrency
    started = time.perf_counter()
    await asyncio.gather(*(worker(share) for _ in range(concurrency)))
    conc = time.perf_counter() - started
    await client_nc.close()
    await server_nc.close()
    return {
        "call_p50_ms": percentile(samples, 50) * 1000,
        "call_p99_ms": percentile(samples, 99) * 1000,
        "seq_calls_per_s": calls / seq,
        "conc_calls_per_s": share * concurrency / conc,
    }


CONTENDERS = {"keel-nats": keel_nats, "natspy-nats": natspy_nats}
