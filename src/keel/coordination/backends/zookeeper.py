"""ZooKeeper coordination backend (``kazoo``), shaped like Curator's ``InterProcessMutex``.

A key ``K`` is a container node ``/keel/K`` (the server removes it once empty); everyone who
wants it creates an ephemeral sequential child named for its attempt, ``_c_<token>-<seq>``.
The holder is the lowest sequence, and the fence is that node's creation zxid, which ZooKeeper
orders totally and persists (the epoch is in its high bits, so it grows across restarts and
leader changes). A waiter watches its predecessor and the node ahead of that (`_Turn`): when
the one ahead of its predecessor goes it lists the key, while its predecessor holds, so that
when the predecessor goes it knows it is next without a listing on the hand-off's path. Each
node has two watchers at most (no herd), and the lock goes to waiters in the order they came.
Only a node's deletion frees a place: a holder's `update` changes its data, which fires the
watch too.

Leases are the *session*: the server removes every ephemeral node of a session it has not heard
from for the *negotiated* session timeout (the server may grant less than the ``ttl`` asked of
`connect`; the negotiated value is what bounds a lock, ``held.ttl`` says which). So a lock's
ttl is the session's, not its own (PER_LOCK_TTL is absent: asking for a shorter ttl is
`Unsupported`). Session expiry is pushed to the client (SESSION_EVENTS): every lock held
through it is marked lost at once. kazoo runs the session on its own threads; results cross
into the event loop with ``call_soon_threadsafe``. A paused process keeps no session alive (its
threads stop too).

Failure semantics: a create whose reply was lost is found again by its name (the attempt's
token) and taken as ours. A release is a ``delete`` of our own node, sent at once; if the
connection drops before the server confirms it, the core sends it again — the session may well
survive the reconnect (on another server of an ensemble, say), and with it the node — until
the server says the node is gone (or the session is). Node names are unique per attempt, so a
retried delete can never remove someone else's node.
A request made while kazoo is not connected (a server down or restarting) fails at once with
`BackendUnavailable`, as every other "not now" of the server does (`_UNAVAILABLE`): kazoo would
queue it until a server answered, and send it then, behind the back of a caller that gave up.

Ensembles, TLS and digest logins: see `_zk_connect`.
"""

from __future__ import annotations

import asyncio
import contextlib
import posixpath
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from kazoo.client import KazooClient, KazooState
from kazoo.exceptions import (
    EXCEPTIONS,
    BadVersionError,
    ConnectionClosedError,
    ConnectionDropped,
    ConnectionLoss,
    NoAuthError,
    NodeExistsError,
    NoNodeError,
    NotEmptyError,
    NotReadOnlyCallError,
    OperationTimeoutError,
    RequestTimeoutError,
    SessionExpiredError,
    SessionMovedError,
    ThrottledOpError,
)
from kazoo.handlers.threading import AsyncResult, KazooTimeoutError, SequentialThreadingHandler
from kazoo.protocol.serialization import (
    Connect,
    Create,
    Create2,
    Delete,
    MultiHeader,
    Transaction,
    int_struct,
    read_string,
    stat_struct,
)
from kazoo.protocol.states import EventType
from kazoo.security import OPEN_ACL_UNSAFE

from keel._tls import TLS_OPTIONS, credentials_rejected
from keel.coordination._clock import now
from keel.coordination.backends._zk_connect import client_options, tls_refusal
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

# Every "not now" of kazoo or the server: connection and session faults, and the replies of a
# server that cannot serve the request yet (throttling, read-only without quorum, a session
# moved to another member, a request timed out).
_UNAVAILABLE = (
    ConnectionLoss,
    ConnectionDropped,
    ConnectionClosedError,
    SessionExpiredError,
    OperationTimeoutError,
    KazooTimeoutError,
    NotReadOnlyCallError,
    RequestTimeoutError,
    SessionMovedError,
    ThrottledOpError,
)
_CONTAINER = 4  # CreateMode.CONTAINER
_HANDSHAKE_FLOOR = 1.0  # seconds: the shortest wait for a handshake's answer
_EPHEMERAL_SEQUENTIAL = 3  # CreateMode.EPHEMERAL_SEQUENTIAL


class _CreateContainer(Create2):  # type: ignore[misc]
    """ZooKeeper's createContainer (opcode 19): Create2's wire format, a container node that
    the server deletes once its last child is gone. kazoo has no call for it."""

    type = 19


