"""A server's concurrency slots: a semaphore a drain can empty of waiters at once.

`acquire` returns True with a slot, or False when `wake_all` (the start of a drain) woke it
without one: the request was delivered but never started, so the server hands it back right
away instead of holding it until a running handler ends. A freed slot goes straight to the
longest waiter (first come, first served). Cancellation-safe: a waiter cancelled just as it was
handed a slot passes the slot on.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque


class Slots:
    def __init__(self, size: int) -> None:
        self.free = size
        self._waiters: deque[asyncio.Future[bool]] = deque()

    @property
    def waiting(self) -> int:
        return sum(not w.done() for w in self._waiters)

    def take(self) -> bool:
        """A free slot if one is free and nobody waits for one (no await, no coroutine)."""
        if self.free > 0 and not self._waiters:
            self.free -= 1
            return True
        return False

    async def acquire(self) -> bool:
        if self.free > 0 and not self._waiters:
            self.free -= 1
            return True
        waiter: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.result():
                self.release()  # handed a slot while being cancelled: pass it on
            else:
                with contextlib.suppress(ValueError):  # already woken without a slot
                    self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(True)  # the slot changes hands without becoming free
                return
        self.free += 1

    def wake_all(self) -> None:
        """Wake every waiter without a slot (they see False)."""
        waiters, self._waiters = self._waiters, deque()
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(False)
