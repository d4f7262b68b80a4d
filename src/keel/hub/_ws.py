"""The WebSocket stream of a subscription: the SSE semantics, plus acks over the socket.

Server -> client text messages: ``{"type": "event", "seq", "event"}``, ``{"type": "gap",
"from", "to", "count"}``, ``{"type": "heartbeat"}``, ``{"type": "acked", "seq", "count"}``,
``{"type": "error", "error": {...}}``. Client -> server: ``{"type": "ack", "seq": N}`` acks
every ready message up to N (it is committed before ``acked`` is answered).

Where it starts: after ``?after=SEQ`` if given, else after the acknowledged prefix of the
queue, so a client that acks what it processed and reconnects misses nothing and gets
only what it had not acked (at least once: what it processed but had not acked comes again).
An authentication or tenancy failure is an ``error`` message followed by a close with code
4000 + the HTTP status (4401, 4404); a bad client message is an ``error`` and the socket
stays open.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect

from keel import errors
from keel.hub._core import Hub
from keel.hub._sse import StreamCursor

MAX_CLIENT_MESSAGE = 4096


def _error(status: int, code: str, message: str) -> str:
    return json.dumps(
        {"type": "error", "error": {"code": code, "message": message, "status": status}}
    )


async def websocket_stream(ws: WebSocket, hub: Hub) -> None:
    await ws.accept()
    sub_id = ws.path_params["sub_id"]
    token = ws.headers.get("x-auth-token") or ws.query_params.get("access_token")
    client = hub.fanout.join(sub_id)
    try:
        who = await hub.authenticate(token)
        await hub.subscription(who, sub_id)
        raw = ws.query_params.get("after")
        if raw is not None and not raw.isdigit():
            raise errors.BadRequest("after must be a sequence number", field="after")
        after = int(raw) if raw is not None else await hub.store.acked_upto(sub_id)
    except errors.KeelError as exc:
        hub.fanout.leave(client)
        status, code = (
            (401, "unauthorized")
            if isinstance(exc, errors.Unauthorized)
            else (404, "not_found")
            if isinstance(exc, errors.NotFound)
            else (400, "bad_request")
        )
        await ws.send_text(_error(status, code, exc.message))
        await ws.close(4000 + status)
        return
    cursor = StreamCursor(hub, sub_id, client, after)

    async def write(frame: bytes) -> None:
        await ws.send_text(frame.decode())

    async def send() -> None:
        await cursor.pump(write, catch_up=True, fmt="ws")

    async def receive() -> None:
        while True:
            text = await ws.receive_text()
            reply = await _on_message(hub, who, sub_id, text)
            await ws.send_text(reply)

    tasks = [asyncio.create_task(send()), asyncio.create_task(receive())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, WebSocketDisconnect, RuntimeError):
                await task
        hub.fanout.leave(client)
        with contextlib.suppress(RuntimeError):
            await ws.close()


async def _on_message(hub: Hub, who: Any, sub_id: str, text: str) -> str:
    if len(text) > MAX_CLIENT_MESSAGE:
        return _error(413, "too_large", f"messages are limited to {MAX_CLIENT_MESSAGE} bytes")
    try:
        message = json.loads(text)
    except ValueError:
        return _error(400, "bad_request", "send JSON text messages")
    seq = message.get("seq") if isinstance(message, dict) else None
    if not isinstance(message, dict) or message.get("type") != "ack" or type(seq) is not int:
        return _error(400, "bad_request", 'expected {"type": "ack", "seq": N}')
    try:
        count = await hub.ack_upto(who, sub_id, seq)
    except errors.KeelError as exc:
        return _error(400, "bad_request", exc.message)
    return json.dumps({"type": "acked", "seq": seq, "count": count})
