"""Counting semaphore of ``permits`` leased slots, each slot a fenced lock of its own.

A permit is one slot's lease: at most ``permits`` holders at once, each with a fence that is
strictly greater than every earlier fence *of that slot* — a resource guarded by a permit is
fenced per slot (key it by ``permit.name``). Loss, renewal and cancellation behave exactly as
for locks. Waiters try every slot, then wait for the backend's change notification on the slots
and try again, so the semaphore is not fair: a late waiter may overtake an early one.
"""

from __future__ import annotations

import random
import time
from typing import TYPE_CHECKING

from keel.coordination._keys import key_for
from keel.coordination._lock import HeldLock, LockContext, try_key
from keel.errors import ConfigError, LockTimeout

if TYPE_CHECKING:
    from keel.coordination._coordinator import Coordinator


class Semaphore:
    """``async with coord.semaphore(name, n).acquire() as permit:``"""

    def __init__(self, coord: Coordinator, name: str, permits: int) -> None:
        if permits < 1:
            raise ConfigError(f"a semaphore needs at least one permit, not {permits}")
        self.coord = coord
        self.name = name
        self.permits = permits
        self._prefix = key_for("semaphore", name) + "/"

    def acquire(
        self, *, ttl: float | None = None, timeout: float | None = None, cancel_on_loss: bool = True
    ) -> LockContext:
        return LockContext(
            lambda: self.take(ttl=ttl, timeout=timeout), cancel_on_loss=cancel_on_loss
        )

    async def take(self, *, ttl: float | None = None, timeout: float | None = None) -> HeldLock:
        """Take a permit for manual use; ``await permit.release()`` gives it back."""
        lease = self.coord._lease_ttl(ttl)
        deadline = None if timeout is None else time.monotonic() + timeout
        permit = await self._try_every_slot(lease)
        if permit is not None:
            return permit
        async with self.coord.backend.changes(self._prefix) as changes:
            while True:
                permit = await self._try_every_slot(lease)
                if permit is not None:
                    return permit
                left = lease if deadline is None else deadline - time.monotonic()
                if left <= 0:
                    raise LockTimeout(
                        f"all {self.permits} permits of semaphore {self.name!r} stayed taken "
                        f"for {timeout}s; retry later or raise the timeout",
                        name=self.name,
                        timeout=timeout,
                    )
                await changes.wait(min(left, lease))

    async def _try_every_slot(self, lease: float) -> HeldLock | None:
        for slot in random.sample(range(self.permits), self.permits):
            key = f"{self._prefix}{slot}"
            permit = await try_key(self.coord, f"{self.name}[{slot}]", key, ttl=lease)
            if permit is not None:
                return permit
        return None

    async def holders(self) -> int:
        """How many permits are taken right now."""
        return len(await self.coord.backend.children(self._prefix))
