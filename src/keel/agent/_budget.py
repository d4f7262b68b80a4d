"""One bound on the bytes a process holds in partial frames, across all its connections.

Each reader (an agent session, a controller connection, a qemu-ga line reader) reports what
it holds through a `Holding`. Over the limit, a reader that holds more than `FREE` bytes waits
before it reads more (its peer then sees back-pressure); a reader holding less is never held
back, so small requests (pings) keep flowing while large frames wait. A reader waits at most
until its own deadline (the frame timeout, the request's deadline); what happens then is the
reader's stall handling. The total may pass the limit by one read per reader, never more.

Thread-safe, and tied to no one event loop (the client may run loops in several threads):
a waiter is woken on its own loop whenever the total goes down.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

FREE = 64 * 1024
AGENT_LIMIT = 16 * 1024 * 1024  # an agent: four frames of the largest size at once
CLIENT_LIMIT = 32 * 1024 * 1024  # a controller, which may talk to many guests


class Budget:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.total = 0
        self._lock = threading.Lock()
        self._waiters: set[asyncio.Future[None]] = set()

    def _add(self, delta: int) -> None:
        with self._lock:
            self.total += delta
            woken = list(self._waiters) if delta < 0 else []
        for waiter in woken:
            with contextlib.suppress(RuntimeError):  # its loop has closed
                waiter.get_loop().call_soon_threadsafe(_wake, waiter)

    async def _freed(self, timeout: float | None) -> None:
        waiter = asyncio.get_running_loop().create_future()
        with self._lock:
            self._waiters.add(waiter)
        try:
            # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation that
            # lands as the waiter is woken, and the caller's own deadline would be lost.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await waiter
        finally:
            with self._lock:
                self._waiters.discard(waiter)


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class Holding:
    """What one reader holds against a `Budget`."""

    def __init__(self, budget: Budget) -> None:
        self.budget = budget
        self.held = 0

    def set(self, held: int) -> None:
        if held != self.held:
            self.budget._add(held - self.held)
            self.held = held

    def release(self) -> None:
        self.set(0)

    def must_wait(self) -> bool:
        return self.held > FREE and self.budget.total > self.budget.limit

    async def room(self, deadline: float | None) -> bool:
        """Wait until this reader may read more; False if ``deadline`` (a `time.monotonic`
        value) passed first."""
        while self.must_wait():
            timeout = None if deadline is None else deadline - time.monotonic()
            if timeout is not None and timeout <= 0:
                return False
            # Woken when any reader gives bytes back; rechecked, since others may be faster.
            # The 1 s cap covers a change of limit or a wake-up lost to a closed loop.
            await self.budget._freed(1.0 if timeout is None else min(timeout, 1.0))
        return True


CLIENT_BUDGET = Budget(CLIENT_LIMIT)
"""Shared by every controller connection in this process (Keel's agent and qemu-ga)."""
