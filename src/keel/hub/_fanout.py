"""In-process fan-out of committed messages to live stream clients (SSE and WebSocket).

Each message is encoded once per subscription and the same bytes go to every client of it.
Every client has a bounded queue; a client whose queue is full is marked ``lagging`` and gets
nothing more from here until it has caught up from the store, so a slow client costs a flag,
never memory. Nothing here is durable: the store is the truth, this is only the wake-up.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Sequence

from keel.hub.stores.base import Appended


def sse_frame(seq: int, body: bytes) -> bytes:
    return b"id: %d\nevent: cloudevent\ndata: %s\n\n" % (seq, body)


def ws_frame(seq: int, body: bytes) -> bytes:
    return b'{"type":"event","seq":%d,"event":%s}' % (seq, body)


# What a client's queue holds: (seq, SSE frame, WebSocket frame), both built once per message.
Item = tuple[int, bytes, bytes]


class StreamClient:
    def __init__(self, subscription: str, maxsize: int) -> None:
        self.subscription = subscription
        self.queue: asyncio.Queue[Item] = asyncio.Queue(maxsize)
        self.lagging = False
        self.closed = asyncio.Event()


class Fanout:
    def __init__(self, client_queue: int = 256) -> None:
        self.client_queue = client_queue
        self._clients: dict[str, set[StreamClient]] = defaultdict(set)
        self.lagged = 0

    def join(self, subscription: str) -> StreamClient:
        client = StreamClient(subscription, self.client_queue)
        self._clients[subscription].add(client)
        return client

    def leave(self, client: StreamClient) -> None:
        clients = self._clients.get(client.subscription)
        if clients is not None:
            clients.discard(client)
            if not clients:
                del self._clients[client.subscription]

    def publish(self, appended: Sequence[Appended]) -> None:
        for item in appended:
            clients = self._clients.get(item.subscription)
            if not clients:
                continue
            frame = (item.seq, sse_frame(item.seq, item.body), ws_frame(item.seq, item.body))
            for client in clients:
                if client.lagging:
                    continue
                try:
                    client.queue.put_nowait(frame)
                except asyncio.QueueFull:
                    client.lagging = True
                    self.lagged += 1

    def nudge(self, subscription: str) -> None:
        """Another process appended: every client of it catches up from the store."""
        for client in self._clients.get(subscription, ()):
            client.lagging = True
            if not client.queue.full():
                client.queue.put_nowait((-1, b"", b""))

    def close_subscription(self, subscription: str) -> None:
        for client in self._clients.pop(subscription, set()):
            client.closed.set()
            # A sentinel wakes a client waiting on an empty queue; a full one is not waiting.
            if not client.queue.full():
                client.queue.put_nowait((-1, b"", b""))

    def close_all(self) -> None:
        for subscription in list(self._clients):
            self.close_subscription(subscription)

    @property
    def client_count(self) -> int:
        return sum(len(c) for c in self._clients.values())
