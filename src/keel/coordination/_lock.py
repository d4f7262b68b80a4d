"""Leased, fenced locks: a fair queue of waiters, background renewal, loss detection and
cancellation on loss.

What a holder is promised:

* ``held.fence`` is strictly greater than every fence handed out earlier for that name, on
  every backend. Present it to the resource the lock guards (`FencedRegister`,
  `fenced_update`, `fenced_modify`): the resource, not the lock, is what finally refuses a
  stale holder.
* Every read of ``held.fence``, and every fenced write the library performs with a `HeldLock`,
  first checks the lease's expiry bound (no I/O): a holder that was paused past its lease gets
  `LockLost` there instead of writing. What is left is the instant between that check and the
  write reaching the resource; only the resource's own fence comparison covers it.
* Waiters are served in arrival order; a released lock goes to the longest waiter, never back
  to a releaser that asks again while others wait.
* The lease is renewed every ttl/3. The lock is *lost* as soon as any of these is true: the
  backend says the record is no longer ours, the backend's session was dropped, or renewal has
  not succeeded by the conservative expiry bound (the send time of the last successful renewal
  plus the ttl the server enforces, kept on the boot clock and the wall clock, see
  `keel.coordination._clock`). Then ``held.lost`` is set, ``held.check()`` raises `LockLost`,
  and inside ``async with coord.lock(...)`` the body is cancelled (unless
  ``cancel_on_loss=False``) and the block exits with `LockLost`, keeping the reason.
* What a holder is *not* promised: that nobody else holds the lock at the same instant. A
  holder paused (GC, SIGSTOP, swap) longer than its ttl resumes believing it holds the lock
  until its next check; only the fence protects the resource in that window.
* An attempt that fails ambiguously (the server applied it, the reply was lost) is retried
  with the same queue entry, which the backend recognises as ours; an attempt given up (time
  out, cancellation, an error) leaves the queue in the background, so it leaves no ghost. A
  release the server did not confirm is retried in the background until it is.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Coroutine
from types import TracebackType
from typing import TYPE_CHECKING, Any

from keel.coordination._clock import Bound, now
from keel.coordination._renewals import Entry
from keel.coordination.backends.base import Grant, Waiter
from keel.errors import BackendUnavailable, LockLost, LockTimeout

if TYPE_CHECKING:
    from keel.coordination._coordinator import Coordinator

_LOSS_MESSAGE = "keel.coordination: lock lost"
_RAN_OUT = "the lease ran out before it could be renewed"
_RETRY = 0.05
_FOREVER = 3600.0  # one wait_turn call when there is no deadline; the loop goes on after it
_new_bound = object.__new__


class HeldLock:
    """A lock this process holds: its fence, its loss event, and the means to end it."""

    # One is made per acquisition: slots make that (and every attribute read) cheaper.
    __slots__ = (
        "__weakref__",
        "_bound",
        "_cancelled",
        "_fence",
        "_gone",
        "_last",
        "_loop",
        "_lost",
        "_on_lost",
        "_released",
        "_renewing",
        "_task",
        "_timer",
        "coord",
        "data",
        "key",
        "lost_reason",
        "name",
        "ttl",
    )

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
        self.ttl = ttl
        self.data = data
        # The Event is made only when someone asks for it: most locks are never lost, and
        # making one is a good part of an uncontended cycle.
        self._gone = False
        self._lost: asyncio.Event | None = None
        self.lost_reason = ""
        self._fence = fence
        wall, current = time.time(), now()  # read once for the bound and the first renewal
        # Bound(expires, wall, current), without a call into its __init__ (every acquire).
        bound = self._bound = _new_bound(Bound)
        bound.boot, bound.wall = expires, wall + (expires - current)
        self._released = False
        self._task: asyncio.Task[object] | None = None  # cancelled on loss
        self._on_lost: list[Callable[[], None]] = []
        self._cancelled = False
        # Renewal is an entry in the coordinator's one renewal timer (`_renewals`) that starts
        # a task only when a renewal is due: most locks are released long before that, and a
        # task or a loop timer per acquisition would cost every cycle.
        self._loop = asyncio.get_running_loop()
        self._last = current
        self._renewing: asyncio.Task[None] | None = None
        # Half the time left when less than a third of the ttl is (a grant that came late): a
        # renewal due at the bound itself could only find it passed and declare the loss.
        # (`_schedule`, inlined: this runs on every acquire.)
        delay = min(ttl / 3, (expires - current) / 2)
        self._timer: Entry | None = coord._renewals.add(current + max(0.0, delay), self, self._loop)
        coord._held.add(self)

    def __repr__(self) -> str:
        state = "lost" if self._gone else "released" if self._released else "held"
        return f"<HeldLock {self.name!r} fence={self._fence} {state}>"

    @property
    def lost(self) -> asyncio.Event:
        """Set once the lease is lost (never for a lock released while held)."""
        if self._lost is None:
            self._lost = asyncio.Event()
            if self._gone:
                self._lost.set()
        return self._lost

    @property
    def fence(self) -> int:
        """The fence to present to the resource; `LockLost` if the lease is gone (checked on
        every read, so a holder resuming from a pause learns here, before it writes)."""
        if self._released or self._gone or self._bound.passed():
            self.check()  # raises (check()'s own test, without its call for a live lock)
        return self._fence

    @property
    def granted_fence(self) -> int:
        """The fence this lock was granted, without any check (for logs and histories)."""
        return self._fence

    @property
    def expires(self) -> float:
        """The `keel.coordination._clock.now` instant after which the lease may have ended."""
        return self._bound.boot

    def remaining(self) -> float:
        """Seconds the lease is known to have left (0 once it may have ended)."""
        return max(0.0, self._bound.remaining())

    def check(self) -> None:
        """Raise `LockLost` unless the lease is known to be valid right now (no I/O)."""
        if not (self._released or self._gone):
            if not self._bound.passed():
                return
            self._mark_lost(_RAN_OUT)
        raise LockLost(
            f"lock {self.name!r} (fence {self._fence}) is no longer held: "
            f"{self.lost_reason or 'this holder released it'}; stop using the resource",
            name=self.name,
            fence=self._fence,
        )

    async def extend(self, ttl: float | None = None) -> None:
        """Renew the lease now, optionally for a new ttl: the server's expiry moves to it (and
        ``held.ttl`` says what the server enforces). `LockLost` if the lease is gone."""
        self.check()
        new_ttl = self.coord._lease_ttl(ttl) if ttl is not None else self.ttl
        sent = now()
        expires = await self.coord.backend.renew(self.key, self.coord.owner, self._fence, new_ttl)
        if expires is None:
            self._mark_lost("the backend no longer has this lease")
            self.check()
            return
        self.ttl = new_ttl
        self._renewed(sent, expires)

    async def release(self) -> None:
        """Give the lock up. Idempotent; never raises for a lock that was already lost. The
        release is sent at once; if the server does not confirm it, it is retried in the
        background until it is (or the coordinator closes)."""
        if self._released:
            return
        self._released = True
        coord, key, fence = self.coord, self.key, self._fence
        if self._timer is not None:  # `_stop_renewal`, inlined for the common case
            coord._renewals.cancel(self._timer)
            self._timer = None
        if self._renewing is not None:
            self._stop_renewal()
        coord._held.discard(self)
        # `Coordinator._release`, inlined (a coroutine less on every release).
        try:
            sent = await coord.backend.release(key, coord.owner, fence)
        except BackendUnavailable:
            coord._retry(lambda: coord._release_confirmed(key, fence), f"release of {key}")
            return
        coord._confirm(sent, key, fence)

    def _renewed(self, sent: float, expires: float) -> None:
        self._last = sent
        self._bound = Bound(min(expires, sent + self.ttl))
        if self._timer is not None:
            self.coord._renewals.cancel(self._timer)
        self._schedule()

    async def release_confirmed(self) -> bool:
        """Give the lock up and wait for the backend's answer: True if the lease was still
        ours when it was deleted, False if it had already ended (lost, expired, broken by
        `Coordinator.break_lock`) or was released before. Raises `BackendUnavailable` when
        the answer cannot be had; the release is then retried in the background until the
        server confirms it, as `release` does."""
        if self._released:
            return False
        was_lost = self._gone or self._bound.passed()
        self._released = True
        self._stop_renewal()
        self.coord._held.discard(self)
        # Deleting is conditional on our fence, so it is safe even when the lease is gone.
        try:
            deleted = await self.coord.backend.delete(self.key, self._fence)
        except BackendUnavailable:
            # No answer: the record may outlive us (a ZooKeeper session that survives the
            # reconnect keeps its node), so the release is retried until it is confirmed.
            await self.coord._release(self.key, self._fence)
            raise
        return deleted and not was_lost

    def _mark_lost(self, reason: str) -> None:
        if self._gone or self._released:
            return
        self.lost_reason = reason
        self._gone = True
        if self._lost is not None:
            self._lost.set()
        self.coord._held.discard(self)
        self._stop_renewal()
        # The server may still have the record as ours (a lease given up by the client's
        # bound, a ZooKeeper session that outlived a stall): give it up there too, or this
        # client would wait behind its own ghost. The backend acts only if it is still ours.
        self._released = True
        self.coord._release_soon(self.key, self._fence)
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
            self.coord._renewals.cancel(self._timer)
            self._timer = None
        if self._renewing is not None and self._renewing is not asyncio.current_task():
            self._renewing.cancel()

    def _schedule(self, delay: float | None = None, current: float | None = None) -> None:
        if current is None:
            current = now()
        if delay is None:
            # Half the time left, not all of it (a slow renewal, a wall clock stepped forward):
            # one due at the bound would only find it passed.
            delay = min(self._last + self.ttl / 3 - current, self._bound.remaining() / 2)
        self._timer = self.coord._renewals.add(current + max(0.0, delay), self, self._loop)

    def _due(self) -> None:
        self._timer = None
        if not (self._released or self._gone):
            self._renewing = self._loop.create_task(self._renew_once())

    async def _renew_once(self) -> None:
        if self._bound.passed():
            self._mark_lost(_RAN_OUT)
            return
        sent = now()
        try:
            async with asyncio.timeout(max(0.001, self._bound.remaining())):
                expires = await self.coord.backend.renew(
                    self.key, self.coord.owner, self._fence, self.ttl
                )
        except Exception:  # any failure to renew is retried until the bound, never fatal
            # Keep trying until the expiry bound; the next attempt declares the loss. A
            # renewal task must not die quietly: the holder would learn only on check().
            self._schedule(min(_RETRY, max(0.0, self._bound.remaining())))
            return
        if expires is None:
            self._mark_lost("the backend no longer has this lease (expired or taken over)")
            return
        if not (self._released or self._gone):
            self._renewed(sent, expires)


def live(held: HeldLock | None) -> bool:
    """Whether ``held`` is a lease known valid right now (marks it lost if it ran out)."""
    if held is None:
        return False
    try:
        held.check()
    except LockLost:
        return False
    return True


class LockContext:
    """``async with coord.lock(name) as held:`` — acquire on entry, release on exit."""

    __slots__ = ("_acquire", "_cancel_on_loss", "_held")  # one is made per acquisition

    def __init__(self, acquire: Callable[[], Awaitable[HeldLock]], *, cancel_on_loss: bool) -> None:
        self._acquire = acquire
        self._cancel_on_loss = cancel_on_loss
        self._held: HeldLock | None = None

    async def __aenter__(self) -> HeldLock:
        held = await self._acquire()
        if self._cancel_on_loss:
            held._task = asyncio.current_task(held._loop)  # the loop known: no lookup
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
        if cancelled_by_us:
            task = asyncio.current_task()
            if task is not None and task.uncancel() > 0:
                # Someone else cancelled this task too: their cancellation wins.
                cancelled_by_us = False
        # Check before releasing: after the release the reason would read "released". (The
        # test is check()'s own, so that a live lock pays no call and no exception frame.)
        lost: LockLost | None = None
        if held._released or held._gone or held._bound.passed():
            try:
                held.check()
            except LockLost as error:
                lost = error
        await held.release()
        if lost is not None and (exc_type is None or cancelled_by_us):
            raise lost


def acquire_key(
    coord: Coordinator,
    name: str,
    key: str,
    *,
    ttl: float | None,
    timeout: float | None,
    data: bytes = b"",
) -> Coroutine[Any, Any, HeldLock]:
    """Acquire a leased key, waiting in its queue up to ``timeout`` (None: forever; 0: one
    try). The lock returned is live: one whose lease ran out before it could be handed over
    (a stalled loop) is given back and waited for again. `LockTimeout` when not taken."""
    # `_acquire`'s own coroutine, not one wrapping it: a frame less on every acquire.
    # Never None with or_raise (typing.cast would be one more call).
    return _acquire(coord, name, key, ttl=ttl, timeout=timeout, data=data, or_raise=True)  # type: ignore[return-value]


async def try_key(coord: Coordinator, name: str, key: str, *, ttl: float | None) -> HeldLock | None:
    """One attempt that never queues: the held lock, or None if the key is held or waited for."""
    return await _acquire(coord, name, key, ttl=ttl, timeout=0, data=b"")


async def _acquire(
    coord: Coordinator,
    name: str,
    key: str,
    *,
    ttl: float | None,
    timeout: float | None,
    data: bytes,
    or_raise: bool = False,
) -> HeldLock | None:
    """The held lock, or None (`LockTimeout` with ``or_raise``) when not taken in time."""
    lease = coord._lease_ttl(ttl)
    take_now = coord._take_now
    if take_now is not None:
        # A local backend's fast path: no Waiter, no queue dance, no coroutine below here.
        taken = take_now(key, coord.owner, lease, data)
        if type(taken) is tuple:
            fence, expires = taken
            held = HeldLock(coord, name, key, fence=fence, ttl=lease, expires=expires, data=data)
            if expires > held._last:  # as below: the bound not passed when made
                return held
            held._mark_lost(_RAN_OUT)
            await held.release()
            if timeout is not None and timeout <= 0:
                return _not_taken(name, timeout, or_raise)
        elif taken is None and timeout is not None and timeout <= 0:
            # Not free: a try's answer (enqueue would say the same).
            return _not_taken(name, timeout, or_raise)
    deadline = None if timeout is None else now() + timeout
    while True:
        waiter = Waiter(key, coord.owner, lease, data)
        grant = await _take(coord, waiter, deadline)
        if grant is None:
            return _not_taken(name, timeout, or_raise)
        held = HeldLock(
            coord, name, key, fence=grant.fence, ttl=lease, expires=grant.expires, data=data
        )
        if grant.expires > held._last:  # the bound not passed when made (clocks read there)
            return held
        held._mark_lost(_RAN_OUT)  # stalled between the grant and here: not live any more
        await held.release()
        if deadline is None or deadline <= now():
            return _not_taken(name, timeout, or_raise)


def _not_taken(name: str, timeout: float | None, or_raise: bool) -> HeldLock | None:
    """What an attempt not taken in time returns: None, or with ``or_raise`` `LockTimeout`."""
    if or_raise:
        raise _timed_out(name, timeout)
    return None


async def _take(coord: Coordinator, waiter: Waiter, deadline: float | None) -> Grant | None:
    """The queue dance: enqueue, wait for our turn, retry ambiguous failures with the same
    entry; on any way out but a grant, leave the queue (in the background)."""
    backend = coord.backend
    queue = deadline is None or deadline > now()
    queued = False
    delay = _RETRY
    unavailable: BackendUnavailable | None = None
    leave = True  # whether the queue may still hold an entry of ours on the way out
    try:
        while True:
            try:
                if not queued:
                    grant = await backend.enqueue(waiter, queue=queue)
                    queued = queue
                else:
                    left = _FOREVER if deadline is None else deadline - now()
                    grant = await backend.wait_turn(waiter, max(0.0, left))
                if grant is not None:
                    leave = False
                    return grant
                unavailable = None
                if not queue:
                    leave = False  # a refused try leaves nothing behind
                    return None
            except BackendUnavailable as exc:
                if not queue:
                    raise
                # The entry may exist (applied, reply lost): enqueue again with the same
                # waiter, which the backend recognises, after a short back-off.
                unavailable, queued = exc, False
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
            if deadline is not None and now() >= deadline:
                if unavailable is not None:
                    raise unavailable
                return None
    finally:
        if leave and waiter.sent:
            coord._abandon(waiter)


def _timed_out(name: str, timeout: float | None) -> LockTimeout:
    return LockTimeout(
        f"lock {name!r} is held by another owner and was not freed within "
        f"{timeout}s; retry later or raise the timeout",
        name=name,
        timeout=timeout,
    )
