"""The floor for `python -m bench rpc`: a bare asyncio + msgspec request/reply loop.

What any RPC over asyncio must do at the least, in one process: the caller encodes a
request (msgspec Struct, msgpack), registers a future under its id and queues the bytes;
a server task decodes each request and runs the handler in a task of its own (so handlers
may await, as Keel's do); the reply is encoded, decoded by the caller's side and resolves
the future. No envelope version, context, deadline, acknowledgement, metrics or broker.
Timed with the same `time_calls` as every contender, so ``keel-memory / bare`` is the cost
of Keel's framework per call on this machine in this run.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import msgspec

from bench._timing import time_calls


class _Request(msgspec.Struct, array_like=True):
    id: int
    method: str
    args: dict[str, Any]


class _Reply(msgspec.Struct, array_like=True):
    id: int
    result: Any = None


async def measure(params: dict[str, Any]) -> dict[str, float]:
    calls, concurrency = params["calls"], params["concurrency"]
    encoder = msgspec.msgpack.Encoder()
    requests_decoder = msgspec.msgpack.Decoder(_Request)
    replies_decoder = msgspec.msgpack.Decoder(_Reply)
    inbox: asyncio.Queue[bytes] = asyncio.Queue()
    pending: dict[int, asyncio.Future[Any]] = {}
    ids = itertools.count()
    loop = asyncio.get_running_loop()
    running: set[asyncio.Task[None]] = set()

    async def echo(i: int) -> int:
        return i

    handlers = {"echo": echo}

    def on_reply(body: bytes) -> None:
        reply = replies_decoder.decode(body)
        future = pending.pop(reply.id, None)
        if future is not None and not future.done():
            future.set_result(reply.result)

    async def handle(request: _Request) -> None:
        result = await handlers[request.method](**request.args)
        on_reply(encoder.encode(_Reply(request.id, result)))

    async def serve() -> None:
        while True:
            task = loop.create_task(handle(requests_decoder.decode(await inbox.get())))
            running.add(task)
            task.add_done_callback(running.discard)

    async def call(i: int) -> Any:
        request_id = next(ids)
        future: asyncio.Future[Any] = loop.create_future()
        pending[request_id] = future
        inbox.put_nowait(encoder.encode(_Request(request_id, "echo", {"i": i})))
        return await future

    server = loop.create_task(serve())
    try:
        return await time_calls(call, calls, concurrency)
    finally:
        server.cancel()
