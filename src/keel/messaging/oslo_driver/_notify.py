"""oslo.messaging notifications on Keel: oslo's wire format, Keel's delivery.

Sending: the body is what oslo's rabbit driver publishes (the 1.0 dict or the 2.0
envelope, the context flattened into ``_context_*``), published by `OsloNotifier` to
``<topic>.<priority>`` after declaring that default queue, so a notification waits for a
listener that is not running yet; it returns once the broker holds it.

Listening: a `keel.messaging.oslo.OsloNotificationListener` per exchange (oslo's queue
names: ``<topic>.<priority>`` without a pool, the pool's queue with one) hands each
notification to oslo through this poll-style listener and settles it with oslo's verdict:
``acknowledge()`` acks, ``requeue()`` requeues (up to the listener's ``max_redeliveries``,
then the notification is dead-lettered instead of looping), a body that is not an oslo
notification is dead-lettered with the reason. ``stop()`` takes no new deliveries; what was
already taken is handed to oslo or, after ``cleanup()``, requeued.
"""

from __future__ import annotations

import asyncio
import queue
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from oslo_messaging._drivers import base

from keel.messaging._notify import NotificationResult
from keel.messaging._target import Target
from keel.messaging.oslo import (
    OsloNotificationListener,
    context_to_oslo,
    decode_message,
    to_keel,
)
from keel.wire import Notification, RequestContext

if TYPE_CHECKING:
    from keel.messaging.oslo_driver._driver import KeelDriver

_STOP = object()


class _Listener(OsloNotificationListener):
    """oslo's context reaches oslo's endpoints as it was sent (see `context_from_oslo`)."""

    def _decode(self, body: bytes) -> Notification:
        return to_keel(decode_message(body), verbatim=True)


class _Incoming(base.IncomingMessage):  # type: ignore[misc]  # oslo is untyped
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        verdict: asyncio.Future[bool],
        ctxt: dict[str, Any],
        message: dict[str, Any],
    ) -> None:
        super().__init__(ctxt, message, message.get("message_id"))
        self._loop = loop
        self._verdict = verdict

    def _say(self, requeue: bool) -> None:
        self._loop.call_soon_threadsafe(_decide, self._verdict, requeue)

    def acknowledge(self) -> None:
        self._say(False)

    def requeue(self) -> None:
        self._say(True)


def _decide(verdict: asyncio.Future[bool], requeue: bool) -> None:
    if not verdict.done():
        verdict.set_result(requeue)


class NotificationPoller(base.PollStyleListener):  # type: ignore[misc]
    """What oslo polls: notifications the Keel listeners took, in the order they came."""

    def __init__(self, driver: KeelDriver, pool: str | None, batch_size: int) -> None:
        super().__init__()
        self._driver = driver
        self._pool = pool
        self._batch = batch_size
        self._queue: queue.Queue[Any] = queue.Queue()
        self._listeners: list[_Listener] = []
        self._stopping = False
        self._closed = False

    async def start(self, targets_and_priorities: Iterable[tuple[Any, str]]) -> None:
        by_exchange: dict[str, tuple[list[str], set[str]]] = {}
        for target, priority in targets_and_priorities:
            topics, priorities = by_exchange.setdefault(
                target.exchange or self._driver.exchange, ([], set())
            )
            if target.topic not in topics:
                topics.append(target.topic)
            priorities.add(priority)
        size = max(self._batch, getattr(self._driver.conf, "executor_thread_pool_size", 64))
        for exchange, (topics, priorities) in by_exchange.items():
            transport, prefix = await self._driver.notify_transport(exchange)
            listener = _Listener(
                transport,
                [Target(prefix + topic) for topic in topics],
                [_Relay(self, priorities)],
                pool=self._pool,
                durable=self._driver.durable_queues,
                pool_queue_per_subject=self._driver.options.scheme == "nats",
                # Room for a whole batch in oslo's hands, and for every worker thread.
                max_concurrency=size,
                service=self._pool or "oslo-listener",
            )
            await listener.start()
            self._listeners.append(listener)

    async def relay(
        self, ctx: RequestContext, publisher_id: str, event_type: str, payload: Any, meta: Any
    ) -> NotificationResult | None:
        if self._closed:
            return NotificationResult.REQUEUE
        loop = asyncio.get_running_loop()
        verdict: asyncio.Future[bool] = loop.create_future()
        message = {
            "message_id": meta["message_id"],
            "publisher_id": publisher_id,
            "event_type": event_type,
            "priority": str(meta["priority"]).upper(),
            "payload": payload,
            "timestamp": meta["timestamp"],
        }
        self._queue.put(_Incoming(loop, verdict, context_to_oslo(ctx), message))
        requeue = await verdict
        return NotificationResult.REQUEUE if requeue else None

    @base.batch_poll_helper  # type: ignore[untyped-decorator]
    def poll(self, timeout: float | None = None) -> Any:
        try:
            # Once stopping, hand over what is here and no longer wait.
            item = self._queue.get(block=not self._stopping, timeout=timeout)
        except queue.Empty:
            return None
        return None if item is _STOP else item

    def stop(self) -> None:
        self._stopping = True
        self._driver.run(self._stop_consuming())
        self._queue.put(_STOP)

    async def _stop_consuming(self) -> None:
        for listener in self._listeners:
            await listener.stop_consuming()

    def cleanup(self) -> None:
        self._closed = True
        while True:  # taken but never polled: back to the broker
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not _STOP:
                item.requeue()
        self._driver.run(self._close())

    async def _close(self) -> None:
        for listener in self._listeners:
            await listener.stop(timeout=self._driver.options.drain_timeout)
        self._listeners.clear()


class _Relay:
    """A Keel notification endpoint with a method for each priority oslo listens to."""

    def __init__(self, poller: NotificationPoller, priorities: Sequence[str] | set[str]) -> None:
        for priority in priorities:
            setattr(self, priority, poller.relay)
