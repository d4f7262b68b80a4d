"""Redis coordination backend (single instance): ``SET NX PX`` leases, one counter per key for
fences, Lua scripts so that acquire, renew and release are each one atomic round trip.

What Redis cannot promise: it acknowledges writes before replicating them, so after a failover
to a replica a lock (and even its fence counter's last increments) can vanish and a second
client can acquire it while the first still believes it holds it. The fence still protects a
fenced resource as long as the counter never goes backwards: run one instance with AOF and
``appendfsync always`` (as scripts/servers does), so a restart keeps every fence it handed out.
Without that, a restart can hand out a fence again and only the lease protects the resource.
Leases are timed by the server's clock (``PX``), so client clocks do not matter.

Sentinel, TLS and logins are the Redis transport's (`keel._redis_client`):
``redis+sentinel://s1,s2,s3/service/db`` follows the primary, ``rediss://`` speaks TLS,
``user:password@`` logs in. Under Sentinel, ``wait_replicas`` (default 1) makes acquire and
renew wait until a replica holds the write, so a failover keeps every lock granted and every
fence handed out: fences never go backwards across it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import Callable, Mapping
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import BusyLoadingError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from keel import _redis_client
from keel.coordination.backends._redis_pipe import Pipe
from keel.coordination.backends.base import Backend, Characteristic, Grant, Record, map_errors
from keel.errors import CoordinationError

_ACQUIRE = """
if redis.call('exists', KEYS[1]) == 1 then return false end
local fence = redis.call('incr', KEYS[2])
redis.call('set', KEYS[1], fence .. '\\n' .. ARGV[1] .. '\\n' .. ARGV[3], 'PX', ARGV[2])
redis.call('sadd', KEYS[3], KEYS[1])
return fence
"""
_RENEW = """
local v = redis.call('get', KEYS[1])
if v and string.sub(v, 1, #ARGV[1]) == ARGV[1] then
  redis.call('pexpire', KEYS[1], ARGV[2])
  return 1
end
return 0
"""
_RELEASE = """
local v = redis.call('get', KEYS[1])
if v and string.sub(v, 1, #ARGV[1]) == ARGV[1] then
  redis.call('del', KEYS[1])
  return 1
end
return 0
"""
_UNAVAILABLE = (RedisConnectionError, RedisTimeoutError, BusyLoadingError, OSError)
_POLL = 0.01


def _parse(key: str, raw: bytes | str) -> Record:
    raw = raw.encode() if isinstance(raw, str) else raw
    fence, owner, data = raw.split(b"\n", 2)
    return Record(key, owner.decode(), int(fence), data)


class RedisBackend:
    """Leased records in one Redis instance (see the module docstring for what it lacks)."""

    characteristics = frozenset(
        {
            Characteristic.DISTRIBUTED,
            Characteristic.DURABLE_FENCES,
            Characteristic.SERVER_TIMED_LEASES,
            Characteristic.PER_LOCK_TTL,
        }
    )
    URL_OPTIONS = frozenset({"connect_timeout", "socket_timeout", *_redis_client.URL_OPTIONS})

    def __init__(self, client: aioredis.Redis, pipe: Pipe, url: str) -> None:
        self._client = client  # reads and listings
        self._pipe = pipe  # the lock scripts (see _redis_pipe)
        self._url = url
        self._shas = {s: hashlib.sha1(s.encode()).hexdigest() for s in (_ACQUIRE, _RENEW, _RELEASE)}

    async def _eval(self, script: str, keys: list[str], args: list[Any]) -> Any:
        # EVALSHA; the script is loaded once on NOSCRIPT (first use, or after a restart).
        try:
            return await self._pipe.call_replicated(
                "EVALSHA", self._shas[script], len(keys), *keys, *args
            )
        except CoordinationError as exc:
            if not str(exc).startswith("redis: NOSCRIPT"):
                raise
        await self._pipe.call("SCRIPT", "LOAD", script)
        return await self._pipe.call_replicated(
            "EVALSHA", self._shas[script], len(keys), *keys, *args
        )

    @classmethod
    async def open(
        cls, url: Any, *, member_id: str, ttl: float, options: Mapping[str, str]
    ) -> Backend:
        where = _redis_client.target(url, options)
        client = _redis_client.client(
            where,
            socket_connect_timeout=float(options.get("connect_timeout", 5)),
            socket_timeout=float(options.get("socket_timeout", 5)),
            retry=Retry(NoBackoff(), 0),
        )
        timeout = float(options.get("socket_timeout", 5))

        async def locate() -> tuple[str, int]:
            return await _redis_client.primary(where)

        pipe = Pipe(
            url.host or "127.0.0.1",
            url.port or 6379,
            username=url.username,
            password=url.password,
            db=where.db,
            timeout=timeout,
            on_connect=tuple(("SCRIPT", "LOAD", s) for s in (_ACQUIRE, _RENEW, _RELEASE)),
            locate=locate if where.service is not None else None,
            ssl=where.ssl_context(),
            server_hostname=url.host,
            wait_replicas=where.wait_replicas,
        )
        backend = cls(client, pipe, url.redacted())
        try:
            with map_errors(_UNAVAILABLE, backend="redis", url=backend._url):
                await _redis_client.check_login(client, where)
        except BaseException:
            await _redis_client.close(client)
            raise
        return backend

    def lease_ttl(self, ttl: float) -> float:
        return max(ttl, 0.001)

    async def acquire(self, key: str, owner: str, ttl: float, data: bytes) -> Grant | None:
        sent = time.monotonic()
        parent = key.rpartition("/")[0]
        fence = await self._eval(
            _ACQUIRE,
            [f"keel:{key}", f"keel-fence:{key}", f"keel-children:{parent}/"],
            [owner, int(ttl * 1000), data],
        )
        return None if fence is None else Grant(int(fence), sent + ttl)

    async def renew(self, key: str, owner: str, fence: int, ttl: float) -> float | None:
        sent = time.monotonic()
        ok = await self._eval(_RENEW, [f"keel:{key}"], [f"{fence}\n{owner}\n", int(ttl * 1000)])
        return sent + ttl if ok else None

    async def release(self, key: str, owner: str, fence: int) -> None:
        # Pipelined, not awaited: this connection's next command is ordered after it. The
        # scripts are loaded on every (re)connection; if the server restarted in between
        # and forgot them, the release fails and the lease expires instead.
        await self._pipe.send(
            "EVALSHA", self._shas[_RELEASE], 1, f"keel:{key}", f"{fence}\n{owner}\n"
        )

    async def get(self, key: str) -> Record | None:
        with map_errors(_UNAVAILABLE, backend="redis", url=self._url):
            raw = await self._client.get(f"keel:{key}")
        return None if raw is None else _parse(key, raw)

    async def children(self, prefix: str) -> list[Record]:
        index = f"keel-children:{prefix}"
        with map_errors(_UNAVAILABLE, backend="redis", url=self._url):
            names = sorted(await self._client.smembers(index))
            if not names:
                return []
            values = await self._client.mget(names)
            gone = [n for n, v in zip(names, values, strict=True) if v is None]
            if gone:
                await self._client.srem(index, *gone)
        return [
            _parse((n.decode() if isinstance(n, bytes) else n).removeprefix("keel:"), v)
            for n, v in zip(names, values, strict=True)
            if v is not None
        ]

    async def wait(self, key: str, timeout: float) -> None:
        await asyncio.sleep(min(timeout, _POLL))

    def on_session_lost(self, callback: Callable[[], None]) -> None:
        return None

    async def close(self) -> None:
        with contextlib.suppress(CoordinationError):
            await self._pipe.call("PING")  # after every pipelined release
        await self._pipe.close()
        with map_errors(_UNAVAILABLE, backend="redis", url=self._url):
            await _redis_client.close(self._client)
