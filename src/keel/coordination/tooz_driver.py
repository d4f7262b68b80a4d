"""Keel as a tooz backend: unchanged tooz code on `keel.coordination`.

    coordinator = tooz.coordination.get_coordinator("keel+etcd://127.0.0.1:2379", b"api-1")

URLs ``keel+etcd://``, ``keel+zookeeper://``, ``keel+redis://`` and ``keel+sqlite:///path``
name the Keel backend after the ``+``; the rest of the URL is Keel's
(docs/coordination-contract.md).
Option ``timeout`` (tooz's name; seconds) is the lease ttl, default 10; other tooz options
are accepted and ignored. This module translates only: every lock, group, election and
lease is the core's, and so is every guarantee.

What a tooz caller gets, and where it differs from tooz's own drivers (docs/openstack.md):

* ``get_lock(name)``: a leased, fenced Keel lock of the same name (``coord.lock(name)`` from
  native Keel code excludes it too). ``lock.fence`` is the holding's fencing token (as granted:
  unlike native ``held.fence`` it does not check the lease, so a holder paused past it learns
  from ``is_still_owner()`` or from the resource's refusal). Leases are
  renewed in the background: a live holder never loses its lock because it forgot
  ``heartbeat()``; a dead one frees it within ttl. ``acquire(shared=True)`` is a reader of
  the core's reader-writer lock. ``release()`` waits for the backend and says whether the lock
  was still ours; ``is_still_owner()`` asks the backend; ``break_()`` ends the holder's lease
  by force, which is safe because the next holder's fence is higher.
* Groups are created explicitly as in tooz; a member's capabilities are tooz's msgpack
  encoding in the member's leased record; a member leaves by ``leave_group``, by ``stop()``,
  or by lease expiry when its process dies. Watchers are tooz's own polling ``run_watchers``
  over ``get_members``; leadership is a Keel election per group (fenced terms).
* ``heartbeat()`` renews every lease now; it is never required (CHARACTERISTICS include
  NON_TIMEOUT_BASED: liveness is Keel's renewal, not the application's heartbeat calls).

Errors come back as tooz's: an unreachable server is ``ToozConnectionError``, a missing group
``GroupNotCreated`` and so on; any other Keel error is a ``ToozError`` carrying it as cause.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import threading
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode

import tooz
from tooz import coordination, locking, utils

import keel.coordination as kc
from keel import urls
from keel._portal import Portal, caller_runs_portal
from keel.coordination.backends.base import Characteristic
from keel.coordination.sync import SyncHeldLock
from keel.errors import (
    BackendUnavailable,
    GroupExists,
    GroupNotEmpty,
    GroupNotFound,
    KeelError,
    LockLost,
    LockTimeout,
    NotMember,
)

T = TypeVar("T")
C = coordination.Characteristics

SCHEMES = {
    "keel+etcd": "etcd",
    "keel+zookeeper": "zookeeper",
    "keel+redis": "redis",
    "keel+sqlite": "sqlite",
}
DEFAULT_TTL = 10.0
_TOOZ_OPTIONS = {"timeout", "lock_timeout", "membership_timeout", "leader_timeout", "namespace"}

# What tooz calls each guarantee, from what the Keel backend is. Consistency models are those
# of the server: etcd is linearizable (Raft, quorum reads); ZooKeeper is sequentially
# consistent (a follower may serve older data); SQLite serializes every write in one file on one
# host; a Redis instance is one thread, but a failover can lose acknowledged writes, so only
# what tooz's own redis driver claims is claimed.
_MODEL: dict[str, tuple[coordination.Characteristics, ...]] = {
    "etcd": (C.LINEARIZABLE, C.SERIALIZABLE),
    "zookeeper": (C.SEQUENTIAL,),
    "sqlite": (C.LINEARIZABLE, C.SERIALIZABLE),
    "redis": (C.CAUSAL,),
}


def characteristics(backend: str, declared: frozenset[Characteristic]) -> tuple[C, ...]:
    """tooz's CHARACTERISTICS for a Keel backend with the given Keel characteristics."""
    # NON_TIMEOUT_BASED in tooz's sense (its zookeeper and etcd3gw drivers): liveness is kept by
    # the client library (Keel renews every lease itself), not by the caller's heartbeat().
    found = [C.DISTRIBUTED_ACROSS_THREADS, C.DISTRIBUTED_ACROSS_PROCESSES, C.NON_TIMEOUT_BASED]
    if Characteristic.DISTRIBUTED in declared:
        found.append(C.DISTRIBUTED_ACROSS_HOSTS)
    if Characteristic.REPLICATED in declared:
        # Quorum writes: a partitioned minority cannot change what the majority sees.
        found.append(C.SAME_VIEW_UNDER_PARTITIONS)
    return (*found, *_MODEL[backend])


