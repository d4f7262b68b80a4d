"""The WebSocket stream of a subscription: the SSE semantics, plus acks over the socket.

Two framings, chosen at the handshake:

- The CloudEvents WebSocket binding, when the client offers the subprotocol
  ``cloudevents.json`` (the hub answers with it): every server message is one CloudEvent in
  the JSON format, each event carrying its queue position as the ``hubseq`` extension (a
  string of digits); a gap is an event of type ``org.keel.hub.gap``, an ack's answer one of
  ``org.keel.hub.acked``, an error one of ``org.keel.hub.error``. The client acks with an
  event of type ``org.keel.hub.ack`` and data ``{"seq": N}``. WebSocket pings keep it alive.
- Otherwise the hub's JSON messages: ``{"type": "event", "seq", "event"}``, ``{"type":
  "gap", "from", "to", "count"}``, ``{"type": "heartbeat"}``, ``{"type": "acked", "seq",
  "count"}``, ``{"type": "error", "error": {...}}``; the client sends ``{"type": "ack",
  "seq": N}``.

An ack covers every ready message up to N and is committed before it is answered. Where it
starts: after ``?after=SEQ`` if given, else after the acknowledged prefix of the queue, so a
client that acks what it processed and reconnects misses nothing (at least once).

Failures: a bad token, another project's subscription or a bad ``?after=`` is an error
message followed by a close with code 4000 + the HTTP status (4401, 4404, 4400). A bad client
message is an error message and the socket stays open. The server's own frame limit is
`MAX_CLIENT_MESSAGE` (set in uvicorn, so a larger frame is refused with 1009 before it is
buffered). A client that does not read blocks only its own stream (every send waits for the
socket to drain) and, once its replies back up, the hub stops reading from it. Every way out,
from a failed handshake to a vanished peer, leaves the fan-out; a close by the client, clean
or not, is no error in the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any
from urllib.parse import quote

import msgspec
from starlette.websockets import WebSocket, WebSocketDisconnect

from keel import errors
from keel._log import event as log_event
from keel.hub._auth import Principal
from keel.hub._core import Hub
from keel.hub._events import CloudEvent, encode_event, event_from_json
from keel.hub._fanout import StreamClient
from keel.hub._input import MAX_SEQ, decode_json, integer, no_repeats, parse_uint
from keel.hub._openapi import refuse_undeclared
from keel.hub._sse import Format, StreamCursor
from keel.hub._status import error_fields, keel_error
from keel.wire import new_id

log = logging.getLogger("keel.hub.ws")
_WS_OPERATION = ("/v1/subscriptions/{sub_id}/ws", "GET")

MAX_CLIENT_MESSAGE = 4096
SUBPROTOCOL = "cloudevents.json"
ACK_TYPE = "org.keel.hub.ack"
# What ends a stream from the client's side: it closed, or the socket broke under a send.
_GONE = (WebSocketDisconnect, OSError, RuntimeError)


class _Session:
    def __init__(self, ws: WebSocket, hub: Hub, sub_id: str, fmt: Format) -> None:
        self.ws = ws
        self.hub = hub
        self.sub_id = sub_id
        self.fmt = fmt
        self.acked = -1  # the highest seq this connection acked: a repeat costs no write

    def _reply(self, kind: str, data: dict[str, Any]) -> str:
        if self.fmt == "ce":
            event = CloudEvent(
                id=new_id(),
                # The path as a URL writes it: before the subscription is found (an error)
                # the id is the client's, decoded, and %0A would be a control character.
                source=f"/v1/subscriptions/{quote(self.sub_id, safe='')}",
                type=f"org.keel.hub.{kind}",
                data=data,
            )
            return encode_event(event).decode()
        if kind == "error":
            return msgspec.json.encode({"type": "error", "error": data}).decode()
        return msgspec.json.encode({"type": kind, **data}).decode()

    def error(self, status: int, code: str, message: str, **fields: Any) -> str:
        return self._reply("error", {"code": code, "message": message, "status": status, **fields})

    def _seq(self, text: str) -> int:
        message = decode_json(text, "message")
        if self.fmt == "ce":
            event = event_from_json(message)
            if event.type != ACK_TYPE or not isinstance(event.data, dict):
                raise errors.BadRequest(
                    f'expected a CloudEvent of type {ACK_TYPE} with data {{"seq": N}}',
                    field="type",
                )
            message = event.data
        elif not isinstance(message, dict) or message.get("type") != "ack":
            raise errors.BadRequest('expected {"type": "ack", "seq": N}', field="type")
        return integer(message.get("seq"), "seq", minimum=0, maximum=MAX_SEQ)

    async def on_message(self, who: Principal, text: str) -> str:
        if len(text) > MAX_CLIENT_MESSAGE:
            return self.error(
                413,
                "too_large",
                f"messages are limited to {MAX_CLIENT_MESSAGE} bytes",
                limit=MAX_CLIENT_MESSAGE,
            )
        try:
            seq = self._seq(text)
            count = await self.hub.ack_upto(who, self.sub_id, seq, above=self.acked)
            self.acked = max(self.acked, seq)
        except errors.KeelError as exc:
            status, code = keel_error(exc)
            return self.error(status, code, exc.message, **error_fields(exc))
        return self._reply("acked", {"seq": seq, "count": count})


async def websocket_stream(ws: WebSocket, hub: Hub) -> None:
    offered = ws.scope.get("subprotocols") or []
    fmt: Format = "ce" if SUBPROTOCOL in offered else "ws"
    session = _Session(ws, hub, ws.path_params["sub_id"], fmt)
    client: StreamClient | None = None
    try:
        await ws.accept(subprotocol=SUBPROTOCOL if fmt == "ce" else None)
        try:
            no_repeats(ws.query_params.multi_items())
            refuse_undeclared(ws.query_params, *_WS_OPERATION)
            who = await hub.authenticate(
                ws.headers.get("x-auth-token") or ws.query_params.get("access_token")
            )
            raw = ws.query_params.get("after")
            after = parse_uint(raw, "after") if raw is not None else None
            # Join before reading the position: nothing committed in between is lost.
            client = hub.fanout.join(session.sub_id)
            await hub.subscription(who, session.sub_id)
            if after is None:
                after = await hub.store.acked_upto(session.sub_id)
        except errors.KeelError as exc:
            status, code = keel_error(exc)
            await ws.send_text(session.error(status, code, exc.message, **error_fields(exc)))
            await ws.close(4000 + status)
            return
        await _serve(session, who, StreamCursor(hub, session.sub_id, client, after))
    except _GONE:
        pass  # the client went away: a normal end of a stream, whatever the close code
    except Exception as exc:
        log_event(log, logging.ERROR, "hub.ws_failed", sub=session.sub_id, error=repr(exc))
        with contextlib.suppress(*_GONE):
            await ws.close(1011)
    finally:
        if client is not None:
            client.close()
            hub.fanout.leave(client)


async def _serve(session: _Session, who: Principal, cursor: StreamCursor) -> None:
    ws = session.ws

    async def write(frame: bytes) -> None:
        await ws.send_text(frame.decode())

    async def receive() -> None:
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            if text is None:
                reply = session.error(400, "bad_request", "send JSON in text messages")
            else:
                reply = await session.on_message(who, text)
            await ws.send_text(reply)

    tasks = [
        asyncio.create_task(cursor.pump(write, catch_up=True, fmt=session.fmt)),
        asyncio.create_task(receive()),
    ]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
    for result in results:
        if isinstance(result, Exception) and not isinstance(result, _GONE):
            raise result
    with contextlib.suppress(*_GONE):
        await ws.close()
