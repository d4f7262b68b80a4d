"""etcd v3 coordination backend (gRPC through ``aetcd``'s channel and stubs), shaped like etcd's
own ``concurrency.Mutex``.

A key ``K`` is a prefix ``/keel/K/``; everyone who wants it puts a key of its own under it,
``/keel/K/<token>``, on a lease of its own. The holder is the one whose key has the lowest
create revision, and the fence is that create revision: etcd's revision counter is global,
linearizable and persisted, so later holders' fences are higher, across restarts and leader
changes. Waiters are served in create-revision order, each watching for the deletion of the
keys ahead of it (no herd: nobody retries, the next in line simply finds itself first).

Leases: one per attempt, never shared, so renewing one lock can never keep another lock's
orphan alive. A lease is renewed only by the lock (or waiter) it belongs to; leases left free
by a release are reused by later attempts while most of their time is left, so an
uncontended acquire and release are one round trip each. etcd leases are whole seconds with a
floor of 2 s: a ttl is rounded up. ``extend(ttl)`` with a new ttl moves the key to a lease of
that ttl (the key keeps its create revision, so its fence), and the expiry bound is taken from
the ttl the server reports.

Failure semantics: an attempt whose reply is lost is retried with the same key name, which the
transaction recognises as ours (it returns our key's create revision instead of queueing
again); an attempt given up revokes its lease, which deletes its key wherever it stood. A
client cut off from etcd loses its locks at the conservative expiry bound (core); etcd frees
them when the lease runs out on the leader — after a leader change etcd *extends* leases by an
election timeout, which only delays liveness. etcd's "not ready" answers (no leader, leader
changed, too many requests, a member still starting) are the retryable `BackendUnavailable`.
Revisions survive compaction; fences need no history, only the current revision counter.

Clusters, TLS and logins (`_etcd_channel`): ``etcd://h1:2379,h2:2379,h3:2379`` lists the
members and the client moves to a live one by itself; ``etcds://`` (or ``tls=true``) with
``ca``, ``cert``, ``key`` speaks TLS; ``user:password@`` logs in with etcd's auth.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import aetcd
from aetcd import rpc
from aetcd.rtypes import EventKind
from grpc import StatusCode
from grpc.aio import AioRpcError

from keel._tls import TLS_OPTIONS
from keel.coordination._clock import now
from keel.coordination.backends._etcd_channel import Client, token_refused
from keel.coordination.backends.base import (
    Backend,
    Changes,
    Characteristic,
    Grant,
    Record,
    Waiter,
    map_errors,
)
from keel.errors import BackendUnavailable, KeelError

_MIN_TTL = 2
_DELETE_TRIES = 4  # reads and deletes tried while members fail under a release
_MIN_CALL_S = 1.0  # the least time one call of a release is given, timeout allowing
_LEAST_CALL_S = 0.1  # below this a call cannot be answered: the release is out of time
_UNAVAILABLE_CODES = {
    StatusCode.UNAVAILABLE,
    StatusCode.DEADLINE_EXCEEDED,
    StatusCode.CANCELLED,
    StatusCode.UNKNOWN,
    StatusCode.RESOURCE_EXHAUSTED,  # "etcdserver: too many requests"
}
_NOT_READY = ("no leader", "leader changed", "not capable", "too many requests", "timed out")
# gRPC's own C core, not etcd, says this when a member's connection dies mid-call (seen with a
# cluster member SIGKILLed under load): the call's fate is unknown, as with UNAVAILABLE.
_CORE_FAULT = "Internal error from Core"
_GRPC_OPTIONS = {
    # Reconnect quickly after a cut connection: leases are seconds, gRPC's default back-off
    # (up to 120 s) would outlive them.
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.min_reconnect_backoff_ms": 100,
    "grpc.max_reconnect_backoff_ms": 1000,
}
_ASCEND = rpc.RangeRequest.SortOrder.Value("ASCEND")
_BY_CREATE = rpc.RangeRequest.SortTarget.Value("CREATE")


def _not_ready(exc: BaseException) -> bool:
    if isinstance(exc, AioRpcError):
        details = exc.details() or ""
        return (
            exc.code() in _UNAVAILABLE_CODES
            or any(text in details for text in _NOT_READY)
            or (exc.code() == StatusCode.INTERNAL and _CORE_FAULT in details)
        )
    if isinstance(exc, aetcd.exceptions.ClientError) and isinstance(exc.__cause__, AioRpcError):
        # aetcd's own calls (watches, connect) wrap a reply by its code and keep only the
        # details: RESOURCE_EXHAUSTED ("too many requests") or UNKNOWN ("leader changed")
        # became a bare ClientError. Judge the reply it wraps, as for the stubs' calls.
        return _not_ready(exc.__cause__)
    if isinstance(exc, aetcd.exceptions.InternalError):
        return _CORE_FAULT in str(exc)
    return isinstance(
        exc, aetcd.exceptions.ConnectionFailedError | aetcd.exceptions.ConnectionTimeoutError
    )


class _LeaseGone(Exception):
    pass


@dataclass(slots=True)
class _Lease:
    id: int
    ttl: int
    expires: float  # conservative bound on the lease clock


@dataclass(slots=True)
class _Attempt:
    """What the backend keeps for one waiter: its key and lease, its create revision once
    known, the keys ahead of it and the revision to watch from."""

    key: bytes
    lease: _Lease
    revision: int = 0
    ahead: set[bytes] = field(default_factory=set)
    watch_from: int = 0


def _prefix_end(prefix: bytes) -> bytes:
    return prefix[:-1] + bytes([prefix[-1] + 1])


# The name of a persistent record's entry in its key's directory (tokens are hex and "-").
_PERSISTENT = b"="


def _dir(key: str) -> bytes:
    return f"/keel/{key.rstrip('/')}/".encode()


class EtcdBackend:
    """Leased records in etcd v3 (see the module docstring)."""

    characteristics = frozenset(
        {
            Characteristic.DISTRIBUTED,
            Characteristic.REPLICATED,
            Characteristic.DURABLE_FENCES,
            Characteristic.SERVER_TIMED_LEASES,
            Characteristic.PER_LOCK_TTL,
            Characteristic.CHANGE_WATCHES,
            Characteristic.FAIR_QUEUE,
        }
    )
    URL_OPTIONS = frozenset({"connect_timeout", *TLS_OPTIONS})

    def __init__(self, client: Client, url: str, timeout: float) -> None:
        self._client = client
        self._url = url
        self._timeout = timeout
        self._free: dict[int, list[_Lease]] = {}  # leases no key is on, by ttl
        self._held: dict[tuple[str, int], _Attempt] = {}  # (key, fence) -> its attempt
        self._leases: set[int] = set()  # every lease this client may still have keys on

    @classmethod
    async def open(
        cls, url: Any, *, member_id: str, ttl: float, options: Mapping[str, str]
    ) -> Backend:
        timeout = float(options.get("connect_timeout", 5))
        client = Client(url, options, _GRPC_OPTIONS)
        backend = cls(client, url.redacted(), timeout)
        try:
            # gRPC reports a refused handshake only as "unavailable", after the whole
            # timeout: a probe with Python's ssl says at once why (one extra handshake).
            refused = await client.refusal()
            if refused is not None:
                raise refused
            with backend._mapped():
                await client.connect()
                await client.reach(timeout)
        except KeelError as exc:
            with contextlib.suppress(Exception):
                await client.close()
            raise exc from None
        return backend

    @contextlib.contextmanager
    def _mapped(self) -> Iterator[None]:
        channel = self._client.current
        with map_errors(
            (aetcd.exceptions.ConnectionFailedError,),
            backend="etcd",
            url=self._url,
            not_ready=_not_ready,
            passthrough=(_LeaseGone,),
        ):
            try:
                yield
            except AioRpcError as exc:
                if exc.code() == StatusCode.NOT_FOUND and "lease" in (exc.details() or ""):
                    raise _LeaseGone from exc
                if exc.code() in _UNAVAILABLE_CODES:
                    self._client.rotate(channel)  # the next call tries the next member
                raise

    def lease_ttl(self, ttl: float) -> float:
        return float(max(_MIN_TTL, math.ceil(ttl)))

    # --- leases ------------------------------------------------------------------------------

    async def _lease(self, ttl: int) -> _Lease:
        """A lease no key is on, with most of its time left: a freed one, or a new one."""
        pool = self._free.get(ttl, [])
        while pool:
            lease = pool.pop()
            if lease.expires - now() > ttl * 2 / 3:
                return lease
            if lease.expires > now():
                with contextlib.suppress(_LeaseGone, BackendUnavailable):
                    await self._keepalive(lease)
                    return lease
            self._leases.discard(lease.id)
        sent = now()
        with self._mapped():
            reply = await self._client.leasestub.LeaseGrant(
                rpc.LeaseGrantRequest(TTL=ttl), timeout=self._timeout
            )
        self._leases.add(reply.ID)
        return _Lease(reply.ID, ttl, sent + min(ttl, reply.TTL))

    async def _keepalive(self, lease: _Lease, timeout: float | None = None) -> None:
        """Refresh the lease; its bound moves to the send time plus what the server reports."""
        for attempt in (1, 2):
            token = self._client.token
            sent = now()
            with self._mapped():
                try:
                    async for reply in self._client.leasestub.LeaseKeepAlive(
                        [rpc.LeaseKeepAliveRequest(ID=lease.id)],
                        timeout=self._timeout if timeout is None else timeout,
                    ):
                        if reply.TTL <= 0:
                            raise _LeaseGone
                        lease.expires = sent + min(lease.ttl, reply.TTL)
                        return
                except AioRpcError as exc:
                    # A stream: the token interceptor does not retry it (_etcd_channel).
                    if attempt == 2 or not token_refused(exc):
                        raise
                    await self._client.refresh(token)
                    continue
            break
        raise _LeaseGone

    def _reuse(self, lease: _Lease) -> None:
        self._free.setdefault(lease.ttl, []).append(lease)

    async def _revoke(self, lease: _Lease) -> None:
        """End the lease and every key on it (idempotent: a lease already gone is fine)."""
        with contextlib.suppress(_LeaseGone), self._mapped():
            await self._client.leasestub.LeaseRevoke(
                rpc.LeaseRevokeRequest(ID=lease.id), timeout=self._timeout
            )
        self._leases.discard(lease.id)

    # --- taking a key --------------------------------------------------------------------------

    async def _txn(self, request: rpc.TxnRequest, timeout: float | None = None) -> Any:
        with self._mapped():
            return await self._client.kvstub.Txn(
                request, timeout=self._timeout if timeout is None else timeout
            )

    def _listing(self, prefix: bytes) -> rpc.RequestOp:
        return rpc.RequestOp(
            request_range=rpc.RangeRequest(
                key=prefix,
                range_end=_prefix_end(prefix),
                sort_order=_ASCEND,
                sort_target=_BY_CREATE,
                keys_only=True,
            )
        )

    async def enqueue(self, waiter: Waiter, *, queue: bool) -> Grant | None:
        try:
            return await self._enqueue(waiter, queue=queue)
        except _LeaseGone:
            # The lease ran out before the key could be put on it: start over on a new one.
            attempt: _Attempt | None = waiter.state
            if attempt is not None:
                self._leases.discard(attempt.lease.id)
            waiter.state = None
            return await self._enqueue(waiter, queue=queue)

    async def _enqueue(self, waiter: Waiter, *, queue: bool) -> Grant | None:
        if waiter.state is None:
            lease = await self._lease(int(self.lease_ttl(waiter.ttl)))
            prefix = _dir(waiter.key)
            waiter.state = _Attempt(prefix + waiter.token.encode(), lease)
        attempt: _Attempt = waiter.state
        prefix = _dir(waiter.key)
        put = rpc.RequestOp(
            request_put=rpc.PutRequest(
                key=attempt.key,
                value=waiter.owner.encode() + b"\n" + waiter.data,
                lease=attempt.lease.id,
            )
        )
        waiter.sent = True
        if not queue:
            # A try: only when nobody at all holds or waits for the key.
            reply = await self._txn(
                rpc.TxnRequest(
                    compare=[
                        rpc.Compare(
                            key=prefix,
                            range_end=_prefix_end(prefix),
                            result=rpc.Compare.EQUAL,
                            target=rpc.Compare.CREATE,
                            create_revision=0,
                        )
                    ],
                    success=[put],
                )
            )
            if not reply.succeeded:
                self._reuse(attempt.lease)
                waiter.state, waiter.sent = None, False
                return None
            return self._granted(waiter, int(reply.header.revision))
        mine = rpc.RequestOp(request_range=rpc.RangeRequest(key=attempt.key))
        reply = await self._txn(
            rpc.TxnRequest(
                compare=[
                    rpc.Compare(
                        key=attempt.key,
                        result=rpc.Compare.EQUAL,
                        target=rpc.Compare.CREATE,
                        create_revision=0,
                    )
                ],
                success=[put, self._listing(prefix)],
                failure=[mine, self._listing(prefix)],  # ours already: an earlier attempt
            )
        )
        if reply.succeeded:
            attempt.revision = int(reply.header.revision)
        else:
            kvs = reply.responses[0].response_range.kvs
            if not kvs:  # deleted since the compare (its lease ran out): look again
                return await self._enqueue(waiter, queue=queue)
            attempt.revision = int(kvs[0].create_revision)
        listing = reply.responses[1].response_range.kvs
        attempt.ahead = {kv.key for kv in listing if kv.create_revision < attempt.revision}
        attempt.watch_from = int(reply.header.revision) + 1
        return None if attempt.ahead else self._granted(waiter, attempt.revision)

    def _granted(self, waiter: Waiter, fence: int) -> Grant:
        attempt: _Attempt = waiter.state
        attempt.revision = fence
        self._held[(waiter.key, fence)] = attempt
        return Grant(fence, attempt.lease.expires)

    async def wait_turn(self, waiter: Waiter, timeout: float) -> Grant | None:
        attempt: _Attempt = waiter.state
        prefix = _dir(waiter.key)
        deadline = now() + timeout
        # One watch for the whole wait, not one per event: etcd serves a watch that starts at
        # a past revision from its "unsynced" set, caught up every 100 ms, so a watch made
        # again after each event (the revision moves with every enqueue) heard the release
        # ahead of it 85 ms late; a watch kept open is synced after its first catch-up.
        watch = _Watch(self, prefix, kind=EventKind.DELETE)
        try:
            while attempt.ahead:
                # Keep our place: renew our lease in time, whatever else happens.
                renew_at = attempt.lease.expires - attempt.lease.ttl * 2 / 3
                left = min(deadline, renew_at) - now()
                if left > 0:
                    try:
                        event = await watch.next(attempt.watch_from, left)
                    except aetcd.exceptions.RevisionCompactedError:
                        # Missed events: list what is ahead of us again.
                        await watch.close()
                        await self.enqueue(waiter, queue=True)
                        continue
                    if event is not None:
                        attempt.ahead.discard(event.kv.key)
                        attempt.watch_from = int(event.kv.mod_revision) + 1
                        continue
                if now() >= deadline:
                    return None
                try:
                    await self._keepalive(attempt.lease)
                except _LeaseGone:
                    # Our key went with its lease (we were paused past it): queue again.
                    await watch.close()
                    waiter.state = None
                    await self.enqueue(waiter, queue=True)
                    return await self.wait_turn(waiter, max(0.0, deadline - now()))
        finally:
            await watch.close()
        return self._granted(waiter, attempt.revision)

    async def _watch_once(
        self, prefix: bytes, start: int, timeout: float, kind: EventKind | None = None
    ) -> Any:
        """The first event under ``prefix`` from revision ``start``, or None after
        ``timeout``; `RevisionCompactedError` if ``start`` is compacted away."""
        watch = _Watch(self, prefix, kind=kind)
        try:
            return await watch.next(start, timeout)
        finally:
            await watch.close()

    async def dequeue(self, waiter: Waiter) -> None:
        attempt: _Attempt | None = waiter.state
        if attempt is not None:
            await self._revoke(attempt.lease)  # its key goes with it, granted or not

    async def renew(self, key: str, owner: str, fence: int, ttl: float) -> float | None:
        attempt = self._held.get((key, fence))
        if attempt is None:
            return None
        ttl_s = int(self.lease_ttl(ttl))
        try:
            if ttl_s == attempt.lease.ttl:
                # The lease alone is not the record: a key deleted under a live lease (a
                # forced `delete`, an operator) must end the holding too. One round trip.
                _, mine = await asyncio.gather(
                    self._keepalive(attempt.lease), self._has(attempt.key, fence)
                )
                if not mine:
                    self._held.pop((key, fence), None)
                    return None
                return attempt.lease.expires
            return await self._move(key, fence, attempt, ttl_s)
        except _LeaseGone:
            self._held.pop((key, fence), None)
            return None

    async def _move(self, key: str, fence: int, attempt: _Attempt, ttl: int) -> float | None:
        """Put our key on a lease of the new ttl (same key: same create revision, so fence)."""
        lease = await self._lease(ttl)
        reply = await self._txn(
            rpc.TxnRequest(
                compare=[
                    rpc.Compare(
                        key=attempt.key,
                        result=rpc.Compare.EQUAL,
                        target=rpc.Compare.CREATE,
                        create_revision=fence,
                    )
                ],
                success=[
                    rpc.RequestOp(
                        request_put=rpc.PutRequest(
                            key=attempt.key, lease=lease.id, ignore_value=True
                        )
                    )
                ],
            )
        )
        if not reply.succeeded:
            self._reuse(lease)
            self._held.pop((key, fence), None)
            return None
        old, attempt.lease = attempt.lease, lease
        self._reuse(old)
        return lease.expires

    async def release(self, key: str, owner: str, fence: int) -> Awaitable[None]:
        attempt = self._held.get((key, fence))
        if attempt is None:
            return _done()
        await self._txn(
            rpc.TxnRequest(
                compare=[
                    rpc.Compare(
                        key=attempt.key,
                        result=rpc.Compare.EQUAL,
                        target=rpc.Compare.CREATE,
                        create_revision=fence,
                    )
                ],
                success=[
                    rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=attempt.key))
                ],
            )
        )
        del self._held[(key, fence)]
        self._reuse(attempt.lease)  # confirmed: no key is on it any more
        return _done()

    # --- reading -------------------------------------------------------------------------------

    @staticmethod
    def _created(k: bytes, revision: int) -> Any:
        return rpc.Compare(
            key=k, result=rpc.Compare.EQUAL, target=rpc.Compare.CREATE, create_revision=revision
        )

    async def _has(self, k: bytes, fence: int) -> bool:
        """Whether the etcd key ``k`` is still the one created at revision ``fence``."""
        with self._mapped():
            reply = await self._client.kvstub.Range(
                rpc.RangeRequest(key=k, keys_only=True), timeout=self._timeout
            )
        return bool(reply.kvs) and int(reply.kvs[0].create_revision) == fence

    async def create(self, key: str, data: bytes) -> int | None:
        # A persistent record is one more entry of the key's directory, on no lease, under a
        # name no attempt's token can have.
        k = _dir(key) + _PERSISTENT
        put = rpc.RequestOp(request_put=rpc.PutRequest(key=k, value=b"\n" + data))
        reply = await self._txn(rpc.TxnRequest(compare=[self._created(k, 0)], success=[put]))
        return int(reply.header.revision) if reply.succeeded else None

    async def update(self, key: str, fence: int, data: bytes) -> bool:
        for _ in range(3):  # only a concurrent update of the same record makes us retry
            _, holder, _ = await self._entries(key)
            if holder is None or int(holder.create_revision) != fence:
                return False
            # The owner is part of the value; the lease stays (ignore_lease).
            owner = bytes(holder.value).partition(b"\n")[0]
            put = rpc.RequestOp(
                request_put=rpc.PutRequest(
                    key=holder.key, value=owner + b"\n" + data, ignore_lease=True
                )
            )
            unchanged = rpc.Compare(
                key=holder.key,
                result=rpc.Compare.EQUAL,
                target=rpc.Compare.MOD,
                mod_revision=int(holder.mod_revision),
            )
            request = rpc.TxnRequest(compare=[self._created(holder.key, fence), unchanged])
            request.success.append(put)
            if (await self._txn(request)).succeeded:
                return True
        return False

    async def delete(self, key: str, fence: int) -> bool:
        # One operation's time in all, whatever the members do: a member that hangs (stopped,
        # partitioned) would otherwise cost the whole timeout per call and per try (21 s).
        deadline = now() + self._timeout
        prefix = _dir(key)
        keeper: asyncio.Task[None] | None = None  # set once a delete's answer was lost
        unavailable = 0
        conflicts = 0
        least = min(_MIN_CALL_S, self._timeout / 4)  # a short timeout still allows retries
        try:
            while True:
                call = min(deadline - now(), max(self._timeout / 2, least))
                if call < _LEAST_CALL_S:  # past the deadline (a conflict went round again)
                    raise BackendUnavailable(
                        f"etcd: release of {key!r} unanswered in {self._timeout} s", backend="etcd"
                    )
                try:
                    revision, holder, nested = await self._entries(key, timeout=call)
                    if holder is None or int(holder.create_revision) != fence or nested:
                        if keeper is None or nested:
                            return False
                        left = max(_LEAST_CALL_S, deadline - now())
                        return await self._deleted_by_us(key, fence, left)
                    # Nothing under the key was written since the read (a member joining,
                    # say): the comparison holds for every key of the range.
                    quiet = rpc.Compare(
                        key=prefix,
                        range_end=_prefix_end(prefix),
                        result=rpc.Compare.LESS,
                        target=rpc.Compare.MOD,
                        mod_revision=revision + 1,
                    )
                    remove = rpc.RequestOp(
                        request_delete_range=rpc.DeleteRangeRequest(key=holder.key)
                    )
                    request = rpc.TxnRequest(compare=[self._created(holder.key, fence), quiet])
                    request.success.append(remove)
                    call = max(_LEAST_CALL_S, min(deadline - now(), call))
                    try:
                        succeeded = (await self._txn(request, timeout=call)).succeeded
                    except BackendUnavailable:
                        if keeper is None:
                            keeper = self._keep_lease(key, fence)
                        raise
                except BackendUnavailable:
                    # The member in use died between the read and the write, or under either:
                    # the channel has moved on, and the delete is conditional on our fence, so
                    # asking the next member again is safe. A release is worth a few tries
                    # before the caller hears "retry later".
                    unavailable += 1
                    pause = 0.2 * unavailable
                    if unavailable >= _DELETE_TRIES or now() + pause + least > deadline:
                        raise
                    await asyncio.sleep(pause)
                    continue
                if succeeded:
                    self._forget(key, fence)
                    return True
                conflicts += 1
                if conflicts >= 3:  # something under the key keeps changing between read and delete
                    return False
        finally:
            if keeper is not None:
                keeper.cancel()

    def _keep_lease(self, key: str, fence: int) -> asyncio.Task[None]:
        """Keep the lease alive while a lost delete is settled: its end is how `_deleted_by_us`
        tells the server's removal from ours, so a short lease must not end under the retries."""
        attempt = self._held.get((key, fence))

        async def keep() -> None:
            if attempt is None:
                return
            with contextlib.suppress(_LeaseGone):
                while True:
                    # Each refresh is given a third of the ttl, and a failed one is sent again
                    # at once (to the next member): one sent to a hanging member must not
                    # outlast the lease it keeps.
                    try:
                        await self._keepalive(attempt.lease, attempt.lease.ttl / 3)
                    except KeelError:
                        await asyncio.sleep(_LEAST_CALL_S)
                        continue
                    await asyncio.sleep(attempt.lease.ttl / 3)

        return asyncio.get_running_loop().create_task(keep())

    def _forget(self, key: str, fence: int) -> None:
        attempt = self._held.pop((key, fence), None)
        if attempt is not None:
            self._reuse(attempt.lease)  # our own: no key is on it any more

    async def _deleted_by_us(self, key: str, fence: int, timeout: float) -> bool:
        """Our delete was sent, its answer lost, and the key is no longer ours: it was our
        delete (True) unless the lease had ended by then (the server removed the key) or an
        operator broke the lock in that moment."""
        attempt = self._held.get((key, fence))
        if attempt is None:
            return False
        with self._mapped():
            reply = await self._client.leasestub.LeaseTimeToLive(
                rpc.LeaseTimeToLiveRequest(ID=attempt.lease.id), timeout=timeout
            )
        if reply.TTL <= 0:
            self._held.pop((key, fence), None)
            self._leases.discard(attempt.lease.id)
            return False
        self._forget(key, fence)
        return True

    async def _entries(
        self, key: str, timeout: float | None = None
    ) -> tuple[int, Any | None, bool]:
        """The revision read at, the key's holder (its lowest direct entry) and whether any
        record lives under the key (an entry of a key below it)."""
        prefix = _dir(key)
        with self._mapped():
            reply = await self._client.kvstub.Range(
                rpc.RangeRequest(key=prefix, range_end=_prefix_end(prefix)),
                timeout=self._timeout if timeout is None else timeout,
            )
        direct = [kv for kv in reply.kvs if b"/" not in kv.key[len(prefix) :]]
        holder = min(direct, key=lambda kv: kv.create_revision) if direct else None
        return int(reply.header.revision), holder, len(direct) < len(reply.kvs)

    @staticmethod
    def _record(key: str, kv: Any) -> Record:
        owner, _, data = bytes(kv.value).partition(b"\n")
        return Record(key, owner.decode(), int(kv.create_revision), data)

    async def get(self, key: str) -> Record | None:
        prefix = _dir(key)
        with self._mapped():
            reply = await self._client.kvstub.Range(
                rpc.RangeRequest(
                    key=prefix,
                    range_end=_prefix_end(prefix),
                    sort_order=_ASCEND,
                    sort_target=_BY_CREATE,
                    limit=1,
                ),
                timeout=self._timeout,
            )
        if not reply.kvs:
            return None
        if b"/" not in reply.kvs[0].key[len(prefix) :]:
            return self._record(key, reply.kvs[0])
        # The oldest entry is a key's below this one (a group's member): read them all.
        _, holder, _ = await self._entries(key)
        return None if holder is None else self._record(key, holder)

    async def children(self, prefix: str) -> list[Record]:
        p = f"/keel/{prefix}".encode()
        with self._mapped():
            reply = await self._client.kvstub.Range(
                rpc.RangeRequest(key=p, range_end=_prefix_end(p)), timeout=self._timeout
            )
        holders: dict[bytes, Any] = {}
        for kv in reply.kvs:
            name, slash, rest = kv.key[len(p) :].partition(b"/")
            if not slash or b"/" in rest:
                continue  # not a member's own key
            if name not in holders or kv.create_revision < holders[name].create_revision:
                holders[name] = kv
        return [self._record(prefix + n.decode(), kv) for n, kv in sorted(holders.items())]

    @contextlib.asynccontextmanager
    async def changes(self, key: str) -> AsyncIterator[Changes]:
        prefix = _dir(key) if not key.endswith("/") else f"/keel/{key}".encode()
        with self._mapped():
            reply = await self._client.kvstub.Range(
                rpc.RangeRequest(key=prefix, range_end=_prefix_end(prefix), count_only=True),
                timeout=self._timeout,
            )
        yield _Changes(self, prefix, int(reply.header.revision))

    def on_session_lost(self, callback: Callable[[], None]) -> None:
        return None

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            for lease_id in list(self._leases):
                await self._client.leasestub.LeaseRevoke(
                    rpc.LeaseRevokeRequest(ID=lease_id), timeout=self._timeout
                )
        self._leases.clear()
        self._free.clear()
        with contextlib.suppress(Exception):
            await self._client.close()


