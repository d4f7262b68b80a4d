"""The NATS transport, ``nats://host:port``: JetStream for queues, core NATS for the rest.

Clusters: ``nats://h1:4222,h2:4223,h3:4224`` lists several servers of one cluster; the client
connects to one and fails over to the others (and to those the cluster announces) by itself.
Streams are created with ``replicas`` copies (URL option or keyword; by default 3 when the
server reports a cluster of three or more, as many as it has below that, 1 for a server in no
cluster, so that clients whose URLs list different servers agree; a default that differs
from an existing stream's takes the stream's, logged): an R3 stream keeps every
acknowledged message through the loss of any one server, and its Raft group elects a new
leader within a few seconds (sends in that window retry under their message id, below).
TLS and credentials (`keel._tls`): ``nats+tls://`` or ``tls=true`` turns
TLS on with the options ``ca``, ``cert``, ``key``, ``verify``; ``user:password@`` in the URL
logs in, or the option ``nkey`` (keyword ``nkey``, else ``KEEL_NATS_NKEY``): the path of a
file holding an nkey user seed (``SU...``, as ``nk -gen user`` writes it), named like
``ca``/``cert``/``key`` for the file it points to; the seed only signs the server's nonce
(nats-py's nkeys support, the ``nkeys`` package: ``pip install keel[nats]``) and never leaves
the file, so no URL, log line or error holds it. A refused certificate is `TLSError`, a
refused login (a wrong password, an nkey the server does not know) `CredentialsRejected`,
both from ``connect``; a missing or malformed seed file is a `ConfigError` from the
constructor.

Mapping of the Transport contract onto NATS (server 2.9, client nats-py):

* A shared queue (not ``exclusive``) is a durable JetStream pull consumer named after the
  queue. An unbound queue has its own work-queue stream ``KQ_<queue>`` on the subject
  ``keel.q.<queue>``: a message leaves it when acknowledged. A queue bound to a subject is a
  consumer (starting at its declaration) on the limits-retention stream ``KS_<subject>``, so
  every queue bound to the subject gets its own copy and the consumers of one queue
  compete; that stream keeps messages for ``subject_max_age`` (default 24 h), acknowledged
  or not. Interest retention would delete on ack, but NATS 2.9 acknowledges and then drops
  a publish that lands while a shutting-down server has already stopped its consumers, so
  it is not used. Names are escaped (``.`` and ``_`` become ``_2E`` and ``_5F``), so the
  mapping is deterministic and injective.
* The credit window (``prefetch``) is enforced by the puller: it asks the server for at most
  ``prefetch - unsettled`` messages at a time (``max_ack_pending`` is per JetStream consumer,
  i.e. shared by every server of a queue, so it is only a high safety cap). ``ack`` is
  ``+ACK``, ``requeue`` is ``-NAK`` (immediate redelivery to any consumer), ``dead_letter``
  publishes the body with a ``Keel-Dead-Letter-Reason`` header to ``<queue>.dlq`` (waiting
  for the JetStream ack) and then ``+TERM``s the original. ``delivery_count`` is
  JetStream's ``num_delivered``.
* Every queue also has a core subject ``keel.c.<queue>``. An ``exclusive`` queue (reply
  queues, fanout queues) is only that: a core subscription on it and on its bindings,
  at-most-once, gone with the connection, no broker state. The consumers of a shared,
  unbound queue also subscribe to it in one queue group (named after the queue), so they
  compete for core messages too; these count against the same credit window (core NATS has
  no credit: what arrives beyond it waits in the consumer, unseen by the core, and is sent
  on again if the consumer is cancelled first; past 4096 such messages, or 8 x
  ``max_message_bytes`` of them, a flood goes to the queue's stream instead, to be pulled
  with credit, so no publisher grows a consumer's memory). nats-py's own queue per core
  subscription is bounded at 16 x ``max_message_bytes`` (its default is 128 MiB): past it the
  client drops what arrives (a slow consumer; at most once, as core NATS promises).
* ``send`` with ``durable=False`` (calls, replies) is a core publish to ``keel.c.<queue>``
  with a private reply subject: a consumer of the queue takes it at once (no store, no ack:
  the contract acknowledges a call when it starts anyway, so at-most-once loses nothing it
  promised). With no consumer subscribed, the server answers 503 "no responders" and the
  message is published to the queue's stream, where it waits for a server (or for its
  deadline). A consumer cancelled with core messages in flight hands them back the same
  way; requeue of a core message is such a send. A call lost with the broker or with a
  killed server surfaces as `CallTimeout`. This keeps calls at core NATS speed; through
  JetStream (store, pull, ack) they ran at about half the rate of raw nats-py.
* ``send``/``publish`` with ``durable=True`` (casts, notifications, dead letters) wait for
  the JetStream publish ack (the message is in the stream's file store) and retry under one
  ``Nats-Msg-Id`` until ``publish_timeout`` (default 10 s), so a retry across a reconnect is
  stored once; then they raise `TransportError`. ``publish`` with ``durable=False``
  (fanout, presence) is a core publish.
* A durable queue has at most one binding (one consumer filter on NATS 2.9), and a queue
  with a binding receives only what is published to that subject: ``send`` to it publishes
  to its subject. ``publish`` to a subject no stream captures is dropped, as on AMQP.

Failure semantics:

* Connection loss: nats-py reconnects with backoff and restores core subscriptions; this
  transport then replays its declarations (streams, consumers) and re-issues its pull
  requests. Deliveries taken before the loss can still be settled afterwards.
* Consumer crash (process killed): its unsettled messages are redelivered once
  ``ack_wait`` (default 10 s) passes; a live consumer keeps long-running deliveries alive
  with ``+WPI`` every ``ack_wait / 3``. ``cancel`` stops pulling; ``close`` naks what is
  unsettled so it is redelivered at once.
* A queue deleted under its users (an operator's ``nats stream rm``, another connection's
  ``delete_queue``): its pullers hear "Consumer Deleted" (or nothing, then re-ask), and a
  durable send or publish of a connection that declared it hears "no stream"; either
  declares it again after `_REDECLARE_PAUSE_S` (see there why not at once), one declaration
  per queue. A bound queue's consumer starts again after its `_Stream.floor`.
* Broker restart: the streams are file-backed, so everything acknowledged to a sender is
  still there; an ack from a consumer lost in the restart means a redelivery (at-least-once).
  The server writes each message before it acks it but fsyncs on its own interval (NATS 2.9:
  every 2 minutes), so a machine crash, unlike a process crash, can lose recent messages.

Options (URL query): ``max_message_bytes`` (default 1 MiB), ``ack_wait``, ``publish_timeout``,
``connect_timeout`` (seconds, default 10), ``subject_max_age`` (seconds), ``replicas``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import logging
import math
import os
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, RetentionPolicy, StorageType

from keel._tls import TLS_OPTIONS, TLSConfig, credentials_rejected, tls_config, tls_failure
from keel.errors import ConfigError, KeelError, MessageTooLarge, TransportError
from keel.messaging.transports.base import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_MAX_MESSAGE_BYTES,
    Handler,
    check_size,
    observe,
    positive_seconds,
)
from keel.urls import URL

log = logging.getLogger("keel.messaging.nats")

_ACK, _NAK, _TERM, _WPI = b"+ACK", b"-NAK", b"+TERM", b"+WPI"
_REASON_HEADER = "Keel-Dead-Letter-Reason"
_PULL_EXPIRES_NS = 30 * 1_000_000_000  # a long poll; the server answers 408 when it ends
# While a pull request waits, the consumer's leader sends an idle heartbeat (status 100) this
# often. A request held by a leader that died gets no 408, ever: a puller that has heard
# nothing for `_PULL_SILENT_BEATS` heartbeats takes its requests for dead and asks again.
_PULL_HEARTBEAT_S = 1.0
_PULL_SILENT_BEATS = 3
# A pull refused with 409 (the consumer's waiting list full, a leadership change, the
# consumer deleted) is asked again after this pause, doubling up to the maximum: at once,
# a full waiting list had the puller send thousands of refused requests a second.
_PULL_REFUSED_PAUSE_S = 0.05
_PULL_REFUSED_PAUSE_MAX_S = 2.0
_MAX_ACK_PENDING = 100_000  # per queue across all its consumers; credit is per puller
_AUTO_ACK_WINDOW = 256
_BACKLOG_LIMIT = 4096  # core messages a busy consumer holds beyond its credit
_BACKLOG_BODIES = 8  # ... and at most this many max_message_bytes of them
# What nats-py may queue for one core subscription before it drops (a slow consumer): its
# default, 128 MiB per subscription, would let one publisher's flood grow every consumer.
_PENDING_BODIES = 16  # in max_message_bytes
_SWEEP_INTERVAL = 1.0
# How long a cancelled consumer keeps handing back what the server routed to it before its
# UNSUB (see `_Puller._retire`): the server writes such a message microseconds after the
# UNSUB's PONG, later only when its goroutine is starved of CPU.
_STRAGGLER_WINDOW = 0.25
# A queue deleted under this transport is declared again only after this pause. nats-server
# 2.9 answers a stream's deletion (and tells its pull requests "Consumer Deleted") before it
# has removed the stream's files: a stream made again at once lost its block file (every
# publish then 503, err_code 10077, "error opening msg block file") or acked messages its
# consumer never delivered, in 5 of 6 tries; after 0.25 s, 0.5 s or 1 s, 0 of 16.
_REDECLARE_PAUSE_S = 0.5
_PLAIN = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-")


_FOREIGN = (nats.errors.Error, OSError, TimeoutError)


def _translate(exc: BaseException, what: str) -> KeelError:
    """The one place where nats-py (and socket) exceptions become keel.errors."""
    if isinstance(exc, nats.errors.MaxPayloadError):
        return MessageTooLarge(f"NATS {what}: message over the server's max_payload")
    return TransportError(f"NATS {what} failed: {str(exc) or type(exc).__name__}")


# JetStream: "stream name already in use with a different configuration"
_STREAM_NAME_IN_USE = 10058


@contextlib.contextmanager
def _mapped(what: str) -> Iterator[None]:
    try:
        yield
    except KeelError:
        raise
    except _FOREIGN as exc:
        raise _translate(exc, what) from exc


def _token(text: str) -> str:
    """A JetStream name for a subject or queue name: injective escaping, bounded length."""
    # Byte-wise, fixed-width escapes of the UTF-8 form: distinct names stay distinct.
    out = "".join(chr(b) if chr(b) in _PLAIN else f"_{b:02X}" for b in text.encode())
    if len(out) > 200:
        out = out[:160] + "_H" + hashlib.sha256(text.encode()).hexdigest()[:32]
    return out


def _address(queue: str) -> str:
    return f"keel.q.{queue}"


def _call_subject(queue: str) -> str:
    """Core NATS subject of a queue: its exclusive consumer or its shared consumers' group."""
    return f"keel.c.{queue}"