def _text(value: bytes | str) -> str:
    """A tooz id (bytes, or str at runtime) as Keel's text name."""
    if isinstance(value, str):
        return value
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise tooz.ToozError(f"ids must be UTF-8 to be Keel names, not {value!r}") from None


def _id(value: str) -> bytes:
    return value.encode("utf-8")


@contextmanager
def _translated(group: bytes | str = "", member: bytes | str = "") -> Iterator[None]:
    """Keel's errors as the tooz errors a tooz caller catches (the one mapping)."""
    try:
        yield
    except BackendUnavailable as exc:
        utils.raise_with_cause(coordination.ToozConnectionError, str(exc), cause=exc)
    except GroupNotFound as exc:
        raise coordination.GroupNotCreated(group) from exc
    except GroupExists as exc:
        raise coordination.GroupAlreadyExist(group) from exc
    except GroupNotEmpty as exc:
        raise coordination.GroupNotEmpty(group) from exc
    except NotMember as exc:
        raise coordination.MemberNotJoined(group, member) from exc
    except KeelError as exc:
        utils.raise_with_cause(tooz.ToozError, str(exc), cause=exc)


def _encode(capabilities: Any) -> bytes:
    return b"" if capabilities is None else utils.dumps(capabilities)


def _decode(metadata: bytes) -> Any:
    """Capabilities as tooz stored them; metadata a native Keel member wrote is returned as
    the bytes it is when it is not tooz's encoding."""
    if not metadata:
        return None
    try:
        return utils.loads(metadata)
    except tooz.ToozError:
        return metadata


async def _renewed(holdings: list[kc.HeldLock]) -> bool:
    """Renew each holding now; False as soon as one is found gone."""
    try:
        for held in holdings:
            await held.extend()
    except LockLost:
        return False
    return True