def _done() -> asyncio.Future[None]:
    future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    future.set_result(None)
    return future


class _Watch:
    """A watch under ``prefix`` kept open across events: opened at the first `next`, from
    the revision asked for then; opened again (from the revision asked for) only after an
    error or `close`."""

    def __init__(self, backend: EtcdBackend, prefix: bytes, *, kind: EventKind | None) -> None:
        self._backend = backend
        self._prefix = prefix
        self._kind = kind
        self._events: asyncio.Queue[Any] = asyncio.Queue()
        self._id: int | None = None
        self._watcher: Any = None

    async def next(self, start: int, timeout: float) -> Any:
        """The next event (at or after ``start`` if the watch opens now), or None after
        ``timeout``; `RevisionCompactedError` if ``start`` is compacted away."""
        backend = self._backend
        if self._id is None:
            watcher = backend._client._watcher
            try:
                callback = await watcher.add_callback(
                    self._prefix,
                    self._events.put,
                    range_end=_prefix_end(self._prefix),
                    start_revision=start,
                    kind=self._kind,
                )
            except aetcd.exceptions.WatchTimeoutError:
                return None
            except aetcd.exceptions.RevisionCompactedError:
                raise
            except Exception as exc:
                with backend._mapped():
                    raise exc from None
            self._id, self._watcher = callback.watch_id, watcher
        try:
            async with asyncio.timeout(timeout):
                event = await self._events.get()
        except TimeoutError:
            return None
        if isinstance(event, Exception):  # aetcd hands a broken stream's error to callbacks
            await self.close()
            if isinstance(event, aetcd.exceptions.RevisionCompactedError):
                raise event
            with backend._mapped():
                raise event
        return event

    async def close(self) -> None:
        watch_id, watcher, self._id = self._id, self._watcher, None
        self._events = asyncio.Queue()
        if watch_id is not None:
            with contextlib.suppress(Exception):  # the stream may be gone with its member
                await watcher.cancel(watch_id)


class _Changes:
    """Any put or delete under the prefix since the revision last seen (lease expiries
    delete keys, so they count)."""

    def __init__(self, backend: EtcdBackend, prefix: bytes, revision: int) -> None:
        self._backend = backend
        self._prefix = prefix
        self._revision = revision

    async def wait(self, timeout: float) -> None:
        try:
            event = await self._backend._watch_once(
                self._prefix, self._revision + 1, max(0.001, timeout)
            )
        except aetcd.exceptions.RevisionCompactedError as exc:
            self._revision = int(exc.compacted_revision) - 1
            return
        except BackendUnavailable:
            await asyncio.sleep(min(timeout, 0.1))  # unreachable: the caller re-reads
            return
        if event is not None:
            self._revision = int(event.kv.mod_revision)
