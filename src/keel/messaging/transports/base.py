"""The Transport protocol: the few I/O primitives a broker adapter provides.

Everything else (reply routing, deadlines, retries, dedup, versioning, drain, dead-letter
policy) lives once in keel.messaging's core. A transport offers:

* named queues, durable or transient, each optionally bound to subjects;
* ``send`` to one queue, ``publish`` to every queue bound to a subject;
* ``consume`` with a credit window (``prefetch``): the transport never holds more than that many
  unsettled deliveries for one consumer; each delivery is settled exactly once by the core with
  ``ack`` (done), ``requeue`` (hand back for any consumer, e.g. on drain) or ``dead_letter``
  (moved to the queue's dead-letter queue ``<queue>.dlq`` with a reason).

Delivery promises a transport must keep (the conformance suite checks them):

* ``send``/``publish`` with ``durable=True`` return only once the broker holds the message
  (publisher confirm or equivalent) and it survives a broker restart; ``durable=False``
  messages may be lost on a broker crash but never silently while the broker is up.
* An unsettled delivery whose consumer disconnects or is cancelled goes back to its queue.
* Within one queue, messages are offered in publish order (redeliveries may come later).
* ``auto_ack`` consumers (replies, fanout) get at-most-once delivery with no credit window.
* ``handler`` is called on the transport's event loop, must not block, and must not raise.
* A delivery handed over stays alive until it is settled, even after its consumer was
  cancelled or its queue's other consumers came and went: a broker that redelivers on a
  timer (JetStream's ``ack_wait``, a Redis visibility timeout) keeps being told it is in
  progress until then, so a handler longer than the timer is never run twice.
* A delivery from a dead-letter queue says why it was dead-lettered (``dead_letter_reason``).
* A task a transport starts never ends with an exception nobody sees (`observe`).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

from keel.errors import ConfigError, MessageTooLarge
from keel.urls import URL

DEFAULT_MAX_MESSAGE_BYTES = 1024 * 1024
# Every transport that reaches a broker bounds its first ``connect`` by this (URL option or
# keyword ``connect_timeout``, seconds), retries and handshakes included, then raises
# `TransportError`; memory:// accepts it and has nothing to wait for.
DEFAULT_CONNECT_TIMEOUT = 10.0


def positive_seconds(value: object, name: str, url: URL) -> float:
    """A duration option as a finite positive float, or `ConfigError` naming it."""
    try:
        seconds = float(value)  # type: ignore[arg-type]  # str or number, checked here
    except (TypeError, ValueError):
        seconds = math.nan
    if not (seconds > 0 and math.isfinite(seconds)):
        raise ConfigError(
            f"{name}={value!r} in {url.redacted()}: give a positive number of seconds"
        )
    return seconds


def check_size(body: bytes, limit: int) -> None:
    """Refuse a body over the transport's limit before it reaches the broker."""
    if len(body) > limit:
        raise MessageTooLarge(
            f"message is {len(body)} bytes, over the transport's {limit}-byte limit",
            size=len(body),
            limit=limit,
        )


def observe(task: asyncio.Task[Any], log: logging.Logger) -> asyncio.Task[Any]:
    """Log the exception a background task ends with, if any (it is then retrieved, so asyncio
    never reports it as lost); a cancelled task is not an error."""

    task.add_done_callback(lambda finished: log_outcome(finished, log))
    return task


def log_outcome(finished: asyncio.Task[Any], log: logging.Logger) -> None:
    """Retrieve what a finished task ended with and log it if it is an exception."""
    if finished.cancelled():
        return
    exc = finished.exception()
    if exc is not None:
        log.error("event=task.failed task=%s error=%r", finished.get_name(), exc, exc_info=exc)


class Delivery(Protocol):
    """One message handed to a consumer; settle it exactly once."""

    @property
    def body(self) -> bytes: ...

    @property
    def delivery_count(self) -> int:
        """1 on first delivery, more after requeues (best effort where the broker cannot tell)."""
        ...

    @property
    def settled(self) -> bool:
        """Whether this delivery needs no more settling (settled, or auto-acknowledged)."""
        ...

    @property
    def dead_letter_reason(self) -> str | None:
        """The reason given to `dead_letter`, on a delivery from a dead-letter queue."""
        ...

    async def ack(self) -> None: ...

    async def requeue(self) -> None: ...

    async def dead_letter(self, reason: str) -> None: ...


Handler = Callable[[Delivery], None]


class Consumer(Protocol):
    async def cancel(self) -> None:
        """Stop new deliveries. Deliveries already handed over stay the core's to settle."""
        ...


class SendNowait(Protocol):
    """What a transport whose `Transport.send` never waits (the in-process broker) may offer
    beside it: the same send as a plain call, raising what ``send`` raises. The core's call
    and reply paths use it where a transport has it (a coroutine fewer per message), and
    ``await transport.send(...)`` everywhere else."""

    def __call__(self, queue: str, body: bytes, *, durable: bool) -> None: ...


def send_nowait(transport: Transport) -> SendNowait | None:
    """The transport's ``send_nowait`` if it has one (see `SendNowait`)."""
    found: SendNowait | None = getattr(transport, "send_nowait", None)
    return found


@runtime_checkable
class Transport(Protocol):
    url: URL
    max_message_bytes: int

    async def connect(self) -> None: ...

    async def close(self) -> None:
        """Close; unsettled deliveries go back to their queues."""
        ...

    async def declare_queue(
        self,
        name: str,
        *,
        durable: bool,
        bindings: Sequence[str] = (),
        exclusive: bool = False,
    ) -> None:
        """Create the queue if missing (idempotent) and bind it to subjects.

        ``exclusive`` queues belong to this connection and vanish with it (reply queues,
        fanout queues).
        """
        ...

    async def delete_queue(self, name: str) -> None: ...

    async def send(self, queue: str, body: bytes, *, durable: bool) -> None: ...

    async def publish(self, subject: str, body: bytes, *, durable: bool) -> None: ...

    async def consume(
        self, queue: str, handler: Handler, *, prefetch: int, auto_ack: bool = False
    ) -> Consumer:
        """Deliver the queue's messages to ``handler``.

        With ``auto_ack`` the transport settles each delivery as it hands it over (replies,
        fanout: at-most-once) and ``prefetch`` is ignored; the handler must not settle it.
        """
        ...