class KeelLock(locking.Lock):
    """A tooz lock over a Keel lock (exclusive) or reader slot (``shared=True``).

    One object may hold several shared slots at once, or one exclusive holding; ``release``
    gives back the latest. ``fence`` is the exclusive holding's fencing token (None when not
    held exclusively): present it to the resource the lock guards.
    """

    def __init__(self, driver: KeelDriver, name: bytes) -> None:
        super().__init__(name)
        self._driver = driver
        self._keel_name = _text(name)
        self._mutex = threading.Lock()
        self._holdings: list[tuple[bool, kc.HeldLock]] = []  # (shared, holding)

    @property
    def fence(self) -> int | None:
        # The granted fence, read without the lease check: the check may mark the lock lost,
        # which must happen on the loop, not in the caller's thread. A lost holding's fence is
        # refused by the resource once a newer holder wrote; ``is_still_owner()`` asks.
        with self._mutex:
            return next((h.granted_fence for shared, h in self._holdings if not shared), None)

    def acquire(
        self, blocking: bool | float = True, shared: bool = False, timeout: float | None = None
    ) -> bool:
        wait, timeout = utils.convert_blocking(blocking, timeout)
        coord = self._driver.coordinator
        rw = coord.rwlock(self._keel_name)
        take = rw.acquire_read if shared else rw.acquire_write

        async def attempt() -> kc.HeldLock | None:
            try:
                return await take(timeout=timeout if wait else 0)
            except LockTimeout:
                return None

        held = self._driver.run(attempt())
        if held is None:
            return False
        with self._mutex:
            self._holdings.append((shared, held))
        return True

    def release(self) -> bool:
        with self._mutex:
            if not self._holdings:
                return False
            _, held = self._holdings.pop()
        return self._driver.run(held.release_confirmed())

    def is_still_owner(self) -> bool:
        """Asks the backend (and renews the lease while at it)."""
        with self._mutex:
            holdings = [h for _, h in self._holdings]
        if not holdings:
            return False
        return self._driver.run(_renewed(holdings[-1:]))

    def break_(self) -> bool:
        return self._driver.run(self._driver.coordinator.break_lock(self._keel_name))

    def heartbeat(self) -> bool:
        """Renew this object's holdings now; False if it holds none (or lost them)."""
        with self._mutex:
            holdings = [h for _, h in self._holdings]
        if not holdings:
            return False
        return self._driver.run(_renewed(holdings))


async def _won(election: kc.Election) -> bool:
    try:
        await election.campaign(timeout=0)
    except LockTimeout:
        return False
    return True


