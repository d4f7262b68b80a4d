"""etcd v3 coordination backend (gRPC through ``aetcd``'s channel and stubs).

A record is a key ``/keel/<key>`` attached to a lease; ``acquire`` is one transaction that
creates it only if its create revision is 0 (absent), and the fence is that creation's
revision: etcd's revision counter is global, linearizable and persisted, so a later holder's
fence is always higher, across restarts and leader changes. Leases are shared per ttl within
one client (one keep-alive renews every lock of that ttl), so acquire and release are one
round trip each. etcd leases are whole seconds with a floor of 2 s: a ttl is rounded up.

Failure semantics: etcd is linearizable (Raft), so a granted record is on a quorum. A client
cut off from etcd loses its locks at the conservative expiry bound (core); etcd itself frees
them when the lease runs out on the leader — after a leader change etcd *extends* leases by an
election timeout, which only delays liveness. Revisions survive compaction; fences need no
history, only the current revision counter.

Clusters, TLS and logins (`_etcd_channel`): ``etcd://h1:2379,h2:2379,h3:2379`` lists the
members and the client moves to a live one by itself; ``etcds://`` (or ``tls=true``) with
``ca``, ``cert``, ``key`` speaks TLS; ``user:password@`` logs in with etcd's auth.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import aetcd
from aetcd import rpc
from grpc import StatusCode
from grpc.aio import AioRpcError

from keel._tls import TLS_OPTIONS
from keel.coordination.backends._etcd_channel import Client, token_refused
from keel.coordination.backends.base import Backend, Characteristic, Grant, Record, map_errors
from keel.errors import BackendUnavailable, KeelError

_MIN_TTL = 2
_UNAVAILABLE_CODES = {
    StatusCode.UNAVAILABLE,
    StatusCode.DEADLINE_EXCEEDED,
    StatusCode.CANCELLED,
    StatusCode.UNKNOWN,
}
_GRPC_OPTIONS = {
    # Reconnect quickly after a cut connection: leases are seconds, gRPC's default back-off
    # (up to 120 s) would outlive them.
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.min_reconnect_backoff_ms": 100,
    "grpc.max_reconnect_backoff_ms": 1000,
}


class _LeaseGone(Exception):
    pass


@dataclass(slots=True)
class _Lease:
    id: int
    expires: float


def _prefix_end(prefix: bytes) -> bytes:
    return prefix[:-1] + bytes([prefix[-1] + 1])


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
        }
    )
    URL_OPTIONS = frozenset({"connect_timeout", *TLS_OPTIONS})

    def __init__(self, client: aetcd.Client, url: str, timeout: float) -> None:
        self._client = client
        self._url = url
        self._timeout = timeout
        self._leases: dict[int, _Lease] = {}
        self._lease_lock = asyncio.Lock()
        self._held: dict[tuple[str, int], int] = {}  # (key, fence) -> lease id
        self._seen: dict[bytes, int] = {}  # key -> revision at which we saw it held

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
        with map_errors((aetcd.exceptions.ConnectionFailedError,), backend="etcd", url=self._url):
            try:
                yield
            except AioRpcError as exc:
                if exc.code() == StatusCode.NOT_FOUND and "lease" in (exc.details() or ""):
                    raise _LeaseGone from exc
                if exc.code() in _UNAVAILABLE_CODES:
                    self._client.rotate(channel)  # the next call tries the next member
                    raise BackendUnavailable(
                        f"etcd at {self._url} is unreachable ({exc.code().name}: "
                        f"{exc.details()}); retry later"
                    ) from exc
                raise

    def lease_ttl(self, ttl: float) -> float:
        return float(max(_MIN_TTL, math.ceil(ttl)))

    async def _lease(self, ttl: int) -> _Lease:
        lease = self._leases.get(ttl)
        # Reuse a lease only while most of it is left: a lock's expiry bound is its lease's.
        if lease is not None and lease.expires - time.monotonic() > ttl * 2 / 3:
            return lease
        async with self._lease_lock:
            lease = self._leases.get(ttl)
            if lease is not None and lease.expires - time.monotonic() > ttl * 2 / 3:
                return lease
            if lease is not None:
                sent = time.monotonic()
                if await self._keepalive(lease.id) > 0:
                    lease.expires = sent + ttl
                    return lease
            sent = time.monotonic()
            with self._mapped():
                reply = await self._client.leasestub.LeaseGrant(
                    rpc.LeaseGrantRequest(TTL=ttl), timeout=self._timeout
                )
            lease = self._leases[ttl] = _Lease(reply.ID, sent + ttl)
            return lease

    async def _keepalive(self, lease_id: int) -> int:
        for attempt in (1, 2):
            token = self._client.token
            with self._mapped():
                try:
                    async for reply in self._client.leasestub.LeaseKeepAlive(
                        [rpc.LeaseKeepAliveRequest(ID=lease_id)], timeout=self._timeout
                    ):
                        return int(reply.TTL)
                except AioRpcError as exc:
                    # A stream: the token interceptor does not retry it (_etcd_channel).
                    if attempt == 2 or not token_refused(exc):
                        raise
                    await self._client.refresh(token)
        return 0

    async def acquire(self, key: str, owner: str, ttl: float, data: bytes) -> Grant | None:
        ttl_s = int(self.lease_ttl(ttl))
        k = f"/keel/{key}".encode()
        for _ in range(2):
            lease = await self._lease(ttl_s)
            txn = rpc.TxnRequest(
                compare=[
                    rpc.Compare(
                        key=k,
                        result=rpc.Compare.EQUAL,
                        target=rpc.Compare.CREATE,
                        create_revision=0,
                    )
                ],
                success=[
                    rpc.RequestOp(
                        request_put=rpc.PutRequest(
                            key=k, value=owner.encode() + b"\n" + data, lease=lease.id
                        )
                    )
                ],
            )
            try:
                with self._mapped():
                    reply = await self._client.kvstub.Txn(txn, timeout=self._timeout)
            except _LeaseGone:
                self._leases.pop(ttl_s, None)
                continue
            if not reply.succeeded:
                self._seen[k] = reply.header.revision
                return None
            fence = int(reply.header.revision)
            self._held[(key, fence)] = lease.id
            return Grant(fence, lease.expires)
        raise BackendUnavailable(f"etcd at {self._url} keeps dropping fresh leases; retry later")

    async def renew(self, key: str, owner: str, fence: int, ttl: float) -> float | None:
        lease_id = self._held.get((key, fence))
        if lease_id is None:
            return None
        ttl_s = int(self.lease_ttl(ttl))
        sent = time.monotonic()
        try:
            alive = await self._keepalive(lease_id) > 0
        except _LeaseGone:
            alive = False
        if not alive:
            self._held.pop((key, fence), None)
            return None
        shared = self._leases.get(ttl_s)
        if shared is not None and shared.id == lease_id:
            shared.expires = sent + ttl_s
        return sent + ttl_s

    async def release(self, key: str, owner: str, fence: int) -> None:
        self._held.pop((key, fence), None)
        k = f"/keel/{key}".encode()
        txn = rpc.TxnRequest(
            compare=[
                rpc.Compare(
                    key=k,
                    result=rpc.Compare.EQUAL,
                    target=rpc.Compare.CREATE,
                    create_revision=fence,
                )
            ],
            success=[rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=k))],
        )
        with self._mapped():
            await self._client.kvstub.Txn(txn, timeout=self._timeout)

    @staticmethod
    def _record(kv: Any) -> Record:
        owner, _, data = bytes(kv.value).partition(b"\n")
        return Record(
            kv.key.decode().removeprefix("/keel/"), owner.decode(), kv.create_revision, data
        )

    async def get(self, key: str) -> Record | None:
        with self._mapped():
            reply = await self._client.kvstub.Range(
                rpc.RangeRequest(key=f"/keel/{key}".encode()), timeout=self._timeout
            )
        return self._record(reply.kvs[0]) if reply.kvs else None

    async def children(self, prefix: str) -> list[Record]:
        p = f"/keel/{prefix}".encode()
        with self._mapped():
            reply = await self._client.kvstub.Range(
                rpc.RangeRequest(key=p, range_end=_prefix_end(p)), timeout=self._timeout
            )
        return [self._record(kv) for kv in reply.kvs if b"/" not in kv.key[len(p) :]]

    async def wait(self, key: str, timeout: float) -> None:
        k = f"/keel/{key}".encode()
        seen = self._seen.pop(k, None)
        # Watching from the revision at which we saw the key held closes the race with a
        # release that happened in between; any watch failure degrades to a short sleep.
        try:
            await self._client.watch_once(
                k,
                timeout=timeout,
                range_end=_prefix_end(k) if key.endswith("/") else None,
                start_revision=None if seen is None else seen + 1,
            )
        except aetcd.exceptions.WatchTimeoutError:
            return
        except Exception:
            await asyncio.sleep(min(timeout, 0.05))

    def on_session_lost(self, callback: Callable[[], None]) -> None:
        return None

    async def close(self) -> None:
        leases = list(self._leases.values())
        self._leases.clear()
        with contextlib.suppress(Exception):
            for lease in leases:
                await self._client.leasestub.LeaseRevoke(
                    rpc.LeaseRevokeRequest(ID=lease.id), timeout=self._timeout
                )
        with contextlib.suppress(Exception):
            await self._client.close()
