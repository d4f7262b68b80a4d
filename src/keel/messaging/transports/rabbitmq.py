"""RabbitMQ transport, ``rabbit://user:pass@host:port/vhost`` (``amqp://`` also accepted;
``amqps://`` for TLS).

A thin adapter over AMQP 0-9-1 (aiormq, the protocol layer under aio-pika; ``keel[rabbitmq]``):

* A queue is an AMQP queue. ``durable`` queues are durable queues, classic or quorum
  (``queue_type``, below), and get a durable ``<queue>.dlq`` of the same type beside them;
  ``exclusive`` queues are exclusive, auto-delete queues of this connection. Subjects are
  routing keys on one durable topic exchange (``keel`` by default, ``?exchange=`` to change
  it); ``send`` publishes on the default exchange with the queue name as routing key.
* Each consumer has its own channel with ``basic.qos(prefetch)``; ``auto_ack`` consumers
  consume with ``no_ack``. ``ack`` is ``basic.ack`` (the acks of one event-loop iteration go
  out as one ``basic.ack(multiple)`` up to the oldest delivery still open; ``ack`` returns
  once its frame is written), ``requeue`` is ``basic.nack(requeue)``
  (RabbitMQ puts the message back at its original place), ``dead_letter`` publishes the body
  to ``<queue>.dlq`` with the reason in the ``x-keel-reason`` header, waits for the broker's
  confirm, then acks the original.

RabbitMQ's direct reply-to (``amq.rabbitmq.reply-to``) is not used: it is not a queue that
can be declared or consumed like the others (it must be consumed with no_ack on the very
channel that publishes the requests), so it does not fit the contract's one exclusive reply
queue per transport; an exclusive auto-delete queue costs one declare per transport.

What the broker holds when a call returns:

* ``send``/``publish`` with ``durable=True`` go out persistent on a publisher-confirm channel
  and return once the broker confirmed them (for a durable queue: written to disk).
  ``durable=False`` messages go out transient, without confirm: they are written to the
  socket when ``send`` returns, and may be lost if the connection or broker fails then.
* A transient message sent to a queue that does not exist, or published to a subject no
  queue is bound to, is dropped by the broker (the core declares every queue before its
  first send); a durable ``send`` is ``mandatory`` (see "A queue deleted", below).
* With quorum queues, a ``send`` to a durable queue this transport declared (a call's
  request to its topic or server queue) goes out on the confirm channel even when
  transient, and is ``mandatory``: RabbitMQ 3.10's quorum-queue client (fixed in 3.13)
  rejects a channel's publishes to a queue whose recorded leader is a dead node for as long
  as that node is down, which a channel without confirms never hears. A nack retires the
  confirm channel for a fresh one (which reads the queue's record again; at most one new
  channel every ``_RETIRE_EVERY_S``) and the message is sent once more on it; a second nack
  is a retryable `TransportError`. The old channel is closed once its confirms are due.
  tests/topology/test_rabbitmq_quorum_leader_loss.py.

Clusters and failover: the URL may list several nodes in oslo.messaging's form,
``rabbit://u:p@h1:5672,u:p@h2:5673/vhost``. ``connect`` and every reconnect try them in turn,
starting after the node last used, so a client whose node died moves to a live one by itself.
``queue_type`` (URL option or keyword): ``quorum`` declares durable queues (and their
``.dlq``) as quorum queues, replicated by Raft on a majority of the nodes, so a confirmed
message survives the loss of any one node of three; ``classic`` keeps classic queues (one
node holds each; lost while that node is down). The default, ``auto``, is quorum when the
URL lists several nodes and classic for one. Transient and exclusive queues stay classic
(quorum queues are always durable). ``delivery_limit=N`` adds the broker's own poison bound to
quorum queues: a message delivered N times without an ack is dead-lettered by the broker to
``<queue>.dlq`` (at-least-once dead-lettering), whatever the consumers do.

TLS and credentials (`keel._tls`): ``amqps://`` or ``tls=true`` turns TLS on; ``ca``,
``cert``, ``key``, ``verify`` as on every backend. A refused certificate is `TLSError` and a
refused user or password `CredentialsRejected`, from ``connect``; after a reconnect the same
failures are logged (without the password) and retried.

Connection loss: heartbeats (``?heartbeat=``, default 20 s) detect a dead peer. The
transport reconnects by itself with backoff and replays what it declared (exchange, queues,
bindings) and its consumers on fresh channels. Exclusive queues come back empty; the core
then starts a new reply queue (`on_reconnect`; keel.messaging._link says why). While it is
disconnected ``send``/``publish`` wait up to ``?reconnect_wait=`` (default 10 s) for the
reconnect, then raise `TransportError`; a publish in flight when the connection drops raises
`TransportError` (the broker may or may not hold it: retry; casts are deduplicated by key).
Deliveries handed out before the loss go back to their queue (the broker requeues unacked
messages of a dead channel): settling one afterwards does nothing except ``ack``, which
raises `TransportError` so the core does not start work the broker will hand out again.

A queue deleted behind the transport's back (``rabbitmqctl delete_queue``, another
connection's ``queue.delete``): the broker cancels its consumers; a consumer of a queue this
transport declared declares it again, as it was declared (bindings too), and consumes on a
fresh channel; what the queue held is gone with it. A durable ``send`` is published
``mandatory``: one the broker returns as unroutable (its queue is gone) declares the queue
again if this transport declared it (a ``.dlq`` always) and is sent once more, else raises
`TransportError`. Calls and replies are not confirmed, so one sent in the moment between a
deletion and the consumer's declaration is lost and its call times out.

Consumer crash: the broker requeues every unacknowledged delivery of a closed channel or
connection. RabbitMQ's ``consumer_timeout`` (scripts/servers.d/rabbitmq.sh keeps the 30 min
default) closes a channel that holds one delivery unacknowledged longer: the transport
reopens that consumer's channel and consumes again; the delivery is redelivered.

``delivery_count``: classic queues only carry a ``redelivered`` flag, so this is best effort:
``x-delivery-count`` when the broker sends it (quorum queues), else the count this process
saw when it requeued the same body, else 2 for a redelivery and 1 for a first delivery.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import aiormq
import aiormq.exceptions as amqp_errors
from aiormq.abc import AbstractChannel, DeliveredMessage
from pamqp import commands as spec

from keel._tls import (
    TLS_OPTIONS,
    TLSConfig,
    credentials_rejected,
    hidden_refusal,
    tls_config,
    tls_failure,
)
from keel.errors import ConfigError, KeelError, TransportError
from keel.messaging.transports import _amqp_publish
from keel.messaging.transports.base import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_MAX_MESSAGE_BYTES,
    Handler,
    check_size,
    observe,
    positive_seconds,
)
from keel.urls import URL, Host

log = logging.getLogger("keel.messaging.rabbitmq")

REASON_HEADER = "x-keel-reason"
_REQUEUE_MEMORY = 4096  # bodies whose requeue count this process remembers
_RETIRE_EVERY_S = 0.5  # a nacked confirm channel is replaced at most this often
_CLIENT_ERRORS = (amqp_errors.AMQPError, amqp_errors.ChannelInvalidStateError, OSError)


class _Unroutable(TransportError):
    """The broker returned a mandatory message: no queue by that name."""


_QUEUE_TYPES = ("auto", "classic", "quorum")


def _translate(exc: BaseException, action: str, url: URL) -> KeelError:
    """The one place where client-library errors become Keel errors."""
    failed = tls_failure(exc, backend="RabbitMQ", server=url.redacted())
    if failed is not None:
        return failed
    if isinstance(exc, amqp_errors.AuthenticationError | amqp_errors.ProbableAuthenticationError):
        return credentials_rejected(
            backend="RabbitMQ", server=url.redacted(), user=url.username or "guest"
        )
    if isinstance(exc, amqp_errors.ChannelPreconditionFailed):
        return ConfigError(
            f"{action} on {url.redacted()} refused by RabbitMQ: {exc}; a queue of that name "
            "exists with other properties: delete it or declare it the same way"
        )
    if isinstance(exc, amqp_errors.ChannelAccessRefused):
        return ConfigError(f"{action} on {url.redacted()} refused by RabbitMQ: {exc}")
    if isinstance(exc, TimeoutError):
        return TransportError(f"{action} on {url.redacted()} timed out; retry later")
    return TransportError(f"{action} on {url.redacted()} failed: {exc!r}; retry later")


@dataclass(slots=True)
class _QueueSpec:
    durable: bool
    exclusive: bool
    bindings: list[str] = field(default_factory=list)


class _Delivery:
    __slots__ = (
        "_consumer",
        "_generation",
        "_settled",
        "_tag",
        "body",
        "dead_letter_reason",
        "delivery_count",
    )

    def __init__(
        self, consumer: _Consumer, tag: int, body: bytes, count: int, reason: str | None = None
    ) -> None:
        self._consumer = consumer
        self._generation = consumer.generation
        self._tag = tag
        self._settled = False
        self.body = body
        self.delivery_count = count
        self.dead_letter_reason = reason

    @property
    def settled(self) -> bool:
        return self._settled

    def _channel(self, *, hold: bool = False) -> AbstractChannel | None:
        """The channel to settle on, or None if the delivery is already settled or stale.

        With ``hold`` the tag stays open (no batched ``basic.ack(multiple)`` may cover it)
        until the caller's own frame for it is written: `_written` then closes it. A batch
        could otherwise overtake a nack waiting for room in aiormq's frame queue, ack a
        message meant for requeue, and make the broker close the channel on the nack.
        """
        if self._settled:
            return None
        self._settled = True
        consumer = self._consumer
        if consumer.generation != self._generation:
            return None  # its channel is gone: the broker has requeued it
        consumer.unsettled -= 1
        if not hold:
            consumer.open_tags.discard(self._tag)
        channel = consumer.channel
        if not consumer.active and consumer.unsettled == 0:
            consumer.close_soon()
        if channel is None or channel.is_closed:
            return None
        return channel

    async def ack(self) -> None:
        stale = self._settled is False and self._consumer.generation != self._generation
        # Held like a nack: the tag stays open until its batch is written, so that no other
        # batch's basic.ack(multiple) covers it and the broker sees it acked twice.
        channel = self._channel(hold=True)
        if channel is None:
            self._written()
            if stale:
                raise TransportError(
                    "cannot ack: the channel that delivered this message is gone and the "
                    "broker has put it back on its queue"
                )
            return
        await self._consumer.ack(channel, self._tag)

    def _written(self) -> None:
        consumer = self._consumer
        if consumer.generation == self._generation:  # a new channel reuses tag numbers
            consumer.open_tags.discard(self._tag)

    async def requeue(self) -> None:
        channel = self._channel(hold=True)
        if channel is None:
            self._written()
            return
        self._consumer.transport.remember_requeue(self.body, self.delivery_count)
        try:
            with contextlib.suppress(*_CLIENT_ERRORS):
                await channel.basic_nack(self._tag, requeue=True)
        finally:
            self._written()

    async def dead_letter(self, reason: str) -> None:
        consumer = self._consumer
        if self._settled or consumer.generation != self._generation:
            self._channel()
            return
        try:
            await consumer.transport.send_raw(
                consumer.queue + ".dlq", self.body, durable=True, headers={REASON_HEADER: reason}
            )
        except TransportError:
            # Not held by the dead-letter queue: leave it to the broker to hand out again.
            log.warning("dead letter for %s not confirmed; it will be redelivered", consumer.queue)
            channel = self._channel(hold=True)
            try:
                if channel is not None:
                    with contextlib.suppress(*_CLIENT_ERRORS):
                        await channel.basic_nack(self._tag, requeue=True)
            finally:
                self._written()
            return
        channel = self._channel(hold=True)
        try:
            if channel is not None:
                with contextlib.suppress(*_CLIENT_ERRORS):
                    await channel.basic_ack(self._tag)
        finally:
            self._written()


@dataclass(slots=True, eq=False)
class _AckBatch:
    channel: AbstractChannel
    sent: asyncio.Future[None]
    tags: list[int] = field(default_factory=list)


class _Consumer:
    def __init__(
        self,
        transport: RabbitTransport,
        queue: str,
        handler: Handler,
        prefetch: int,
        auto_ack: bool,
    ) -> None:
        self.transport = transport
        self.queue = queue
        self.handler = handler
        self.prefetch = prefetch
        self.auto_ack = auto_ack
        self.channel: AbstractChannel | None = None
        self.tag: str | None = None
        self.active = True
        self.unsettled = 0
        self.generation = 0
        # Delivery tags handed to the core and not settled yet, and the acks of this loop
        # iteration waiting to go out as one frame (see `ack`).
        self.open_tags: set[int] = set()
        self._acks: _AckBatch | None = None
        # One batch goes out at a time: a later batch's basic.ack(multiple) written before an
        # earlier batch's single acks would settle those tags twice, and the broker closes
        # the channel on an unknown delivery tag.
        self._ack_order = asyncio.Lock()

    async def start(self, connection: aiormq.Connection) -> None:
        """(Re)open this consumer's channel and consume; earlier deliveries become stale."""
        channel = await connection.channel(publisher_confirms=False)
        self.generation += 1
        self.unsettled = 0
        self.open_tags.clear()
        self.channel = channel
        if not self.auto_ack:
            await channel.basic_qos(prefetch_count=self.prefetch)
        ok = await channel.basic_consume(self.queue, self._on_message, no_ack=self.auto_ack)
        self.tag = ok.consumer_tag
        if not self.active:
            # Cancelled while this start was under way (a server stopping while its queue
            # was declared again): the cancel saw the channel before this one, and this one
            # would consume on, nacking every message back to the queue in a hot loop.
            await self._close_channel()
            return
        generation = self.generation
        channel.closing.add_done_callback(lambda f: self._on_channel_closed(f, generation))
        channel.on_consumer_cancel_callbacks.add(
            lambda frame: self._on_broker_cancel(frame, channel, generation)
        )

    def _on_broker_cancel(
        self, frame: spec.Basic.Cancel, channel: AbstractChannel, generation: int
    ) -> None:
        """The broker cancelled this consumer: its queue was deleted (or, with a quorum
        queue, lost its leader for good)."""
        if (
            frame.consumer_tag == self.tag
            and self.active
            and generation == self.generation
            and channel is self.channel
        ):
            self.transport.queue_lost(self)

    def _on_channel_closed(self, closed: asyncio.Future[Any], generation: int) -> None:
        reason = None if closed.cancelled() else closed.exception()
        # Only a channel the broker closed on its own (consumer_timeout, a channel error) is
        # reopened here; a lost connection closes every channel and the supervisor replays.
        if (
            isinstance(reason, amqp_errors.AMQPChannelError)
            and self.active
            and generation == self.generation
        ):
            self.transport.channel_lost(self)

    async def _on_message(self, message: DeliveredMessage) -> None:
        delivery = message.delivery
        assert isinstance(delivery, spec.Basic.Deliver)
        tag = delivery.delivery_tag
        assert tag is not None
        if self.auto_ack:
            if self.active:
                settled = _Delivery(self, tag, message.body, 1)
                settled._settled = True  # no_ack: the broker forgot it when it sent it
                self.handler(settled)
            return
        if not self.active or message.channel is not self.channel:
            with contextlib.suppress(*_CLIENT_ERRORS):
                await message.channel.basic_nack(tag, requeue=True)
            return
        count = 1
        headers = message.header.properties.headers
        if delivery.redelivered:
            found = headers.get("x-delivery-count") if headers else None
            if isinstance(found, int):
                count = found + 1
            else:
                count = self.transport.requeue_count(message.body) + 1
        reason = headers.get(REASON_HEADER) if headers else None
        if isinstance(reason, bytes):
            reason = reason.decode(errors="replace")
        self.unsettled += 1
        self.open_tags.add(tag)
        self.handler(
            _Delivery(self, tag, message.body, count, reason if isinstance(reason, str) else None)
        )

    async def ack(self, channel: AbstractChannel, tag: int) -> None:
        """Acknowledge ``tag``, together with the other acks of this loop iteration.

        Under load many handlers finish in one iteration; their acks go out as one
        ``basic.ack(multiple)`` up to the highest tag below every delivery still open (what
        is above it, individually), sent by one task on the next iteration: one frame and
        one write instead of one per message (an ack frame cost as much as a publish). The
        caller still waits until its ack is written, and gets `TransportError` if it was
        not, as with a single ack.
        """
        batch = self._acks
        if batch is None or batch.channel is not channel:
            batch = self._acks = _AckBatch(channel, asyncio.get_running_loop().create_future())
            self.transport.keep(asyncio.get_running_loop().create_task(self._send_acks(batch)))
        batch.tags.append(tag)
        await asyncio.shield(batch.sent)

    async def _send_acks(self, batch: _AckBatch) -> None:
        if self._acks is batch:
            self._acks = None
        try:
            async with self._ack_order:
                tags = batch.tags
                # Every tag at or below the highest one under `low` is settled and written:
                # acked in this batch or an earlier one, or nacked. A tag leaves open_tags
                # only once its own frame is written, so a batch still waiting (formed while
                # this one waited for the lock) keeps its tags out of this one's multiple.
                mine = set(tags)
                low = min((t for t in self.open_tags if t not in mine), default=None)
                covered = [t for t in tags if low is None or t < low]
                rest = [t for t in tags if low is not None and t > low]
                if len(covered) == 1:
                    await batch.channel.basic_ack(covered[0])
                elif covered:
                    await batch.channel.basic_ack(max(covered), multiple=True)
                for tag in rest:
                    await batch.channel.basic_ack(tag)
                if self.channel is batch.channel:  # a new channel reuses tag numbers
                    self.open_tags.difference_update(mine)
        except _CLIENT_ERRORS as exc:
            batch.sent.set_exception(_translate(exc, "ack", self.transport.url))
            batch.sent.exception()  # retrieved: a caller may have gone meanwhile
            return
        batch.sent.set_result(None)

    async def flush_acks(self) -> None:
        """Write the acks waiting for this iteration's batch (before the channel closes)."""
        batch = self._acks
        if batch is not None:
            with contextlib.suppress(KeelError):
                await asyncio.shield(batch.sent)
        # And the batches already under way, waiting behind a slow write: the lock is FIFO,
        # so once it is ours they are written (a close after only a requeue saw none above).
        async with self._ack_order:
            pass

    async def cancel(self) -> None:
        if not self.active:
            return
        self.active = False
        self.transport.forget_consumer(self)
        channel = self.channel
        if channel is not None and not channel.is_closed and self.tag is not None:
            with contextlib.suppress(*_CLIENT_ERRORS):
                await channel.basic_cancel(self.tag)
        if self.auto_ack or self.unsettled == 0:
            await self._close_channel()

    def close_soon(self) -> None:
        task = asyncio.get_running_loop().create_task(self._close_channel())
        self.transport.keep(task)

    async def _close_channel(self) -> None:
        await self.flush_acks()
        channel, self.channel = self.channel, None
        if channel is not None and not channel.is_closed:
            with contextlib.suppress(*_CLIENT_ERRORS):
                await channel.close()


