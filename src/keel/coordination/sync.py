"""Blocking facade over `keel.coordination`, for threaded services.

Every operation is the async one, run on the process's shared portal loop (keel._portal) and
waited for (as kazoo's ``exists()`` is ``exists_async().get()``); nothing is written twice.

Failure semantics are the async ones with one difference: a thread cannot be cancelled, so a
lost lock does not interrupt the ``with`` body. The holder learns of the loss through
``held.lost`` (a `threading.Event`), ``held.check()`` and ``held.fence`` (raise `LockLost`) and
on exit of the ``with`` block (raises `LockLost`); a fenced resource refuses its stale writes
regardless. ``check()`` and ``fence`` run on the loop that owns the lock (a loss they find
sets asyncio state, which only that loop may touch), so each is one hop to it and back.
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from keel._portal import Portal, portal
from keel.coordination._coordinator import Coordinator
from keel.coordination._coordinator import connect as _connect
from keel.coordination._lock import HeldLock
from keel.errors import LockLost

T = TypeVar("T")

__all__ = ["SyncCoordinator", "SyncHeldLock", "connect"]


class SyncHeldLock:
    """A held lock seen from a thread: ``fence``, ``lost``, ``check()``, ``extend()``."""

    def __init__(self, held: HeldLock, runner: Portal) -> None:
        self._held = held
        self._runner = runner
        self.name = held.name
        self.granted_fence = held.granted_fence
        self.lost = threading.Event()
        held._on_lost.append(self.lost.set)
        if held.lost.is_set():
            self.lost.set()

    @property
    def fence(self) -> int:
        """The fence, checked like ``HeldLock.fence`` (`LockLost` if the lease is gone)."""

        async def fence() -> int:
            return self._held.fence

        return self._runner.run(fence())

    def check(self) -> None:
        """Raise `LockLost` unless the lease is known to be valid right now."""

        async def check() -> None:
            self._held.check()

        self._runner.run(check())

    def extend(self, ttl: float | None = None) -> None:
        self._runner.run(self._held.extend(ttl))

    def release(self) -> None:
        self._runner.run(self._held.release())


class SyncCoordinator:
    """`Coordinator` for threads; make it with `connect`. Use it as a context manager."""

    def __init__(self, coord: Coordinator, runner: Portal) -> None:
        self.coord = coord
        self._runner = runner
        self.member_id = coord.member_id
        self.characteristics = coord.characteristics

    def run(self, operation: Callable[[Coordinator], Awaitable[T]]) -> T:
        """Run any async coordination operation (elections, groups, ...) and wait for it."""

        async def call() -> T:
            return await operation(self.coord)

        return self._runner.run(call())

    def acquire(
        self, name: str, *, ttl: float | None = None, timeout: float | None = None
    ) -> SyncHeldLock:
        return SyncHeldLock(
            self._runner.run(self.coord.acquire(name, ttl=ttl, timeout=timeout)), self._runner
        )

    def try_acquire(self, name: str, *, ttl: float | None = None) -> SyncHeldLock | None:
        held = self._runner.run(self.coord.try_acquire(name, ttl=ttl))
        return None if held is None else SyncHeldLock(held, self._runner)

    @contextmanager
    def lock(
        self, name: str, *, ttl: float | None = None, timeout: float | None = None
    ) -> Iterator[SyncHeldLock]:
        """``with coord.lock(name) as held:`` — `LockLost` on exit if the lease was lost."""
        held = self.acquire(name, ttl=ttl, timeout=timeout)
        lost: LockLost | None = None
        try:
            yield held
        finally:
            try:
                held.check()  # before the release, which would make the reason "released"
            except LockLost as error:
                lost = error
            held.release()
        if lost is not None:
            raise lost

    def close(self) -> None:
        self._runner.run(self.coord.close())

    def __enter__(self) -> SyncCoordinator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(url: str | None = None, **kwargs: Any) -> SyncCoordinator:
    """Blocking `keel.coordination.connect`; same arguments."""
    runner = portal()
    return SyncCoordinator(runner.run(_connect(url, **kwargs)), runner)
