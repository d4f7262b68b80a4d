"""ZooKeeper coordination backend (``kazoo``): ephemeral nodes in one session.

A record is an ephemeral node ``/keel/<key>`` created by this client's session; ``acquire`` is
one ``create`` (it fails if the node exists) and the fence is the node's creation zxid, which
ZooKeeper orders totally and persists (the epoch is in its high bits, so it grows across
restarts and leader changes). Release is one ``delete`` of our node.

Leases are the *session*: the server removes every ephemeral node of a session it has not heard
from for the session timeout (the ``ttl`` given to `connect`). So a lock's ttl is the session's,
not its own (characteristic PER_LOCK_TTL is absent: asking for a shorter ttl is `Unsupported`).
Session expiry is pushed to the client (SESSION_EVENTS): every lock held through it is marked
lost at once. kazoo runs the session on its own threads; results cross into the event loop
with ``call_soon_threadsafe``. A paused process keeps no session alive (its threads stop too).

Known gap: release checks locally that the session is still the one that created the node and
then deletes it (one round trip); if the session expires while that delete is in flight, the
client's *new* session could delete a successor's node. The successor's fence is still higher
than ours, so fenced resources stay safe; only that successor's exclusion is weakened.

Ensembles, TLS and digest logins: see `_zk_connect`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import socket
import time
from collections.abc import Callable, Mapping
from typing import Any

from kazoo.client import KazooClient, KazooState
from kazoo.exceptions import (
    BadVersionError,
    ConnectionClosedError,
    ConnectionLoss,
    NoAuthError,
    NodeExistsError,
    NoNodeError,
    OperationTimeoutError,
    SessionExpiredError,
)
from kazoo.handlers.threading import AsyncResult, KazooTimeoutError, SequentialThreadingHandler

from keel._tls import TLS_OPTIONS, credentials_rejected
from keel.coordination.backends._zk_connect import client_options, tls_refusal
from keel.coordination.backends.base import Backend, Characteristic, Grant, Record, map_errors
from keel.errors import KeelError

_UNAVAILABLE = (
    ConnectionLoss,
    BadVersionError,
    ConnectionClosedError,
    SessionExpiredError,
    OperationTimeoutError,
    KazooTimeoutError,
)


class _InlineResult(AsyncResult):  # type: ignore[misc]
    """Runs ``rawlink`` callbacks on the connection thread instead of queueing them to
    kazoo's completion thread: Keel's callbacks only hand the result to the event loop
    (``call_soon_threadsafe``), and the extra thread hop cost a third of each round trip."""

    def _do_callbacks(self) -> None:
        for callback in self._callbacks:
            callback(self)


class _Handler(SequentialThreadingHandler):  # type: ignore[misc]
    def async_result(self) -> AsyncResult:
        return _InlineResult(self)

    def create_connection(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("use_ssl"):
            # kazoo wraps the socket in TLS before it connects, and drops it unclosed when the
            # connect fails (a server of the URL down): find that out on a plain socket.
            address = kwargs["address"] if "address" in kwargs else args[0]
            socket.create_connection(address, kwargs.get("timeout")).close()
        return super().create_connection(*args, **kwargs)


def _path(key: str) -> str:
    return "/keel/" + key.rstrip("/")


class ZookeeperBackend:
    """Leased records as ephemeral ZooKeeper nodes (see the module docstring)."""

    characteristics = frozenset(
        {
            Characteristic.DISTRIBUTED,
            Characteristic.REPLICATED,
            Characteristic.DURABLE_FENCES,
            Characteristic.SERVER_TIMED_LEASES,
            Characteristic.SESSION_EVENTS,
            Characteristic.CHANGE_WATCHES,
        }
    )
    URL_OPTIONS = frozenset({"connect_timeout", *TLS_OPTIONS})

    def __init__(self, client: KazooClient, url: str, ttl: float) -> None:
        self._client = client
        self._url = url
        self._ttl = ttl
        self._loop = asyncio.get_running_loop()
        self._on_lost: list[Callable[[], None]] = []
        self._sessions: dict[tuple[str, int], int] = {}  # (key, fence) -> session id
        self._retries: set[asyncio.Task[None]] = set()  # releases lost with a connection
        self._releasing: set[tuple[str, int]] = set()  # deletes sent, not yet confirmed
        # key -> the highest fence granted here: a node of ours with a fence not above it is
        # one we released (its delete lost), never a create whose reply we lost.
        self._granted_top: collections.OrderedDict[str, int] = collections.OrderedDict()
        client.add_listener(self._state_changed)

    @classmethod
    async def open(
        cls, url: Any, *, member_id: str, ttl: float, options: Mapping[str, str]
    ) -> Backend:
        kwargs, tls = client_options(url, options)
        refused = await tls_refusal(url, tls)
        if refused is not None:
            raise refused
        client = KazooClient(
            **kwargs,
            timeout=ttl,
            handler=_Handler(),
            connection_retry={"max_tries": -1, "delay": 0.1, "max_delay": 1.0},
        )
        backend = cls(client, url.redacted(), ttl)
        try:
            with backend._mapped():
                await asyncio.to_thread(client.start, float(options.get("connect_timeout", 10)))
            if url.username is not None:
                await backend._check_login(url)
        except BaseException:
            await asyncio.to_thread(client.stop)
            client.close()  # its wake-up socket pair
            raise
        return backend

    async def _check_login(self, url: Any) -> None:
        """Digest logins are checked against ACLs only: read /keel (created with ours)."""
        with self._mapped():
            try:
                await asyncio.to_thread(self._client.ensure_path, "/keel")
                await asyncio.to_thread(self._client.get_children, "/keel")
            except NoAuthError:
                raise credentials_rejected(
                    backend="ZooKeeper",
                    server=self._url,
                    user=url.username,
                    detail="/keel belongs to another user, or the password is wrong",
                ) from None

    def _mapped(self) -> contextlib.AbstractContextManager[None]:
        return map_errors(
            _UNAVAILABLE,
            backend="zookeeper",
            url=self._url,
            passthrough=(NodeExistsError, NoNodeError, BadVersionError),
        )

    def _state_changed(self, state: str) -> None:
        # Runs on a kazoo thread. SUSPENDED is left to the core's expiry bound; LOST means
        # the server has already deleted our ephemeral nodes.
        if state == KazooState.LOST:
            for callback in self._on_lost:
                self._loop.call_soon_threadsafe(callback)

    async def _call(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        future: asyncio.Future[Any] = self._loop.create_future()

        def settle(result: Any) -> None:
            if future.cancelled():
                return
            try:
                future.set_result(result.get_nowait())
            except Exception as exc:
                future.set_exception(exc)

        with self._mapped():
            method(*args, **kwargs).rawlink(
                lambda result: self._loop.call_soon_threadsafe(settle, result)
            )
            return await future

    def _session_id(self) -> int:
        client_id = self._client.client_id
        return int(client_id[0]) if client_id else 0

    def lease_ttl(self, ttl: float) -> float:
        negotiated = getattr(self._client, "_session_timeout", None)
        return max(self._ttl, (negotiated or 0) / 1000)

    async def acquire(self, key: str, owner: str, ttl: float, data: bytes) -> Grant | None:
        sent = time.monotonic()
        try:
            _, stat = await self._call(
                self._client.create_async,
                _path(key),
                owner.encode() + b"\n" + data,
                ephemeral=True,
                makepath=True,
                include_data=True,
            )
        except NodeExistsError:
            stat = await self._orphan(key, owner)
            if stat is None:
                return None
        except KeelError:
            # The create may have been applied with its reply lost in a cut connection. The
            # session lives on (the client reaches another server in time), and so would the
            # node, held by nobody: adopt it if it is there, else fail as we would have.
            with contextlib.suppress(KeelError):
                stat = await self._orphan(key, owner)
                if stat is not None:
                    return self._granted(key, stat, sent, ttl)
            raise
        return self._granted(key, stat, sent, ttl)

    async def _orphan(self, key: str, owner: str) -> Any:
        """Our session's node for ``key`` that no lock of ours holds (a create whose reply
        was lost), or None."""
        try:
            node_data, stat = await self._call(self._client.get_async, _path(key))
        except NoNodeError:
            return None
        mine = stat.ephemeralOwner == self._session_id() and node_data.startswith(
            owner.encode() + b"\n"
        )
        held = (key, int(stat.czxid))
        if not mine or held in self._sessions or held in self._releasing:
            return None  # held, or released with its delete on the way: not an orphan
        if stat.czxid <= self._granted_top.get(key, 0):
            # Released already, its delete lost: delete it now; the caller tries again.
            with contextlib.suppress(KeelError, NoNodeError, BadVersionError):
                await self._call(self._client.delete_async, _path(key), stat.version)
            return None
        return stat

    def _granted(self, key: str, stat: Any, sent: float, ttl: float) -> Grant:
        fence = int(stat.czxid)
        self._sessions[(key, fence)] = int(stat.ephemeralOwner)
        self._granted_top[key] = max(fence, self._granted_top.pop(key, 0))
        if len(self._granted_top) > 10_000:
            self._granted_top.popitem(last=False)
        return Grant(fence, sent + self.lease_ttl(ttl))

    async def renew(self, key: str, owner: str, fence: int, ttl: float) -> float | None:
        sent = time.monotonic()
        stat = await self._call(self._client.exists_async, _path(key))
        if stat is None or stat.czxid != fence or stat.ephemeralOwner != self._session_id():
            return None
        return sent + self.lease_ttl(ttl)

    async def release(self, key: str, owner: str, fence: int) -> None:
        session = self._sessions.pop((key, fence), None)
        if session is None or session != self._session_id():
            return  # our session ended, and the server deleted the node with it
        # Same session as at acquire, so the node is still the one we created (only we or
        # the session's expiry delete it); its data version is 0 since we never set it.
        # Pipelined: ZooKeeper runs one session's requests in order, so anything this client
        # does next sees the delete; others see it one round trip later. If the connection
        # drops first and the client gets the same session back on another server (the
        # session outlives a lost server), nothing would delete the node: `_released`
        # deletes it again then.
        self._releasing.add((key, fence))
        self._client.delete_async(_path(key), 0).rawlink(
            lambda result: self._loop.call_soon_threadsafe(
                self._released, result, key, fence, session
            )
        )

    def _released(self, result: Any, key: str, fence: int, session: int) -> None:
        try:
            result.get_nowait()
        except _UNAVAILABLE:  # the delete may not have reached the server
            task = self._loop.create_task(self._release_again(key, fence, session))
            self._retries.add(task)
            task.add_done_callback(self._retries.discard)
            task.add_done_callback(lambda _: self._releasing.discard((key, fence)))
            return
        except Exception:  # gone already (NoNode, BadVersion): released
            pass
        self._releasing.discard((key, fence))

    async def _release_again(self, key: str, fence: int, session: int) -> None:
        """Delete our node once the client is back on the same session; stop when the
        session ends (its expiry deletes the node) or past one session timeout."""
        deadline = time.monotonic() + self.lease_ttl(self._ttl) * 2
        # 0: kazoo between connections; only another session means ours is gone.
        while time.monotonic() < deadline and self._session_id() in (session, 0):
            try:
                stat = await self._call(self._client.exists_async, _path(key))
                # Only this session deletes its own ephemeral node, so what we find with our
                # session and our fence is still ours when the delete arrives.
                if stat is None or stat.czxid != fence or stat.ephemeralOwner != session:
                    return
                await self._call(self._client.delete_async, _path(key), 0)
            except (NoNodeError, BadVersionError):
                return
            except KeelError:
                await asyncio.sleep(0.1)
            else:
                return

    def _record(self, key: str, data: bytes, stat: Any) -> Record:
        owner, _, rest = data.partition(b"\n")
        return Record(key, owner.decode(), int(stat.czxid), rest)

    async def get(self, key: str) -> Record | None:
        try:
            data, stat = await self._call(self._client.get_async, _path(key))
        except NoNodeError:
            return None
        return self._record(key, data, stat)

    async def children(self, prefix: str) -> list[Record]:
        try:
            names = await self._call(self._client.get_children_async, _path(prefix))
        except NoNodeError:
            return []
        records = await asyncio.gather(*(self.get(prefix + n) for n in sorted(names)))
        return [r for r in records if r is not None]

    async def wait(self, key: str, timeout: float) -> None:
        changed = asyncio.Event()

        def watcher(_event: Any) -> None:
            self._loop.call_soon_threadsafe(changed.set)

        try:
            if key.endswith("/"):
                await self._call(self._client.get_children_async, _path(key), watcher)
            elif await self._call(self._client.exists_async, _path(key), watcher) is None:
                return
        except NoNodeError:
            await asyncio.sleep(min(timeout, 0.05))
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await changed.wait()

    def on_session_lost(self, callback: Callable[[], None]) -> None:
        self._on_lost.append(callback)

    async def close(self) -> None:
        for task in list(self._retries):
            task.cancel()

        def stop() -> None:
            with contextlib.suppress(Exception):
                self._client.exists("/")  # after every pipelined delete (session FIFO)
            self._client.stop()
            self._client.close()

        await asyncio.to_thread(stop)