@dataclass(slots=True)
class _Stream:
    """A shared queue as declared: its consumer on the stream of its address subject."""

    stream: str
    consumer: str
    address: str
    durable: bool
    # A bound queue (a KS_ stream keeps what is published to its subject whatever consumes
    # it): the highest stream sequence known to be past for this queue, so a consumer made
    # again after a deletion starts after it, not at "new" (which would skip what was
    # published, and confirmed, while the queue was gone).
    floor: int = 0


class _Delivery:
    __slots__ = ("_msg", "_puller", "_settled")

    def __init__(self, puller: _Puller, msg: Msg, settled: bool = False) -> None:
        self._puller = puller
        self._msg = msg
        self._settled = settled

    @property
    def body(self) -> bytes:
        return self._msg.data

    @property
    def delivery_count(self) -> int:
        try:
            return int(self._msg.metadata.num_delivered)
        except (ValueError, IndexError, nats.errors.Error):
            return 1

    @property
    def settled(self) -> bool:
        return self._settled

    @property
    def dead_letter_reason(self) -> str | None:
        headers = self._msg.headers
        return headers.get(_REASON_HEADER) if headers else None

    async def _settle(self, verdict: bytes) -> None:
        if self._settled:
            return
        self._settled = True
        puller = self._puller
        transport = puller.transport
        transport.in_flight.discard(self)
        try:
            if not transport.closed:
                with _mapped("settle"):
                    await transport.nc.publish(self._msg.reply, verdict)
        finally:
            # Its credit comes back even when the verdict could not be sent (nats-py's
            # reconnect buffer full during a failover): the server redelivers an unacked
            # message after ack_wait, but a delivery kept here would hold one unit of credit
            # for good, and a prefetch's worth of them stopped the consumer for good.
            await puller.settled(self)

    async def ack(self) -> None:
        await self._settle(_ACK)

    async def requeue(self) -> None:
        await self._settle(_NAK)

    async def dead_letter(self, reason: str) -> None:
        if self._settled:
            return
        try:
            await self._puller.transport.dead_letter(self._puller.queue, self.body, reason)
        except KeelError:
            # Not in the DLQ: hand it back rather than hold it (and its credit) forever.
            with contextlib.suppress(KeelError):
                await self._settle(_NAK)
            raise
        await self._settle(_TERM)


