"""Redis coordination backend (single instance): ``SET PX`` leases, one counter per key for
fences, a queue of waiters per key, and Lua scripts (`_redis_scripts`) so that a try, a place
in the queue, a renewal and a release are each one atomic round trip.

Fair hand-off: waiters queue in arrival order (a sorted set); whoever frees a key — its holder
releasing it, a waiter leaving, or the next look after a lease ran out — grants it to the
longest live waiter in the same script and wakes that waiter through a list it blocks on
(``BLPOP``). A releaser asking again queues behind. Observers wait on pub/sub messages the
scripts publish (`_redis_watch`), bounded by the holder's remaining lease (an expiry
publishes nothing).

What Redis cannot promise: it acknowledges writes before replicating them, so after a failover
to a replica a lock (and even its fence counter's last increments) can vanish and a second
client can acquire it while the first still believes it holds it. The fence still protects a
fenced resource as long as the counter never goes backwards: run one instance with AOF and
``appendfsync always`` (as scripts/servers does), so a restart keeps every fence it handed out.
Without that, a restart can hand out a fence again and only the lease protects the resource.
Leases are timed by the server's clock (``PX``), so client clocks do not matter.

After a restart the server answers ``LOADING`` until its dataset is back: that, and every
other "not ready" reply, is the retryable `BackendUnavailable` (`_NOT_READY`).

Sentinel, TLS and logins are the Redis transport's (`keel._redis_client`):
``redis+sentinel://s1,s2,s3/service/db`` follows the primary, ``rediss://`` speaks TLS,
``user:password@`` logs in. Under Sentinel, ``wait_replicas`` (default 1) makes acquire and
renew wait until a replica holds the write, so a failover keeps every lock granted and every
fence handed out: fences never go backwards across it. A waiter woken with a grant renews it
through ``WAIT`` before it counts (the grant was the releaser's write; the renewal's ``WAIT``
covers it, since a replica applies writes in order).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import BusyLoadingError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from keel import _redis_client
from keel.coordination._clock import now
from keel.coordination.backends import _redis_scripts as lua
from keel.coordination.backends._redis_pipe import Pipe
from keel.coordination.backends._redis_watch import Subscriber
from keel.coordination.backends.base import (
    Backend,
    Changes,
    Characteristic,
    Grant,
    Record,
    Waiter,
    map_errors,
    mark_observed,
)
from keel.errors import BackendUnavailable

_UNAVAILABLE = (RedisConnectionError, RedisTimeoutError, BusyLoadingError, OSError)
# Error replies that mean "this server cannot serve yet / right now", not "you asked wrong".
_NOT_READY = ("LOADING", "BUSY", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN", "READONLY", "NOREPLICAS")


def _not_ready(exc: BaseException) -> bool:
    if not isinstance(exc, hiredis.ReplyError | ResponseError):
        return False
    return str(exc).split(" ", 1)[0] in _NOT_READY


def _parse(key: str, raw: bytes | str) -> Record:
    raw = raw.encode() if isinstance(raw, str) else raw
    fence, owner, _token, data = raw.split(b"\n", 3)
    return Record(key, owner.decode(), int(fence), data)


class RedisBackend:
    """Leased records in one Redis instance (see the module docstring for what it lacks)."""

    characteristics = frozenset(
        {
            Characteristic.DISTRIBUTED,
            Characteristic.DURABLE_FENCES,
            Characteristic.SERVER_TIMED_LEASES,
            Characteristic.PER_LOCK_TTL,
            Characteristic.CHANGE_WATCHES,
            Characteristic.FAIR_QUEUE,
        }
    )
    URL_OPTIONS = frozenset({"connect_timeout", "socket_timeout", *_redis_client.URL_OPTIONS})

    def __init__(
        self, client: aioredis.Redis, pipe: Pipe, subscriber: Subscriber, url: str, timeout: float
    ) -> None:
        self._client = client  # reads, listings and blocking pops (a pool)
        self._pipe = pipe  # the lock scripts (see _redis_pipe)
        self._subscriber = subscriber
        self._url = url
        self._timeout = timeout
        self._shas = {s: hashlib.sha1(s.encode()).hexdigest() for s in lua.SCRIPTS}
        self._wait_replicas = pipe.wait_replicas

    @classmethod
    async def open(
        cls, url: Any, *, member_id: str, ttl: float, options: Mapping[str, str]
    ) -> Backend:
        timeout = float(options.get("socket_timeout", 5))
        where = _redis_client.target(url, options)
        client = _redis_client.client(
            where,
            socket_connect_timeout=float(options.get("connect_timeout", 5)),
            socket_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
        )
        host, port = url.host or "127.0.0.1", url.port or 6379

        async def locate() -> tuple[str, int]:
            return await _redis_client.primary(where)

        pipe = Pipe(
            host,
            port,
            username=url.username,
            password=url.password,
            db=where.db,
            timeout=timeout,
            on_connect=tuple(("SCRIPT", "LOAD", s) for s in lua.SCRIPTS),
            locate=locate if where.service is not None else None,
            ssl=where.ssl_context(),
            server_hostname=url.host,
            wait_replicas=where.wait_replicas,
            on_readonly=lambda: _redis_client.distrust(where),
        )
        subscriber = Subscriber(
            host,
            port,
            username=url.username,
            password=url.password,
            locate=locate if where.service is not None else None,
            ssl=where.ssl_context(),
            server_hostname=url.host,
        )
        backend = cls(client, pipe, subscriber, url.redacted(), timeout)
        try:
            with backend._mapped():
                await _redis_client.check_login(client, where)
        except BaseException:
            await _redis_client.close(client)
            raise
        return backend

    def _mapped(self) -> contextlib.AbstractContextManager[None]:
        return map_errors(_UNAVAILABLE, backend="redis", url=self._url, not_ready=_not_ready)

    async def _eval(self, script: str, args: list[Any], *, replicated: bool = False) -> Any:
        # EVALSHA; the script is loaded again on NOSCRIPT (a restart the pipe did not see).
        # ``replicated``: a write that grants or renews a lease waits for ``wait_replicas``.
        call = self._pipe.call_replicated if replicated else self._pipe.call
        with self._mapped():
            try:
                return await call("EVALSHA", self._shas[script], *args)
            except hiredis.ReplyError as exc:
                if not str(exc).startswith("NOSCRIPT"):
                    raise
            await self._pipe.call("SCRIPT", "LOAD", script)
            return await call("EVALSHA", self._shas[script], *args)

    def lease_ttl(self, ttl: float) -> float:
        return max(ttl, 0.001)

    def _args(self, waiter: Waiter) -> list[Any]:
        return lua.script_args(
            waiter.key, owner=waiter.owner, ttl=waiter.ttl, data=waiter.data, token=waiter.token
        )

    async def enqueue(self, waiter: Waiter, *, queue: bool) -> Grant | None:
        sent = now()
        waiter.sent = True
        if not queue:
            fence = await self._eval(lua.TRY, self._args(waiter), replicated=True)
            return None if fence is None else Grant(int(fence), sent + waiter.ttl)
        grant, left = await self._place(waiter, sent)
        waiter.state = left
        return grant

    async def _place(self, waiter: Waiter, sent: float) -> tuple[Grant | None, float]:
        """Join the queue or keep our place: the grant if it is ours, and the seconds left on
        the current holder's lease."""
        fence, left_ms = await self._eval(lua.ENQUEUE, self._args(waiter), replicated=True)
        grant = None if fence is None else Grant(int(fence), sent + waiter.ttl)
        return grant, max(0, int(left_ms)) / 1000

    async def wait_turn(self, waiter: Waiter, timeout: float) -> Grant | None:
        deadline = now() + timeout
        wake = f"keel-wake:{waiter.key}:{waiter.token}"
        while (left := deadline - now()) > 0:
            # Block until the key is handed to us; wake in time to keep our place (ttl/3) and
            # to take over from a holder whose lease runs out (nothing is pushed for that).
            lease_left = waiter.state or waiter.ttl
            wait = min(left, waiter.ttl / 3, lease_left + 0.005, self._timeout - 0.5)
            sent = now()
            with self._mapped():
                popped = await self._client.blpop([wake], timeout=max(0.01, wait))
            if popped is not None:
                fence = int(popped[1])
                if not self._wait_replicas:
                    return Grant(fence, sent + waiter.ttl)
                # The grant is the releaser's write: a replicated renewal covers it too.
                expires = await self.renew(waiter.key, waiter.owner, fence, waiter.ttl)
                if expires is not None:
                    return Grant(fence, expires)
            grant, waiter.state = await self._place(waiter, now())
            if grant is not None:
                return grant
        return None

    async def dequeue(self, waiter: Waiter) -> None:
        await self._eval(lua.DEQUEUE, self._args(waiter))

    async def renew(self, key: str, owner: str, fence: int, ttl: float) -> float | None:
        sent = now()
        args = lua.script_args(key, ttl=ttl, holder=f"{fence}\n{owner}\n")
        ok = await self._eval(lua.RENEW, args, replicated=True)
        return sent + ttl if ok else None

    async def release(self, key: str, owner: str, fence: int) -> Awaitable[None]:
        # Sent at once and not waited for: this connection's next command is ordered after
        # it, so a release and the next acquire share one round trip. The core watches the
        # reply and retries the release if it does not come.
        args = lua.script_args(key, holder=f"{fence}\n{owner}\n")
        with self._mapped():
            reply = await self._pipe.send("EVALSHA", self._shas[lua.RELEASE], *args)
        return self._confirmed(reply)

    async def _confirmed(self, reply: asyncio.Future[Any]) -> None:
        with self._mapped():
            try:
                await reply
            except hiredis.ReplyError as exc:
                if not str(exc).startswith("NOSCRIPT"):
                    raise
                # A server that forgot the scripts: load them, and the core sends it again.
                await self._pipe.call("SCRIPT", "LOAD", lua.RELEASE)
                raise BackendUnavailable(f"redis at {self._url} had lost its scripts") from exc

    async def create(self, key: str, data: bytes) -> int | None:
        fence = await self._eval(lua.CREATE, lua.script_args(key, data=data), replicated=True)
        return None if fence is None else int(fence)

    async def update(self, key: str, fence: int, data: bytes) -> bool:
        args = lua.script_args(key, data=data, holder=f"{fence}\n")
        return bool(await self._eval(lua.UPDATE, args, replicated=True))

    async def delete(self, key: str, fence: int) -> bool:
        args = [*lua.script_args(key, holder=f"{fence}\n"), f"keel-children:{key}/"]
        return bool(await self._eval(lua.DELETE, args, replicated=True))

    # Reads go through the pipe too: redis-py's per-command machinery cost three times the
    # round trip (0.5 ms against 0.15 ms on the development machine), and on the pipe a read
    # is ordered after this client's pipelined releases.
    async def get(self, key: str) -> Record | None:
        with self._mapped():
            raw = await self._pipe.call("GET", f"keel:{key}")
        return None if raw is None else _parse(key, raw)

    async def children(self, prefix: str) -> list[Record]:
        index = f"keel-children:{prefix}"
        with self._mapped():
            names = sorted(await self._pipe.call("SMEMBERS", index))
            if not names:
                return []
            values = await self._pipe.call("MGET", *names)
            gone = [n for n, v in zip(names, values, strict=True) if v is None]
            if gone:
                # Tidying only: nobody waits for the answer, and a failure is harmless.
                pruned = await self._pipe.send("SREM", index, *gone)
                mark_observed(pruned)
        return [
            _parse((n.decode() if isinstance(n, bytes) else n).removeprefix("keel:"), v)
            for n, v in zip(names, values, strict=True)
            if v is not None
        ]

    @contextlib.asynccontextmanager
    async def changes(self, key: str) -> AsyncIterator[Changes]:
        channel = f"keel-ev:{key}"
        await self._subscriber.listen(channel)
        try:
            yield _Changes(self, key, channel)
        finally:
            self._subscriber.unlisten(channel)

    async def _next_expiry(self, key: str) -> float | None:
        with self._mapped():
            least = await self._client.eval(lua.NEXT_EXPIRY, 1, f"keel:{key}")
        return None if int(least) < 0 else int(least) / 1000

    def on_session_lost(self, callback: Callable[[], None]) -> None:
        return None

    async def close(self) -> None:
        with contextlib.suppress(BackendUnavailable, hiredis.ReplyError):
            await self._pipe.call("PING")  # after every pipelined release
        await self._pipe.close()
        await self._subscriber.close()
        with self._mapped():
            await _redis_client.close(self._client)


class _Changes:
    def __init__(self, backend: RedisBackend, key: str, channel: str) -> None:
        self._backend = backend
        self._key = key
        self._channel = channel
        self._seen = backend._subscriber.generation(channel)

    async def wait(self, timeout: float) -> None:
        backend = self._backend
        with contextlib.suppress(BackendUnavailable):
            expiry = await backend._next_expiry(self._key)
            if expiry is not None:
                timeout = min(timeout, expiry + 0.005)
        await backend._subscriber.changed(self._channel, self._seen, timeout)
        self._seen = backend._subscriber.generation(self._channel)
