"""The in-process transport, ``memory://[name]``: Keel's embedded default and a real backend.

One broker per name per process, shared by every transport object (every "connection") that
names it, across threads and event loops: a handler runs on the loop of the consumer it
belongs to. It keeps the whole Transport contract except durability across a process exit:
when the process ends, everything it held is gone. ``durable`` is accepted and means "held
until consumed or the process exits".

A queue deleted by another transport object (as an operator would delete one on a broker)
takes what it held with it; its consumers on other transports wait for it to exist again, and
a transport that declared it declares it again at once (bindings too), as a send to it does.

Options (URL query): ``max_message_bytes`` (default 1 MiB); ``connect_timeout`` is accepted,
as by every transport, and never waited for.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import msgspec

from keel.errors import TransportError
from keel.messaging.transports.base import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_MAX_MESSAGE_BYTES,
    Handler,
    check_size,
    positive_seconds,
)
from keel.urls import URL

log = logging.getLogger("keel.messaging.memory")
_get_ident = threading.get_ident


@dataclass(slots=True)
class _Message:
    body: bytes
    delivery_count: int = 1
    reason: str | None = None  # why it was dead-lettered, in a dead-letter queue


@dataclass(slots=True, eq=False)
class _Consumer:
    queue: _Queue
    handler: Handler
    prefetch: int
    loop: asyncio.AbstractEventLoop
    owner: MemoryTransport
    auto_ack: bool = False
    unsettled: set[_Delivery] = field(default_factory=set)
    active: bool = True
    # asyncio's own loops say which thread runs them (`_thread_id`, None while stopped): a
    # send asks that, not asyncio._get_running_loop(), which costs a getpid() system call
    # (3.11's fork check) on every call and reply. Other loops (uvloop) are asked the latter.
    plain: bool = False

    def __post_init__(self) -> None:
        self.plain = isinstance(self.loop, asyncio.BaseEventLoop)

    def here(self) -> bool:
        """Whether this consumer's loop is the one running this code."""
        loop = self.loop
        if self.plain:
            return loop._thread_id == _get_ident()  # type: ignore[attr-defined,no-any-return]
        return asyncio._get_running_loop() is loop

    async def cancel(self) -> None:
        broker = self.queue.broker
        with broker.lock:
            self.active = False
            if self in self.queue.consumers:
                self.queue.consumers.remove(self)
            waiting = broker.orphans.get(self.queue.name)
            if waiting is not None and self in waiting:
                waiting.remove(self)


@dataclass(slots=True, eq=False)
class _Queue:
    broker: _Broker
    name: str
    owner: MemoryTransport | None  # exclusive queues belong to one connection
    ready: deque[_Message] = field(default_factory=deque)
    consumers: list[_Consumer] = field(default_factory=list)
    next_consumer: int = 0


class _Delivery(msgspec.Struct, eq=False):
    """One delivery: the body and the delivery count, not the queued _Message (a message
    handed straight to a consumer, every call and reply, never becomes one; a requeue makes
    it again). A Struct: made in C, two per call; eq=False keeps identity hashing (the
    consumer's set of unsettled deliveries)."""

    _consumer: _Consumer
    # An attribute, not a property: the server and the reply link each read it per call.
    body: bytes
    _count: int = 1
    _reason: str | None = None
    _settled: bool = False

    @property
    def delivery_count(self) -> int:
        return self._count

    @property
    def settled(self) -> bool:
        return self._settled

    @property
    def dead_letter_reason(self) -> str | None:
        return self._reason

    def _settle(self) -> bool:
        if self._settled:
            return False
        self._settled = True
        self._consumer.unsettled.discard(self)
        return True

    async def ack(self) -> None:
        # _settle and dispatch's first check, inlined: every call is acknowledged here.
        if not self._settled:
            self._settled = True
            consumer = self._consumer
            consumer.unsettled.discard(self)
            queue = consumer.queue
            if queue.ready:  # the credit freed may take a message that waits
                queue.broker.dispatch(queue)

    async def requeue(self) -> None:
        self.requeue_now()

    def requeue_now(self) -> None:
        if self._settle():
            queue = self._consumer.queue
            message = _Message(self.body, self._count + 1, self._reason)
            with queue.broker.lock:
                queue.ready.appendleft(message)
            queue.broker.dispatch(queue)

    async def dead_letter(self, reason: str) -> None:
        if self._settle():
            queue = self._consumer.queue
            broker = queue.broker
            dlq = broker.ensure_queue(queue.name + ".dlq", owner=None)
            with broker.lock:
                dlq.ready.append(_Message(self.body, reason=reason))
            broker.dispatch(dlq)
            broker.dispatch(queue)


