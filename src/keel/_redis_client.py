"""How Keel's Redis transport and Redis coordinator reach Redis: one server, or the primary
that Sentinel names; plaintext or TLS; with or without an ACL user. Both parts build their
clients here, so a URL means the same to both.

URL forms:

* ``redis://[user:password@]host:port/db`` and ``rediss://...`` (TLS);
* ``redis+sentinel://[user:password@]s1:26379,s2:26379,s3:26379/service/db`` and
  ``rediss+sentinel://...``: the sentinels, then the monitored service's name (the
  ``sentinel monitor`` name) and the database. The user and password are the data servers';
  ``sentinel_username`` / ``sentinel_password`` (URL options or keywords) log in to the
  sentinels when they ask for it. With TLS the sentinels are reached over TLS too.

After a failover the client reconnects to the primary the sentinels name now (every
reconnect asks them: see `_SentinelConnection` for the one redis-py skipped); a connection
to a server the sentinels no longer name is dropped before its next command (`follow`, which
the messaging consumers call when a blocking read comes back empty); a server that was
demoted answers READONLY, and redis-py's Sentinel connection drops it and asks again.

What a failover may lose: Redis replicates asynchronously, so a write acknowledged by the old
primary may be missing on the new one. ``wait_replicas=N`` (default 1 for a Sentinel URL, 0
otherwise) makes the writes that must survive (durable sends; lock acquisitions, which carry
fences) wait for ``WAIT N`` before they count as done; see `replicated`.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import redis.asyncio as aioredis
from redis import exceptions as rexc
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import (
    MasterNotFoundError,
    Sentinel,
    SentinelConnectionPool,
    SentinelManagedConnection,
    SentinelManagedSSLConnection,
)
from redis.backoff import NoBackoff

from keel._tls import TLS_OPTIONS, TLSConfig, credentials_rejected, tls_config, tls_failure
from keel.errors import ConfigError, KeelError
from keel.urls import URL

log = logging.getLogger("keel.redis")

WAIT_TIMEOUT_MS = 2000
ALONE_RECHECK_S = 2.0  # a primary found without replicas is asked again after this
_SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
_TLS_SCHEMES = ("rediss", "rediss+sentinel")
OPTIONS = ("sentinel_username", "sentinel_password", "wait_replicas")
URL_OPTIONS = frozenset({*OPTIONS, *TLS_OPTIONS})  # every Redis URL knows these


@dataclass(frozen=True)
class Target:
    """Where a Redis URL points: the server or the sentinels, the database, TLS, login."""

    url: URL
    db: int
    service: str | None  # Sentinel's name for the primary; None for one server
    tls: TLSConfig | None
    wait_replicas: int
    sentinel_username: str | None
    sentinel_password: str | None

    @property
    def sentinels(self) -> list[tuple[str, int]]:
        return [(h.host, h.port or 26379) for h in self.url.hosts] or [("127.0.0.1", 26379)]

    def ssl_kwargs(self) -> dict[str, Any]:
        """redis-py's TLS keywords for this target (empty without TLS)."""
        if self.tls is None:
            return {}
        return {
            "ssl": True,
            "ssl_ca_certs": self.tls.ca,
            "ssl_certfile": self.tls.cert,
            "ssl_keyfile": self.tls.key,
            "ssl_cert_reqs": "none" if self.tls.verify == "none" else "required",
            "ssl_check_hostname": self.tls.check_hostname,
        }

    def ssl_context(self) -> ssl.SSLContext | None:
        return None if self.tls is None else self.tls.context()


def target(url: URL, options: Mapping[str, Any] | None = None) -> Target:
    """Parse a Redis URL (and keyword options, which win) into a `Target`."""
    opts = {**url.options, **{k: v for k, v in (options or {}).items() if v is not None}}
    parts = [p for p in url.path.split("/") if p]
    service: str | None = None
    if url.scheme in _SENTINEL_SCHEMES:
        if not parts:
            raise ConfigError(
                f"{url.redacted()}: name the Sentinel service, "
                "e.g. redis+sentinel://127.0.0.1:26379/mymaster/0"
            )
        service, parts = parts[0], parts[1:]
    if len(parts) > 1 or (parts and not parts[0].isascii()) or (parts and not parts[0].isdigit()):
        raise ConfigError(f"{url.redacted()}: the database must be a number, e.g. /0")
    try:
        wait = int(opts.get("wait_replicas", 1 if service else 0))
    except ValueError:
        raise ConfigError(f"{url.redacted()}: wait_replicas must be a number") from None
    return Target(
        url=url,
        db=int(parts[0]) if parts else 0,
        service=service,
        tls=tls_config(url, options, secure_scheme=url.scheme in _TLS_SCHEMES),
        wait_replicas=max(0, wait),
        sentinel_username=opts.get("sentinel_username"),
        sentinel_password=opts.get("sentinel_password"),
    )