class KeelDriver(coordination.CoordinationDriverCachedRunWatchers):
    """The tooz coordination driver; tooz makes it from a ``keel+<backend>://`` URL."""

    CHARACTERISTICS: tuple[C, ...] = (C.DISTRIBUTED_ACROSS_THREADS, C.DISTRIBUTED_ACROSS_PROCESSES)

    def __init__(self, member_id: bytes, parsed_url: Any, options: dict[str, Any]) -> None:
        super().__init__(member_id, parsed_url, options)
        scheme = parsed_url.scheme.lower()
        if scheme not in SCHEMES:
            raise tooz.ToozError(f"{scheme}:// is not a Keel URL; use one of {sorted(SCHEMES)}")
        self.backend_name = SCHEMES[scheme]
        opts = utils.collapse(options)
        ttl = opts.get("timeout") or opts.get("lock_timeout") or DEFAULT_TTL
        try:
            self.ttl = float(ttl)
        except (TypeError, ValueError):
            self.ttl = math.nan
        if not (self.ttl > 0 and math.isfinite(self.ttl)):
            raise tooz.ToozError(f"timeout must be a positive number of seconds, not {ttl!r}")
        keel_query = urlencode(
            [(k, v) for k, v in parse_qsl(parsed_url.query) if k not in _TOOZ_OPTIONS]
        )
        self.url = f"{self.backend_name}://{parsed_url.netloc}{parsed_url.path}" + (
            f"?{keel_query}" if keel_query else ""
        )
        with _translated():
            declared = urls.resolve("coordination", self.url)[0].characteristics
        self.CHARACTERISTICS = characteristics(self.backend_name, declared)
        self._portal: Portal = caller_runs_portal()
        self._coord: kc.Coordinator | None = None
        self._groups: dict[bytes, kc.Group] = {}
        self._elections: dict[bytes, kc.Election] = {}
        self._order = threading.Lock()
        self._tail: concurrent.futures.Future[Any] | None = None

    # --- plumbing ----------------------------------------------------------------------------

    @property
    def coordinator(self) -> kc.Coordinator:
        """The Keel coordinator underneath (native Keel calls may use it directly)."""
        if self._coord is None:
            raise tooz.ToozError("the coordinator is not started; call start() first")
        return self._coord

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a Keel operation on the portal's loop (in this thread while the loop thread
        waits for I/O, see `CallerRunsPortal`), wait, and translate its errors."""
        with _translated():
            return self._portal.run(coro)

    def _submit(
        self,
        make: Callable[[], Coroutine[Any, Any, T]],
        group: bytes = b"",
        member: bytes = b"",
    ) -> coordination.CoordinatorResult[T]:
        """Start an operation and return tooz's async result for it. Operations of one
        coordinator run in the order they were submitted, as on tooz's own drivers (one
        executor thread): callers rely on it (``join_group(...)`` then, without waiting,
        ``get_members``)."""
        with self._order:
            previous = self._tail

            async def ordered() -> T:
                if previous is not None:  # its outcome is its caller's, not ours
                    await asyncio.wait([asyncio.wrap_future(previous)])
                return await make()

            future = asyncio.run_coroutine_threadsafe(ordered(), self._portal.loop)
            self._tail = future
        return coordination.CoordinatorResult(future, lambda: _translated(group, member))

    def _group(self, group_id: bytes) -> kc.Group:
        # One Group (and Election) object per id: it holds this member's membership (term),
        # so threads racing to make the first one must end up with the same.
        with self._order:
            if group_id not in self._groups:
                self._groups[group_id] = self.coordinator.group(_text(group_id))
            return self._groups[group_id]

    def _election(self, group_id: bytes) -> kc.Election:
        with self._order:
            if group_id not in self._elections:
                self._elections[group_id] = self.coordinator.election(_text(group_id))
            return self._elections[group_id]

    def _start(self) -> None:
        try:
            self._coord = self._portal.run(
                kc.connect(self.url, member_id=_text(self._member_id), ttl=self.ttl)
            )
        except KeelError as exc:  # tooz has one error for "start() could not connect"
            utils.raise_with_cause(coordination.ToozConnectionError, str(exc), cause=exc)
        self._groups.clear()
        self._elections.clear()

    def _stop(self) -> None:
        coord, self._coord = self._coord, None
        if coord is not None:
            with _translated():
                self._portal.run(coord.close())

    # --- locks and liveness --------------------------------------------------------------------

    def get_lock(self, name: bytes) -> KeelLock:
        return KeelLock(self, name)

    def heartbeat(self) -> float:
        """Renew every lease now (never required: Keel renews every ttl/3 by itself); returns
        the seconds tooz's heart may wait before the next beat."""
        self.run(self.coordinator.heartbeat())
        return self.ttl

    # --- groups ------------------------------------------------------------------------------

    def create_group(self, group_id: bytes) -> coordination.CoordinatorResult[None]:
        return self._submit(self._group(group_id).create, group_id)

    def get_groups(self) -> coordination.CoordinatorResult[list[bytes]]:
        coord = self.coordinator

        async def groups() -> list[bytes]:
            return [_id(name) for name in await coord.groups()]

        return self._submit(groups)

    def delete_group(self, group_id: bytes) -> coordination.CoordinatorResult[None]:
        return self._submit(self._group(group_id).delete, group_id)

    def join_group(
        self, group_id: bytes, capabilities: coordination.Capabilities | None = None
    ) -> coordination.CoordinatorResult[None]:
        group = self._group(group_id)

        async def join() -> None:
            if group.membership is not None and not group.membership.lost.is_set():
                raise coordination.MemberAlreadyExist(group_id, self._member_id)
            try:
                await group.join(_encode(capabilities), timeout=0, created=True)
            except LockTimeout:  # another process holds this member id's membership
                raise coordination.MemberAlreadyExist(group_id, self._member_id) from None
            self._joined_groups.add(group_id)

        return self._submit(join, group_id, self._member_id)

    def leave_group(self, group_id: bytes) -> coordination.CoordinatorResult[None]:
        group = self._group(group_id)

        async def leave() -> None:
            self._joined_groups.discard(group_id)
            if group.membership is not None and await group.leave():
                return
            # tooz names members by id: leaving ends this id's membership wherever it is held.
            if await group.expel(group.coord.member_id):
                return
            if not await group.exists():
                raise coordination.GroupNotCreated(group_id)
            raise coordination.MemberNotJoined(group_id, self._member_id)

        return self._submit(leave, group_id, self._member_id)

    async def _members(self, group_id: bytes) -> dict[bytes, kc.Member]:
        group = self._group(group_id)
        exists, members = await asyncio.gather(group.exists(), group.members())
        if not exists:
            raise coordination.GroupNotCreated(group_id)
        return {_id(m): member for m, member in members.items()}

    def get_members(self, group_id: bytes) -> coordination.CoordinatorResult[set[bytes]]:
        async def members() -> set[bytes]:
            return set(await self._members(group_id))

        return self._submit(members, group_id)

    def get_members_with_capabilities(
        self, group_id: bytes
    ) -> coordination.CoordinatorResult[dict[bytes, coordination.Capabilities | None]]:
        async def members() -> dict[bytes, Any]:
            return {m: _decode(x.metadata) for m, x in (await self._members(group_id)).items()}

        return self._submit(members, group_id)

    async def _member(self, group_id: bytes, member_id: bytes) -> kc.Member:
        member = (await self._members(group_id)).get(_id(_text(member_id)))
        if member is None:
            raise coordination.MemberNotJoined(group_id, member_id)
        return member

    def get_member_capabilities(
        self, group_id: bytes, member_id: bytes
    ) -> coordination.CoordinatorResult[coordination.Capabilities | None]:
        async def capabilities() -> Any:
            return _decode((await self._member(group_id, member_id)).metadata)

        return self._submit(capabilities, group_id, member_id)

    def get_member_info(
        self, group_id: bytes, member_id: bytes
    ) -> coordination.CoordinatorResult[dict[str, Any]]:
        async def info() -> dict[str, Any]:
            member = await self._member(group_id, member_id)
            # Keel's record has no timestamps; it has the membership's fence instead.
            return {"capabilities": _decode(member.metadata), "fence": member.fence}

        return self._submit(info, group_id, member_id)

    def update_capabilities(
        self, group_id: bytes, capabilities: coordination.Capabilities
    ) -> coordination.CoordinatorResult[None]:
        group = self._group(group_id)
        return self._submit(lambda: group.update(_encode(capabilities)), group_id, self._member_id)

    # --- leaders -----------------------------------------------------------------------------

    # tooz annotates bytes, but answers None between leaders (its own suite asserts that).
    def get_leader(  # type: ignore[override]
        self, group_id: bytes
    ) -> coordination.CoordinatorResult[bytes | None]:
        election = self._election(group_id)

        async def leader() -> bytes | None:
            current = await election.leader()
            return None if current is None else _id(current.member_id)

        return self._submit(leader, group_id)

    def leader_term(self, group_id: bytes) -> SyncHeldLock | None:
        """This member's live term as the group's leader (``.fence`` fences what the leader
        writes, checked on the loop like the blocking facade's), or None when it does not
        lead. An extra method: tooz has no fence."""
        election = self._elections.get(group_id)
        term = None if election is None else election.term
        return None if term is None or term.lost.is_set() else SyncHeldLock(term, self._portal)

    def stand_down_group_leader(self, group_id: bytes) -> bool:
        election = self._elections.get(group_id)
        if election is None or election.term is None:
            return False
        self.run(election.resign())
        return True

    def run_elect_coordinator(self) -> None:
        for group_id, hooks in list(self._hooks_elected_leader.items()):
            election = self._election(group_id)
            if election.term is not None and not election.term.lost.is_set():
                continue  # already leading: tooz fires the hooks once per term
            if not self.run(_won(election)):
                continue
            hooks.run(coordination.LeaderElected(group_id, self._member_id))

    def run_watchers(self, timeout: float | None = None) -> list[Any]:
        result = super().run_watchers(timeout=timeout)
        self.run_elect_coordinator()
        return result
