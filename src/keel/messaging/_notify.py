"""Notifications: a Notifier publishes events; NotificationListeners consume them in pools.

Delivery: at-least-once. `Notifier` returns once the broker holds the notification for every
queue bound to its topic and priority; the default queue (pool None) is declared by the
notifier itself, so notifications wait for a listener that is not running yet. Every pool
gets its own copy; listeners in one pool compete. A listener acknowledges after its handlers
return; a handler may return `NotificationResult.REQUEUE` to have it delivered again (up to
``max_redeliveries``, then it is dead-lettered); a handler that raises dead-letters it with
the reason. With ``max_concurrency=1`` a listener handles one queue's notifications in
publish order. A body that is not a notification this listener reads (over
``max_message_bytes``, too deep, of the wrong shape) is dead-lettered with the reason without
calling any handler, and so is one whose handling fails in any unexpected way (a filter rule
that raises): every delivery is settled and frees its slot (keel.messaging._poison).
Stopping hands back at once the notifications waiting for a slot; those running get up to
the timeout, then are cancelled and go back to the queue.
"""

from __future__ import annotations

import asyncio
import enum
import inspect
import logging
import re
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

from keel import urls
from keel._log import event
from keel.errors import ConfigError, MalformedMessage, TransportError
from keel.messaging import _heavy, _metrics, _poison, _tap
from keel.messaging._link import link
from keel.messaging._slots import Slots
from keel.messaging._target import Target, notify_queue, notify_subject
from keel.messaging._threads import run_sync
from keel.messaging.transports.base import Consumer, Delivery, Handler, Transport, observe
from keel.wire import (
    ENVELOPE_VERSION,
    Notification,
    RequestContext,
    decode_notification,
    encode,
    new_id,
)

log = logging.getLogger("keel.messaging.notify")

PRIORITIES = ("audit", "debug", "info", "warn", "error", "critical", "sample")


class NotificationResult(enum.Enum):
    HANDLED = "handled"
    REQUEUE = "requeue"


class Notifier:
    """Publishes notifications as ``publisher_id`` on one or more topics.

    By default `notify` returns once the broker holds the notification. With ``window=N``
    it returns once the notification is handed to the transport (in publish order), with at
    most N of them awaiting the broker's confirmation: a durable broker then writes many at
    once instead of one disk flush per notification. The first publish that fails is raised
    by the next `notify` or by `flush`, which returns once the broker holds every one sent
    (``async with`` flushes on exit). A process that dies loses what was not confirmed yet.
    """

    def __init__(
        self,
        transport: Transport,
        publisher_id: str,
        *,
        topics: Sequence[str] = ("notifications",),
        service: str | None = None,
        window: int = 0,
    ) -> None:
        for topic in topics:
            Target(topic)  # validates the name
        if window < 0:
            raise ConfigError(f"window={window}: give 0 (wait for each) or a positive count")
        self.window = window
        self._slots = asyncio.Semaphore(window) if window else None
        self._inflight: set[asyncio.Task[None]] = set()
        self._failure: BaseException | None = None
        self.transport = transport
        self.publisher_id = publisher_id
        self.topics = tuple(topics)
        self.service = service or urls.from_env("service", "")
        self._link = link(transport)
        self.counts: Counter[tuple[str, ...]] = Counter()
        self.metric_labels = {"publisher": publisher_id}
        _metrics.track(self)

    def gauges(self) -> dict[str, float]:
        return {}

    def prepare(self, *, publisher_id: str) -> Notifier:
        return Notifier(
            self.transport,
            publisher_id,
            topics=self.topics,
            service=self.service,
            window=self.window,
        )

    async def _send(self, publish: Callable[[], Awaitable[None]]) -> None:
        """Run one notification's publishing now, or in the window (see the class)."""
        if self._slots is None:
            await publish()
            return
        self._raise_failure()
        await self._slots.acquire()
        task = asyncio.get_running_loop().create_task(self._confirmed(publish))
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    async def _confirmed(self, publish: Callable[[], Awaitable[None]]) -> None:
        assert self._slots is not None
        try:
            await publish()
        except Exception as exc:  # raised to the caller by the next notify() or flush()
            if self._failure is None:
                self._failure = exc
        finally:
            self._slots.release()

    def _raise_failure(self) -> None:
        failure, self._failure = self._failure, None
        if failure is not None:
            raise failure

    async def flush(self) -> None:
        """Return once the broker holds every notification sent; raise the first failure."""
        if self._inflight:
            await asyncio.wait(set(self._inflight))
        self._raise_failure()

    async def __aenter__(self) -> Notifier:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.flush()

    async def notify(
        self, ctx: RequestContext | None, event_type: str, payload: Any, priority: str
    ) -> None:
        priority = priority.lower()
        if priority not in PRIORITIES:
            raise ConfigError(f"priority {priority!r} is not one of {', '.join(PRIORITIES)}")
        message = Notification(
            ENVELOPE_VERSION,
            new_id(),
            self.publisher_id,
            event_type,
            priority,
            payload,
            datetime.now(UTC).isoformat(),
            ctx or RequestContext(service=self.service or None),
        )
        body = encode(message, self.transport.max_message_bytes)
        subjects = [notify_subject(topic, priority) for topic in self.topics]
        for topic, subject in zip(self.topics, subjects, strict=True):
            await self._link.declare(
                notify_queue(topic, priority, None), durable=True, bindings=[subject]
            )

        async def publish() -> None:
            for subject in subjects:
                await self.transport.publish(subject, body, durable=True)

        await self._send(publish)
        self.counts["keel_notifications", priority, "published"] += 1
        tap = _tap.state.tap
        if tap is not None:
            for topic in self.topics:
                try:
                    tap.on_notify(
                        publisher=self.service or self.publisher_id,
                        topic=topic,
                        priority=priority,
                        event_type=event_type,
                    )
                except Exception as exc:
                    _tap.failed(exc)

    async def audit(self, ctx: RequestContext | None, event_type: str, payload: Any) -> None:
        await self.notify(ctx, event_type, payload, "audit")

    async def debug(self, ctx: RequestContext | None, event_type: str, payload: Any) -> None:
        await self.notify(ctx, event_type, payload, "debug")

    async def info(self, ctx: RequestContext | None, event_type: str, payload: Any) -> None:
        await self.notify(ctx, event_type, payload, "info")

    async def warn(self, ctx: RequestContext | None, event_type: str, payload: Any) -> None:
        await self.notify(ctx, event_type, payload, "warn")

    warning = warn

    async def error(self, ctx: RequestContext | None, event_type: str, payload: Any) -> None:
        await self.notify(ctx, event_type, payload, "error")

    async def critical(self, ctx: RequestContext | None, event_type: str, payload: Any) -> None:
        await self.notify(ctx, event_type, payload, "critical")

    async def sample(self, ctx: RequestContext | None, event_type: str, payload: Any) -> None:
        await self.notify(ctx, event_type, payload, "sample")