class _Puller:
    """One ``consume`` on a shared queue: pull requests sized by free credit."""

    def __init__(
        self, transport: NatsTransport, queue: str, handler: Handler, prefetch: int, auto_ack: bool
    ) -> None:
        self.transport = transport
        self.queue = queue
        self.handler = handler
        self.prefetch = prefetch
        self.auto_ack = auto_ack
        self.unsettled: set[_Delivery | _CoreDelivery] = set()
        self.requested = 0  # messages asked for and not yet delivered or expired
        self.active = True
        self.inbox = transport.nc.new_inbox()
        self._sub: Subscription | None = None
        self._calls: Subscription | None = None
        self._backlog: deque[Msg] = deque()
        self._backlog_bytes = 0
        self._loop = asyncio.get_running_loop()
        self._heard = self._loop.time()  # the last answer on the inbox (or the last request)
        self._refused_pause = 0.0  # after a 409: the pause before the next pull
        self._resume_at = 0.0  # no pull before this (loop time)
        self._silent_asks = 0  # re-asks since the inbox last heard anything
        self._last_batch = 0  # the size of the last pull request
        declared = transport.streams.get(queue)
        # A bound queue's declaration, whose floor this puller moves (see _Stream.floor).
        self.bound = declared if declared is not None and declared.stream[:3] == "KS_" else None

    async def start(self, call_subject: str | None) -> None:
        nc = self.transport.nc
        self._sub = await nc.subscribe(self.inbox, cb=self._on_msg)
        if call_subject is not None:
            # Competing consumers of the queue's core subject: one queue group per queue.
            self._calls = await nc.subscribe(
                call_subject,
                queue=call_subject,
                cb=self._on_call,
                pending_bytes_limit=self.transport.pending_bytes,
            )
            await self.transport.subscribed()
        await self.refill()

    async def _on_call(self, msg: Msg) -> None:
        if not self.active:
            # Routed here before the cancel reached the server: hand it to another consumer.
            with contextlib.suppress(KeelError):
                await self.transport.send(self.queue, msg.data, durable=False)
            return
        if len(self.unsettled) >= self.prefetch:
            limit = _BACKLOG_BODIES * self.transport.max_message_bytes
            if len(self._backlog) >= _BACKLOG_LIMIT or self._backlog_bytes > limit:
                # A flood (a hostile publisher's, too) waits in the queue's stream, pulled
                # with credit, instead of in this process's memory.
                with contextlib.suppress(nats.errors.Error):
                    await self.transport.nc.publish(_address(self.queue), msg.data)
                return
            # Core NATS has no credit: keep it here, unseen by the core, until credit frees.
            self._backlog.append(msg)
            self._backlog_bytes += len(msg.data)
            return
        self._hand_over(msg)

    def _hand_over(self, msg: Msg) -> None:
        delivery = _CoreDelivery(self.transport, self.queue, msg, self)
        # Counted against the credit window, so a busy consumer pulls fewer stored messages.
        self.unsettled.add(delivery)
        self.handler(delivery)

    async def settled(self, delivery: _Delivery | _CoreDelivery) -> None:
        self.unsettled.discard(delivery)
        if not self.active and not self.unsettled:
            self.transport.pullers.discard(self)  # cancelled, and nothing left to keep alive
        if self._backlog and self.active:
            self._hand_over(self._take_backlog())
            return
        # Checked first: every settlement (every call's ack) passes here, and most have
        # nothing to pull, so they skip the coroutine and the suppress block.
        if self._wants_pull():
            # A failed pull is not this delivery's failure: the reconnect replay pulls again.
            with contextlib.suppress(KeelError):
                await self.refill()

    def _wants_pull(self) -> bool:
        if not self.active or not self.transport.nc.is_connected:
            return False
        if self._resume_at and self._loop.time() < self._resume_at:
            return False
        free = self.prefetch - len(self.unsettled) - self.requested
        # Ask in batches of at least half the window while a request is outstanding: one
        # pull request per message would double the traffic of a busy queue.
        return free > 0 and not (self.requested and free < max(1, self.prefetch // 2))

    async def refill(self) -> None:
        if not self._wants_pull():
            return
        free = self.prefetch - len(self.unsettled) - self.requested
        declared = self.transport.streams.get(self.queue)
        if declared is None:
            return
        self.requested += free
        self._last_batch = free
        self._heard = self._loop.time()
        request = json.dumps(
            {
                "batch": free,
                "expires": _PULL_EXPIRES_NS,
                "idle_heartbeat": int(_PULL_HEARTBEAT_S * 1_000_000_000),
            }
        ).encode()
        with _mapped(f"pull from {self.queue!r}"):
            await self.transport.nc.publish(
                f"$JS.API.CONSUMER.MSG.NEXT.{declared.stream}.{declared.consumer}",
                request,
                reply=self.inbox,
            )

    def silent(self) -> bool:
        """Outstanding pull requests fell silent: no heartbeat for `_PULL_SILENT_BEATS`."""
        silence = _PULL_HEARTBEAT_S * _PULL_SILENT_BEATS
        return bool(self.active and self.requested) and self._loop.time() - self._heard >= silence

    async def ask_again_if_silent(self, asked: float) -> None:
        """Ask again when outstanding pull requests fell silent (their server is gone: a
        stream leader killed, say). Without this the queue's last messages waited for a
        request that nobody held any more: a listener stalled after a leader loss. Called
        by the transport's keep-alive tick (`NatsTransport._ask_silent_pulls_again`) after a
        round trip begun at ``asked``: heard from since, the request is alive."""
        if self._heard >= asked or not self.silent():
            return
        self._silent_asks += 1
        log.info(
            "pull on %s went silent for %.1fs: asking again",
            self.queue, _PULL_HEARTBEAT_S * _PULL_SILENT_BEATS,
        )  # fmt: skip
        self.requested = 0
        if self._silent_asks > 1:
            # Asked again once and still nothing: no 503 comes for a consumer that is gone
            # (deleted while no request of ours waited to hear its 409). Declare it again,
            # off this tick (a cluster electing its meta leader answers late; +WPI must not
            # wait for it).
            self.transport._spawn(self._declare_again())
        with contextlib.suppress(KeelError):
            await self.refill()

    async def _declare_again(self) -> None:
        if not self.active:
            return
        try:
            if not await self.transport.declare_again(self.queue):
                return
        except KeelError as exc:
            log.info("queue %s: declaring its consumer again failed: %s", self.queue, exc)
            return
        with contextlib.suppress(KeelError):
            await self.refill()

    def _refused(self) -> None:
        """A 409: pull again after a pause (doubling), not at once."""
        pause = min(max(self._refused_pause * 2, _PULL_REFUSED_PAUSE_S), _PULL_REFUSED_PAUSE_MAX_S)
        self._refused_pause = pause
        self._resume_at = self._loop.time() + pause
        self._loop.call_later(pause, self._resume)

    def _resume(self) -> None:
        self._resume_at = 0.0
        if self._wants_pull():
            self.transport._spawn(self._refill_quietly())

    async def _refill_quietly(self) -> None:
        with contextlib.suppress(KeelError):
            await self.refill()

    async def _on_msg(self, msg: Msg) -> None:
        self._heard = self._loop.time()
        self._silent_asks = 0
        headers = msg.headers
        if headers and "Status" in headers:
            if self._on_status(headers) == "409":
                self._refused()
                if headers.get("Description", "").lower() == "consumer deleted":
                    self.transport._spawn(self._declare_again())
                return
            with contextlib.suppress(KeelError):
                await self.refill()
            return
        self._refused_pause = 0.0
        self.requested = max(0, self.requested - 1)
        if self.bound is not None:
            with contextlib.suppress(nats.errors.Error, ValueError, IndexError):
                self.bound.floor = max(self.bound.floor, msg.metadata.sequence.stream)
        if not self.active:
            # A pull answered after cancel: hand it straight back for another consumer.
            with contextlib.suppress(nats.errors.Error):
                await self.transport.nc.publish(msg.reply, _NAK)
            return
        if self.auto_ack:
            try:
                await self.transport.nc.publish(msg.reply, _ACK)
            except nats.errors.Error:
                pass  # not acked, so not handed over: the server sends it again after ack_wait
            else:
                self.handler(_Delivery(self, msg, settled=True))
            # Whatever the ack did: a puller that stops asking here has nothing left to wake it.
            await self._refill_quietly()
            return
        delivery = _Delivery(self, msg)
        self.unsettled.add(delivery)
        self.transport.in_flight.add(delivery)
        self.handler(delivery)
        if not self.requested and self._wants_pull():
            # The last outstanding request is filled while credit is free (settlements
            # did not reach the batch threshold meanwhile): ask now, not at the next ack.
            with contextlib.suppress(KeelError):
                await self.refill()

    def _on_status(self, headers: dict[str, str]) -> str:
        status = headers.get("Status", "")
        if status == "100":  # idle heartbeat
            return status
        pending = headers.get("Nats-Pending-Messages")
        if pending:  # 408 (expired) and some 409s: the unfilled part of that request is gone
            self.requested = max(0, self.requested - int(pending))
        elif headers.get("Description", "").startswith("Exceeded"):
            # A limit (MaxWaiting, MaxRequestBatch...) refused the request just sent, at once;
            # the ones before it still wait.
            self.requested = max(0, self.requested - self._last_batch)
        else:  # the consumer deleted, its leader changed: every outstanding request is gone
            self.requested = 0
        if status == "409" and self._refused_pause == 0.0:  # the first of a run, not each
            log.info("pull on %s ended: %s", self.queue, headers.get("Description", ""))
        return status

    def reset(self) -> None:
        """After a reconnect: outstanding pull requests died with the old connection."""
        self.requested = 0

    async def cancel(self) -> None:
        if not self.active:
            return
        self.active = False
        if not self.unsettled:
            # Else it stays listed until its deliveries are settled: close() hands them back.
            self.transport.pullers.discard(self)
        # Dropping interest makes the server drop our waiting pull requests; what it routed
        # here before comes back to the callbacks, which hand it to another consumer.
        subs = [sub for sub in (self._calls, self._sub) if sub is not None]
        if subs and not self.transport.closed:
            await asyncio.gather(*(self._retire(sub) for sub in subs))
        while self._backlog and not self.transport.closed:
            with contextlib.suppress(KeelError):
                await self.transport.send(self.queue, self._take_backlog().data, durable=False)

    async def _retire(self, sub: Subscription) -> None:
        """Unsubscribe without losing what the server still routes here.

        nats-py's own ``drain`` (UNSUB, one round trip, then forget the subscription) is not
        enough: nats-server 2.9 may write a message it matched before it processed the
        UNSUB after its PONG; nats-py then drops it for an unknown subscription, and a core
        call is lost (its caller times out; a pulled message waits ``ack_wait``). So the
        subscription keeps its callback (which hands everything back) for
        `_STRAGGLER_WINDOW` after the UNSUB's round trip, and only then is drained.
        """
        nc = self.transport.nc
        try:
            if not nc.is_connected:
                raise nats.errors.ConnectionReconnectingError
            unsubscribe: Callable[[int], Awaitable[None]] = nc._send_unsubscribe  # sid stays
            await unsubscribe(sub._id)
            await nc.flush()
            await asyncio.sleep(_STRAGGLER_WINDOW)
            drain: Callable[[], Awaitable[None]] = sub.drain  # untyped in nats-py
            await drain()  # a second UNSUB (ignored), a round trip, the callbacks' queue
        except (nats.errors.Error, OSError):
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()

    def _take_backlog(self) -> Msg:
        msg = self._backlog.popleft()
        self._backlog_bytes -= len(msg.data)
        return msg


class _CoreDelivery:
    """A core NATS message (a call, a reply, a fanout): at-most-once, nothing to ack."""

    __slots__ = ("_msg", "_puller", "_queue", "_settled", "_transport")

    def __init__(
        self,
        transport: NatsTransport,
        queue: str,
        msg: Msg,
        puller: _Puller | None = None,
        *,
        settled: bool = False,
    ) -> None:
        self._transport = transport
        self._queue = queue
        self._msg = msg
        self._puller = puller
        self._settled = settled

    @property
    def body(self) -> bytes:
        return self._msg.data

    @property
    def delivery_count(self) -> int:
        return 1

    @property
    def settled(self) -> bool:
        return self._settled

    @property
    def dead_letter_reason(self) -> str | None:
        return None

    async def _settle(self) -> bool:
        if self._settled:
            return False
        self._settled = True
        if self._puller is not None:
            await self._puller.settled(self)
        return True

    async def ack(self) -> None:
        await self._settle()

    async def requeue(self) -> None:
        if await self._settle() and not self._transport.closed:
            await self._transport.send(self._queue, self._msg.data, durable=False)

    async def dead_letter(self, reason: str) -> None:
        if await self._settle():
            await self._transport.dead_letter(self._queue, self._msg.data, reason)


class _CoreConsumer:
    def __init__(
        self, transport: NatsTransport, queue: str, handler: Handler, auto_ack: bool
    ) -> None:
        self.transport = transport
        self.queue = queue
        self.handler = handler
        self.auto_ack = auto_ack
        self.subs: list[Subscription] = []

    async def _on_msg(self, msg: Msg) -> None:
        # auto_ack (replies, fanout): at most once, nothing for the core to settle.
        self.handler(_CoreDelivery(self.transport, self.queue, msg, settled=self.auto_ack))

    async def start(self, subjects: Sequence[str]) -> None:
        for subject in subjects:
            with _mapped(f"subscribe to {subject!r}"):
                self.subs.append(
                    await self.transport.nc.subscribe(
                        subject, cb=self._on_msg, pending_bytes_limit=self.transport.pending_bytes
                    )
                )
        await self.transport.subscribed()

    async def cancel(self) -> None:
        subs, self.subs = self.subs, []
        self.transport.core_consumers.discard(self)
        if self.transport.closed:
            return
        for sub in subs:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()


async def _abandon(consumer: _Puller | _CoreConsumer) -> None:
    """Undo a consume that failed part way: its subscriptions made before the failure (a
    flush that timed out) would go on calling a handler its caller never got."""
    with contextlib.suppress(KeelError, nats.errors.Error):
        await consumer.cancel()


def _nkey_seed_file(url: URL, path: str | None) -> tuple[str | None, str | None]:
    """The nkey seed file to log in with, checked now (readable, a user seed), and the
    public key it signs for (for error messages; the seed itself is never kept)."""
    if path is None:
        return None, None
    if url.username is not None:
        raise ConfigError(
            f"{url.redacted()}: give either user:password@ or nkey=, not both "
            "(NATS logs in one way)"
        )
    try:
        import nkeys  # noqa: PLC0415 - only for nkey logins
    except ImportError:
        raise ConfigError(
            "nkey= needs the nkeys package (pip install 'keel[nats]', or nats-py[nkeys])"
        ) from None
    try:
        with open(path, "rb") as f:
            seed = bytearray(f.read(4096).strip())
    except OSError as exc:
        raise ConfigError(f"NATS option nkey={path}: cannot read it ({exc.strerror})") from None
    malformed = ConfigError(
        f"NATS option nkey={path}: not an nkey user seed (one line starting with SU)"
    )
    try:
        pair = nkeys.from_seed(seed) if seed.startswith(b"SU") else None
        public = bytes(pair.public_key).decode() if pair is not None else None
        if pair is not None:
            pair.wipe()
    except Exception:  # nkeys raises its own errors and binascii's; none may echo the seed
        public = None
    finally:
        seed[:] = bytes(len(seed))
    if public is None:
        raise malformed
    return path, public


class NatsTransport:
    """A NATS connection. See the module docstring for the mapping and what it keeps."""

    URL_OPTIONS = frozenset(
        {
            "max_message_bytes",
            "ack_wait",
            "publish_timeout",
            "connect_timeout",
            "subject_max_age",
            "replicas",
            "nkey",
            *TLS_OPTIONS,
        }
    )

    def __init__(
        self,
        url: URL,
        *,
        max_message_bytes: int | None = None,
        ack_wait: float | None = None,
        publish_timeout: float | None = None,
        connect_timeout: float | None = None,
        replicas: int | None = None,
        tls: bool | None = None,
        ca: str | None = None,
        cert: str | None = None,
        key: str | None = None,
        verify: str | None = None,
        nkey: str | None = None,
    ) -> None:
        self.url = url
        options = url.options
        # The variable fills only what the URL leaves out: a URL's password login wins.
        env = os.environ.get("KEEL_NATS_NKEY") if url.username is None else None
        self.nkey, self.nkey_public = _nkey_seed_file(
            url, nkey or options.get("nkey") or env or None
        )
        self._tls: TLSConfig | None = tls_config(
            url,
            {"tls": tls, "ca": ca, "cert": cert, "key": key, "verify": verify},
            secure_scheme=url.scheme == "nats+tls",
        )
        try:
            given = replicas or options.get("replicas")
            # Without ``replicas`` the cluster decides, once connected (`_cluster_replicas`).
            self._replicas_given = given is not None
            self.replicas = int(given) if given else min(3, len(url.hosts) or 1)
            self.max_message_bytes = max_message_bytes or int(
                options.get("max_message_bytes", DEFAULT_MAX_MESSAGE_BYTES)
            )
            self.ack_wait = ack_wait or float(options.get("ack_wait", 10.0))
            self.publish_timeout = publish_timeout or float(options.get("publish_timeout", 10.0))
            self.subject_max_age = float(options.get("subject_max_age", 86400.0))
        except ValueError as exc:
            raise ConfigError(f"bad option in {url.redacted()}: {exc}") from None
        self.connect_timeout = positive_seconds(
            connect_timeout or options.get("connect_timeout", DEFAULT_CONNECT_TIMEOUT),
            "connect_timeout",
            url,
        )
        self.pending_bytes = _PENDING_BODIES * self.max_message_bytes
        self.slow_consumer_drops = 0
        self.nc = Client()
        self.js = self.nc.jetstream(timeout=5.0)
        self.streams: dict[str, _Stream] = {}
        self.exclusive: dict[str, list[str]] = {}
        self.pullers: set[_Puller] = set()
        # JetStream deliveries handed over and not settled, whoever consumed them (a cancelled
        # puller's too): each is kept alive with +WPI until it is settled.
        self.in_flight: set[_Delivery] = set()
        self.core_consumers: set[_CoreConsumer] = set()
        self.closed = False
        self._tasks: set[asyncio.Task[None]] = set()
        # Core sends awaiting a possible "no responders" (503): reply token -> (queue, body).
        # Two generations, swapped every sweep, so an entry lives one to two intervals.
        self._unanswered: dict[str, tuple[str, bytes]] = {}
        self._unanswered_old: dict[str, tuple[str, bytes]] = {}
        self._refusals = ""
        self._tokens = itertools.count()
        self._refused: asyncio.Future[KeelError] | None = None
        self._redeclaring: dict[str, asyncio.Future[None]] = {}

    # --- connection ----------------------------------------------------------------------

    async def connect(self) -> None:
        scheme = "tls" if self._tls is not None else "nats"
        servers = [f"{scheme}://{where}" for where in self.url.endpoints(4222)]
        loop = asyncio.get_running_loop()
        # nats-py retries a first connect forever; a refused certificate or login (seen by
        # the error callback) ends it at once instead, as a typed error.
        self._refused = loop.create_future()
        connecting = loop.create_task(
            self.nc.connect(
                servers=servers,
                name="keel",
                user=self.url.username,
                password=self.url.password,
                nkeys_seed=self.nkey,
                tls=self._tls.context() if self._tls is not None else None,
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.5,  # type: ignore[arg-type]  # a float works
                connect_timeout=min(2.0, self.connect_timeout),  # type: ignore[arg-type]
                reconnected_cb=self._on_reconnected,
                disconnected_cb=self._on_disconnected,
                error_cb=self._on_error,
            )
        )
        waiting: list[asyncio.Future[object]] = [connecting, self._refused]  # type: ignore[list-item]
        done, _ = await asyncio.wait(
            waiting,
            timeout=self.connect_timeout,
            return_when=asyncio.FIRST_COMPLETED,
        )
        refused, self._refused = self._refused, None
        if connecting not in done:
            connecting.cancel()
            with contextlib.suppress(asyncio.CancelledError, *_FOREIGN):
                await connecting
            await self.nc.close()
            if refused in done:
                raise refused.result()
            raise TransportError(
                f"cannot reach NATS at {self.url.redacted()} within {self.connect_timeout}s"
            )
        refused.cancel()
        with _mapped(f"connect to {self.url.redacted()}"):
            connecting.result()
        if not self._replicas_given:
            self.replicas = self._cluster_replicas()
        self.closed = False
        self._refusals = self.nc.new_inbox()
        with _mapped("subscribe"):
            await self.nc.subscribe(self._refusals + ".*", cb=self._on_refused)
        self._spawn(self._keep_alive())

    def _cluster_replicas(self) -> int:
        """The default stream replicas from the server, not the URL: clients whose URLs list
        different numbers of servers of one cluster must pick the same (issue 19: the second
        to declare a queue failed "stream name already in use with a different
        configuration"). 3 in a cluster of three or more servers, as many as it has below
        that, 1 for a server in no cluster; the URL's count if the server does not say."""
        info = self.nc._server_info or {}
        if not info.get("cluster"):
            return 1
        members = {str(u) for u in info.get("connect_urls") or ()}
        return min(3, len(members)) if members else self.replicas

    def _spawn(self, coro: Coroutine[object, object, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        observe(task, log)

    def _refusal(self, exc: BaseException) -> KeelError | None:
        """A refused certificate or login: retrying the same will not mend it."""
        server = self.url.redacted()
        failed = tls_failure(exc, backend="NATS", server=server)
        if failed is not None:
            return failed
        if isinstance(exc, nats.errors.AuthorizationError) or (
            "authorization violation" in str(exc).lower()
        ):
            if self.nkey is not None:
                return credentials_rejected(
                    backend="NATS",
                    server=server,
                    user=None,
                    detail=f"nkey {self.nkey_public} from nkey={self.nkey}",
                    advice="the server does not list that nkey: check the seed file",
                )
            return credentials_rejected(backend="NATS", server=server, user=self.url.username)
        return None

    async def _on_error(self, exc: Exception) -> None:
        if isinstance(exc, nats.errors.SlowConsumerError):
            # A core subscription's queue is full (a flood): nats-py dropped the message.
            self.slow_consumer_drops += 1
            if self.slow_consumer_drops % 1000 == 1:
                log.warning(
                    "nats: dropped core messages to %s, a consumer too slow for a flood "
                    "(%d dropped so far)",
                    exc.subject,
                    self.slow_consumer_drops,
                )
            return
        refused = self._refusal(exc)
        if refused is None:
            log.debug("nats: %s", type(exc).__name__)
            return
        if self._refused is not None:  # connecting: connect raises it
            if not self._refused.done():
                self._refused.set_result(refused)
        else:  # after a reconnect: nats-py keeps trying; say why it fails
            log.warning("nats: %s", refused)

    async def _on_disconnected(self) -> None:
        if not self.closed:
            log.warning("nats: disconnected from %s; reconnecting", self.url.redacted())

    async def _on_reconnected(self) -> None:
        log.info("nats: reconnected to %s; replaying declarations", self.url.redacted())
        self._spawn(self._replay())

    async def _replay(self) -> None:
        """Re-declare every stream and consumer, then re-issue the pull requests."""
        delay = 0.1
        while not self.closed:
            try:
                for queue, declared in list(self.streams.items()):
                    await self._ensure(queue, declared)
                break
            except KeelError as exc:
                log.info("nats: replay failed (%s); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
        for puller in list(self.pullers):
            puller.reset()
            with contextlib.suppress(KeelError):
                await puller.refill()

    async def _ask_silent_pulls_again(self) -> None:
        silent = [puller for puller in self.pullers if puller.silent()]
        if not silent:
            return
        # After the loop stalled (a handler that blocked it) heartbeats of live requests may
        # wait unread in the socket, and this tick wakes before the reader: asking again on
        # top of a live request gave a listener more than its prefetch. One round trip first
        # reads what came before it; a puller heard from since is left alone.
        asked = asyncio.get_running_loop().time()
        with contextlib.suppress(nats.errors.Error, OSError):
            await self.nc.flush(timeout=math.ceil(_PULL_HEARTBEAT_S * _PULL_SILENT_BEATS))
        for _ in range(3):  # the subscriptions' own tasks hand what was read to the pullers
            await asyncio.sleep(0)
        for puller in silent:
            await puller.ask_again_if_silent(asked)

    async def _keep_alive(self) -> None:
        """Forget core sends nobody refused; ask again for pulls gone silent; tell the server
        slow deliveries live (+WPI)."""
        last_wpi = last_sweep = time.monotonic()
        # Wake often enough to send +WPI several times per ack_wait, however short it is.
        tick = min(_SWEEP_INTERVAL, self.ack_wait / 4)
        while not self.closed:
            await asyncio.sleep(tick)
            now = time.monotonic()
            if now - last_sweep >= _SWEEP_INTERVAL:
                # A 503 comes back within a round trip; anything older was taken by someone.
                last_sweep = now
                self._unanswered, old = {}, self._unanswered
                self._unanswered_old = old
            await self._ask_silent_pulls_again()
            if now - last_wpi < self.ack_wait / 3 or not self.nc.is_connected:
                continue
            last_wpi = now
            # Every unsettled delivery, its consumer cancelled (a draining server) or not.
            for delivery in list(self.in_flight):
                with contextlib.suppress(nats.errors.Error, OSError):
                    await self.nc.publish(delivery._msg.reply, _WPI)

    async def close(self) -> None:
        if self.closed:
            return
        pullers = list(self.pullers)
        # At once, not one after another: each keeps handing back stragglers for a while.
        await asyncio.gather(*(puller.cancel() for puller in pullers))
        for puller in pullers:
            for delivery in list(puller.unsettled):
                # One that cannot be handed back (a reconnect's buffer full, the connection
                # closed under us) comes back after ack_wait: close still closes.
                with contextlib.suppress(KeelError):
                    await delivery.requeue()
        for consumer in list(self.core_consumers):
            await consumer.cancel()
        self.closed = True
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(nats.errors.Error, OSError, TimeoutError):
            await self.nc.flush(timeout=2)
        await self.nc.close()

    def _check_open(self) -> None:
        if self.closed or self.nc.is_closed:
            raise TransportError(f"transport {self.url.redacted()} is closed")

    # --- queues --------------------------------------------------------------------------

    async def declare_queue(
        self,
        name: str,
        *,
        durable: bool,
        bindings: Sequence[str] = (),
        exclusive: bool = False,
    ) -> None:
        self._check_open()
        if exclusive:
            self.exclusive[name] = [_call_subject(name), *bindings]
            return
        if len(bindings) > 1:
            raise ConfigError(
                f"queue {name!r}: the NATS transport binds a shared queue to one subject "
                f"(asked for {len(bindings)}); declare one queue per subject"
            )
        if bindings:
            declared = _Stream("KS_" + _token(bindings[0]), _token(name), bindings[0], durable)
        else:
            declared = _Stream("KQ_" + _token(name), _token(name), _address(name), durable)
        await self._ensure(name, declared)
        self.streams[name] = declared

    async def _add_stream(self, declared: _Stream, replicas: int) -> None:
        if declared.stream.startswith("KS_"):
            await self.js.add_stream(
                name=declared.stream,
                subjects=[declared.address],
                retention=RetentionPolicy.LIMITS,
                max_age=self.subject_max_age,
                storage=StorageType.FILE if declared.durable else StorageType.MEMORY,
                num_replicas=replicas,
            )
        else:
            await self.js.add_stream(
                name=declared.stream,
                subjects=[declared.address],
                retention=RetentionPolicy.WORK_QUEUE,
                storage=StorageType.FILE if declared.durable else StorageType.MEMORY,
                num_replicas=replicas,
            )

    async def _ensure(self, queue: str, declared: _Stream) -> None:
        bound = declared.stream.startswith("KS_")
        with _mapped(f"declare queue {queue!r}"):
            try:
                await self._add_stream(declared, self.replicas)
            except nats.js.errors.BadRequestError as exc:
                # Another client made the stream with other replicas (a server that does
                # not advertise its cluster, or an explicit ``replicas``). A default is
                # only a guess: adopt the stream's, if that is all that differs (the
                # second add_stream checks the rest). An explicit one stays an error.
                if self._replicas_given or exc.err_code != _STREAM_NAME_IN_USE:
                    raise
                existing = (await self.js.stream_info(declared.stream)).config.num_replicas
                if existing is None or existing == self.replicas:
                    raise
                await self._add_stream(declared, existing)
                log.info(
                    "queue %s: stream %s has %d replicas, not the default %d: kept",
                    queue, declared.stream, existing, self.replicas,
                )  # fmt: skip
            if bound and declared.floor:
                await self._bound_consumer_again(declared)
                return
            info = await self.js.add_consumer(
                declared.stream,
                ConsumerConfig(
                    durable_name=declared.consumer,
                    ack_policy=AckPolicy.EXPLICIT,
                    # A bound queue starts at its declaration, as an AMQP queue would.
                    deliver_policy=DeliverPolicy.NEW if bound else DeliverPolicy.ALL,
                    ack_wait=self.ack_wait,
                    max_ack_pending=_MAX_ACK_PENDING,
                    max_deliver=-1,
                ),
            )
            if bound and info.delivered is not None:
                declared.floor = max(declared.floor, info.delivered.stream_seq or 0)

    async def _bound_consumer_again(self, declared: _Stream) -> None:
        """The consumer of a bound queue this transport declared before: kept if it is there
        (a reconnect's replay), else made again starting after its floor."""
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await self.js.consumer_info(declared.stream, declared.consumer)
            return
        config = ConsumerConfig(
            durable_name=declared.consumer,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=declared.floor + 1,
            ack_wait=self.ack_wait,
            max_ack_pending=_MAX_ACK_PENDING,
            max_deliver=-1,
        )
        try:
            await self.js.add_consumer(declared.stream, config)
        except nats.js.errors.BadRequestError:
            # Made again meanwhile by another consumer of the queue (with its own start).
            await self.js.consumer_info(declared.stream, declared.consumer)

    async def declare_again(self, queue: str) -> bool:
        """Declare ``queue`` again as this transport declared it, after `_REDECLARE_PAUSE_S`
        (deleted under it); one declaration at a time per queue, whoever noticed. False if
        this transport never declared it."""
        declared = self.streams.get(queue)
        if declared is None or self.closed:
            return False
        pending = self._redeclaring.get(queue)
        if pending is None:
            pending = asyncio.ensure_future(self._declare_after_pause(queue, declared))
            self._redeclaring[queue] = pending
            pending.add_done_callback(lambda done: self._redeclared(queue, done))
        await asyncio.shield(pending)
        return True

    async def _declare_after_pause(self, queue: str, declared: _Stream) -> None:
        await asyncio.sleep(_REDECLARE_PAUSE_S)
        if self.streams.get(queue) is declared and not self.closed:
            await self._ensure(queue, declared)
            log.warning("queue %s was gone: declared again", queue)

    def _redeclared(self, queue: str, done: asyncio.Future[None]) -> None:
        self._redeclaring.pop(queue, None)
        if not done.cancelled():
            done.exception()  # retrieved here: a waiter that was cancelled never reads it

    async def delete_queue(self, name: str) -> None:
        for consumer in [c for c in self.core_consumers if c.queue == name]:
            await consumer.cancel()
        if self.exclusive.pop(name, None) is not None:
            return
        for puller in [p for p in self.pullers if p.queue == name]:
            await puller.cancel()
        declared = self.streams.pop(name, None)
        if declared is None and not self.closed:
            declared = await self._declared_elsewhere(name)
        if declared is not None and not self.closed:
            with contextlib.suppress(nats.js.errors.NotFoundError), _mapped("delete queue"):
                if declared.stream.startswith("KS_"):
                    await self.js.delete_consumer(declared.stream, declared.consumer)
                else:
                    await self.js.delete_stream(declared.stream)
        if not self.closed and not name.endswith(".dlq"):
            await self._delete_dlq_if_empty(name + ".dlq")

    async def _declared_elsewhere(self, name: str) -> _Stream | None:
        """Queue ``name`` as another connection declared it (an unbound queue's own stream, or
        a bound queue's consumer on the stream of its subject), or None if there is none:
        a queue is deleted whoever declared it, as on every other transport."""
        consumer = _token(name)
        with _mapped("delete queue"):
            try:
                info = await self.js.stream_info("KQ_" + consumer)
            except nats.js.errors.NotFoundError:
                pass
            else:
                durable = info.config.storage != StorageType.MEMORY
                return _Stream(info.config.name or "", consumer, _address(name), durable)
            offset = 0
            while page := await self.js.streams_info(offset):  # a page of up to 256
                offset += len(page)
                for info in page:
                    stream = info.config.name or ""
                    if not stream.startswith("KS_") or not info.config.subjects:
                        continue
                    try:
                        await self.js.consumer_info(stream, consumer)
                    except nats.js.errors.NotFoundError:
                        continue
                    durable = info.config.storage != StorageType.MEMORY
                    return _Stream(stream, consumer, info.config.subjects[0], durable)
        return None

    async def _delete_dlq_if_empty(self, dlq: str) -> None:
        """A deleted queue's dead-letter stream goes too, unless it holds dead letters."""
        self.streams.pop(dlq, None)
        stream = "KQ_" + _token(dlq)
        with _mapped("delete queue"), contextlib.suppress(nats.js.errors.NotFoundError):
            info = await self.js.stream_info(stream)
            if info.state.messages:
                log.warning(
                    "kept dead-letter queue %s: it holds %d messages", dlq, info.state.messages
                )
                return
            await self.js.delete_stream(stream)

    # --- sending -------------------------------------------------------------------------

    def _check_size(self, body: bytes) -> None:
        check_size(body, self.max_message_bytes)

    def _subject_of(self, queue: str) -> str:
        declared = self.streams.get(queue)
        return declared.address if declared is not None else _address(queue)

    async def subscribed(self) -> None:
        """Return once the server routes to this connection's new subscriptions. nats-py only
        buffers a SUB, so a message another connection published right after `consume`
        returned could find no subscriber (a fanout lost: 18 of 200 in a probe). One PING's
        PONG is not enough on nats-server 2.9: another connection's publish sent right after
        it still missed the new subscription 7 times in 400 (raw nats-py, one server), and a
        publish 100 ms later reached it; after a second round trip, 0 in 400. A server
        that stopped answering holds them ``connect_timeout`` in all (not nats-py's 10 s
        each), then the consume fails with a retryable error. During a reconnect nats-py
        does not wait: it sends the subscriptions again once it is back."""
        deadline = time.monotonic() + self.connect_timeout
        with _mapped("subscribe"):
            # nats-py types the timeouts int; a float works.
            await self.nc.flush(timeout=max(0.001, self.connect_timeout))  # type: ignore[arg-type]
            left = max(0.001, deadline - time.monotonic())
            await self.nc.flush(timeout=left)  # type: ignore[arg-type]

    async def send(self, queue: str, body: bytes, *, durable: bool) -> None:
        self._check_open()
        self._check_size(body)
        declared = self.streams.get(queue)
        if durable or (declared is not None and declared.address != _address(queue)):
            subject = _address(queue) if declared is None else declared.address
            if durable:
                await self._stored(subject, body, None, must_exist=True)
                return
            with _mapped(f"send to {queue!r}"):
                await self.nc.publish(subject, body)
            return
        # Core first: taken at once by a consumer of the queue if one is subscribed. With
        # none, the server answers 503 to the reply subject and the message goes to the
        # queue's stream instead, to wait there for a consumer.
        token = f"{self._refusals}.{next(self._tokens)}"
        self._unanswered[token] = (queue, body)
        try:  # the hot path of every call and reply: no context manager
            await self.nc.publish(_call_subject(queue), body, reply=token)
        except _FOREIGN as exc:
            raise _translate(exc, f"send to {queue!r}") from exc

    async def _on_refused(self, msg: Msg) -> None:
        headers = msg.headers
        if not headers or headers.get("Status") != "503":
            return
        entry = self._unanswered.pop(msg.subject, None) or self._unanswered_old.pop(
            msg.subject, None
        )
        if entry is not None and not self.closed:
            queue, body = entry
            # Into the stream (if the queue has one; an exclusive queue that is gone has not).
            with contextlib.suppress(nats.errors.Error):
                await self.nc.publish(_address(queue), body)

    async def publish(self, subject: str, body: bytes, *, durable: bool) -> None:
        self._check_open()
        self._check_size(body)
        if durable:
            # A subject this connection bound a queue to must have its stream: right after a
            # broker restart JetStream may still be loading it, so wait rather than drop.
            bound = any(d.address == subject for d in self.streams.values())
            await self._stored(subject, body, None, must_exist=bound)
        else:
            with _mapped(f"publish to {subject!r}"):
                await self.nc.publish(subject, body)

    async def dead_letter(self, queue: str, body: bytes, reason: str) -> None:
        dlq = queue + ".dlq"
        if dlq not in self.streams:
            await self.declare_queue(dlq, durable=True)
        # Header values are one line; the reason is for people reading the DLQ.
        headers = {_REASON_HEADER: " ".join(reason.split())[:1000] or "-"}
        await self._stored(_address(dlq), body, headers, must_exist=True)

    async def _stored(
        self, subject: str, body: bytes, headers: dict[str, str] | None, *, must_exist: bool
    ) -> None:
        """Publish until JetStream acks, one message id across retries (bounded in time)."""
        headers = {**(headers or {}), "Nats-Msg-Id": uuid.uuid4().hex}
        deadline = time.monotonic() + self.publish_timeout
        delay = 0.05
        while True:
            left = deadline - time.monotonic()
            try:
                with _mapped(f"durable publish to {subject!r}"):
                    await self.js.publish(
                        subject, body, timeout=max(0.1, min(2.0, left)), headers=headers
                    )
            except TransportError as exc:
                cause = exc.__cause__
                no_stream = isinstance(cause, nats.js.errors.NoStreamResponseError)
                if (
                    no_stream
                    and self.nc.is_connected
                    and not must_exist
                    and not await self._captured(subject, left)
                ):
                    log.debug("nats: nothing bound to %s; message dropped", subject)
                    return  # unroutable, as on AMQP
                if no_stream and must_exist and self.nc.is_connected:
                    # Deleted under us: a queue this transport declared is declared again.
                    queue = self._declared_at(subject)
                    if queue is not None:
                        with contextlib.suppress(KeelError):
                            await self.declare_again(queue)
                if time.monotonic() + delay >= deadline or self.closed:
                    raise TransportError(
                        f"NATS did not confirm a message to {subject!r} within "
                        f"{self.publish_timeout}s ({exc}); it may or may not be stored"
                    ) from None
            else:
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    def _declared_at(self, subject: str) -> str | None:
        """The queue this transport declared whose stream captures ``subject``, if any."""
        for queue, declared in self.streams.items():
            if declared.address == subject:
                return queue
        return None

    async def _captured(self, subject: str, left: float) -> bool:
        """Whether a stream captures ``subject`` (True when JetStream cannot say now).

        "No responders" to a JetStream publish means no stream leader took it, not that no
        stream captures the subject: in a cluster, a stream's subjects are subscribed on its
        leader only, so from the leader's loss until the election of the next one (a second
        or two) a publish to an R3 stream has no responder. Dropping it then as unroutable
        lost notifications that `publish` had returned for (issue 19). The meta leader
        answers this from the streams' configuration, leader or not."""
        try:
            async with asyncio.timeout(max(0.1, min(2.0, left))):
                await self.js.find_stream_name_by_subject(subject)
        except nats.js.errors.NotFoundError:
            return False
        except _FOREIGN as exc:
            log.debug("nats: cannot tell whether a stream captures %s (%s)", subject, exc)
        return True

    # --- consuming -----------------------------------------------------------------------

    async def consume(
        self, queue: str, handler: Handler, *, prefetch: int, auto_ack: bool = False
    ) -> _Puller | _CoreConsumer:
        self._check_open()
        subjects = self.exclusive.get(queue)
        if subjects is not None:
            core = _CoreConsumer(self, queue, handler, auto_ack)
            try:
                await core.start(subjects)
            except KeelError:
                await _abandon(core)
                raise
            self.core_consumers.add(core)
            return core
        if queue not in self.streams:
            raise TransportError(
                f"queue {queue!r} is not declared on this {self.url.redacted()} connection"
            )
        window = _AUTO_ACK_WINDOW if auto_ack else max(1, prefetch)
        puller = _Puller(self, queue, handler, window, auto_ack)
        self.pullers.add(puller)
        declared = self.streams[queue]
        unbound = declared.address == _address(queue)
        try:
            with _mapped(f"consume from {queue!r}"):
                await puller.start(_call_subject(queue) if unbound else None)
        except KeelError:
            await _abandon(puller)
            raise
        return puller
