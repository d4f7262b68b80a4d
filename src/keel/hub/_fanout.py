"""In-process fan-out of committed messages to live stream clients (SSE and WebSocket).

Each message is encoded once per subscription and the same bytes go to every client of it.
Every client has a bounded queue; a client whose queue is full is marked ``lagging`` and gets
nothing more from here until it has caught up from the store, so a slow client costs a flag,
never memory. Nothing here is durable: the store is the truth, this is only the wake-up.

A client's queue is a deque and one waiter future rather than an `asyncio.Queue`: with a
thousand clients the fan-out is the hub's hottest loop, and the queue's bookkeeping (its
getters list, unfinished-task count and ``finished`` event) was a large share of each
delivery while only one reader ever waits.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict, deque
from collections.abc import Sequence

from keel.hub.stores.base import Appended


def sse_frame(seq: int, body: bytes) -> bytes:
    return b"id: %d\nevent: cloudevent\ndata: %s\n\n" % (seq, body)


def ws_frame(seq: int, body: bytes) -> bytes:
    return b'{"type":"event","seq":%d,"event":%s}' % (seq, body)


def ce_frame(seq: int, body: bytes) -> bytes:
    """The event itself (the CloudEvents WebSocket binding) with its queue position as the
    ``hubseq`` extension attribute, spliced in (``body`` is an encoded JSON object). A string
    of digits: a CloudEvents Integer is 32-bit, a queue position is not."""
    return b'{"hubseq":"%d",%s' % (seq, body[1:])


# What a client's queue holds: (seq, SSE frame, WebSocket frame, CloudEvents WebSocket
# frame), each built once per message.
Item = tuple[int, bytes, bytes, bytes]


class StreamClient:
    __slots__ = ("_waiter", "closed", "items", "lagging", "maxsize", "subscription")

    def __init__(self, subscription: str, maxsize: int) -> None:
        self.subscription = subscription
        self.maxsize = maxsize
        self.items: deque[Item] = deque()
        self.lagging = False
        self.closed = False
        self._waiter: asyncio.Future[None] | None = None

    def offer(self, item: Item) -> bool:
        """Queue ``item`` unless the queue is full (then nothing is queued)."""
        if len(self.items) >= self.maxsize:
            return False
        self.items.append(item)
        self._wake()
        return True

    def lag(self) -> None:
        """Drop what is queued: the client will catch up from the store."""
        self.lagging = True
        self.items.clear()
        self._wake()

    def close(self) -> None:
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self) -> None:
        """Return when something is queued, the client lags or it was closed."""
        if self.items or self.lagging or self.closed:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiter = waiter
        try:
            await waiter
        finally:
            self._waiter = None


HEARTBEAT_ITEM: Item = (-2, b"", b"", b"")


class Fanout:
    """Also the one heartbeat clock: every ``heartbeat`` seconds an idle client gets a
    heartbeat item, so a waiting client needs no timer of its own (one per wake-up was a
    large share of the fan-out's cost)."""

    def __init__(self, client_queue: int = 256, heartbeat: float = 15.0) -> None:
        self.client_queue = client_queue
        self.heartbeat = heartbeat
        self._clients: dict[str, set[StreamClient]] = defaultdict(set)
        self._beat: asyncio.Task[None] | None = None
        self.lagged = 0

    def join(self, subscription: str) -> StreamClient:
        client = StreamClient(subscription, self.client_queue)
        self._clients[subscription].add(client)
        if self._beat is None or self._beat.done():
            self._beat = asyncio.get_running_loop().create_task(self._beats())
        return client

    async def _beats(self) -> None:
        while self._clients:
            await asyncio.sleep(self.heartbeat)
            for clients in list(self._clients.values()):
                for client in clients:
                    if not client.items:
                        client.offer(HEARTBEAT_ITEM)

    def leave(self, client: StreamClient) -> None:
        clients = self._clients.get(client.subscription)
        if clients is not None:
            clients.discard(client)
            if not clients:
                del self._clients[client.subscription]

    def publish(self, appended: Sequence[Appended]) -> None:
        clients_of = self._clients
        for item in appended:
            clients = clients_of.get(item.subscription)
            if not clients:
                continue
            seq, body = item.seq, item.body
            frame = (seq, sse_frame(seq, body), ws_frame(seq, body), ce_frame(seq, body))
            for client in clients:
                if client.lagging:
                    continue
                if not client.offer(frame):
                    client.lag()
                    self.lagged += 1

    def nudge(self, subscription: str) -> None:
        """Another process appended: every client of it catches up from the store."""
        for client in self._clients.get(subscription, ()):
            client.lag()

    def close_subscription(self, subscription: str) -> None:
        for client in self._clients.pop(subscription, set()):
            client.close()

    def close_all(self) -> None:
        for subscription in list(self._clients):
            self.close_subscription(subscription)
        if self._beat is not None:
            self._beat.cancel()
            self._beat = None

    @property
    def client_count(self) -> int:
        return sum(len(c) for c in self._clients.values())