class _SentinelConnection(SentinelManagedConnection):
    """redis-py's connection to the sentinels' primary, mended where it reaches a server the
    sentinels do not name (issue 19: calls stalled about 20 s after a killed primary came back).

    * A connection dropped under a command is reconnected by redis-py's
      ``send_packed_command`` through ``connect_check_health``, which goes to the address the
      connection had and retries the socket connect there (25 times, about 10 s, with Keel's
      retry) without asking the sentinels. A blocking read in flight when the primary was
      killed thus knocked at the dead primary's address until it restarted (a master again,
      with its old data), then stayed on it until Sentinel demoted it about 10 s later. Here
      that reconnect goes through ``connect``, which asks the sentinels.
    * Before each command: a connection to another server than the pool's primary (the
      sentinels' latest answer, refreshed by every connect and by `follow`) is dropped and
      reconnected. A tuple comparison per command.
    """

    async def connect_check_health(
        self, check_health: bool = True, retry_socket_connect: bool = True
    ) -> None:
        if self.is_connected:
            return
        if retry_socket_connect:  # redis-py's reconnect of a dropped connection
            await self.connect()  # type: ignore[no-untyped-call]
            return
        await super().connect_check_health(check_health=check_health, retry_socket_connect=False)

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        primary = self.connection_pool.master_address
        if self.is_connected and primary is not None and primary != (self.host, self.port):
            log.info(
                "redis: leaving %s:%s, the sentinels' primary is %s:%s now",
                self.host, self.port, *primary,
            )  # fmt: skip
            await self.disconnect()
        await super().send_packed_command(command, check_health)

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        # redis-py's own handler (skipped here) only reconnects on READONLY, and the
        # reconnect asks the sentinel that answered last first: one with a stale or wrong
        # view (partitioned, or restarted with an old config) names the same replica
        # forever while the others know the primary. Asked last from now on.
        try:
            return await super(SentinelManagedConnection, self).read_response(*args, **kwargs)
        except rexc.ReadOnlyError:
            if not self.connection_pool.is_master:
                raise
            sentinels = self.connection_pool.sentinel_manager.sentinels
            if len(sentinels) > 1:
                sentinels.append(sentinels.pop(0))
            await self.disconnect()
            raise rexc.ConnectionError(
                f"redis {self.host}:{self.port} is a replica now, not the primary; "
                "asking the other sentinels"
            ) from None


class _SentinelSSLConnection(_SentinelConnection, SentinelManagedSSLConnection):
    pass


