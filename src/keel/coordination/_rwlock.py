"""Reader-writer locks: many readers or one writer, each a leased, fenced record.

The writer's key is the plain lock's (``coord.lock(name)``), so a writer and a plain holder of
the same name exclude each other; readers are records of their own under ``shared/<name>/``.
Exclusion is a two-sided check on the primitives, no extra server feature:

* a writer takes the lock key, *then* waits until no reader record is live;
* a reader creates its record, *then* looks at the lock key, and if a writer holds it, removes
  its record and waits for the writer to finish.

On a backend whose reads see every write completed before them (sqlite, etcd, redis, a single
ZooKeeper server) one of the two always sees the other, so a reader and a writer never both
proceed. Writers are preferred: a waiting writer holds the key, so new readers back off and a
stream of readers cannot starve it (a stream of writers can starve readers). What each holder
is promised about loss, renewal and cancellation is the plain lock's (`keel.coordination._lock`);
a reader's fence is per reader slot, so fence a resource with the writer's.

A plain ``coord.lock(name)`` does not look for readers: only `write()` excludes them.
Known gap: on a ZooKeeper *ensemble* a read served by a lagging follower could miss the other
side's write; run the check against a single server or the leader where that matters.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

from keel.coordination._clock import now
from keel.coordination._keys import key_for
from keel.coordination._lock import HeldLock, LockContext, acquire_key, try_key
from keel.errors import LockTimeout

if TYPE_CHECKING:
    from keel.coordination._coordinator import Coordinator


class ReadWriteLock:
    """``async with coord.rwlock(name).read() as held:`` / ``.write()``."""

    def __init__(self, coord: Coordinator, name: str) -> None:
        self.coord = coord
        self.name = name
        self._key = key_for("lock", name)
        self._readers = key_for("shared", name) + "/"

    def read(
        self, *, ttl: float | None = None, timeout: float | None = None, cancel_on_loss: bool = True
    ) -> LockContext:
        return LockContext(
            lambda: self.acquire_read(ttl=ttl, timeout=timeout), cancel_on_loss=cancel_on_loss
        )

    def write(
        self, *, ttl: float | None = None, timeout: float | None = None, cancel_on_loss: bool = True
    ) -> LockContext:
        return LockContext(
            lambda: self.acquire_write(ttl=ttl, timeout=timeout), cancel_on_loss=cancel_on_loss
        )

    def _timeout(self, timeout: float | None) -> LockTimeout:
        return LockTimeout(
            f"lock {self.name!r} stayed held in the other mode for {timeout}s; retry later or "
            "raise the timeout",
            name=self.name,
            timeout=timeout,
        )

    async def acquire_write(
        self, *, ttl: float | None = None, timeout: float | None = None
    ) -> HeldLock:
        """Exclusive: no other writer, plain holder or reader while held."""
        deadline = None if timeout is None else now() + timeout
        held = await acquire_key(self.coord, self.name, self._key, ttl=ttl, timeout=timeout)
        try:
            await self._readers_gone(deadline, timeout, held.ttl)
        except BaseException:
            await held.release()
            raise
        return held

    async def _readers_gone(
        self, deadline: float | None, timeout: float | None, ttl: float
    ) -> None:
        backend = self.coord.backend
        if not await backend.children(self._readers):
            return  # no reader: nothing to wait for, so no subscription (a round trip or two)
        async with backend.changes(self._readers) as changes:  # subscribe, then read
            while await backend.children(self._readers):
                left = 1.0 if deadline is None else deadline - now()
                if left <= 0:
                    raise self._timeout(timeout)
                await changes.wait(min(left, ttl))

    async def acquire_read(
        self, *, ttl: float | None = None, timeout: float | None = None
    ) -> HeldLock:
        """Shared with other readers; excludes writers. One coordinator may hold it many times
        at once (each a slot of its own)."""
        lease = self.coord._lease_ttl(ttl)
        deadline = None if timeout is None else now() + timeout
        backend = self.coord.backend
        while True:
            held = await self._free_slot(lease)
            if await backend.get(self._key) is None:
                return held
            await held.release()  # let the writer in
            left = 1.0 if deadline is None else deadline - now()
            if left <= 0:
                raise self._timeout(timeout)
            # Subscribed after our own release, which would otherwise count as the change
            # (SQLite: a loop that never yields), then read again before waiting.
            async with backend.changes(self._key) as changes:
                if await backend.get(self._key) is not None:
                    await changes.wait(min(left, lease))

    async def _free_slot(self, lease: float) -> HeldLock:
        """Take the lowest free reader slot of this member id: slots are reused, so records do
        not pile up on backends that keep a row or a counter per key."""
        for slot in itertools.count():
            key = key_for("shared", self.name, f"{self.coord.member_id}#{slot}")
            held = await try_key(self.coord, f"{self.name}[shared]", key, ttl=lease)
            if held is not None:
                return held
        raise AssertionError("unreachable")  # itertools.count() never ends
