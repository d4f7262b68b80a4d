"""Streams of one subscription (SSE and WebSocket): a cursor over its queue, resumable by seq.

What a client gets: every message after its resume point, in sequence order, each exactly
once per connection; a ``gap`` event (with the count) first if retention already dropped part
of that range; a heartbeat when idle for the fan-out's ``heartbeat`` seconds. Live messages
come from the in-process fan-out; a client that falls behind (its bounded queue filled up)
or sees a hole in the sequence is caught up from the store, so nothing is buffered for slow
clients and nothing is skipped. Streaming itself does not ack or claim anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Literal

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from keel._log import event as log_event
from keel.hub._core import Hub
from keel.hub._events import SEQ_ATTRIBUTE, CloudEvent, encode_event
from keel.hub._fanout import StreamClient, ce_frame, sse_frame, ws_frame
from keel.hub.stores.base import Gap

PAGE = 500
# sse: text/event-stream; ws: the hub's JSON messages; ce: the CloudEvents WebSocket binding
# (subprotocol ``cloudevents.json``), where WebSocket pings are the heartbeat.
Format = Literal["sse", "ws", "ce"]
HEARTBEAT = {"sse": b": hb\n\n", "ws": b'{"type":"heartbeat"}', "ce": b""}
_ENCODE = {"sse": sse_frame, "ws": ws_frame, "ce": ce_frame}
_SLOT = {"sse": 1, "ws": 2, "ce": 3}  # where a queued Item holds the format's frame
GAP_TYPE = "org.keel.hub.gap"
Write = Callable[[bytes], Awaitable[None]]
# Where the app puts the server's own ``send`` (see `keel.hub._app`), so a stream's frames
# skip the middlewares' per-message wrappers: they only watch for a response start, which
# a stream has already sent, and were a third of the cost of each delivery.
RAW_SEND = "keel.raw_send"

log = logging.getLogger("keel.hub.http")


def gap_frame(gap: Gap, fmt: Format = "sse", sub_id: str = "") -> bytes:
    data = {"from": gap.first, "to": gap.last, "count": gap.count}
    if fmt == "ws":
        return json.dumps({"type": "gap", **data}).encode()
    if fmt == "ce":
        event = CloudEvent(
            id=f"gap-{sub_id}-{gap.last}",
            source=f"/v1/subscriptions/{sub_id}",
            type=GAP_TYPE,
            data=data,
            extensions={SEQ_ATTRIBUTE: str(gap.last)},
        )
        return encode_event(event)
    return f"id: {gap.last}\nevent: gap\ndata: {json.dumps(data)}\n\n".encode()


class StreamCursor:
    """Built after the subscription was checked (so errors become HTTP answers, not streams)."""

    def __init__(self, hub: Hub, sub_id: str, client: StreamClient, cursor: int) -> None:
        self.hub = hub
        self.sub_id = sub_id
        self.client = client
        self.cursor = cursor

    async def _catch_up(self, fmt: Format, write: Write) -> None:
        client = self.client
        encode = _ENCODE[fmt]
        client.items.clear()
        client.lagging = False
        # Bounded by the queue's length when the catch-up began plus what arrives meanwhile;
        # each round reads a full page or ends.
        while not client.closed:
            gap, messages = await self.hub.store.read(self.sub_id, after=self.cursor, limit=PAGE)
            frames: list[bytes] = []
            if gap is not None:
                frames.append(gap_frame(gap, fmt, self.sub_id))
                self.cursor = gap.last
            for message in messages:
                frames.append(encode(message.seq, bytes(message.event)))
                self.cursor = message.seq
            if fmt == "sse":
                if frames:
                    await write(b"".join(frames))
            else:
                for frame in frames:
                    await write(frame)
            if len(messages) < PAGE:
                return

    def _take(self, fmt: Format) -> tuple[list[bytes], bool]:
        """Frames to send now (everything queued, in order) and whether a hole means
        catching up from the store. Under load one send per frame is what limits fan-out,
        and SSE frames concatenate safely; WebSocket sends one message per event."""
        chunk: list[bytes] = []
        items = self.client.items
        slot = _SLOT[fmt]
        while items:
            item = items.popleft()
            seq = item[0]
            if seq > self.cursor + 1:
                return chunk, True  # the store has it: committed before the wake-up
            if seq == self.cursor + 1:
                self.cursor = seq
                frame = item[slot]
                assert isinstance(frame, bytes)
                chunk.append(frame)
            elif seq < 0 and not chunk and HEARTBEAT[fmt]:
                chunk.append(HEARTBEAT[fmt])  # only when idle: any frame also keeps it alive
            # else: already sent during a catch-up
        return chunk, False

    async def pump(self, write: Write, *, catch_up: bool, fmt: Format = "sse") -> None:
        """Write the stream with ``write`` until the client is closed (or ``write`` fails)."""
        client = self.client
        try:
            if fmt == "sse":
                await write(b"retry: 2000\n\n")
            need = catch_up
            while not client.closed:
                if need or client.lagging:
                    await self._catch_up(fmt, write)
                    need = False
                    continue
                if not client.items:
                    await client.wait()
                    continue
                chunk, need = self._take(fmt)
                if fmt != "sse":
                    for frame in chunk:
                        await write(frame)
                elif chunk:
                    await write(b"".join(chunk) if len(chunk) > 1 else chunk[0])
        finally:
            self.hub.fanout.leave(client)


class EventStreamResponse(Response):
    """``text/event-stream`` written by a `StreamCursor` until the client goes away."""

    media_type = "text/event-stream"

    def __init__(self, cursor: StreamCursor, *, catch_up: bool, headers: Mapping[str, str]) -> None:
        self.cursor = cursor
        self.catch_up = catch_up
        self.status_code = 200
        self.background = None
        self.init_headers(headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        send = scope.get(RAW_SEND, send)
        client = self.cursor.client

        async def write(chunk: bytes) -> None:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})

        async def watch() -> None:
            # Ends at the disconnect: a GET's request messages stop after its (empty) body.
            while (await receive())["type"] != "http.disconnect":
                pass
            client.close()

        watcher = asyncio.create_task(watch())
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            await self.cursor.pump(write, catch_up=self.catch_up)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            pass  # the client went away mid-write
        except Exception as exc:
            # The response has started: a 500 is no longer possible, so end the stream.
            log_event(log, logging.ERROR, "hub.stream_failed", error=repr(exc))
        finally:
            client.close()
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await watcher