class _Sentinels(Sentinel):
    """redis-py's asyncio Sentinel manager, mended where concurrent callers lose sentinels.

    redis-py's ``discover_master`` walks ``self.sentinels`` with ``enumerate`` and, when one
    answers, swaps it to the front by the index it had when the walk reached it. Every
    connect to the primary calls it, so after a failover every consumer and every pipe of a
    client asks at once; a caller whose sentinel moved meanwhile (another caller's swap, or
    `_SentinelConnection`'s rotation) swapped by a stale index: ``[s1, s2, s3]`` became
    ``[s3, s2, s3]``. The dropped sentinel was never asked again, and its client (with its
    open TLS connections) was left to the garbage collector, unclosed: one sentinel
    connection leaked per failover, and the rotation lost a sentinel. Here the walk is over
    a copy and the answering sentinel is found by identity, so the list keeps every
    sentinel once; and `aclose` closes every client made, whatever the list holds by then.
    """

    def __init__(self, sentinels: list[tuple[str, int]], **kwargs: Any) -> None:
        # redis-py types this constructor only from 8.x on: called untyped, either way checks.
        cast(Any, super()).__init__(sentinels, **kwargs)
        self._made: tuple[aioredis.Redis, ...] = tuple(self.sentinels)

    async def discover_master(self, service_name: str) -> tuple[Any, Any]:
        failures: list[str] = []
        refused: list[rexc.ResponseError] = []
        for sentinel in list(self.sentinels):
            try:
                masters: Any = await sentinel.sentinel_masters()
            except (rexc.ConnectionError, rexc.TimeoutError) as exc:
                failures.append(f"{sentinel} - {exc!r}")
                continue
            except rexc.ResponseError as exc:
                # redis-py lets this out and never asks the sentinels after it: one sentinel
                # whose ACL lacks SENTINEL MASTERS (or a stale config) hid the two that know
                # the primary. A refusal from every sentinel is a configuration error.
                where = sentinel.connection_pool.connection_kwargs
                log.warning(
                    "redis: sentinel %s:%s refused SENTINEL MASTERS: %s",
                    where.get("host"), where.get("port"), exc,
                )  # fmt: skip
                failures.append(f"{sentinel} - {exc!r}")
                refused.append(exc)
                continue
            state = masters.get(service_name)
            if state and self.check_master_state(state, service_name):
                self._ask_first(sentinel)
                forced = getattr(self, "_force_master_ip", None)
                return (forced if forced is not None else state["ip"]), state["port"]
        if refused and len(refused) == len(self.sentinels):
            raise refused[0]
        detail = f" : {', '.join(failures)}" if failures else ""
        raise MasterNotFoundError(f"No master found for {service_name!r}{detail}")

    def _ask_first(self, sentinel: aioredis.Redis) -> None:
        """Swap the sentinel that answered to the front, by where it is now."""
        order = self.sentinels
        for index, other in enumerate(order):
            if other is sentinel:
                order[0], order[index] = order[index], order[0]
                return

    async def aclose(self) -> None:
        """Close every sentinel client this manager made, each even if another fails
        (redis-py's own, in the versions that have one, closes those still in the list;
        see redis/redis-py#3201)."""
        results = await asyncio.gather(
            *(sentinel.aclose() for sentinel in self._made), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result


async def follow(redis: aioredis.Redis) -> None:
    """Under Sentinel, ask the sentinels for the primary now: the pool's connections to any
    other server leave it before their next command (see `_SentinelConnection`). A consume
    loop calls this when a blocking read comes back empty, so a consumer left on a server
    that is not the primary (it came back still a master) moves within one read. Nothing for
    one server."""
    pool = redis.connection_pool
    if isinstance(pool, SentinelConnectionPool):
        await pool.get_master_address()  # type: ignore[no-untyped-call]


def client(where: Target, **kwargs: Any) -> aioredis.Redis:
    """A redis-py client for the target; ``kwargs`` are redis-py connection keywords
    (timeouts, retry)."""
    url = where.url
    common: dict[str, Any] = {
        "db": where.db,
        "username": url.username,
        "password": url.password,
        **where.ssl_kwargs(),
        **kwargs,
    }
    if where.service is None:
        return aioredis.Redis(host=url.host or "127.0.0.1", port=url.port or 6379, **common)
    sentinel_kwargs: dict[str, Any] = {
        "username": where.sentinel_username,
        "password": where.sentinel_password,
        "socket_timeout": kwargs.get("socket_connect_timeout", 2),
        "socket_connect_timeout": kwargs.get("socket_connect_timeout", 2),
        # One try per sentinel: redis-py's default retry (3 more, with back-off) made a
        # sentinel that accepts and never answers (stopped, overloaded) cost about 15 s on
        # every connect, before the next sentinel was asked.
        "retry": Retry(NoBackoff(), 0),
        **where.ssl_kwargs(),
    }
    manager = _Sentinels(where.sentinels, sentinel_kwargs=sentinel_kwargs)
    connection = _SentinelSSLConnection if where.tls is not None else _SentinelConnection
    redis: aioredis.Redis = manager.master_for(
        where.service, redis_class=aioredis.Redis, connection_class=connection, **common
    )
    return redis


async def close(redis: aioredis.Redis) -> None:
    """Close a client of `client`, and its connections to the sentinels (redis-py's
    ``Redis.aclose`` leaves the Sentinel manager's own clients open)."""
    manager = getattr(redis.connection_pool, "sentinel_manager", None)
    try:
        await redis.aclose()
    finally:
        if isinstance(manager, _Sentinels):
            await manager.aclose()


async def primary(where: Target) -> tuple[str, int]:
    """The address of the server to write to now (the sentinels' primary, or the server)."""
    url = where.url
    if where.service is None:
        return url.host or "127.0.0.1", url.port or 6379
    sentinel_kwargs: dict[str, Any] = {
        "username": where.sentinel_username,
        "password": where.sentinel_password,
        "socket_timeout": 2,
        "socket_connect_timeout": 2,
        "retry": Retry(NoBackoff(), 0),  # one try per sentinel, as in `client`
        **where.ssl_kwargs(),
    }
    order = _sentinel_order.setdefault(tuple(where.sentinels), list(where.sentinels))
    manager = _Sentinels(list(order), sentinel_kwargs=sentinel_kwargs)
    try:
        host, port = await manager.discover_master(where.service)
        # discover_master put the sentinel that answered first: asked first next time too.
        kwargs = manager.sentinels[0].connection_pool.connection_kwargs
        answered = (kwargs.get("host"), kwargs.get("port"))
        if answered in order:
            order.remove(answered)
            order.insert(0, answered)
    finally:
        await manager.aclose()
    return str(host), int(port)


# The order `primary` asks a URL's sentinels in, by the URL's sentinels: the last to answer
# first, one whose primary turned out a replica last (`distrust`).
_sentinel_order: dict[tuple[tuple[str, int], ...], list[tuple[str, int]]] = {}


def distrust(where: Target) -> None:
    """The primary `primary` named answers READONLY: ask the sentinel that named it last.
    One with a stale or wrong view (partitioned, restarted with an old config) would
    otherwise name the same replica on every reconnect while the others know the primary."""
    order = _sentinel_order.get(tuple(where.sentinels))
    if order is not None and len(order) > 1:
        order.append(order.pop(0))


def refusal(exc: BaseException, where: Target, *, sentinel: bool = False) -> KeelError | None:
    """A refused login or certificate (retrying will not mend it), else None. ``sentinel``:
    the refusal came from a sentinel (its user is ``sentinel_username``)."""
    server = where.url.redacted()
    backend = "Redis Sentinel" if sentinel else "Redis"
    user = where.sentinel_username if sentinel else where.url.username
    failed = tls_failure(exc, backend=backend, server=server)
    if failed is not None:
        return failed
    for item in (exc, exc.__cause__, exc.__context__):
        if isinstance(item, rexc.AuthenticationError | rexc.AuthenticationWrongNumberOfArgsError):
            return credentials_rejected(backend=backend, server=server, user=user)
        if isinstance(item, rexc.ResponseError) and str(item).startswith(("WRONGPASS", "NOAUTH")):
            return credentials_rejected(backend=backend, server=server, user=user)
    return None


async def _check_sentinels(where: Target) -> None:
    """Under Sentinel: raise the refusal if no sentinel takes our certificate or login.

    redis-py asks each sentinel in turn and, when none answers, says only "No master found"
    (a retryable `TransportError`): a wrong CA or sentinel password would look like sentinels
    that are down. One connection to each (without retries) until one answers tells them
    apart; if one answers, the primary's own connection is checked next as for one server."""
    found: KeelError | None = None
    for host, port in where.sentinels:
        sentinel = aioredis.Redis(
            host=host,
            port=port,
            username=where.sentinel_username,
            password=where.sentinel_password,
            socket_timeout=2,
            socket_connect_timeout=2,
            retry=Retry(NoBackoff(), 0),
            **where.ssl_kwargs(),
        )
        try:
            await sentinel.ping()
        except (rexc.RedisError, OSError) as exc:
            refused = refusal(exc, where, sentinel=True)
            found = found or refused
            continue
        finally:
            await sentinel.aclose()
        return
    if found is not None:
        raise found


async def check_login(redis: aioredis.Redis, where: Target) -> None:
    """Open one connection (TLS handshake, AUTH, SELECT) without retries: a refused
    certificate or login is a typed error now, not ten seconds of reconnecting."""
    if where.service is not None:
        await _check_sentinels(where)
    pool = redis.connection_pool
    options = {**pool.connection_kwargs, "retry": None}
    connection = pool.connection_class(**options)
    try:
        await connection.connect()  # type: ignore[no-untyped-call]
        await connection.send_command("PING")
        await connection.read_response()
    except (rexc.RedisError, OSError) as exc:
        refused = refusal(exc, where)
        if refused is not None:
            raise refused from None
        raise
    finally:
        await connection.disconnect()


def online_replicas(info: Mapping[str, Any]) -> int:
    """Replicas in sync, from ``INFO replication`` (parsed by redis-py): one still loading
    its first copy (after a failover, the old primary) cannot acknowledge a WAIT yet."""
    return sum(
        1
        for name, value in info.items()
        if name.startswith("slave") and isinstance(value, dict) and value.get("state") == "online"
    )


async def replicated(conn_reply: int, where: Target, redis: aioredis.Redis) -> bool:
    """Whether a write that ``WAIT`` saw reach ``conn_reply`` replicas counts as held: it
    does if enough replicas have it, or if the primary has no replica in sync at all (it runs
    alone after a failover until the old primary has caught up: as PostgreSQL's synchronous
    mode under Patroni, availability first while a single server is left)."""
    if conn_reply >= where.wait_replicas:
        return True
    alone = online_replicas(await redis.info("replication")) == 0
    if alone:
        log.warning("redis: the primary has no replica; writes are held by one server only")
    return alone
