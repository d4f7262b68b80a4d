"""The Redis transport, ``redis://host:port/db``: queues on Redis Streams with consumer groups.

Layout (keys under ``keel:mq:``, written ``mq:`` here): a queue is a stream ``mq:q:<queue>``
with one consumer group ``keel``; competing consumers are consumers of that group. A subject
is a set ``mq:b:<subject>`` of the queues bound to it, and a Lua script XADDs to each in one
atomic step. Exclusive queues (reply and fanout queues, read ``auto_ack``) are an owner key
``mq:x:<queue>`` whose TTL the owner refreshes, a channel ``mq:c:<queue>`` and a list
``mq:l:<queue>``: a message goes by PUBLISH while the consumer is subscribed (no AOF write,
so no fsync on the reply path), else waits in the list, which the consumer drains after
subscribing, after a reconnect and whenever idle. A reply published to a subscription whose
connection is dying but not yet closed is lost: the caller gets `CallTimeout` (at-most-once,
as the contract allows for ``auto_ack``).

What the broker holds when ``send``/``publish`` returns: the entry is in the stream, i.e. in
Redis memory and, when Redis runs ``appendonly yes`` + ``appendfsync always`` (as
scripts/servers.d/redis.sh does), fsynced to the AOF before Redis replied. Without AOF (or with
``appendfsync everysec``) a Redis crash loses what was acknowledged since the last fsync or
snapshot: Keel cannot tell, so ``durable=True`` is only as durable as the server's config.

Settlement: ``ack`` is XACK + XDEL (pipelined); ``requeue`` and ``dead_letter`` are Lua scripts
that XACK + XDEL the entry and XADD it again at the tail of the queue (delivery count + 1) or
to the ``<queue>.dlq`` stream with a ``reason`` field, atomically. A requeued entry is
therefore available at once to any consumer of the group, behind the entries already queued.

Consumer crash: an entry read but not settled stays in the group's pending list. A live
consumer refreshes the idle time of its unsettled entries (XCLAIM JUSTID) every third of
``visibility_timeout`` (URL option, default 10 s); every consumer also moves entries idle
longer than that (XAUTOCLAIM) back to the tail of the queue. That is what redelivers a
SIGKILLed server's casts and idempotent calls: after ``visibility_timeout`` plus at most a
third of it (or 2 s, whichever is less). A consumer whose event loop stalls past
``visibility_timeout`` may see its entries redelivered to another consumer too
(at-least-once, never lost).

Exclusive queues vanish on ``close``; if the owner dies they expire ``exclusive_ttl`` (default
30 s) after its last refresh. A consumer crash loses what it had popped from an exclusive
queue, which is the at-most-once the contract allows for ``auto_ack`` consumers.

Connection loss: each command reconnects and retries with backoff for about 10 s, then raises
`TransportError`; a send whose reply was lost in the cut may be retried and so stored twice
(casts carry an idempotency key for that). Consume loops retry forever with backoff and
re-create their group after a restart without persistence. Every redis-py exception is mapped
to keel.errors in `_mapped`.

Options (URL query or keyword): ``max_message_bytes`` (default 1 MiB), ``visibility_timeout``
(s), ``exclusive_ttl`` (s), ``reconnect_retries`` (per command, default 25),
``connect_timeout`` (s the first connect may take, redis-py's retries included; default 10;
no socket connect waits longer than 2 s). The scripts name
keys they are not given, so a Redis Cluster is not supported; one Redis server is, or a
primary with replicas under Sentinel.

Sentinel, TLS and logins (`keel._redis_client`, `keel._tls`): ``redis+sentinel://s1,s2,s3/
service/db`` follows the primary the sentinels name (a consumer whose blocking read comes back
empty asks them again, so it does not sit on a server they no longer name); ``rediss://`` (or
``tls=true``) speaks TLS with ``ca``, ``cert``, ``key``, ``verify``; ``user:password@`` logs
in (an ACL user).
A refused login or certificate is `CredentialsRejected` or `TLSError` from ``connect``. With
``wait_replicas=N`` (default 1 under Sentinel) a durable send returns only once ``WAIT N``
says N replicas have it, so a failover does not lose it; while the primary has no replica at
all (after a failover, until the old primary rejoins) it is held by the primary alone. A send
whose WAIT falls short with replicas connected raises `TransportError` (it may or may not be
stored: the cast's idempotency key covers a retry).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any

from redis import exceptions as rexc
from redis.asyncio.client import PubSub
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff, NoBackoff

from keel import _redis_client
from keel.errors import KeelError, TransportError
from keel.messaging.transports._redis_scripts import SCRIPTS
from keel.messaging.transports.base import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_MAX_MESSAGE_BYTES,
    Handler,
    check_size,
    observe,
    positive_seconds,
)
from keel.urls import URL

log = logging.getLogger("keel.messaging.redis")

PREFIX = "keel:mq:"  # coordination keeps its keys under keel: too
GROUP = "keel"
BLOCK_SECONDS = 2.0  # longest a consume loop blocks in Redis; well under socket_timeout
AUTO_ACK_BATCH = 256
FOLLOW_S = 1.0  # under Sentinel, idle consumers ask for the primary at most this often
PIPE_TIMEOUT = BLOCK_SECONDS + 8  # a batch on the pipe connection, as a command's socket timeout


@contextlib.contextmanager
def _mapped(what: str, url: URL) -> Iterator[None]:
    """The one place redis-py exceptions become keel.errors."""
    try:
        yield
    except KeelError:
        raise
    except (rexc.ConnectionError, rexc.TimeoutError, OSError) as exc:
        raise TransportError(
            f"redis {url.redacted()} unreachable during {what}: {exc}; retry later",
            operation=what,
        ) from exc
    except rexc.RedisError as exc:
        raise TransportError(
            f"redis {url.redacted()} refused {what}: {exc}", operation=what
        ) from exc


_DISCONNECTED = (rexc.ConnectionError, rexc.TimeoutError, OSError)


_DELETE_IF_EMPTY = """
local n = redis.call('XLEN', KEYS[1])
if n == 0 then redis.call('DEL', KEYS[1]) end
return n
"""


def _stream(queue: str) -> str:
    return f"{PREFIX}q:{queue}"


def _owner(queue: str) -> str:
    return f"{PREFIX}x:{queue}"


def _list(queue: str) -> str:
    return f"{PREFIX}l:{queue}"


def _channel(queue: str) -> str:
    return f"{PREFIX}c:{queue}"


class _Delivery:
    __slots__ = (
        "_consumer",
        "_settled",
        "body",
        "dead_letter_reason",
        "delivery_count",
        "entry_id",
    )

    def __init__(
        self,
        consumer: _Consumer,
        entry_id: bytes,
        body: bytes,
        count: int,
        reason: str | None = None,
    ) -> None:
        self._consumer = consumer
        self.entry_id = entry_id
        self.body = body
        self.delivery_count = count
        self.dead_letter_reason = reason
        self._settled = False

    @property
    def settled(self) -> bool:
        return self._settled

    def _settle(self) -> bool:
        if self._settled:
            return False
        self._settled = True
        self._consumer.settled(self)
        return True

    async def ack(self) -> None:
        if self._settle():
            await self._consumer.ack(self)

    async def requeue(self) -> None:
        if self._settle():
            await self._consumer.requeue(self)

    async def dead_letter(self, reason: str) -> None:
        if self._settle():
            await self._consumer.dead_letter(self, reason)


class _Consumer:
    """One consume loop on one queue; a stream group member or a list reader."""

    def __init__(
        self, transport: RedisTransport, queue: str, handler: Handler, prefetch: int, auto_ack: bool
    ) -> None:
        self.transport = transport
        self.queue = queue
        self.handler = handler
        self.prefetch = max(1, prefetch)
        self.auto_ack = auto_ack
        self.exclusive = queue in transport._exclusive
        self.key = _list(queue) if self.exclusive else _stream(queue)
        self._pubsub: PubSub | None = None
        self._drain = True
        self._acks: list[bytes] = []
        self._acks_done: asyncio.Future[None] | None = None
        self.name = f"{transport.token}-{next(transport._consumer_ids)}"
        self.unsettled: dict[bytes, _Delivery] = {}
        self._credit = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopped = False
        self._list_ids = itertools.count()

    def start(self) -> None:
        self._task = observe(asyncio.get_running_loop().create_task(self._run()), log)

    def stopped(self) -> bool:
        return self._stopped

    def settled(self, delivery: _Delivery) -> None:
        self.unsettled.pop(delivery.entry_id, None)
        self._credit.set()

    async def cancel(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        self._stopped = True
        # redis-py can swallow a cancel that lands while it sets up a connection; insist.
        while not task.done():
            task.cancel()
            await asyncio.wait([task], timeout=0.05)
        if self in self.transport._consumers:
            self.transport._consumers.remove(self)
        if self._pubsub is not None:
            close: Callable[[], Awaitable[None]] = self._pubsub.aclose
            with contextlib.suppress(rexc.RedisError, OSError):
                await close()
            self._pubsub = None
        if self.exclusive:
            return
        t = self.transport
        try:
            await t._scripts["orphans"](
                keys=[self.key], args=[GROUP, self.name, *self.unsettled], client=t.redis
            )
        except rexc.RedisError as exc:  # the visibility timeout hands them back instead
            log.info("redis: could not return unread entries of %s: %s", self.queue, exc)
        if self.unsettled and not t._closed:
            # Handed over and still running (a draining server): keep them alive until they
            # are settled, or another consumer's reclaim would run them a second time.
            t._lingering.add(self)
            self._task = observe(asyncio.get_running_loop().create_task(self._linger()), log)

    async def _linger(self) -> None:
        t = self.transport
        try:
            while self.unsettled and not t._closed:
                self._credit.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._credit.wait(), t.visibility_timeout / 3)
                if not self.unsettled:
                    break
                try:
                    await self._hold()
                except (rexc.RedisError, OSError) as exc:
                    log.info("redis: could not keep entries of %s alive: %s", self.queue, exc)
        finally:
            t._lingering.discard(self)
            self._task = None

    async def _queue_gone(self, exc: rexc.ResponseError) -> None:
        """A read refused: the group or the stream is gone (deleted behind our back, or a
        restart without persistence), or another error reply."""
        text = str(exc)
        if "NOGROUP" in text or "no longer exists" in text:
            log.warning("redis: queue %s is gone; declaring it again", self.queue)
        else:
            log.warning("redis: consumer of %s: %s", self.queue, exc)
        t = self.transport
        with contextlib.suppress(rexc.RedisError, KeelError):
            # As declared (bindings too) if this transport did; else its group.
            if not await t._declare_again(self.queue):
                await t._create_group(self.queue)

    # --- the loop --------------------------------------------------------------------------

    async def _run(self) -> None:
        t = self.transport
        loop = asyncio.get_running_loop()
        backoff = 0.05
        next_upkeep = 0.0
        while not self._stopped:
            try:
                if not self.exclusive and loop.time() >= next_upkeep:
                    await self._upkeep()
                    next_upkeep = loop.time() + t.visibility_timeout / 3
                room = AUTO_ACK_BATCH if self.auto_ack else self.prefetch - len(self.unsettled)
                if room <= 0:
                    self._credit.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._credit.wait(), t.visibility_timeout / 3)
                    continue
                got = await self._read(room)
                backoff = 0.05
                if not got and t._where.service is not None:
                    await self._follow()
            except _DISCONNECTED as exc:
                self._drain = True  # what was sent while we were away waits in the list
                log.info(
                    "redis: consumer of %s lost its connection (%s); retrying", self.queue, exc
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            except rexc.ResponseError as exc:
                await self._queue_gone(exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            except Exception:  # a bug must not silently end the consumer: log and go on
                log.exception("redis: consumer of %s failed; retrying", self.queue)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            if self.stopped():  # a swallowed cancel: hand the entries back, do not deliver
                for delivery in got:
                    delivery._settled = True
                    self.unsettled.pop(delivery.entry_id, None)
                return
            for delivery in got:
                self.handler(delivery)

    async def _follow(self) -> None:
        """Under Sentinel, after an empty blocking read: are we on the sentinels' primary?
        A consumer can sit on a server nothing is sent to any more (the old primary came back
        still a master, issue 19); its connections leave before their next command, and a
        subscription, which sends nothing, is closed here and made again on the primary."""
        await self.transport._follow()
        pubsub = self._pubsub
        if pubsub is None:
            return
        address = getattr(self.transport.redis.connection_pool, "master_address", None)
        connection: AbstractConnection | None = pubsub.connection
        if connection is None or address is None:
            return
        if (getattr(connection, "host", None), getattr(connection, "port", None)) == address:
            return
        log.info("redis: consumer of %s subscribes again on the primary", self.queue)
        self._pubsub, self._drain = None, True
        with contextlib.suppress(rexc.RedisError, OSError):
            await connection.disconnect()
        close: Callable[[], Awaitable[None]] = pubsub.aclose
        with contextlib.suppress(rexc.RedisError, OSError):
            await close()

    async def _read(self, room: int) -> list[_Delivery]:
        if self.exclusive and self.auto_ack:
            return await self._read_pubsub(room)
        if self.exclusive:
            return await self._read_list(room)
        return await self._read_stream(room)

    async def _hold(self) -> None:
        """Keep our own unsettled entries from looking idle to other consumers' reclaim."""
        await self.transport.cmd(
            "XCLAIM",
            self.key,
            GROUP,
            self.name,
            0,
            *self.unsettled,
            "JUSTID",
            parse_justid=True,
        )

    async def _upkeep(self) -> None:
        t = self.transport
        if self.unsettled:
            await self._hold()
        await t._scripts["reclaim"](
            keys=[self.key],
            args=[GROUP, self.name, int(t.visibility_timeout * 1000), 100],
            client=t.redis,
        )

    async def _read_stream(self, room: int) -> list[_Delivery]:
        t = self.transport
        reply = await t.cmd(
            "XREADGROUP", "GROUP", GROUP, self.name, "COUNT", room,
            "BLOCK", t.block_ms, "STREAMS", self.key, ">",
        )  # fmt: skip
        if not reply:
            return []
        entries = reply[0][1]
        got = []
        for entry_id, fields in entries:
            count = fields.get(b"n")
            reason = fields.get(b"reason")  # a dead-letter queue's entries carry one
            delivery = _Delivery(
                self,
                entry_id,
                fields[b"b"],
                int(count) if count else 1,
                reason.decode(errors="replace") if reason is not None else None,
            )
            got.append(delivery)
        if self.auto_ack:
            for delivery in got:
                delivery._settled = True
            await self._ack_ids([d.entry_id for d in got])
        else:
            for delivery in got:
                self.unsettled[delivery.entry_id] = delivery
        return got

    async def subscribe(self) -> None:
        """Subscribe and wait until Redis confirms: from then on sends PUBLISH to us."""
        pubsub = self.transport.redis.pubsub()
        await pubsub.subscribe(_channel(self.queue))
        while True:
            message = await pubsub.get_message(timeout=BLOCK_SECONDS)
            if message is not None and message["type"] == "subscribe":
                break
        self._pubsub = pubsub

    async def _read_pubsub(self, room: int) -> list[_Delivery]:
        if self._pubsub is None:
            await self.subscribe()
        assert self._pubsub is not None
        if self._drain:
            # Messages that found no subscriber (before the subscription, or while the
            # connection was down) wait in the list; an idle wake-up also looks there.
            self._drain = False
            got = await self._read_list(room, block=False)
            if got:
                self._drain = True
                return got
        pubsub = self._pubsub
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=BLOCK_SECONDS)
        if message is None:
            self._drain = True
            return []
        got = []
        connection: AbstractConnection | None = pubsub.connection
        # redis-py 8 renamed can_read_destructive (now deprecated, warning on each call).
        can_read: Callable[[], Awaitable[bool]] | None = None
        if connection is not None:
            can_read = getattr(connection, "can_read", connection.can_read_destructive)
        # Hand over every reply already read off the socket in one go: the calls they wake
        # then send their next requests in one loop iteration, hence in one batch.
        for _ in range(room):
            if message is None:
                break
            if message["type"] == "message":
                delivery = _Delivery(self, b"", message["data"], 1)
                delivery._settled = True
                got.append(delivery)
            try:
                if can_read is None or not await can_read():
                    break
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.0)
            except (*_DISCONNECTED, rexc.RedisError):
                break  # deliver what we hold; the next read meets the error and reconnects
        return got

    async def _read_list(self, room: int, *, block: bool = True) -> list[_Delivery]:
        if block:
            reply = await self.transport.cmd(
                "BLMPOP", BLOCK_SECONDS, 1, self.key, "LEFT", "COUNT", room
            )
        else:
            reply = await self.transport.cmd("LMPOP", 1, self.key, "LEFT", "COUNT", room)
        if not reply:
            return []
        got = []
        for body in reply[1]:
            delivery = _Delivery(self, str(next(self._list_ids)).encode(), body, 1)
            if self.auto_ack:
                delivery._settled = True
            else:
                self.unsettled[delivery.entry_id] = delivery
            got.append(delivery)
        return got

    # --- settlement --------------------------------------------------------------------------

    async def _ack_ids(self, ids: Sequence[bytes]) -> None:
        t = self.transport
        with _mapped("ack", t.url):
            try:
                replies = await t._pipe.call(
                    [("XACK", self.key, GROUP, *ids), ("XDEL", self.key, *ids)]
                )
            except _DISCONNECTED as exc:
                log.debug("redis: pipe connection failed (%s); acking on the pool", exc)
            else:
                for reply in replies:
                    if isinstance(reply, rexc.ResponseError):
                        raise reply
                return
            async with t.redis.pipeline(transaction=False) as pipe:
                pipe.execute_command("XACK", self.key, GROUP, *ids)
                pipe.execute_command("XDEL", self.key, *ids)
                await pipe.execute()

    async def ack(self, delivery: _Delivery) -> None:
        if self.exclusive:
            return
        # Acks made in the same loop iteration (a batch read by one XREADGROUP) share one
        # XACK + XDEL round trip: each costs an fsync with appendfsync always.
        self._acks.append(delivery.entry_id)
        done = self._acks_done
        if done is None:
            loop = asyncio.get_running_loop()
            done = self._acks_done = loop.create_future()
            loop.call_soon(self._flush_acks)
        await asyncio.shield(done)

    def _flush_acks(self) -> None:
        ids, self._acks = self._acks, []
        done, self._acks_done = self._acks_done, None
        assert done is not None

        def finished(task: asyncio.Task[None]) -> None:
            error = None if task.cancelled() else task.exception()
            if error is None:
                done.set_result(None)
            else:
                done.set_exception(error)
                done.exception()  # counted as seen: a cancelled waiter must not warn

        asyncio.get_running_loop().create_task(self._ack_ids(ids)).add_done_callback(finished)

    async def requeue(self, delivery: _Delivery) -> None:
        t = self.transport
        with _mapped("requeue", t.url):
            if self.exclusive:
                await t.cmd("LPUSH", self.key, delivery.body)
            else:
                await t._scripts["return"](
                    keys=[self.key], args=[GROUP, 1, delivery.entry_id], client=t.redis
                )

    async def dead_letter(self, delivery: _Delivery, reason: str) -> None:
        t = self.transport
        dlq = _stream(self.queue + ".dlq")
        with _mapped("dead_letter", t.url):
            if self.exclusive:
                await t.cmd("XADD", dlq, "*", "b", delivery.body, "reason", reason)
            else:
                await t._scripts["dead"](
                    keys=[self.key, dlq],
                    args=[GROUP, delivery.entry_id, delivery.body, reason],
                    client=t.redis,
                )