class NotificationFilter:
    """Regular expressions (``re.match``, as oslo.messaging) a notification must all match."""

    def __init__(self, *, event_type: str | None = None, publisher_id: str | None = None) -> None:
        self.event_type = re.compile(event_type) if event_type else None
        self.publisher_id = re.compile(publisher_id) if publisher_id else None

    def match(self, notification: Notification) -> bool:
        if self.event_type and not self.event_type.match(notification.event_type):
            return False
        return not (self.publisher_id and not self.publisher_id.match(notification.publisher_id))


_Handler = Callable[..., Any]


class NotificationListener:
    """Consumes notifications of ``targets``' topics and hands them to endpoint methods.

    An endpoint method is named after the priority it wants (``info``, ``error``, ...) and
    takes ``(ctx, publisher_id, event_type, payload, metadata)``. An endpoint's optional
    ``filter_rule`` (a `NotificationFilter`) skips notifications it does not match.
    """

    def __init__(
        self,
        transport: Transport,
        targets: Sequence[Target],
        endpoints: Sequence[object],
        *,
        pool: str | None = None,
        max_concurrency: int = 16,
        max_redeliveries: int = 5,
        thread_pool_size: int = 8,
        service: str | None = None,
    ) -> None:
        if pool is not None:
            Target(pool)  # validates the name
        self.transport = transport
        self.topics = [t.topic for t in targets]
        self.pool = pool
        self.service = service or urls.from_env("service", pool or "listener")
        self.max_concurrency = max_concurrency
        self.max_redeliveries = max_redeliveries
        self._handlers: dict[str, list[tuple[NotificationFilter | None, _Handler, bool]]] = {}
        for endpoint in endpoints:
            rule = getattr(endpoint, "filter_rule", None)
            for priority in PRIORITIES:
                func = getattr(endpoint, priority, None)
                if callable(func):
                    self._handlers.setdefault(priority, []).append(
                        (rule, func, inspect.iscoroutinefunction(func))
                    )
        if not self._handlers:
            raise ConfigError(
                f"no endpoint has a method named after a priority ({', '.join(PRIORITIES)})"
            )
        self._executor = ThreadPoolExecutor(thread_pool_size, thread_name_prefix="keel-notify")
        self._consumers: list[Consumer] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._slots = Slots(max_concurrency)
        self.counts: Counter[tuple[str, ...]] = Counter()
        self.metric_labels = {"pool": pool or ""}
        _metrics.track(self)

    def gauges(self) -> dict[str, float]:
        return {}

    async def start(self) -> None:
        tap = _tap.state.tap
        if tap is not None:
            for topic in self.topics:
                try:
                    tap.on_listen(topic=topic, service=self.service, pool=self.pool)
                except Exception as exc:
                    _tap.failed(exc)
        lk = link(self.transport)
        for topic in self.topics:
            for priority in self._handlers:
                queue = notify_queue(topic, priority, self.pool)
                await lk.declare(queue, durable=True, bindings=[notify_subject(topic, priority)])
                self._consumers.append(
                    await self.transport.consume(
                        queue, self._handler(queue), prefetch=self.max_concurrency
                    )
                )

    async def stop_consuming(self) -> None:
        """Take no new deliveries; those waiting for a slot go back to the queue, those running
        stay this listener's to finish and settle."""
        for consumer in self._consumers:
            await consumer.cancel()
        self._consumers.clear()
        self._slots.wake_all()  # notifications waiting for a slot go back to the queue now

    async def stop(self, timeout: float = 25.0) -> None:
        await self.stop_consuming()
        if self._tasks:
            _, late = await asyncio.wait(set(self._tasks), timeout=timeout)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late)
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def __aenter__(self) -> NotificationListener:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def _decode(self, body: bytes) -> Notification:
        """Bytes on a queue to a notification (keel.messaging.oslo reads oslo's format)."""
        return decode_notification(body, self.transport.max_message_bytes)

    def _handler(self, queue: str) -> Handler:
        """The transport's callback for one queue (the queue names it in metrics and logs)."""

        def on_delivery(delivery: Delivery) -> None:
            task = asyncio.get_running_loop().create_task(self._handle(delivery, queue))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            observe(task, log)  # _handle catches everything; this is for what it cannot

        return on_delivery

    async def _handle(self, delivery: Delivery, queue: str) -> None:
        try:
            if not await self._slots.acquire():  # woken by stop() without a slot
                await delivery.requeue()
                return
            try:
                await self._process(delivery, queue)
            finally:
                self._slots.release()
        except asyncio.CancelledError:
            if not delivery.settled:
                await delivery.requeue()
            raise
        except TransportError as exc:  # settling failed: the broker redelivers what it holds
            event(log, logging.WARNING, "notification.settle_failed", queue=queue, error=exc)
        except Exception as exc:  # a bug in Keel or in what it calls (a filter rule)
            self.counts["keel_notifications", "?", "malformed"] += 1
            await _poison.settle(
                log, "notification", queue, delivery, _poison.crashed("notification", exc)
            )

    async def _process(self, delivery: Delivery, queue: str) -> None:
        body = delivery.body
        heavy = len(body) > _heavy.HEAVY_BYTES
        if heavy:
            await _heavy.acquire()
        try:
            try:
                note = self._decode(body)
            finally:
                if heavy:
                    _heavy.release()
        except MalformedMessage as exc:
            self.counts["keel_notifications", "?", "malformed"] += 1
            await _poison.settle(log, "notification", queue, delivery, exc)
            return
        label = note.priority if note.priority in PRIORITIES else "?"  # bounded, as sent
        metadata = {
            "message_id": note.message_id,
            "timestamp": note.timestamp,
            "priority": note.priority,
        }
        requeue = False
        for rule, func, is_async in self._handlers.get(note.priority, ()):
            if rule is not None and not rule.match(note):
                continue
            args = (note.ctx, note.publisher_id, note.event_type, note.payload, metadata)
            try:
                if is_async:
                    result = await func(*args)
                else:
                    result = await run_sync(self._executor, func, *args)
            except Exception as exc:
                self.counts["keel_notifications", label, "dead_lettered"] += 1
                event(
                    log,
                    logging.ERROR,
                    "notification.handler_failed",
                    event_type=note.event_type,
                    message_id=note.message_id,
                    error=repr(exc),
                )
                await delivery.dead_letter(f"{type(exc).__name__}: {_poison.reason(exc)}")
                return
            requeue = requeue or result is NotificationResult.REQUEUE
        if requeue:
            if delivery.delivery_count > self.max_redeliveries:
                self.counts["keel_notifications", label, "dead_lettered"] += 1
                await delivery.dead_letter(f"requeued {delivery.delivery_count} times")
            else:
                self.counts["keel_notifications", label, "requeued"] += 1
                await delivery.requeue()
            return
        self.counts["keel_notifications", label, "handled"] += 1
        await delivery.ack()
