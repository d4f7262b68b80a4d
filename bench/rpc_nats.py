"""Contenders on NATS: Keel's nats:// transport beside raw nats-py request/reply.

The anchor is what a hand-written nats-py service does: a queue-group subscriber answering
``msg.respond`` and a client calling ``nc.request`` (core NATS, at-most-once, no envelope,
no deadline propagation). Casts and notifications have no raw equivalent worth the name
(they would be JetStream publishes without a consumer loop), so the anchor omits them.
"""

from __future__ import annotations

import time
from typing import Any

import nats
from nats.aio.msg import Msg

from bench import _oslo_rpc
from bench._keel_rpc import measure
from bench._servers import url
from bench._timing import time_calls


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

    timed = await time_calls(call, calls, concurrency)
    await client_nc.close()
    await server_nc.close()
    return {
        **timed,
    }


async def oslo_keel_nats(params: dict[str, Any]) -> dict[str, float]:
    """oslo.messaging API code on Keel's driver over NATS (oslo has no NATS driver)."""
    return await _oslo_rpc.measure("keel+" + url("nats"), params)


CONTENDERS = {"keel-nats": keel_nats, "natspy-nats": natspy_nats, "oslo-keel-nats": oslo_keel_nats}
