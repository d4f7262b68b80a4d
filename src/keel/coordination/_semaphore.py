"""Counting semaphore of ``permits`` leased slots, each slot a fenced lock of its own.

A permit is one slot's lease: at most ``permits`` holders at once, each with a fence that is
strictly greater than every earlier fence *of that slot* — a resource guarded by a permit is
fenced per slot (key it by ``permit.name``). Loss, renewal and cancellation behave exactly as
for locks. Waiters poll the slots (each wait is bounded by the lease ttl), so the semaphore is
not fair: a late waiter may overtake an early one.
"""

from __future__ import annotations

import random
import time
from typing import TYPE_CHECKING

from keel.coordination._keys import key_for
from keel.coordination._lock import HeldLock, LockContext
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
        backend = self.coord.backend
        while True:
            for slot in random.sample(range(self.permits), self.permits):
                key = f"{self._prefix}{slot}"
                grant = await backend.acquire(key, self.coord.owner, lease, b"")
                if grant is not None:
                    name = f"{self.name}[{slot}]"
                    return HeldLock(
                        self.coord, name, key, fence=grant.fence, ttl=lease, expires=grant.expires
                    )
            left = 0.1 if deadline is None else deadline - time.monotonic()
            if left <= 0:
                raise LockTimeout(
                    f"all {self.permits} permits of semaphore {self.name!r} stayed taken for "
                    f"{timeout}s; retry later or raise the timeout",
                    name=self.name,
                    timeout=timeout,
                )
            await backend.wait(self._prefix, min(left, 0.05))

    async def holders(self) -> int:
        """How many permits are taken right now."""
        return len(await self.coord.backend.children(self._prefix))