class RabbitTransport:
    """One AMQP connection with its channels. See the module docstring for what it keeps.

    Options (keywords or URL query): ``max_message_bytes`` (default 1 MiB), ``heartbeat``
    (seconds, default 20), ``exchange`` (default ``keel``), ``exchange_durable`` (URL only,
    default true; false to share a non-durable oslo.messaging exchange), ``reconnect_wait``
    (seconds a send waits for a reconnect, default 10), ``publish_timeout`` (default 30),
    ``connect_timeout`` (seconds the first connect may take in all, every node and the AMQP
    handshake included; each node of a reconnect gets as long; default 10), ``queue_type``
    (``auto``, ``classic``, ``quorum``), ``delivery_limit`` (quorum queues),
    and the TLS options ``tls``, ``ca``, ``cert``, ``key``, ``verify``.
    """

    URL_OPTIONS = frozenset(
        {
            "max_message_bytes",
            "heartbeat",
            "exchange",
            "exchange_durable",
            "reconnect_wait",
            "publish_timeout",
            "connect_timeout",
            "queue_type",
            "delivery_limit",
            *TLS_OPTIONS,
        }
    )

    def __init__(
        self,
        url: URL,
        *,
        max_message_bytes: int | None = None,
        heartbeat: int | None = None,
        exchange: str | None = None,
        reconnect_wait: float | None = None,
        publish_timeout: float | None = None,
        connect_timeout: float | None = None,
        queue_type: str | None = None,
        delivery_limit: int | None = None,
        tls: bool | None = None,
        ca: str | None = None,
        cert: str | None = None,
        key: str | None = None,
        verify: str | None = None,
    ) -> None:
        options = url.options
        self.url = url
        self.max_message_bytes = max_message_bytes or int(
            options.get("max_message_bytes", DEFAULT_MAX_MESSAGE_BYTES)
        )
        self.exchange = exchange or options.get("exchange", "keel")
        # oslo.messaging declares its exchanges durable only with amqp_durable_queues=True;
        # RabbitMQ refuses a second declaration that differs, so interop must match it.
        self._exchange_durable = options.get("exchange_durable", "true").lower() != "false"
        self._heartbeat = heartbeat or int(options.get("heartbeat", 20))
        self._reconnect_wait = reconnect_wait or float(options.get("reconnect_wait", 10))
        self._publish_timeout = publish_timeout or float(options.get("publish_timeout", 30))
        self.connect_timeout = positive_seconds(
            connect_timeout or options.get("connect_timeout", DEFAULT_CONNECT_TIMEOUT),
            "connect_timeout",
            url,
        )
        self._tls: TLSConfig | None = tls_config(
            url,
            {"tls": tls, "ca": ca, "cert": cert, "key": key, "verify": verify},
            secure_scheme=url.scheme == "amqps",
        )
        self._hosts = list(url.hosts) or [Host("127.0.0.1")]
        self._next_host = 0  # reconnects start after the node last used
        self.queue_type = (queue_type or options.get("queue_type", "auto")).lower()
        if self.queue_type not in _QUEUE_TYPES:
            raise ConfigError(
                f"queue_type={self.queue_type!r} in {url.redacted()}: expected one of "
                f"{', '.join(_QUEUE_TYPES)}"
            )
        if self.queue_type == "auto":
            self.queue_type = "quorum" if len(self._hosts) > 1 else "classic"
        limit = delivery_limit or options.get("delivery_limit")
        self._delivery_limit = int(limit) if limit else None
        if self._delivery_limit is not None and self.queue_type != "quorum":
            raise ConfigError(
                f"delivery_limit in {url.redacted()} needs quorum queues (queue_type=quorum)"
            )
        vhost = url.path[1:] if url.path.startswith("/") else url.path
        self._vhost = quote(vhost, safe="") if vhost else ""
        self._connection: aiormq.Connection | None = None
        self._confirm: AbstractChannel | None = None  # durable publishes
        self._confirm_retired = -_RETIRE_EVERY_S  # monotonic time of the last retirement
        self._plain: AbstractChannel | None = None  # transient publishes
        self._control: AbstractChannel | None = None  # declarations
        self._channel_lock = asyncio.Lock()
        self._ready = asyncio.Event()
        self._queues: dict[str, _QueueSpec] = {}
        self._bindings_index: dict[str, tuple[str, ...]] | None = None  # see _bound_to
        self._consumers: list[_Consumer] = []
        self._requeued: OrderedDict[bytes, int] = OrderedDict()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._supervisor: asyncio.Task[None] | None = None
        self._closed = False
        self._opened = 0  # connections made: above 1, a reconnect
        self._on_reconnect: list[Callable[[], None]] = []

    # --- connection ------------------------------------------------------------------------

    async def connect(self) -> None:
        self._closed = False
        if self._connection is not None and not self._connection.is_closed:
            return
        try:
            # The whole first connect (every node of a cluster, the channels, the replay)
            # within connect_timeout: a node that takes the TCP connection and never
            # answers the AMQP handshake must not hold the caller.
            async with asyncio.timeout(self.connect_timeout):
                await self._open()
        except KeelError:
            raise
        except TimeoutError:
            raise TransportError(
                f"cannot reach RabbitMQ at {self.url.redacted()} within "
                f"{self.connect_timeout:g}s (connect_timeout)"
            ) from None
        except _CLIENT_ERRORS as exc:
            raise _translate(exc, "connect", self.url) from exc
        self._supervisor = observe(asyncio.get_running_loop().create_task(self._supervise()), log)

    def _amqp_url(self, host: Host) -> str:
        user = quote(host.username or "guest", safe="")
        password = quote(host.password or "guest", safe="")
        scheme = "amqps" if self._tls is not None else "amqp"
        default_port = 5671 if self._tls is not None else 5672
        return (
            f"{scheme}://{user}:{password}@{host.address(default_port)}/{self._vhost}"
            f"?heartbeat={self._heartbeat}"
        )

    async def _connect_any(self) -> aiormq.Connection:
        """A connection to the first node that accepts one, trying each node once in turn
        (after the one last used). A refused certificate or login fails at once: every node
        of a cluster shares them."""
        failure: BaseException | None = None
        for _ in range(len(self._hosts)):
            host = self._hosts[self._next_host % len(self._hosts)]
            self._next_host += 1
            context = self._tls.context() if self._tls is not None else None
            connection = aiormq.Connection(self._amqp_url(host), context=context)
            try:
                await asyncio.wait_for(connection.connect(), self.connect_timeout)
            except (*_CLIENT_ERRORS, TimeoutError) as exc:
                with contextlib.suppress(*_CLIENT_ERRORS, RuntimeError):
                    await connection.close()
                mapped = _translate(exc, "connect", self.url)
                mapped = (
                    await hidden_refusal(
                        exc,
                        host.host,
                        host.port or 5671,
                        self._tls,
                        backend="RabbitMQ",
                        server=self.url.redacted(),
                    )
                    or mapped
                )
                if not mapped.retryable:
                    raise mapped from None
                log.info("rabbitmq: node %s refused a connection: %s", host.address(5672), mapped)
                failure = exc
                continue
            self._next_host -= 1  # stay on this node until it fails
            return connection
        assert failure is not None
        raise failure

    async def _open(self) -> None:
        """Connect, open the publishing channels and replay declarations and consumers."""
        connection = await self._connect_any()
        try:
            self._confirm = await connection.channel(publisher_confirms=True)
            self._plain = await connection.channel(publisher_confirms=False)
            self._control = await connection.channel(publisher_confirms=False)
            await self._control.exchange_declare(
                self.exchange, exchange_type="topic", durable=self._exchange_durable
            )
            for name, queue in list(self._queues.items()):
                await self._declare(self._control, name, queue)
            gone: list[_Consumer] = []
            for consumer in list(self._consumers):
                try:
                    await consumer.start(connection)
                except amqp_errors.ChannelNotFoundEntity:
                    # Its queue is gone and not ours to declare (deleted, or a transient
                    # queue another connection declared): consumed again once it exists, as
                    # after a deletion, rather than refusing the whole connection.
                    gone.append(consumer)
        except BaseException:
            await connection.close()
            raise
        self._connection = connection
        self._opened += 1
        if self._opened > 1:
            for callback in self._on_reconnect:
                try:
                    callback()
                except Exception:
                    log.exception("rabbitmq: a reconnect callback failed")
        self._ready.set()
        for consumer in gone:
            self.queue_lost(consumer)

    async def _supervise(self) -> None:
        delay = 0.1
        while True:
            connection = self._connection
            assert connection is not None
            closing = connection.closing
            await asyncio.wait([closing])  # never raises, whatever closed it (even cancelled)
            if not closing.cancelled():
                closing.exception()
            if self.closed:
                return
            self._ready.clear()
            log.warning("connection to %s lost; reconnecting", self.url.redacted())
            self._next_host += 1  # that node is gone: try the others first
            while not self.closed:
                try:
                    await self._open()
                except KeelError as exc:  # a refused certificate or login: say so, keep trying
                    log.warning("reconnect to %s refused: %s", self.url.redacted(), exc)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 2.0)
                except (*_CLIENT_ERRORS, RuntimeError, TimeoutError) as exc:
                    log.info("reconnect to %s failed: %s", self.url.redacted(), type(exc).__name__)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 2.0)
                else:
                    delay = 0.1
                    log.warning("reconnected to %s", self.url.redacted())
                    break

    def on_reconnect(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` after each reconnect, once declarations and consumers are
        replayed and before waiting publishers go on (the core starts a new reply queue)."""
        self._on_reconnect.append(callback)

    @property
    def closed(self) -> bool:
        return self._closed

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._ready.clear()
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        for consumer in self._consumers:
            consumer.active = False
        self._consumers.clear()
        if self._connection is not None:
            with contextlib.suppress(*_CLIENT_ERRORS, RuntimeError):
                await self._connection.close()
        for task in list(self._tasks):
            task.cancel()

    async def _wait_ready(self, action: str) -> aiormq.Connection:
        """The connection, once up; ``action`` (what the caller does, naming its queue) is
        what a `TransportError` says could not be done."""
        if self._closed:
            raise TransportError(f"transport {self.url.redacted()} is closed")
        if self._connection is None or self._connection.is_closed:
            self._ready.clear()  # lost a moment ago: the supervisor has not seen it yet
        if not self._ready.is_set():
            try:
                await asyncio.wait_for(self._ready.wait(), self._reconnect_wait)
            except TimeoutError:
                raise TransportError(
                    f"{action}: not connected to {self.url.redacted()} after "
                    f"{self._reconnect_wait}s of reconnecting; retry later"
                ) from None
        assert self._connection is not None
        return self._connection

    async def _channel(self, kind: str, action: str) -> AbstractChannel:
        """A publishing or control channel, reopened if the broker closed it (channel error)."""
        channel: AbstractChannel | None = getattr(self, kind)
        if channel is not None and not channel.is_closed:
            return channel
        connection = await self._wait_ready(action)
        async with self._channel_lock:
            channel = getattr(self, kind)
            if channel is None or channel.is_closed:
                try:
                    channel = await connection.channel(publisher_confirms=kind == "_confirm")
                except RuntimeError as exc:  # aiormq: the connection closed under us
                    raise _translate(exc, "opening a channel", self.url) from exc
                setattr(self, kind, channel)
        assert channel is not None
        return channel

    # --- helpers the consumers call --------------------------------------------------------

    def keep(self, task: asyncio.Task[Any]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        observe(task, log)

    def forget_consumer(self, consumer: _Consumer) -> None:
        if consumer in self._consumers:
            self._consumers.remove(consumer)

    def channel_lost(self, consumer: _Consumer) -> None:
        """A consumer's channel closed under it (channel error, consumer_timeout)."""
        connection = self._connection
        if self._closed or connection is None or connection.is_closed:
            return  # the supervisor replays every consumer after reconnecting
        log.warning("channel of consumer on %s closed; consuming again", consumer.queue)

        lost = consumer.channel

        async def restart() -> None:
            if connection is not self._connection or consumer.channel is not lost:
                return  # reconnected or restarted meanwhile
            try:
                await consumer.start(connection)
            except (*_CLIENT_ERRORS, RuntimeError) as exc:
                log.warning("could not consume %s again: %r", consumer.queue, exc)

        self.keep(asyncio.get_running_loop().create_task(restart()))

    def queue_lost(self, consumer: _Consumer) -> None:
        """The broker cancelled a consumer because its queue is gone: declare the queue
        again (if this transport declared it) and consume it on a fresh channel, retrying
        with backoff while the consumer is active (a queue declared elsewhere may come
        back)."""
        queue = consumer.queue
        known = self._queues.get(queue)
        log.warning(
            "queue %s was deleted on %s under its consumer; %s",
            queue,
            self.url.redacted(),
            "declaring it again" if known else "consuming again once it exists",
        )
        lost = consumer.channel

        async def restore() -> None:
            delay = 0.1
            expected = lost
            # Until a start succeeds, or something else (a reconnect's replay, a cancel)
            # has taken the consumer over.
            while consumer.active and consumer.channel is expected and not self._closed:
                connection = self._connection
                if connection is None or connection.is_closed:
                    return  # the supervisor replays every declaration and consumer
                try:
                    if known is not None:
                        await self._declare(await self._channel("_control", queue), queue, known)
                    await consumer.start(connection)
                except (*_CLIENT_ERRORS, KeelError, RuntimeError) as exc:
                    expected = consumer.channel  # a failed start leaves its own channel
                    log.info("could not consume %s again yet: %r", queue, exc)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)
                    continue
                break
            if lost is not None and not lost.is_closed:
                with contextlib.suppress(*_CLIENT_ERRORS):
                    await lost.close()

        self.keep(asyncio.get_running_loop().create_task(restore()))

    def remember_requeue(self, body: bytes, count: int) -> None:
        self._requeued[body] = count
        if len(self._requeued) > _REQUEUE_MEMORY:
            self._requeued.popitem(last=False)

    def requeue_count(self, body: bytes) -> int:
        return self._requeued.pop(body, 1)

    # --- the Transport protocol ------------------------------------------------------------

    def _arguments(self, name: str, durable: bool, dlq: bool) -> dict[str, Any] | None:
        """Queue arguments: the queue type, and the broker's poison bound if asked for."""
        if not durable or self.queue_type != "quorum":
            return None
        arguments: dict[str, Any] = {"x-queue-type": "quorum"}
        if self._delivery_limit is not None and not dlq:
            arguments.update(
                {
                    "x-delivery-limit": self._delivery_limit,
                    "x-dead-letter-exchange": "",
                    "x-dead-letter-routing-key": name + ".dlq",
                    "x-dead-letter-strategy": "at-least-once",
                    "x-overflow": "reject-publish",
                }
            )
        return arguments

    async def _declare(self, channel: AbstractChannel, name: str, queue: _QueueSpec) -> None:
        if queue.exclusive:
            await channel.queue_declare(name, durable=False, exclusive=True, auto_delete=True)
        else:
            await channel.queue_declare(
                name, durable=queue.durable, arguments=self._arguments(name, queue.durable, False)
            )
            await channel.queue_declare(
                name + ".dlq", durable=True, arguments=self._arguments(name, True, True)
            )
        for subject in queue.bindings:
            await channel.queue_bind(name, self.exchange, routing_key=subject)

    async def declare_queue(
        self,
        name: str,
        *,
        durable: bool,
        bindings: Sequence[str] = (),
        exclusive: bool = False,
    ) -> None:
        queue = _QueueSpec(durable, exclusive, list(bindings))
        try:
            channel = await self._channel("_control", f"declaring queue {name!r}")
            await self._declare(channel, name, queue)
        except KeelError:
            raise
        except _CLIENT_ERRORS as exc:
            raise _translate(exc, f"declaring queue {name!r}", self.url) from exc
        known = self._queues.get(name)
        if known is None:
            self._queues[name] = queue
        else:
            known.bindings.extend(s for s in bindings if s not in known.bindings)
        self._bindings_index = None

    async def delete_queue(self, name: str) -> None:
        self._queues.pop(name, None)
        self._bindings_index = None
        for consumer in [c for c in self._consumers if c.queue == name]:
            await consumer.cancel()
        try:
            channel = await self._channel("_control", f"deleting queue {name!r}")
            await channel.queue_delete(name)
            await self._delete_dlq_if_empty(name + ".dlq")
        except KeelError:
            raise
        except _CLIENT_ERRORS as exc:
            raise _translate(exc, f"deleting queue {name!r}", self.url) from exc

    async def _delete_dlq_if_empty(self, dlq: str) -> None:
        """Delete a deleted queue's dead-letter queue unless it holds dead letters (those
        are kept for someone to read; a warning names the queue). On a channel of its own:
        a passive declare of a missing queue closes the channel it runs on."""
        connection = await self._wait_ready(f"deleting queue {dlq!r}")
        channel = await connection.channel(publisher_confirms=False)
        try:
            try:
                ok = await channel.queue_declare(dlq, passive=True)
            except amqp_errors.ChannelNotFoundEntity:
                return
            if ok.message_count:
                log.warning(
                    "kept dead-letter queue %s: it holds %d messages", dlq, ok.message_count
                )
                return
            # Quorum queues refuse if-empty (with a connection error): checked just above.
            await channel.queue_delete(dlq, if_empty=self.queue_type != "quorum")
        finally:
            if not channel.is_closed:
                with contextlib.suppress(*_CLIENT_ERRORS):
                    await channel.close()

    def _check_size(self, body: bytes) -> None:
        check_size(body, self.max_message_bytes)

    async def publish_raw(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        *,
        durable: bool,
        headers: dict[str, Any] | None = None,
        content_type: str | None = None,
        content_encoding: str | None = None,
        mandatory: bool = False,
        confirm: bool | None = None,
    ) -> None:
        """Publish one message; with ``confirm`` (default: ``durable``) return only once the
        broker confirmed it. With ``mandatory`` (and ``confirm``) a message no queue took is
        `_Unroutable`."""
        confirm = durable if confirm is None else confirm
        where = f"exchange {exchange!r}, " if exchange else ""
        answer: object = None  # the broker's confirm frame
        for _ in range(2):  # once more on a fresh channel after a nack
            try:
                channel = await self._channel(
                    "_confirm" if confirm else "_plain",
                    f"publishing to {where}routing key {routing_key!r}",
                )
                if headers is None:
                    answer = await _amqp_publish.publish(
                        channel,
                        body,
                        exchange=exchange,
                        routing_key=routing_key,
                        delivery_mode=2 if durable else 1,
                        content_type=content_type,
                        content_encoding=content_encoding,
                        mandatory=mandatory and confirm,
                        timeout=self._publish_timeout,
                    )
                else:  # on a closed channel this waits no more than Keel's own publish
                    answer = await _amqp_publish.until_closed(
                        channel,
                        channel.basic_publish(
                            body,
                            exchange=exchange,
                            routing_key=routing_key,
                            properties=spec.Basic.Properties(
                                delivery_mode=2 if durable else 1,
                                headers=headers,
                                content_type=content_type,
                                content_encoding=content_encoding,
                            ),
                            timeout=self._publish_timeout,
                            mandatory=mandatory and confirm,
                        ),
                    )
            except KeelError:
                raise
            except amqp_errors.PublishError:
                raise _Unroutable(
                    f"no queue took the message for {routing_key!r} on {self.url.redacted()}: "
                    "declare the queue before sending"
                ) from None
            except amqp_errors.DeliveryError as exc:  # aiormq raises a nack
                answer = exc.frame
            except _CLIENT_ERRORS as exc:
                raise _translate(exc, f"publishing to {routing_key!r}", self.url) from exc
            if not confirm or isinstance(answer, spec.Basic.Ack):
                return
            if not self._retire_confirm(channel):
                break
        raise TransportError(
            f"RabbitMQ at {self.url.redacted()} did not accept a message for "
            f"{routing_key!r} ({type(answer).__name__}); retry later"
        )

    def _retire_confirm(self, channel: AbstractChannel) -> bool:
        """After a nack on ``channel``: the next confirmed publish opens a fresh channel
        (see the module docstring); False if one was opened too recently to try again now."""
        if self._confirm is channel:
            now = time.monotonic()
            if now - self._confirm_retired < _RETIRE_EVERY_S:
                return False
            self._confirm_retired = now
            self._confirm = None
            log.info("rabbitmq: a publish was nacked; confirming on a new channel")

            async def close_later() -> None:
                await asyncio.sleep(self._publish_timeout)  # its confirms are due by then
                if not channel.is_closed:
                    with contextlib.suppress(*_CLIENT_ERRORS, RuntimeError):
                        await channel.close()

            self.keep(asyncio.get_running_loop().create_task(close_later()))
        return True  # retired now, or by another publish meanwhile

    async def send(self, queue: str, body: bytes, *, durable: bool) -> None:
        self._check_size(body)
        await self.send_raw(queue, body, durable=durable)

    async def send_raw(
        self, queue: str, body: bytes, *, durable: bool, headers: dict[str, Any] | None = None
    ) -> None:
        """`send` without the size check (a dead letter is sent as it came)."""
        known = self._queues.get(queue)
        confirm = durable or (self.queue_type == "quorum" and known is not None and known.durable)
        options: dict[str, Any] = {
            "durable": durable,
            "headers": headers,
            "mandatory": True,
            "confirm": confirm,
        }
        try:
            await self.publish_raw("", queue, body, **options)
        except _Unroutable:
            # The queue is gone (deleted behind our back): declare it again if it is ours
            # to declare, and send once more; else the caller hears of it.
            if not await self._declare_again(queue):
                raise
            await self.publish_raw("", queue, body, **options)

    def _bound_to(self, subject: str) -> tuple[str, ...]:
        """The queues this transport bound to ``subject`` (an index rebuilt after a change
        of `_queues`: every durable publish asks)."""
        index = self._bindings_index
        if index is None:
            built: dict[str, list[str]] = {}
            for name, queue in self._queues.items():
                for bound in queue.bindings:
                    built.setdefault(bound, []).append(name)
            index = self._bindings_index = {k: tuple(v) for k, v in built.items()}
        return index.get(subject, ())

    async def _declare_again(self, queue: str) -> bool:
        """Declare a queue that vanished as this transport declared it (a ``.dlq`` as a
        dead-letter queue); False if it is not one this transport can declare."""
        known = self._queues.get(queue)
        action = f"declaring queue {queue!r} again"
        try:
            if known is not None:
                channel = await self._channel("_control", action)
                await self._declare(channel, queue, known)
            elif queue.endswith(".dlq"):
                channel = await self._channel("_control", action)
                base = queue.removesuffix(".dlq")
                await channel.queue_declare(
                    queue, durable=True, arguments=self._arguments(base, True, True)
                )
            else:
                return False
        except KeelError:
            raise
        except _CLIENT_ERRORS as exc:
            raise _translate(exc, action, self.url) from exc
        log.warning("queue %s was gone from %s: declared again", queue, self.url.redacted())
        return True

    async def publish(self, subject: str, body: bytes, *, durable: bool) -> None:
        self._check_size(body)
        # Mandatory only where this transport bound a queue to the subject: a subject with
        # no queue at all is no error (a fanout nobody listens to).
        bound = self._bound_to(subject) if durable else ()
        try:
            await self.publish_raw(
                self.exchange, subject, body, durable=durable, mandatory=bool(bound)
            )
        except _Unroutable:
            for name in bound:  # deleted behind our back: declare them again
                await self._declare_again(name)
            await self.publish_raw(self.exchange, subject, body, durable=durable, mandatory=True)

    async def publish_json(self, subject: str, body: bytes, *, durable: bool) -> None:
        """`publish` labelled ``application/json`` (kombu, hence oslo.messaging, needs it)."""
        self._check_size(body)
        await self.publish_raw(
            self.exchange,
            subject,
            body,
            durable=durable,
            content_type="application/json",
            content_encoding="utf-8",
        )

    async def consume(
        self, queue: str, handler: Handler, *, prefetch: int, auto_ack: bool = False
    ) -> _Consumer:
        connection = await self._wait_ready("consume")
        consumer = _Consumer(self, queue, handler, max(1, prefetch), auto_ack)
        try:
            await consumer.start(connection)
        except KeelError:
            raise
        except _CLIENT_ERRORS as exc:
            consumer.active = False
            await consumer._close_channel()
            raise _translate(exc, f"consuming from {queue!r}", self.url) from exc
        self._consumers.append(consumer)
        return consumer