class _Multi(Transaction):  # type: ignore[misc]
    """A ``multi`` whose reply kazoo's `Transaction` cannot read: a create sent as Create2
    (ZooKeeper 3.8 answers it like a plain create, with the path alone; a server that adds
    the stat is read too). Results: the created path, True for a delete, or the op's error
    (a failed multi changes nothing and says which op failed)."""

    @classmethod
    def deserialize(cls, data: bytes, offset: int) -> list[Any]:
        header, offset = MultiHeader.deserialize(data, offset)
        results: list[Any] = []
        while not header.done:
            if header.type in (Create.type, Create2.type):
                path, offset = read_string(data, offset)
                if header.type == Create2.type:
                    offset += stat_struct.size
                results.append(path)
            elif header.type == Delete.type:
                results.append(True)
            elif header.type == -1:
                err = int_struct.unpack_from(data, offset)[0]
                offset += int_struct.size
                results.append(EXCEPTIONS[err]())
            header, offset = MultiHeader.deserialize(data, offset)
        return results


@dataclass(slots=True)
class _Release:
    """A release not sent yet: the key, our node, its fence, and the confirmation handed to
    the core."""

    key: str
    node: str
    fence: int
    confirmation: asyncio.Future[None]


# Backends (per event loop) holding releases not sent yet: every request any ZooKeeper
# backend here sends flushes them all first, so once ``release()`` returned, whatever this
# process asks next is ordered after the delete, as if it had been sent at once.
_deferring: dict[asyncio.AbstractEventLoop, set[ZookeeperBackend]] = {}


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

    def dispatch_callback(self, callback: Any) -> None:
        # Keel's watchers only hand the event to the event loop (``call_soon_threadsafe``):
        # run them on the connection thread, as `_InlineResult` does for replies. A lock's
        # hand-off waits on its predecessor's watch, and the hop to kazoo's completion
        # thread was a thread wake-up on that path. Anything else keeps kazoo's thread.
        if getattr(callback.func, "keel_inline", False):
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody to tell
                callback.func(*callback.args)
        else:
            super().dispatch_callback(callback)

    def create_connection(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("use_ssl"):
            # kazoo wraps the socket in TLS before it connects, and drops it unclosed when the
            # connect fails (a server of the URL down): find that out on a plain socket.
            address = kwargs["address"] if "address" in kwargs else args[0]
            socket.create_connection(address, kwargs.get("timeout")).close()
        return super().create_connection(*args, **kwargs)


def _inline(watcher: Callable[[Any], object]) -> Callable[[Any], object]:
    """Mark a watcher as safe to run on kazoo's connection thread (it must not block)."""
    watcher.keel_inline = True  # type: ignore[attr-defined]
    return watcher


def _dir(key: str) -> str:
    return "/keel/" + key.rstrip("/")


def _seq(name: str) -> int:
    return int(name[-10:])


def _attempts_of(children: list[str]) -> list[str]:
    """The attempts' nodes among a key's children (the rest are keys under it)."""
    return [c for c in children if c.startswith("_c_")]


@dataclass(slots=True)
class _Attempt:
    """One waiter's node: its name once known, its fence, the node just ahead of it, and the
    send time of the last request that proved the session alive."""

    node: str | None = None
    fence: int = 0
    ahead: tuple[str, ...] = ()
    alive_since: float = 0.0


class ZookeeperBackend:
    """Leased records as ephemeral sequential ZooKeeper nodes (see the module docstring)."""

    characteristics = frozenset(
        {
            Characteristic.DISTRIBUTED,
            Characteristic.REPLICATED,
            Characteristic.DURABLE_FENCES,
            Characteristic.SERVER_TIMED_LEASES,
            Characteristic.SESSION_EVENTS,
            Characteristic.CHANGE_WATCHES,
            Characteristic.FAIR_QUEUE,
        }
    )
    URL_OPTIONS = frozenset({"connect_timeout", *TLS_OPTIONS})

    def __init__(self, client: KazooClient, url: str, ttl: float) -> None:
        self._client = client
        self._url = url
        self._ttl = ttl
        self._negotiated: float | None = None
        self._loop = asyncio.get_running_loop()
        self._on_lost: list[Callable[[], None]] = []
        self._held: dict[tuple[str, int], str] = {}  # (key, fence) -> our node's path
        self._dirs: set[str] = set()  # container nodes known to exist
        # Releases wait for the end of the loop iteration (see `release`), by key.
        self._deferred: dict[str, _Release] = {}
        self._flush_due = False
        client.add_listener(self._state_changed)
        self._learn_negotiated_timeout()
        self._fail_fast_while_disconnected()

    def _fail_fast_while_disconnected(self) -> None:
        # kazoo queues a request made while it reconnects (SUSPENDED) and sends it once a
        # server answers again: a try, a read or a renewal against a server that is down or
        # restarting hung until it was back, instead of failing with the retryable
        # BackendUnavailable; and a create queued so, given up by its caller meanwhile, would
        # have been applied later behind its back. Refuse instead: ConnectionLoss, which the
        # core retries (a waiting acquire, a release) or the caller sees as "not now".
        client = self._client
        call = client._call

        def refused_unless_connected(request: Any, async_object: Any) -> Any:
            if client.state != KazooState.CONNECTED:
                async_object.set_exception(ConnectionLoss("not connected to a server"))
                return False
            return call(request, async_object)

        client._call = refused_unless_connected

    def _learn_negotiated_timeout(self) -> None:
        # kazoo uses the session timeout the server negotiated but keeps only the one it
        # asked for; read the server's answer off the handshake.
        connection = self._client._connection
        invoke = connection._invoke

        late = [0]  # 1 when the last handshake's answer did not come in time

        def handshake(timeout: float, request: Any, xid: int | None = None) -> Any:
            if not isinstance(request, Connect):
                return invoke(timeout, request, xid)
            # kazoo waits for the handshake's answer a whole session timeout (per host): a
            # reconnect that landed on a restarted server still loading its data waited that
            # long (15 s with a 15 s session) although the server was serving a second later.
            # The first try waits a third of it, the next ones after a late answer two thirds:
            # a live server slower than a third (3.5 s of a 9 s session) is reached on the
            # second try instead of never, and a close() that must wait out a handshake under
            # way (kazoo's stop does) waits two thirds of a session at most.
            wait = min(timeout, max(_HANDSHAKE_FLOOR, timeout / 3) * (2 if late[0] else 1))
            try:
                result = invoke(wait, request, xid)
            except Exception:
                late[0] = 1
                raise
            late[0] = 0
            if isinstance(result, tuple):
                self._negotiated = result[0].time_out / 1000
            return result

        connection._invoke = handshake

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
            passthrough=(NodeExistsError, NoNodeError, BadVersionError, NotEmptyError),
        )

    def _state_changed(self, state: str) -> None:
        # Runs on a kazoo thread. SUSPENDED is left to the core's expiry bound; LOST means
        # the server has already deleted our ephemeral nodes.
        if state == KazooState.LOST:
            for callback in self._on_lost:
                self._loop.call_soon_threadsafe(callback)

    def _future(self, result: AsyncResult) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = self._loop.create_future()

        def settle(done: AsyncResult) -> None:
            if future.done():
                return
            try:
                future.set_result(done.get_nowait())
            except Exception as exc:
                future.set_exception(exc)

        result.rawlink(lambda done: self._loop.call_soon_threadsafe(settle, done))
        return future

    async def _call(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        self._flush()
        with self._mapped():
            return await self._future(method(*args, **kwargs))

    def _session_id(self) -> int:
        client_id = self._client.client_id
        return int(client_id[0]) if client_id else 0

    def lease_ttl(self, ttl: float) -> float:
        return self._negotiated or self._ttl

    async def _ensure_dir(self, path: str) -> None:
        """Create the key's container node (and its persistent parents) if missing."""
        parent = posixpath.dirname(path)
        if parent not in self._dirs:
            await self._call(self._client.ensure_path_async, parent)
            self._dirs.add(parent)
        self._flush()
        result = self._client.handler.async_result()
        self._client._call(
            _CreateContainer(path, b"", self._client.default_acl or OPEN_ACL_UNSAFE, _CONTAINER),
            result,
        )
        try:
            await self._call(lambda: result)
        except NodeExistsError:
            pass
        except NoNodeError:  # the parent was deleted since (a created group's, say)
            self._dirs.discard(parent)
            await self._call(self._client.ensure_path_async, parent)
            self._dirs.add(parent)
            await self._ensure_dir(path)

    # --- the queue -------------------------------------------------------------------------

    async def enqueue(self, waiter: Waiter, *, queue: bool) -> Grant | None:
        attempt: _Attempt = waiter.state or _Attempt()
        waiter.state = attempt
        path = _dir(waiter.key)
        prefix = f"_c_{waiter.token}-"
        children: list[str] | None = None
        if attempt.node is None and waiter.sent:
            # A create may have been applied with its reply lost: look for our node by name.
            attempt.alive_since = now()
            children = await self._children_of(path)
            mine = [c for c in children if c.startswith(prefix)]
            if mine:
                stat = await self._call(self._client.exists_async, f"{path}/{mine[0]}")
                if stat is not None and stat.ephemeralOwner == self._session_id():
                    attempt.node, attempt.fence = mine[0], int(stat.czxid)
        released = None if waiter.sent else self._deferred.pop(waiter.key, None)
        self._flush()  # every other release first, in the order they were made
        if released is not None:
            children = await self._retake(waiter, attempt, path, prefix, released)
        if attempt.node is None:
            for _ in range(3):
                attempt.alive_since = now()
                waiter.sent = True
                # Pipelined: the session's requests run in order, so the listing includes
                # the node just created, and both answers come back in one round trip.
                created = self._future(
                    self._client.create_async(
                        f"{path}/{prefix}",
                        waiter.owner.encode() + b"\n" + waiter.data,
                        ephemeral=True,
                        sequence=True,
                        include_data=True,
                    )
                )
                listed = self._future(self._client.get_children_async(path))
                # If the create fails, the listing fails alike: nobody needs its error.
                mark_observed(listed)
                try:
                    with self._mapped():
                        new_path, stat = await created
                        children = await listed
                    break
                except NoNodeError:
                    await self._ensure_dir(path)
            else:
                raise BackendUnavailable(
                    f"zookeeper at {self._url}: {path} keeps vanishing as it is created"
                )
            attempt.node, attempt.fence = posixpath.basename(new_path), int(stat.czxid)
        if children is None:  # our node is known (an earlier call): where does it stand now?
            attempt.alive_since = now()
            children = await self._children_of(path)
        return await self._position(waiter, attempt, children, queue=queue)

    async def _retake(
        self, waiter: Waiter, attempt: _Attempt, path: str, prefix: str, released: _Release
    ) -> list[str] | None:
        """This client's release of the key, not sent yet, and its next attempt at it: one
        ``multi`` deleting the old node and creating the new one, so one write (one fsync on
        the server) instead of two. The new node queues behind every waiter like any other.
        A multi's create answers with the path alone; the fence (the new node's czxid) is
        the multi's own zxid, which the server puts in the answer's header: it applies
        writes one at a time and answers each with the last zxid applied, this one's (see
        ZooKeeper's FinalRequestProcessor), and every node a multi creates gets that zxid as
        its czxid. So no ``exists`` after it (one request less per cycle). The listing is
        pipelined behind. Returns the listing, or None (``attempt.node`` unset) when the
        multi changed nothing: then the release is sent on its own (or was already done: our
        node was gone) and the caller creates."""
        client = self._client
        chroot = client.chroot
        create = Create2(
            chroot + f"{path}/{prefix}",
            waiter.owner.encode() + b"\n" + waiter.data,
            client.default_acl or OPEN_ACL_UNSAFE,
            _EPHEMERAL_SEQUENTIAL,
        )
        result = client.handler.async_result()
        zxid = [0]

        def answered(_: AsyncResult) -> None:
            # Inline on the connection thread, as the answer is read: kazoo has just set
            # last_zxid from this answer's header, the multi's own zxid (see the docstring).
            # Only then: a rawlink made after the answer (`_future`'s, below, when the
            # answer came first) runs every callback again, by when last_zxid may be a
            # later answer's.
            if not zxid[0]:
                zxid[0] = client.last_zxid

        result.rawlink(answered)
        attempt.alive_since = now()
        waiter.sent = True
        try:
            with self._mapped():
                client._call(_Multi([Delete(chroot + released.node, -1), create]), result)
                multi = self._future(result)
                listed = self._future(client.get_children_async(path))
        except BaseException as exc:
            self._fail_release(released, exc)
            raise
        # A failure here is the multi's, told below.
        mark_observed(listed)
        # The release is settled by the multi's answer, whoever waits for it (or stops to).
        multi.add_done_callback(lambda f: self._retake_released(f, released))
        with self._mapped():
            outcome = await multi
            children: list[str] = await listed
        if not (outcome and outcome[0] is True and isinstance(outcome[-1], str)):
            return None
        node = posixpath.basename(client.unchroot(outcome[-1]))
        fence = zxid[0]
        if fence <= 0:  # not read (an answer without a zxid): ask the node itself
            stat = await self._call(client.exists_async, f"{path}/{node}")
            if stat is None:  # our session ended meanwhile: the core looks for it by name
                raise BackendUnavailable(f"zookeeper at {self._url}: {path}/{node} vanished")
            fence = int(stat.czxid)
        # Both at once: a node known without its fence would be granted with fence 0.
        attempt.node, attempt.fence = node, fence
        return children

    def _retake_released(self, multi: asyncio.Future[Any], released: _Release) -> None:
        if multi.cancelled():  # no answer to read: send the release (a repeat is harmless)
            self._send_release(released)
            return
        error = multi.exception()
        if error is not None:
            self._fail_release(released, error)
            return
        outcome = multi.result()
        if outcome and outcome[0] is True:
            self._release_done(released)
        elif outcome and isinstance(outcome[0], NoNodeError):
            self._release_done(released)  # our node was already gone (session, break)
        else:  # the multi failed on the create: nothing was deleted
            self._send_release(released)

    def _flush(self) -> None:
        backends = _deferring.get(self._loop)
        if backends:
            for backend in list(backends):
                backend._flush_own()

    def _flush_own(self) -> None:
        self._flush_due = False
        _deferring.get(self._loop, set()).discard(self)
        deferred, self._deferred = self._deferred, {}
        for released in deferred.values():
            self._send_release(released)

    def _send_release(self, released: _Release) -> None:
        try:
            with self._mapped():
                sent = self._future(self._client.delete_async(released.node))
        except Exception as exc:
            self._fail_release(released, exc)
            return
        sent.add_done_callback(lambda f: self._delete_answered(f, released))

    def _delete_answered(self, sent: asyncio.Future[Any], released: _Release) -> None:
        error = None if sent.cancelled() else sent.exception()
        if sent.cancelled() or (error is not None and not isinstance(error, NoNodeError)):
            self._fail_release(released, error or ConnectionLoss())
        else:  # gone now, or already gone
            self._release_done(released)

    def _release_done(self, released: _Release) -> None:
        self._held.pop((released.key, released.fence), None)
        if not released.confirmation.done():
            released.confirmation.set_result(None)

    def _fail_release(self, released: _Release, error: BaseException) -> None:
        # The core sends the release again until the server confirms it.
        def reraise() -> None:
            raise error

        mapped: BaseException = error
        try:
            with self._mapped():
                reraise()
        except BaseException as exc:  # mapped to Keel's errors here, handed to the core
            mapped = exc
        if not released.confirmation.done():
            released.confirmation.set_exception(mapped)

    async def _children_of(self, path: str) -> list[str]:
        try:
            children: list[str] = await self._call(self._client.get_children_async, path)
        except NoNodeError:
            return []
        return children

    async def _position(
        self, waiter: Waiter, attempt: _Attempt, children: list[str], *, queue: bool
    ) -> Grant | None:
        assert attempt.node is not None
        mine = _seq(attempt.node)
        if attempt.node not in children:
            # Our node is gone (the session ended): come again at the back of the queue.
            attempt.node = None
            waiter.sent = False
            return await self.enqueue(waiter, queue=queue)
        attempt.ahead = tuple(sorted((c for c in children if _seq(c) < mine), key=_seq))
        if not attempt.ahead:
            return self._granted(waiter, attempt)
        if not queue:
            await self._call(self._client.delete_async, f"{_dir(waiter.key)}/{attempt.node}")
            waiter.state, waiter.sent = None, False
        return None

    def _granted(self, waiter: Waiter, attempt: _Attempt) -> Grant:
        node = f"{_dir(waiter.key)}/{attempt.node}"
        self._held[(waiter.key, attempt.fence)] = node
        return Grant(attempt.fence, attempt.alive_since + self.lease_ttl(waiter.ttl))

    async def wait_turn(self, waiter: Waiter, timeout: float) -> Grant | None:
        attempt: _Attempt = waiter.state
        path = _dir(waiter.key)
        deadline = now() + timeout
        ttl = self._negotiated or self._ttl
        turn = _Turn(self, attempt, path)
        while True:
            if attempt.node != turn.node:  # our node was made again: other names, other facts
                turn = _Turn(self, attempt, path)
            remaining = turn.remaining()
            if not (remaining or turn.relist) and now() - attempt.alive_since < ttl / 3:
                return self._granted(waiter, attempt)
            if remaining and not turn.relist:
                turn.gone.clear()
                await turn.watch(remaining[-2:])
                if turn.covered():
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(max(0.0, min(deadline - now(), ttl / 3))):
                            await turn.gone.wait()
                    if not turn.gone.is_set():
                        if now() >= deadline:
                            return None
                        turn.armed.clear()  # look again in time: our session must still be ours
                    continue
                if not turn.remaining():
                    continue
            # Our node may be gone, or nodes ahead of the watched ones are not known gone.
            turn.relist = False
            attempt.alive_since = now()
            children = await self._children_of(path)
            grant = await self._position(waiter, attempt, children, queue=True)
            if grant is not None:
                return grant
            if waiter.state is not attempt or attempt.node is None:
                return None  # queued again from scratch; the core carries on
            if now() >= deadline:
                return None

    async def dequeue(self, waiter: Waiter) -> None:
        attempt: _Attempt | None = waiter.state
        path = _dir(waiter.key)
        if attempt is not None and attempt.node is not None:
            names = [attempt.node]
        else:
            names = [
                c for c in await self._children_of(path) if c.startswith(f"_c_{waiter.token}-")
            ]
        for name in names:
            with contextlib.suppress(NoNodeError):
                await self._call(self._client.delete_async, f"{path}/{name}")

    # --- holding -------------------------------------------------------------------------------

    async def renew(self, key: str, owner: str, fence: int, ttl: float) -> float | None:
        held = self._held.get((key, fence))
        if held is None:
            return None
        sent = now()
        stat = await self._call(self._client.exists_async, held)
        if stat is None or stat.czxid != fence or stat.ephemeralOwner != self._session_id():
            self._held.pop((key, fence), None)
            return None
        return sent + self.lease_ttl(ttl)

    async def release(self, key: str, owner: str, fence: int) -> Awaitable[None]:
        held = self._held.get((key, fence))
        if held is None:
            return _done(self._loop)
        # Sent at the end of this loop iteration, unless this client's next attempt at the
        # key comes first (then both are one write, `_retake`); any other request from this
        # process sends it first (`_flush`), so it is ordered as if sent at once. Confirmed
        # by the server (gone now, or already gone) before the core lets go of it.
        earlier = self._deferred.pop(key, None)
        if earlier is not None:
            self._send_release(earlier)
        confirmation: asyncio.Future[None] = self._loop.create_future()
        self._deferred[key] = _Release(key, held, fence=fence, confirmation=confirmation)
        _deferring.setdefault(self._loop, set()).add(self)
        if not self._flush_due:
            self._flush_due = True
            self._loop.call_soon(self._flush_own)
        return confirmation

    # --- reading -------------------------------------------------------------------------------

    def _record(self, key: str, data: bytes, stat: Any) -> Record:
        owner, _, rest = data.partition(b"\n")
        return Record(key, owner.decode(), int(stat.czxid), rest)

    async def _holder(self, key: str) -> tuple[str, bytes, Any] | None:
        """The node holding ``key`` (path, data, stat): the lowest of its attempts' nodes, or
        else the key's own node when it carries a persistent record (`create`). Empty data
        marks a plain directory node: no record ever has empty data."""
        path = _dir(key)
        for _ in range(5):  # the holder may go between the listing and the read
            attempts = _attempts_of(await self._children_of(path))
            if not attempts:
                try:
                    data, stat = await self._call(self._client.get_async, path)
                except NoNodeError:
                    return None
                return (path, data, stat) if data else None
            first = f"{path}/{min(attempts, key=_seq)}"
            try:
                data, stat = await self._call(self._client.get_async, first)
            except NoNodeError:
                continue
            return first, data, stat
        return None

    async def get(self, key: str) -> Record | None:
        found = await self._holder(key)
        return None if found is None else self._record(key, found[1], found[2])

    async def create(self, key: str, data: bytes) -> int | None:
        """A persistent record is the key's own node, holding ``\\n`` + data (owner "")."""
        path, value = _dir(key), b"\n" + data
        try:
            stat = (
                await self._call(
                    self._client.create_async, path, value, makepath=True, include_data=True
                )
            )[1]
        except NodeExistsError:
            # A directory node (left by a member's join) becomes the record if it is still
            # empty and nobody holds the key: set_data is conditional on the version read.
            try:
                raw, stat = await self._call(self._client.get_async, path)
                if raw or _attempts_of(await self._children_of(path)):
                    return None
                stat = await self._call(self._client.set_async, path, value, stat.version)
            except (NoNodeError, BadVersionError):
                return None
        return int(stat.czxid)

    async def update(self, key: str, fence: int, data: bytes) -> bool:
        for _ in range(3):  # only a concurrent update of the same record makes us retry
            found = await self._holder(key)
            if found is None or found[2].czxid != fence:
                return False
            node, raw, stat = found
            owner = raw.partition(b"\n")[0]
            try:
                await self._call(self._client.set_async, node, owner + b"\n" + data, stat.version)
            except NoNodeError:
                return False
            except BadVersionError:
                continue
            return True
        return False

    async def delete(self, key: str, fence: int) -> bool:
        """A leased holder's node is deleted by name (names are unique per attempt, so this
        can never hit a successor's). A persistent record's node goes only when no live
        record is under it: ZooKeeper refuses to delete a node with children, atomically,
        so the empty directories members left are removed first and a live member's
        directory refuses (NotEmpty). A lease this client was granted is its own node, known
        by name: one round trip, no lookup."""
        own = self._held.get((key, fence))
        if own is not None:
            try:
                await self._call(self._client.delete_async, own)
            except NoNodeError:
                self._held.pop((key, fence), None)
                return False
            # Kept on BackendUnavailable: the core's retried release still knows the node.
            self._held.pop((key, fence), None)
            return True
        found = await self._holder(key)
        if found is None or found[2].czxid != fence:
            return False
        node, _, stat = found
        if node != _dir(key):
            try:
                await self._call(self._client.delete_async, node)
            except NoNodeError:
                return False
            self._held.pop((key, fence), None)
            return True
        for child in await self._children_of(node):
            if child.startswith("_c_"):
                return False
            try:
                await self._call(self._client.delete_async, f"{node}/{child}")
            except NoNodeError:
                pass
            except NotEmptyError:
                return False
        try:
            await self._call(self._client.delete_async, node, stat.version)
        except (NoNodeError, BadVersionError, NotEmptyError):
            return False
        self._dirs.discard(node)
        return True

    async def children(self, prefix: str) -> list[Record]:
        names = [n for n in await self._children_of(_dir(prefix)) if not n.startswith("_c_")]
        records = await asyncio.gather(*(self.get(prefix + n) for n in sorted(names)))
        return [r for r in records if r is not None]

    @contextlib.asynccontextmanager
    async def changes(self, key: str) -> AsyncIterator[Changes]:
        changes = _Changes(self, _dir(key), nested=key.endswith("/"))
        changes._seen = await changes.signature()
        yield changes

    def on_session_lost(self, callback: Callable[[], None]) -> None:
        self._on_lost.append(callback)

    async def close(self) -> None:
        self._flush_own()  # sent before the session goes (it would free them anyway)

        def stop() -> None:
            self._client.stop()
            self._client.close()

        await asyncio.to_thread(stop)


class _Turn:
    """What one waiter knows of the nodes ahead of its own, kept up to date on kazoo's
    connection thread as watch events and listings come, so that the event loop wakes only
    when it has something to do: take the lock, set a watch, or list the key itself.

    Nodes ahead seen gone (a deletion event, an ``exists`` answering None, a listing without
    them) are in ``deleted``: names are unique per attempt, so a name once gone never comes
    back, and no sequence lower than ours appears after our node was made. So when every node
    of the last full listing's ``ahead`` is in ``deleted``, nobody is ahead of us, and no
    listing is needed to tell. The waiter watches the last two nodes it does not know gone:
    its predecessor's deletion hands it the lock; the one ahead of that (two watchers per
    node: still no herd) makes it list the key while its predecessor holds, so that the
    predecessor's release finds it knowing it is next, with no listing on the hand-off."""

    __slots__ = (
        "armed",
        "attempt",
        "backend",
        "deleted",
        "gone",
        "node",
        "path",
        "relist",
        "watcher",
    )

    def __init__(self, backend: ZookeeperBackend, attempt: _Attempt, path: str) -> None:
        self.backend = backend
        self.attempt = attempt
        self.path = path
        self.node = attempt.node
        self.gone = asyncio.Event()  # something to do (set from the connection thread)
        self.deleted: set[str] = set()
        self.armed: set[str] = set()  # nodes the server holds an unfired watch of ours on
        self.relist = False  # our own node may be gone, or a listing failed: list in the loop

        def watcher(event: Any) -> None:  # one function: kazoo keeps a watcher once per path
            self._event(event)

        self.watcher = _inline(watcher)

    def remaining(self) -> list[str]:
        """The nodes ahead of ours not known gone, in sequence order."""
        return [n for n in self.attempt.ahead if n not in self.deleted]

    def covered(self) -> bool:
        """Whether our watches are on the last two nodes that could still be ahead of ours
        (then the next event says what to do; a listing prunes those ahead of them)."""
        remaining = self.remaining()
        return bool(remaining) and self.armed.issuperset(remaining[-2:])

    async def watch(self, names: list[str]) -> None:
        """Set our watch on those of ``names`` not watched yet (pipelined: one round trip).
        A ``get``, not an ``exists``: on a node already gone it leaves no watch behind (an
        exists would wait on the server, for the session's life, for a creation that never
        comes)."""
        client, backend = self.backend._client, self.backend
        asked = [n for n in names if n not in self.armed]
        if not asked:
            return
        sent = now()
        backend._flush()
        with backend._mapped():
            answers = []
            for name in asked:
                result = client.get_async(f"{self.path}/{name}", self.watcher)
                # Booked on the connection thread as the answer is read, so before any
                # event of that watch (which the server sends after the answer).
                result.rawlink(self._answered(name))
                answer = backend._future(result)
                # Read below until one fails (or we are cancelled): the rest are observed
                # here, or asyncio logs their ConnectionLoss as never retrieved.
                mark_observed(answer)
                answers.append(answer)
            for answer in answers:
                with contextlib.suppress(NoNodeError):
                    await answer
        self.attempt.alive_since = max(self.attempt.alive_since, sent)

    def _answered(self, name: str) -> Callable[[AsyncResult], None]:
        booked: list[bool] = []

        def book(result: AsyncResult) -> None:
            if booked:  # rawlink may call a callback again
                return
            booked.append(True)
            if result.successful():
                self.armed.add(name)
            elif isinstance(result.exception, NoNodeError):
                self.deleted.add(name)

        return book

    def _event(self, event: Any) -> None:
        # On kazoo's connection thread: the listing that says whether we are next is asked
        # for here, at once, and read here too, rather than after wake-ups of the event
        # loop: those were on the hand-off's path.
        if event.path is None:  # the session ended: kazoo dropped every watch
            self.armed.clear()
            self.relist = True
            self._wake()
            return
        name = posixpath.basename(event.path)
        self.armed.discard(name)
        if event.type == EventType.DELETED:  # a holder's `update` only changes its data
            self.deleted.add(name)
        if not self.remaining():
            self._wake()
        elif not self.covered():
            sent = now()
            listing = self.backend._client.get_children_async(self.path)
            listing.rawlink(lambda result: self._listed(sent, result))

    def _listed(self, sent: float, result: AsyncResult) -> None:
        try:
            children = set(result.get_nowait())
        except NoNodeError:
            children = set()
        except Exception:  # the loop lists again and meets the error there
            self.relist = True
            self._wake()
            return
        if self.attempt.node not in children:
            self.relist = True  # `_position` queues us again
        else:
            attempt = self.attempt
            attempt.alive_since = max(attempt.alive_since, sent)
            self.deleted.update(n for n in attempt.ahead if n not in children)
        if self.relist or not self.covered():
            self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed: nobody to tell
            self.backend._loop.call_soon_threadsafe(self.gone.set)


def _done(loop: asyncio.AbstractEventLoop) -> asyncio.Future[None]:
    future: asyncio.Future[None] = loop.create_future()
    future.set_result(None)
    return future


class _Changes:
    """Children created or deleted under the key's node (for a prefix: under its nodes'
    nodes too), told apart by the nodes' pzxid. Watches are one-shot and set by each look; a
    look that finds the signature moved since the previous look returns at once, so nothing
    between two looks is missed."""

    def __init__(self, backend: ZookeeperBackend, path: str, *, nested: bool) -> None:
        self._backend = backend
        self._path = path
        self._nested = nested
        self._seen: tuple[int, ...] | None = None
        self._changed = asyncio.Event()
        loop = backend._loop
        self._watcher = _inline(lambda _event: loop.call_soon_threadsafe(self._changed.set))

    async def _look(self, path: str) -> tuple[list[str], int]:
        client = self._backend._client
        try:
            children, stat = await self._backend._call(
                client.get_children_async, path, self._watcher, include_data=True
            )
        except NoNodeError:
            # Not there yet: watch for its creation instead.
            await self._backend._call(client.exists_async, path, self._watcher)
            return [], 0
        return children, int(stat.pzxid)

    async def signature(self) -> tuple[int, ...]:
        children, pzxid = await self._look(self._path)
        marks = [pzxid]
        if self._nested:
            looks = await asyncio.gather(*(self._look(f"{self._path}/{c}") for c in children))
            marks.extend(mark for _, mark in looks)
        return tuple(marks)

    async def wait(self, timeout: float) -> None:
        self._changed.clear()
        try:
            signature = await self.signature()
        except Exception:
            await asyncio.sleep(min(timeout, 0.1))  # unreachable: the caller re-reads
            return
        if self._seen is not None and signature != self._seen:
            self._seen = signature
            return
        self._seen = signature
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, timeout)):
                await self._changed.wait()
