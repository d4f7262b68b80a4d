"""Per-transport state the core keeps once: the declared-queue cache and the reply router.

Every RPC client on one transport shares one exclusive reply queue (not one per call); a
reply is matched to its waiting call by request id. A reply for a call that already gave up
is counted and logged (at most `_poison.LOG_RATE` lines a second), never an error. A body on
the reply queue that is not a reply this side reads is counted and logged
(keel.messaging._poison), and if its first bytes name a waiting call, that call fails at once
with `MalformedMessage` instead of waiting for its deadline; the reply consumer goes on. A
large body (over `_heavy.HEAVY_BYTES`) whose first bytes name no waiting call is not decoded
at all. Queues are declared once before their first use so a
message is never sent to a queue that does not exist yet.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import weakref
from collections.abc import Callable, Sequence
from typing import Any

from keel import urls
from keel._log import event
from keel.errors import ConfigError, MalformedMessage
from keel.messaging import _heavy, _poison, _tap
from keel.messaging._failures import to_failure
from keel.messaging.transports.base import Delivery, Transport
from keel.wire import ENVELOPE_VERSION, Reply, decode_reply, new_id, reply_id

log = logging.getLogger("keel.messaging")
_RETIRE_WAIT_S = 300  # longest a replaced reply queue waits for the calls sent before


async def connect(url: str | None = None, **options: Any) -> Transport:
    """Open a transport from a URL (default ``$KEEL_TRANSPORT_URL`` or ``memory://``)."""
    cls, parsed = urls.resolve("transport", url or urls.from_env("transport_url", "memory://"))
    known = getattr(cls, "URL_OPTIONS", None)  # third-party transports may not say
    if known is not None:
        urls.check_options(parsed, known)
    try:
        transport: Transport = cls(parsed, **options)
    except TypeError as exc:
        raise ConfigError(f"bad option for {parsed.scheme}:// transport: {exc}") from None
    await transport.connect()
    _tap.install_from_env()
    return transport


class Link:
    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self.declared: set[str] = set()
        self._pending: dict[str, asyncio.Future[Reply]] = {}
        # Calls with a monitor window: request id -> what to do when a heartbeat comes.
        self._beats: dict[str, Callable[[], None]] = {}
        self.reply_to: str | None = None
        # The asyncio loop of the last call made here (clients check it runs on their thread).
        self.loop: asyncio.BaseEventLoop | None = None
        self._reply_lock = asyncio.Lock()
        self.late_replies = 0
        # Deadlines of the calls waiting here, earliest first, under one timer instead of a
        # timer per call (a timer handle cost more than the rest of a call's bookkeeping).
        # A finished call's entry stays until it surfaces or the heap is compacted.
        self._deadlines: list[tuple[float, int, asyncio.Future[Reply]]] = []
        self._order = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._late_log = _poison.LogBudget()
        self._retiring: set[asyncio.Task[None]] = set()
        on_reconnect = getattr(transport, "on_reconnect", None)  # transports that reconnect
        if on_reconnect is not None:
            on_reconnect(self._new_reply_queue)

    async def declare(
        self, name: str, *, durable: bool, bindings: Sequence[str] = (), exclusive: bool = False
    ) -> None:
        if name in self.declared:
            return
        await self.transport.declare_queue(
            name, durable=durable, bindings=bindings, exclusive=exclusive
        )
        self.declared.add(name)

    async def reply_queue(self) -> str:
        if self.reply_to is not None:
            return self.reply_to
        async with self._reply_lock:
            if self.reply_to is None:
                name = f"keel.reply.{new_id()}"
                await self.transport.declare_queue(name, durable=False, exclusive=True)
                await self.transport.consume(name, self._on_reply, prefetch=0, auto_ack=True)
                self.reply_to = name
        return self.reply_to

    def _new_reply_queue(self) -> None:
        """After a reconnect, calls made from now on get replies on a new queue: RabbitMQ
        deletes a dead node's exclusive queues by name, in transactions later than the one
        that listed them (rabbit_amqqueue:delete_queues_on_node_down, 3.10), so a queue of
        the same name declared again meanwhile on another node can lose its record and
        every reply sent to it, with no word to its consumer. The old queue (declared again
        by the reconnect) still takes the replies of calls already waiting; it is deleted
        once they are done."""
        old = self.reply_to
        if old is None:
            return
        self.reply_to = None
        waiting = set(self._pending)
        task = asyncio.get_running_loop().create_task(self._retire(old, waiting))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _retire(self, queue: str, waiting: set[str]) -> None:
        for _ in range(_RETIRE_WAIT_S):  # bounded: calls without a deadline may never end
            if getattr(self.transport, "closed", False):
                return  # the queue died with the connection; nothing to wait for
            if waiting.isdisjoint(self._pending):
                break
            await asyncio.sleep(1)
        try:
            await self.transport.delete_queue(queue)
        except Exception as exc:  # it dies with the connection anyway; say so, go on
            event(log, logging.INFO, "reply.retire_failed", queue=queue, error=exc)

    def expect(
        self,
        request_id: str,
        loop: asyncio.AbstractEventLoop | None = None,
        ends: float | None = None,
    ) -> asyncio.Future[Reply]:
        """A future for the reply to ``request_id``; with ``ends`` (loop time) it fails with
        `TimeoutError` then if no reply came."""
        loop = loop or asyncio.get_running_loop()
        # The Future made directly: loop.create_future is a Python call around just this.
        future: asyncio.Future[Reply] = asyncio.Future(loop=loop)
        self._pending[request_id] = future
        if ends is not None:
            heap = self._deadlines
            heapq.heappush(heap, (ends, next(self._order), future))
            if self._timer is None or ends < self._timer_at:
                self._arm(loop, ends)
            elif len(heap) > 2 * len(self._pending) + 64:
                self._deadlines = [entry for entry in heap if not entry[2].done()]
                heapq.heapify(self._deadlines)
        return future

    def _arm(self, loop: asyncio.AbstractEventLoop, at: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        self._timer = loop.call_at(at, self._expire_due, loop)

    def _expire_due(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        heap = self._deadlines
        now = max(loop.time(), self._timer_at)  # a timer may fire a clock tick early
        while heap and (heap[0][0] <= now or heap[0][2].done()):
            future = heapq.heappop(heap)[2]
            if not future.done():
                future.set_exception(TimeoutError())
        if heap:
            self._arm(loop, heap[0][0])

    def on_heartbeat(self, request_id: str, beat: Callable[[], None]) -> None:
        self._beats[request_id] = beat

    def forget(self, request_id: str, future: asyncio.Future[Reply] | None = None) -> None:
        """Stop waiting for ``request_id``. With its ``future``: make sure nothing it holds is
        reported as lost (a send that outlived the call's deadline leaves the deadline's
        TimeoutError in a future nobody awaited)."""
        self._pending.pop(request_id, None)
        if self._beats:
            self._beats.pop(request_id, None)
        if future is not None:
            if not future.done():
                future.cancel()
            elif not future.cancelled():
                future.exception()

    def _on_reply(self, delivery: Delivery) -> None:
        body = delivery.body
        if len(body) > _heavy.HEAVY_BYTES:
            # A large body is read only if its head names a waiting call: a flood of large
            # junk (or of late replies) on the reply queue costs this side nothing to drop.
            request_id = reply_id(body)
            if request_id is None:
                exc = MalformedMessage(
                    f"not a Keel reply: {len(body)} bytes without a request id at the head; "
                    "not read",
                    problem="shape",
                    size=len(body),
                )
                _poison.note(log, "reply", self.reply_to or "reply", exc, len(body))
                return
            if request_id not in self._pending:
                self._late(request_id, None)
                return
        try:
            reply = decode_reply(body, self.transport.max_message_bytes)
        except MalformedMessage as exc:
            self._unreadable(body, self.reply_to or "reply", exc)
            return
        except Exception as exc:  # the decoder is total; this is a bug, handled the same
            self._unreadable(body, self.reply_to or "reply", _poison.crashed("reply", exc))
            return
        if reply.heartbeat:
            beat = self._beats.get(reply.id)
            if beat is not None:
                beat()
            return
        future = self._pending.pop(reply.id, None)
        if future is None or future.done():
            self._late(reply.id, reply.server)
        else:
            future.set_result(reply)

    def _late(self, request_id: str, server: str | None) -> None:
        self.late_replies += 1
        if self._late_log.take():  # a flood of made-up replies must not flood the log
            unlogged, self._late_log.unlogged = self._late_log.unlogged, 0
            event(
                log,
                logging.INFO,
                "reply.late",
                request_id=request_id[:64],
                server=server[:64] if server else None,
                unlogged=unlogged or None,
            )

    def _unreadable(self, body: bytes, queue: str, exc: MalformedMessage) -> None:
        request_id = reply_id(body)
        future = self._pending.pop(request_id, None) if request_id is not None else None
        why = _poison.note(log, "reply", queue, exc, len(body), request_id=request_id)
        if future is not None and not future.done():
            # The waiting call raises this as if the server had: MalformedMessage, now.
            unreadable = MalformedMessage(
                f"the reply to request {request_id} could not be read: {why}",
                problem=getattr(exc, "problem", "internal"),
            )
            failure = to_failure(unreadable, with_traceback=False)
            future.set_result(Reply(ENVELOPE_VERSION, request_id or "", None, failure))


_links: weakref.WeakKeyDictionary[Transport, Link] = weakref.WeakKeyDictionary()


def link(transport: Transport) -> Link:
    found = _links.get(transport)
    if found is None:
        found = _links[transport] = Link(transport)
    return found
