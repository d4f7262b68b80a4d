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
import json
from collections.abc import AsyncIterator
from typing import Literal

from keel.hub._core import Hub
from keel.hub._fanout import HEARTBEAT_ITEM, Item, StreamClient, sse_frame, ws_frame
from keel.hub.stores.base import Gap

PAGE = 500
Format = Literal["sse", "ws"]
HEARTBEAT = {"sse": b": hb\n\n", "ws": b'{"type":"heartbeat"}'}


def gap_frame(gap: Gap, fmt: Format = "sse") -> bytes:
    data = {"from": gap.first, "to": gap.last, "count": gap.count}
    if fmt == "ws":
        return json.dumps({"type": "gap", **data}).encode()
    return f"id: {gap.last}\nevent: gap\ndata: {json.dumps(data)}\n\n".encode()


class StreamCursor:
    """Built after the subscription was checked (so errors become HTTP answers, not streams)."""

    def __init__(self, hub: Hub, sub_id: str, client: StreamClient, cursor: int) -> None:
        self.hub = hub
        self.sub_id = sub_id
        self.client = client
        self.cursor = cursor

    async def _catch_up(self, fmt: Format) -> AsyncIterator[bytes]:
        client = self.client
        encode = sse_frame if fmt == "sse" else ws_frame
        while not client.queue.empty():
            client.queue.get_nowait()
        client.lagging = False
        while True:
            gap, messages = await self.hub.store.read(self.sub_id, after=self.cursor, limit=PAGE)
            if gap is not None:
                yield gap_frame(gap, fmt)
                self.cursor = gap.last
            for message in messages:
                yield encode(message.seq, bytes(message.event))
                self.cursor = message.seq
            if len(messages) < PAGE:
                return

    def _coalesce(self, item: Item, fmt: Format) -> tuple[list[bytes], bool]:
        """Frames to send now (whatever is already queued, in order) and whether a hole
        means catching up from the store. Under load one send per frame is what limits
        fan-out, and SSE frames concatenate safely; WebSocket sends one message per event."""
        chunk: list[bytes] = []
        client = self.client
        while True:
            seq, sse, ws = item
            if seq > self.cursor + 1:
                return chunk, True  # the store has it: committed before the wake-up
            if seq == self.cursor + 1:
                self.cursor = seq
                chunk.append(sse if fmt == "sse" else ws)
            # else: a wake-up or heartbeat item (< 0), or already sent during a catch-up
            if fmt == "ws" and chunk:
                return chunk, False
            try:
                item = client.queue.get_nowait()
            except asyncio.QueueEmpty:
                return chunk, False

    async def frames(self, *, catch_up: bool, fmt: Format = "sse") -> AsyncIterator[bytes]:
        client = self.client
        try:
            if fmt == "sse":
                yield b"retry: 2000\n\n"
            need = catch_up
            while not client.closed.is_set():
                if need or client.lagging:
                    async for frame in self._catch_up(fmt):
                        yield frame
                    need = False
                item = await client.queue.get()
                if item is HEARTBEAT_ITEM:
                    yield HEARTBEAT[fmt]
                    continue
                chunk, need = self._coalesce(item, fmt)
                if fmt == "ws":
                    for frame in chunk:
                        yield frame
                elif chunk:
                    yield b"".join(chunk)
        finally:
            self.hub.fanout.leave(client)