class _Broker:
    def __init__(self) -> None:
        # One lock for the broker's tables: transports on several threads share it.
        self.lock = threading.Lock()
        self.queues: dict[str, _Queue] = {}
        self.bindings: dict[str, set[str]] = {}
        # Consumers of a queue another transport deleted, waiting for it to exist again.
        self.orphans: dict[str, list[_Consumer]] = {}

    def ensure_queue(self, name: str, owner: MemoryTransport | None) -> _Queue:
        with self.lock:
            queue = self.queues.get(name)
            if queue is None:
                queue = self.queues[name] = _Queue(self, name, owner)
                adopted = self.orphans.pop(name, None)
                if adopted:
                    for consumer in adopted:
                        consumer.queue = queue
                    queue.consumers.extend(adopted)
            return queue

    def dispatch(self, queue: _Queue) -> None:
        """Hand ready messages to consumers with credit, round robin."""
        # Unlocked fast path: whoever appends to `ready` calls dispatch afterwards.
        ready = queue.ready
        if not ready or not queue.consumers:
            return
        while ready:
            with self.lock:
                chosen = self._next_consumer(queue)
                if chosen is None or not ready:
                    return
                message = ready.popleft()
                delivery = _Delivery(chosen, message.body, message.delivery_count, message.reason)
                if chosen.auto_ack:
                    delivery._settled = True
                else:
                    chosen.unsettled.add(delivery)
            if chosen.here():
                chosen.handler(delivery)
            else:
                chosen.loop.call_soon_threadsafe(chosen.handler, delivery)

    @staticmethod
    def _next_consumer(queue: _Queue) -> _Consumer | None:
        """The next consumer with credit after the last one served (under the lock)."""
        consumers = queue.consumers
        count = len(consumers)
        if count == 1:  # the common case: one server or one reply consumer
            only = consumers[0]
            return only if only.auto_ack or len(only.unsettled) < only.prefetch else None
        first = queue.next_consumer
        for step in range(count):
            candidate = consumers[(first + step) % count]
            if candidate.auto_ack or len(candidate.unsettled) < candidate.prefetch:
                queue.next_consumer = (first + step + 1) % count
                return candidate
        return None


_brokers: dict[str, _Broker] = {}
_brokers_lock = threading.Lock()
_connection_ids = itertools.count(1)


def _broker_for(url: URL) -> _Broker:
    key = (url.host or "") + url.path.rstrip("/")  # memory://x and memory://x/ are one broker
    with _brokers_lock:
        broker = _brokers.get(key)
        if broker is None:
            broker = _brokers[key] = _Broker()
        return broker