Command = tuple[Any, ...]
_Queued = tuple[Sequence[Command], "asyncio.Future[list[Any]]"]


def _pack(commands: Sequence[Command]) -> bytes:
    """RESP for the pipe's commands (bytes, str, int arguments), in one buffer.

    redis-py's packer encodes each argument through several Python calls: a fifth of a
    call's CPU on this path. The pipe only sends Keel's own commands, whose arguments are
    bytes, str and int, so this is all it needs (anything else is a bug: TypeError).
    """
    parts: list[bytes] = []
    append = parts.append
    for command in commands:
        append(b"*%d\r\n" % len(command))
        for arg in command:
            kind = arg.__class__
            if kind is bytes:
                data = arg
            elif kind is str:
                data = arg.encode()
            elif kind is int:
                data = b"%d" % arg
            else:
                raise TypeError(f"the redis pipe sends bytes, str and int, not {kind}")
            append(b"$%d\r\n%b\r\n" % (len(data), data))
    return b"".join(parts)


class _Pipe:
    """The hot path's short commands (sends, replies, acks) on one dedicated connection.

    Commands issued while a batch is on the wire wait and go out together in the next batch:
    one write and one read per batch however many callers there are, and none of redis-py's
    per-command pool checkout, retry wrapper and write-timeout task (a quarter of a call's
    CPU in py-spy). The connection does not retry: a batch that meets a connection error
    fails each caller with it, and the callers retry on the pooled connection, whose
    reconnect-and-retry with backoff is the one the module docstring describes. Blocking
    reads stay on the pool, where they hold no one else's commands.

    With ``wait_replicas`` (the transport's second pipe, for durable sends under Sentinel)
    each batch ends with one ``WAIT``, which covers every write of the batch: one replica
    round trip per batch, not per send. Its count ends each caller's replies (None when the
    primary has no replica and the WAIT is skipped). Durable sends have this connection to
    themselves because a WAIT blocks the connection it runs on, up to its timeout while a
    replica lags: on the shared pipe it held every call, reply and ack behind it.
    """

    def __init__(self, transport: RedisTransport, *, wait_replicas: int = 0) -> None:
        self._t = transport
        self._wait = wait_replicas
        self._conn: AbstractConnection | None = None
        self._queued: list[_Queued] = []
        self._task: asyncio.Task[None] | None = None

    def call(self, commands: Sequence[Command]) -> asyncio.Future[list[Any]]:
        """Queue commands; the future holds their replies in order (a command's own error,
        such as NOSCRIPT, as its reply), then the WAIT count on a ``wait_replicas`` pipe, or
        raises the connection error of their batch."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Any]] = loop.create_future()
        self._queued.append((commands, future))
        if self._task is None:
            # It runs next iteration, once every caller of this one has queued its commands.
            self._task = loop.create_task(self._send())
        return future

    def _connection(self) -> AbstractConnection:
        pool = self._t.redis.connection_pool
        # One deadline covers a whole batch instead of a socket timeout per read, and the
        # callers fall back to the pool's retries instead of retrying here.
        options = {**pool.connection_kwargs, "socket_timeout": None, "retry": Retry(NoBackoff(), 0)}
        connection: AbstractConnection = pool.connection_class(**options)
        return connection

    async def _send(self) -> None:
        batch, self._queued = self._queued, []
        replies: list[Any] = []
        failure: BaseException | None = None
        waited: Any = None
        try:
            async with asyncio.timeout(PIPE_TIMEOUT):
                wait = self._wait and not await self._t._alone()
                conn = self._conn
                if conn is None or not conn.is_connected:
                    conn = self._conn = self._connection()
                    connect: Callable[[], Awaitable[None]] = conn.connect  # untyped in redis-py
                    await connect()
                flat = [c for commands, _ in batch for c in commands]
                if wait:
                    flat.append(("WAIT", self._wait, _redis_client.WAIT_TIMEOUT_MS))
                await conn.send_packed_command(_pack(flat), check_health=False)
                for commands, _ in batch:
                    for _ in commands:
                        try:
                            replies.append(await conn.read_response())
                        except rexc.ResponseError as exc:  # its own error; the rest follow
                            replies.append(exc)
                if wait:
                    try:
                        waited = await conn.read_response()
                    except rexc.ResponseError as exc:
                        waited = exc
        except BaseException as exc:
            failure = exc
            await self._drop()
        finally:
            self._task = None
            if self._queued and not self._t._closed:
                self._task = asyncio.get_running_loop().create_task(self._send())
        self._settle(batch, replies, failure, [waited] if self._wait else [])
        if failure is not None and not isinstance(failure, Exception):
            raise failure

    @staticmethod
    def _settle(
        batch: list[_Queued], replies: list[Any], failure: BaseException | None, tail: list[Any]
    ) -> None:
        at = 0
        for commands, future in batch:
            mine = replies[at : at + len(commands)]
            at += len(commands)
            if future.done():  # its caller was cancelled
                continue
            # On a WAIT pipe a reply counts only with the WAIT that follows it.
            if len(mine) == len(commands) and (failure is None or not tail):
                future.set_result(mine + tail)
            elif isinstance(failure, _DISCONNECTED):
                future.set_exception(failure)
            else:
                future.set_exception(rexc.ConnectionError(f"redis pipe: {failure!r}"))

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.disconnect(nowait=True)

    async def close(self) -> None:
        task = self._task
        if task is not None:
            await asyncio.wait([task], timeout=PIPE_TIMEOUT)
            task.cancel()
        await self._drop()


class RedisTransport:
    """A connection pool to one Redis server. See the module docstring for what it keeps."""

    URL_OPTIONS = frozenset(
        {
            "max_message_bytes",
            "visibility_timeout",
            "exclusive_ttl",
            "reconnect_retries",
            "connect_timeout",
            *_redis_client.URL_OPTIONS,
        }
    )

    def __init__(
        self,
        url: URL,
        *,
        max_message_bytes: int | None = None,
        visibility_timeout: float | None = None,
        exclusive_ttl: float | None = None,
        reconnect_retries: int | None = None,
        connect_timeout: float | None = None,
        wait_replicas: int | None = None,
        sentinel_username: str | None = None,
        sentinel_password: str | None = None,
        tls: bool | None = None,
        ca: str | None = None,
        cert: str | None = None,
        key: str | None = None,
        verify: str | None = None,
    ) -> None:
        self.url = url
        opts = url.options
        self._where = _redis_client.target(
            url,
            {
                "wait_replicas": wait_replicas,
                "sentinel_username": sentinel_username,
                "sentinel_password": sentinel_password,
                "tls": tls,
                "ca": ca,
                "cert": cert,
                "key": key,
                "verify": verify,
            },
        )
        self.max_message_bytes = max_message_bytes or int(
            opts.get("max_message_bytes", DEFAULT_MAX_MESSAGE_BYTES)
        )
        self.visibility_timeout = visibility_timeout or float(opts.get("visibility_timeout", 10))
        self.exclusive_ttl = exclusive_ttl or float(opts.get("exclusive_ttl", 30))
        self._ttl_ms = int(self.exclusive_ttl * 1000)
        # A stream consumer wakes at least this often for its upkeep (heartbeat, reclaim).
        self.block_ms = int(min(BLOCK_SECONDS, self.visibility_timeout / 3) * 1000)
        if reconnect_retries is None:
            reconnect_retries = int(opts.get("reconnect_retries", 25))
        self.connect_timeout = positive_seconds(
            connect_timeout or opts.get("connect_timeout", DEFAULT_CONNECT_TIMEOUT),
            "connect_timeout",
            url,
        )
        self.token = f"{os.getpid()}-{uuid.uuid4().hex[:10]}"
        self.redis = _redis_client.client(
            self._where,
            socket_timeout=BLOCK_SECONDS + 8,
            socket_connect_timeout=min(2.0, self.connect_timeout),
            # Bounded reconnect-and-retry per command (25: about 10 s), then TransportError.
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.02), reconnect_retries),
        )
        # redis-py leaves execute_command untyped; one typed alias keeps mypy strict honest.
        self.cmd: Callable[..., Awaitable[Any]] = self.redis.execute_command
        self._scripts = {name: self.redis.register_script(lua) for name, lua in SCRIPTS.items()}
        self._pipe = _Pipe(self)
        self._durable = _Pipe(self, wait_replicas=self._where.wait_replicas)
        self._consumers: list[_Consumer] = []
        self._lingering: set[_Consumer] = set()  # cancelled, keeping deliveries alive
        self._exclusive: dict[str, Sequence[str]] = {}  # exclusive queue -> its subjects
        # Shared queues this transport declared -> their subjects: declared again when one
        # is found gone (deleted behind our back).
        self._declared: dict[str, list[str]] = {}
        self._consumer_ids = itertools.count(1)
        self._keepalive: asyncio.Task[None] | None = None
        self._closed = False
        self._alone_until = 0.0  # the primary has no replica until then (skip WAIT)
        self._followed = 0.0  # when the sentinels were last asked for the primary

    async def connect(self) -> None:
        self._closed = False
        try:
            # The whole connect, redis-py's reconnect retries and a server that takes the
            # TCP connection and never answers included, within connect_timeout.
            async with asyncio.timeout(self.connect_timeout):
                with _mapped("connect", self.url):
                    await _redis_client.check_login(self.redis, self._where)
                    await self.cmd("PING")
        except BaseException as exc:
            # A failed connect leaves nothing open: neither the pool's half-made connections
            # nor the sentinel clients' (asked for the primary before a refused login), which
            # nobody closes otherwise, since the caller never gets the transport.
            with contextlib.suppress(Exception):
                await _redis_client.close(self.redis)
            if not isinstance(exc, TimeoutError):
                raise
            raise TransportError(
                f"cannot reach redis {self.url.redacted()} within {self.connect_timeout:g}s "
                "(connect_timeout)",
                operation="connect",
            ) from None

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for consumer in [*self._consumers, *self._lingering]:
            unsettled = list(consumer.unsettled.values())
            await consumer.cancel()
            for delivery in unsettled:
                with contextlib.suppress(TransportError):
                    await delivery.requeue()
        self._consumers.clear()
        if self._keepalive is not None:
            self._keepalive.cancel()
            self._keepalive = None
        for name in list(self._exclusive):
            with contextlib.suppress(TransportError):
                await self.delete_queue(name)
        self._exclusive.clear()
        await self._pipe.close()
        await self._durable.close()
        await _redis_client.close(self.redis)

    def _check_open(self) -> None:
        if self._closed:
            raise TransportError(f"transport {self.url.redacted()} is closed")

    # --- queues ----------------------------------------------------------------------------

    async def _create_group(self, queue: str) -> None:
        try:
            await self.cmd("XGROUP", "CREATE", _stream(queue), GROUP, "0", "MKSTREAM")
        except rexc.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def declare_queue(
        self,
        name: str,
        *,
        durable: bool,
        bindings: Sequence[str] = (),
        exclusive: bool = False,
    ) -> None:
        self._check_open()
        with _mapped("declare_queue", self.url):
            if exclusive:
                await self.cmd("SET", _owner(name), self.token, "PX", self._ttl_ms)
                self._exclusive[name] = tuple(bindings)
                if self._keepalive is None:
                    self._keepalive = observe(
                        asyncio.get_running_loop().create_task(self._refresh()), log
                    )
            else:
                await self._create_group(name)
                known = self._declared.setdefault(name, [])
                known.extend(subject for subject in bindings if subject not in known)
            if bindings:
                async with self.redis.pipeline(transaction=False) as pipe:
                    for subject in bindings:
                        pipe.execute_command("SADD", f"{PREFIX}b:{subject}", name)
                    pipe.execute_command("SADD", f"{PREFIX}qb:{name}", *bindings)
                    await pipe.execute()

    async def _refresh(self) -> None:
        """Keep this connection's exclusive queues alive while it lives."""
        while True:
            await asyncio.sleep(self.exclusive_ttl / 3)
            try:
                async with self.redis.pipeline(transaction=False) as pipe:
                    for name, subjects in self._exclusive.items():
                        # A publish finding the owner key expired (a long disconnect) drops
                        # the binding; the owner puts it back.
                        for subject in subjects:
                            pipe.execute_command("SADD", f"{PREFIX}b:{subject}", name)
                        # SET, not PEXPIRE: recreates the owner key after a restart without AOF.
                        pipe.execute_command("SET", _owner(name), self.token, "PX", self._ttl_ms)
                        pipe.execute_command("PEXPIRE", _list(name), self._ttl_ms)
                    await pipe.execute()
            except (rexc.RedisError, OSError) as exc:
                log.info("redis: could not refresh exclusive queues: %s", exc)

    async def _declare_again(self, name: str) -> bool:
        """Declare a shared queue this transport declared, as it did; False if it did not."""
        bindings = self._declared.get(name)
        if bindings is None or self._closed:
            return False
        await self.declare_queue(name, durable=True, bindings=bindings)
        return True

    async def delete_queue(self, name: str) -> None:
        for consumer in [c for c in self._consumers if c.queue == name]:
            await consumer.cancel()
        self._exclusive.pop(name, None)
        self._declared.pop(name, None)
        with _mapped("delete_queue", self.url):
            await self._scripts["delete"](
                keys=[_stream(name), _owner(name), _list(name), f"{PREFIX}qb:{name}"],
                args=[PREFIX, name],
                client=self.redis,
            )
            if not name.endswith(".dlq"):
                # Its dead-letter stream goes too, unless it holds dead letters (atomic: one
                # arriving meanwhile keeps it).
                kept = await self.cmd("EVAL", _DELETE_IF_EMPTY, 1, _stream(name + ".dlq"))
                if kept and int(kept) > 0:
                    log.warning("kept dead-letter queue %s.dlq: it holds %s messages", name, kept)

    # --- messages --------------------------------------------------------------------------

    def _check_size(self, body: bytes) -> None:
        check_size(body, self.max_message_bytes)

    async def send(self, queue: str, body: bytes, *, durable: bool) -> None:
        self._check_open()
        self._check_size(body)
        found = await self._send(queue, body, durable)
        if not found:
            # Deleted behind our back since this transport declared it: declare it again.
            with _mapped("send", self.url):
                again = await self._declare_again(queue)
            if again:
                log.warning("redis: queue %s was gone: declared again", queue)
                found = await self._send(queue, body, durable)
        if not found:
            raise TransportError(
                f"queue {queue!r} does not exist on {self.url.redacted()}; "
                "declare it before sending"
            )

    async def _send(self, queue: str, body: bytes, durable: bool) -> Any:
        with _mapped("send", self.url):
            return await self._script(
                "send",
                [_stream(queue), _owner(queue), _list(queue)],
                [body, self._ttl_ms, _channel(queue)],
                replicated=durable,
            )

    async def publish(self, subject: str, body: bytes, *, durable: bool) -> None:
        self._check_open()
        self._check_size(body)
        for attempt in range(2):
            with _mapped("publish", self.url):
                taken = await self._script(
                    "publish",
                    [f"{PREFIX}b:{subject}"],
                    [body, self._ttl_ms, PREFIX],
                    replicated=durable,
                )
            if taken or attempt or not durable:
                return
            # No queue took it: if this transport bound queues to the subject, they were
            # deleted behind its back. Declare them again and publish once more.
            bound = [name for name, subjects in self._declared.items() if subject in subjects]
            if not bound:
                return
            with _mapped("publish", self.url):
                for name in bound:
                    await self._declare_again(name)
            log.warning("redis: queues %s were gone: declared again", ", ".join(bound))

    async def _script(
        self, name: str, keys: Sequence[Any], args: Sequence[Any], *, replicated: bool = False
    ) -> Any:
        script = self._scripts[name]
        argv = (len(keys), *keys, *args)
        # A durable send goes on the pipe whose batches end with one WAIT (see _Pipe).
        wait = self._where.wait_replicas if replicated else 0
        pipe = self._durable if wait else self._pipe
        try:
            replies = await pipe.call([("EVALSHA", script.sha, *argv)])
        except _DISCONNECTED as exc:
            log.debug("redis: pipe connection failed (%s); retrying on the pool", exc)
        else:
            reply = replies[0]
            if not isinstance(reply, rexc.ResponseError):
                if wait and replies[1] is not None:
                    await self._check_replicated(replies[1])
                return reply
            if not isinstance(reply, rexc.NoScriptError):
                raise reply
        if wait and await self._alone():
            wait = 0
        try:  # Redis restarted without the script, or the pipe lost its connection
            return await self._on_pool(script.sha, argv, wait)
        except rexc.NoScriptError:
            await self.cmd("SCRIPT", "LOAD", script.script)
            return await self._on_pool(script.sha, argv, wait)

    async def _on_pool(self, sha: str, argv: tuple[Any, ...], wait: int) -> Any:
        if not wait:
            return await self.cmd("EVALSHA", sha, *argv)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.execute_command("EVALSHA", sha, *argv)
            pipe.execute_command("WAIT", wait, _redis_client.WAIT_TIMEOUT_MS)
            reply, replicas = await pipe.execute()
        await self._check_replicated(replicas)
        return reply

    async def _follow(self) -> None:
        """Ask the sentinels for the primary (at most once per `FOLLOW_S` per transport):
        connections to any other server leave it before their next command."""
        now = time.monotonic()
        if now < self._followed + FOLLOW_S:
            return
        self._followed = now
        try:
            await _redis_client.follow(self.redis)
        except (rexc.RedisError, OSError) as exc:  # mid-failover: the next empty read asks again
            log.info("redis: could not ask the sentinels for the primary: %s", exc)

    async def _alone(self) -> bool:
        """Whether the primary runs without replicas (WAIT would only time out): known for
        a few seconds at a time, then asked again."""
        if self._alone_until == 0.0:
            return False
        now = time.monotonic()
        if now < self._alone_until:
            return True
        with _mapped("send", self.url):
            info = await self.redis.info("replication")
        alone = _redis_client.online_replicas(info) == 0
        self._alone_until = now + _redis_client.ALONE_RECHECK_S if alone else 0.0
        return alone

    async def _check_replicated(self, replicas: Any) -> None:
        if isinstance(replicas, Exception):
            raise replicas
        if int(replicas) >= self._where.wait_replicas:
            return
        if await _redis_client.replicated(int(replicas), self._where, self.redis):
            self._alone_until = time.monotonic() + _redis_client.ALONE_RECHECK_S
        else:
            raise TransportError(
                f"redis {self.url.redacted()}: a durable write reached {replicas} of "
                f"{self._where.wait_replicas} replicas within "
                f"{_redis_client.WAIT_TIMEOUT_MS} ms; it may or may not be kept; retry later",
                operation="send",
            )

    async def consume(
        self, queue: str, handler: Handler, *, prefetch: int, auto_ack: bool = False
    ) -> _Consumer:
        self._check_open()
        if queue not in self._exclusive:
            with _mapped("consume", self.url):
                owner = await self.cmd("GET", _owner(queue))
                exists = await self.cmd("EXISTS", _stream(queue))
            if owner is not None:
                raise TransportError(f"queue {queue!r} is exclusive to another connection")
            if not exists:
                raise TransportError(f"queue {queue!r} does not exist on {self.url.redacted()}")
        consumer = _Consumer(self, queue, handler, prefetch, auto_ack)
        if consumer.exclusive and auto_ack:
            with _mapped("consume", self.url):
                await consumer.subscribe()
        self._consumers.append(consumer)
        consumer.start()
        return consumer
