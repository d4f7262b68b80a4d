"""Leased, fenced locks: acquire, background renewal, loss detection, cancellation on loss.

What a holder is promised:

* ``held.fence`` is strictly greater than every fence handed out earlier for that name, on
  every backend. Present it to the resource the lock guards (`FencedRegister`, `fenced_update`):
  the resource, not the lock, is what finally refuses a stale holder.
* The lease is renewed every ttl/3. The lock is *lost* as soon as any of these is true: the
  backend says the record is no longer ours, the backend's session was dropped, or renewal has
  not succeeded by the conservative expiry bound (the send time of the last successful renewal
  plus the ttl — so a partitioned or paused holder gives up no later than the server frees the
  lock). Then ``held.lost`` is set, ``held.check()`` raises `LockLost`, and inside
  ``async with coord.lock(...)`` the body is cancelled (unless ``cancel_on_loss=False``) and
  the block exits with `LockLost`.
* What a holder is *not* promised: that nobody else holds the lock at the same instant. A
  holder paused (GC, SIGSTOP, swap) longer than its ttl resumes believing it holds the lock
  until its next check; only the fence protects the resource in that window.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import TYPE_CHECKING

from keel.errors import BackendUnavailable, LockLost, LockTimeout

if TYPE_CHECKING:
    from keel.coordination._coordinator import Coordinator

_LOSS_MESSAGE = "keel.coordination: lock lost"
_RETRY = 0.05


class HeldLock:
    """A lock this process holds: its fence, its loss event, and the means to end it."""

    def __init__(
        self,
        coord: Coordinator,
        name: str,
        key: str,
        *,
        fence: int,
        ttl: float,
        expires: float,
        data: bytes = b"",
    ) -> None:
        self.coord = coord
        self.name = name
        self.key = key
        self.fence = fence
        self.ttl = ttl
        self.data = data
        self.lost = asyncio.Event()
        self.lost_reason = ""
        self._expires = expires
        self._released = False
        self._task: asyncio.Task[object] | None = None  # cancelled on loss
        self._on_lost: list[Callable[[], None]] = []
        self._cancelled = False
        # Renewal is a timer that starts a task only when a renewal is due: most locks are
        # released long before that, and a task per acquisition would cost every cycle.
        self._loop = asyncio.get_running_loop()
        self._last = time.monotonic()
        self._renewing: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._schedule()
        coord._held.add(self)

    def __repr__(self) -> str:
        state = "lost" if self.lost.is_set() else "released" if self._released else "held"
        return f"<HeldLock {self.name!r} fence={self.fence} {state}>"

    @property
    def expires(self) -> float:
        """The ``time.monotonic()`` instant after which the lease may have ended."""
        return self._expires

    def check(self) -> None:
        """Raise `LockLost` unless the lease is known to be valid right now (no I/O)."""
        if not self.lost.is_set() and time.monotonic() >= self._expires:
            self._mark_lost("the lease ran out before it could be renewed")
        if self.lost.is_set() or self._released:
            raise LockLost(
                f"lock {self.name!r} (fence {self.fence}) is no longer held: "
                f"{self.lost_reason or 'released'}; stop using the resource",
                name=self.name,
                fence=self.fence,
            )

    async def extend(self, ttl: float | None = None) -> None:
        """Renew the lease now (optionally with a new ttl); `LockLost` if it is gone."""
        self.check()
        new_ttl = self.coord._lease_ttl(ttl) if ttl is not None else self.ttl
        sent = time.monotonic()
        expires = await self.coord.backend.renew(self.key, self.coord.owner, self.fence, new_ttl)
        if expires is None:
            self._mark_lost("the backend no longer has this lease")
            self.check()
        else:
            self.ttl = new_ttl
            self._expires = min(expires, sent + new_ttl)

    async def release(self) -> None:
        """Give the lock up. Idempotent; never raises for a lock that was already lost."""
        if self._released:
            return
        self._released = True
        self._stop_renewal()
        self.coord._held.discard(self)
        with contextlib.suppress(BackendUnavailable):
            await self.coord.backend.release(self.key, self.coord.owner, self.fence)

    async def release_confirmed(self) -> bool:
        """Give the lock up and wait for the backend's answer: True if the lease was still
        ours when it was deleted, False if it had already ended (lost, expired, broken by
        `Coordinator.break_lock`) or was released before. Raises `BackendUnavailable` when
        the answer cannot be had (the lease then ends by expiry)."""
        if self._released:
            return False
        was_lost = self.lost.is_set() or time.monotonic() >= self._expires
        self._released = True
        self._stop_renewal()
        self.coord._held.discard(self)
        # Deleting is conditional on our fence, so it is safe even when the lease is gone.
        deleted = await self.coord.backend.delete(self.key, self.fence)
        return deleted and not was_lost

    def _mark_lost(self, reason: str) -> None:
        if self.lost.is_set() or self._released:
            return
        self.lost_reason = reason
        self.lost.set()
        self.coord._held.discard(self)
        self._stop_renewal()
        for callback in self._on_lost:
            callback()
        # The body's own task noticing the loss (held.check()) gets LockLost raised there;
        # cancelling itself too would hit its next await a second time.
        if (
            self._task is not None
            and not self._task.done()
            and self._task is not asyncio.current_task()
        ):
            self._cancelled = True
            self._task.cancel(_LOSS_MESSAGE)

    def _session_lost(self) -> None:
        self._mark_lost("the backend dropped this client's session")

    def _stop_renewal(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._renewing is not None and self._renewing is not asyncio.current_task():
            self._renewing.cancel()

    def _schedule(self, delay: float | None = None) -> None:
        if delay is None:
            delay = min(self._last + self.ttl / 3, self._expires) - time.monotonic()
        self._timer = self._loop.call_later(max(0.0, delay), self._due)

    def _due(self) -> None:
        self._timer = None
        if not (self._released or self.lost.is_set()):
            self._renewing = self._loop.create_task(self._renew_once())

    async def _renew_once(self) -> None:
        if time.monotonic() >= self._expires:
            self._mark_lost("the lease ran out before it could be renewed")
            return
        sent = time.monotonic()
        try:
            async with asyncio.timeout(max(0.001, self._expires - sent)):
                expires = await self.coord.backend.renew(
                    self.key, self.coord.owner, self.fence, self.ttl
                )
        except Exception:  # any failure to renew is retried until the bound, never fatal
            # Keep trying until the expiry bound; the next attempt declares the loss. A
            # renewal task must not die quietly: the holder would learn only on check().
            self._schedule(min(_RETRY, max(0.0, self._expires - time.monotonic())))
            return
        if expires is None:
            self._mark_lost("the backend no longer has this lease (expired or taken over)")
            return
        self._last = sent
        self._expires = min(expires, sent + self.ttl)
        if not (self._released or self.lost.is_set()):
            self._schedule()


class LockContext:
    """``async with coord.lock(name) as held:`` — acquire on entry, release on exit."""

    def __init__(self, acquire: Callable[[], Awaitable[HeldLock]], *, cancel_on_loss: bool) -> None:
        self._acquire = acquire
        self._cancel_on_loss = cancel_on_loss
        self._held: HeldLock | None = None

    async def __aenter__(self) -> HeldLock:
        held = await self._acquire()
        if self._cancel_on_loss:
            held._task = asyncio.current_task()
        self._held = held
        return held

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        held = self._held
        assert held is not None
        # From here on a loss must not cancel this task: we are already leaving the block.
        held._task = None
        cancelled_by_us = held._cancelled
        task = asyncio.current_task()
        if cancelled_by_us and task is not None and task.uncancel() > 0:
            # Someone else cancelled this task too: their cancellation wins.
            cancelled_by_us = False
        was_lost = held.lost.is_set() or time.monotonic() >= held.expires
        await held.release()
        if was_lost and (exc_type is None or cancelled_by_us):
            held.check()  # raises LockLost with the reason
            raise LockLost(f"lock {held.name!r} was lost", name=held.name, fence=held.fence)


async def acquire_key(
    coord: Coordinator,
    name: str,
    key: str,
    *,
    ttl: float | None,
    timeout: float | None,
    data: bytes = b"",
) -> HeldLock:
    """Acquire a leased key, waiting up to ``timeout`` (None: forever; 0: one try)."""
    lease = coord._lease_ttl(ttl)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        grant = await coord.backend.acquire(key, coord.owner, lease, data)
        if grant is not None:
            return HeldLock(
                coord, name, key, fence=grant.fence, ttl=lease, expires=grant.expires, data=data
            )
        left = 1.0 if deadline is None else deadline - time.monotonic()
        if left <= 0:
            raise LockTimeout(
                f"lock {name!r} is held by another owner and was not freed within "
                f"{timeout}s; retry later or raise the timeout",
                name=name,
                timeout=timeout,
            )
        await coord.backend.wait(key, min(left, lease))
