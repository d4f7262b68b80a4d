"""Contenders on Redis: Keel's redis:// transport beside a raw redis-py request/reply.

The anchor is the obvious hand-written RPC over Redis lists: a client LPUSHes
``<reply list>|<correlation id>|<body>`` on a request list; a server task BRPOPs it and
LPUSHes the body back on that client's reply list (one per client, the reply router matching
correlation ids, as Keel does); a reader task per client BRPOPs replies and resolves the
waiting call. Both pop up to 64 at a time (BLMPOP COUNT) and the server pipelines its replies
without waiting for them, so neither is held to one round trip per message (each pop is a
write, an fsync under appendfsync always). No acks, no redelivery, no deadlines: a floor,
not a peer.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis

from bench import _oslo_rpc
from bench import _servers as servers
from bench._keel_rpc import measure
from bench._timing import time_calls

BATCH = 64


async def keel_redis(params: dict[str, Any]) -> dict[str, float]:
    return await measure(servers.url("redis"), params)


async def redispy_redis(params: dict[str, Any]) -> dict[str, float]:
    calls, concurrency = params["calls"], params["concurrency"]
    url = servers.url("redis")
    prefix = f"bench:{uuid.uuid4().hex[:8]}"
    requests, replies = f"{prefix}:req", f"{prefix}:rep"
    server_r = aioredis.Redis.from_url(url)
    client_r = aioredis.Redis.from_url(url)
    server_cmd: Callable[..., Awaitable[Any]] = server_r.execute_command
    client_cmd: Callable[..., Awaitable[Any]] = client_r.execute_command
    pending: dict[bytes, asyncio.Future[bytes]] = {}
    ids = itertools.count()
    background: set[asyncio.Task[Any]] = set()

    async def serve() -> None:
        while True:
            popped = await server_cmd("BLMPOP", 1, 1, requests, "RIGHT", "COUNT", BATCH)
            if popped is None:
                continue
            pipe = server_r.pipeline(transaction=False)
            for item in popped[1]:
                reply_to, corr, body = item.split(b"|", 2)
                pipe.lpush(reply_to, corr + b"|" + body)
            task = asyncio.ensure_future(pipe.execute())
            background.add(task)
            task.add_done_callback(background.discard)

    async def read_replies() -> None:
        while True:
            popped = await client_cmd("BLMPOP", 1, 1, replies, "RIGHT", "COUNT", BATCH)
            if popped is None:
                continue
            for item in popped[1]:
                corr, body = item.split(b"|", 1)
                future = pending.pop(corr, None)
                if future is not None and not future.done():
                    future.set_result(body)

    async def call(i: int) -> bytes:
        corr = str(next(ids)).encode()
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        pending[corr] = future
        await client_cmd("LPUSH", requests, b"%s|%s|%d" % (replies.encode(), corr, i))
        return await asyncio.wait_for(future, 30)

    tasks = [asyncio.ensure_future(serve()), asyncio.ensure_future(read_replies())]
    timed = await time_calls(call, calls, concurrency)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await client_cmd("DEL", requests, replies)
    await server_r.aclose()
    await client_r.aclose()
    return {
        **timed,
    }


async def oslo_keel_redis(params: dict[str, Any]) -> dict[str, float]:
    """oslo.messaging API code on Keel's driver over Redis (oslo has no Redis driver)."""
    return await _oslo_rpc.measure("keel+" + servers.url("redis"), params)


CONTENDERS = {
    "keel-redis": keel_redis,
    "redispy-redis": redispy_redis,
    "oslo-keel-redis": oslo_keel_redis,
}