class MemoryTransport:
    """In-process broker connection. See the module docstring for what it keeps."""

    # connect_timeout is every transport's; an in-process broker is always reachable.
    URL_OPTIONS = frozenset({"max_message_bytes", "connect_timeout"})

    def __init__(
        self,
        url: URL,
        *,
        max_message_bytes: int | None = None,
        connect_timeout: float | None = None,
    ) -> None:
        self.url = url
        self.connect_timeout = positive_seconds(
            connect_timeout or url.options.get("connect_timeout", DEFAULT_CONNECT_TIMEOUT),
            "connect_timeout",
            url,
        )
        self.max_message_bytes = max_message_bytes or int(
            url.options.get("max_message_bytes", DEFAULT_MAX_MESSAGE_BYTES)
        )
        self._broker = _broker_for(url)
        self._consumers: list[_Consumer] = []
        self._exclusive: list[str] = []
        # The queues this transport declared (shared, and exclusive ones it owns), with their
        # bindings: declared again if another transport deletes one.
        self._declared: dict[str, list[str]] = {}
        self._closed = False
        self.connection_id = next(_connection_ids)

    async def connect(self) -> None:
        self._closed = False

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for consumer in self._consumers:
            await consumer.cancel()
            for delivery in list(consumer.unsettled):
                delivery.requeue_now()
        self._consumers.clear()
        for name in self._exclusive:
            await self.delete_queue(name)
        self._exclusive.clear()

    def _check_open(self) -> None:
        if self._closed:
            raise TransportError(f"transport {self.url.raw} is closed")

    async def declare_queue(
        self,
        name: str,
        *,
        durable: bool,
        bindings: Sequence[str] = (),
        exclusive: bool = False,
    ) -> None:
        self._check_open()
        queue = self._broker.ensure_queue(name, self if exclusive else None)
        if exclusive and queue.owner is self and name not in self._exclusive:
            self._exclusive.append(name)
        if not exclusive or queue.owner is self:
            # Its own exclusive queues too: a reply queue deleted under its consumer would
            # leave every call of this transport waiting for replies that go nowhere.
            known = self._declared.setdefault(name, [])
            known.extend(subject for subject in bindings if subject not in known)
        self._bind(name, bindings)

    def _bind(self, name: str, bindings: Sequence[str]) -> None:
        with self._broker.lock:
            for subject in bindings:
                self._broker.bindings.setdefault(subject, set()).add(name)

    def _declare_again(self, name: str) -> _Queue | None:
        """A queue this transport declared, declared again after another deleted it, as it
        was (exclusive to this transport, or shared); None if this transport did not declare
        it, or is closed."""
        bindings = self._declared.get(name)
        if bindings is None or self._closed:
            return None
        queue = self._broker.ensure_queue(name, self if name in self._exclusive else None)
        self._bind(name, bindings)
        return queue

    async def delete_queue(self, name: str) -> None:
        broker = self._broker
        self._declared.pop(name, None)
        others: list[_Consumer] = []
        with broker.lock:
            queue = broker.queues.pop(name, None)
            for names in broker.bindings.values():
                names.discard(name)
            if queue is not None:
                # Other transports' consumers outlive the queue, waiting for it to come back.
                others = [c for c in queue.consumers if c.owner is not self]
                if others:
                    broker.orphans.setdefault(name, []).extend(others)
                    queue.consumers = [c for c in queue.consumers if c.owner is self]
        if queue is None:
            return
        for consumer in list(queue.consumers):
            await consumer.cancel()
        for owner in {c.owner for c in others}:
            if owner._declare_again(name) is not None:
                log.warning("queue %s was deleted by another connection: declared again", name)

    def _check_size(self, body: bytes) -> None:
        check_size(body, self.max_message_bytes)

    async def send(self, queue: str, body: bytes, *, durable: bool) -> None:
        self.send_nowait(queue, body, durable=durable)

    def send_nowait(  # noqa: PLR0912 - the hot path of every call and reply, inlined
        self, queue: str, body: bytes, *, durable: bool
    ) -> None:
        """`send`, which never waits here, without its coroutine (see base.SendNowait):
        the core calls this for every call and reply."""
        if self._closed:
            self._check_open()
        if len(body) > self.max_message_bytes:
            self._check_size(body)
        broker = self._broker
        target = broker.queues.get(queue)
        if target is None:
            # Deleted by another transport since this one declared it: declare it again.
            target = self._declare_again(queue)
            if target is None:
                raise TransportError(
                    f"queue {queue!r} does not exist on {self.url.raw}; declare it before sending"
                )
            log.warning("queue %s was gone: declared again", queue)
        # Queued, or handed straight to a consumer with credit if none waits before it: one
        # lock round (acquire and release: cheaper than a with block), and the one-consumer
        # case (a server, a reply queue) without a call.
        ready = target.ready
        chosen: _Consumer | None = None
        lock = broker.lock
        lock.acquire()
        try:
            if not ready:
                consumers = target.consumers
                if len(consumers) == 1:
                    only = consumers[0]
                    if only.auto_ack:
                        chosen = only
                        delivery = _Delivery(only, body, 1, None, True)
                    elif len(only.unsettled) < only.prefetch:
                        chosen = only
                        delivery = _Delivery(only, body)
                        only.unsettled.add(delivery)
                elif consumers:
                    chosen = broker._next_consumer(target)
                    if chosen is not None:
                        delivery = _Delivery(chosen, body, 1, None, chosen.auto_ack)
                        if not chosen.auto_ack:
                            chosen.unsettled.add(delivery)
            if chosen is None:
                ready.append(_Message(body))
        finally:
            lock.release()
        if chosen is None:
            broker.dispatch(target)  # a consumer may have got credit meanwhile
            return
        # chosen.here(), inlined: every call and reply passes here.
        loop = chosen.loop
        if (
            loop._thread_id == _get_ident()  # type: ignore[attr-defined]
            if chosen.plain
            else asyncio._get_running_loop() is loop
        ):
            chosen.handler(delivery)
        else:
            loop.call_soon_threadsafe(chosen.handler, delivery)

    async def publish(self, subject: str, body: bytes, *, durable: bool) -> None:
        self._check_open()
        self._check_size(body)
        broker = self._broker
        for attempt in range(2):
            with broker.lock:
                names = broker.bindings.get(subject, ())
                targets = [broker.queues[n] for n in names if n in broker.queues]
                for target in targets:
                    target.ready.append(_Message(body))
            if targets or attempt or not self._declare_bound(subject):
                break
        for target in targets:
            broker.dispatch(target)

    def _declare_bound(self, subject: str) -> bool:
        """No queue took a message for ``subject``: declare again the queues this transport
        bound to it (deleted by another since); False if it bound none."""
        bound = [name for name, subjects in self._declared.items() if subject in subjects]
        for name in bound:
            self._declare_again(name)
            log.warning("queue %s was gone: declared again", name)
        return bool(bound)

    async def consume(
        self, queue: str, handler: Handler, *, prefetch: int, auto_ack: bool = False
    ) -> _Consumer:
        self._check_open()
        target = self._broker.queues.get(queue)
        if target is None:
            raise TransportError(f"queue {queue!r} does not exist on {self.url.raw}")
        if target.owner is not None and target.owner is not self:
            raise TransportError(f"queue {queue!r} is exclusive to another connection")
        consumer = _Consumer(
            target, handler, max(1, prefetch), asyncio.get_running_loop(), self, auto_ack=auto_ack
        )
        with self._broker.lock:
            target.consumers.append(consumer)
        self._consumers.append(consumer)
        self._broker.dispatch(target)
        return consumer

    def queue_depth(self, queue: str) -> int:
        """Messages ready in a queue (for tests and the CLI; not part of the protocol)."""
        target = self._broker.queues.get(queue)
        return len(target.ready) if target else 0
