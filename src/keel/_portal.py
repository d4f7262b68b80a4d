"""One event loop in a background thread, for every blocking facade in the process.

Each blocking operation is the async one run here (`Portal.run`), so blocking and async
objects in one process share connections and the memory:// broker. A blocking call made
from the portal's own thread would wait for itself; it is refused with a clear error.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import math
import selectors
import threading
from collections.abc import Coroutine, Mapping
from typing import Any, TypeVar

T = TypeVar("T")


class Portal:
    """An event loop in a daemon thread; `run` executes a coroutine there and waits."""

    def __init__(self) -> None:
        self.loop = self._new_loop()
        self._thread = threading.Thread(target=self._serve, name="keel-portal", daemon=True)
        self._thread.start()

    def _new_loop(self) -> asyncio.AbstractEventLoop:
        return asyncio.new_event_loop()

    def _serve(self) -> None:
        self.loop.run_forever()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError(
                "a blocking Keel call was made on Keel's own loop thread; await the async API there"
            )
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(5)
        if not self.loop.is_running() and not self.loop.is_closed():
            self.loop.close()  # its self-pipe sockets, not left to the garbage collector


class _Unlocking(selectors.BaseSelector):
    """A selector that lets go of a mutex while it waits: the loop thread holds the mutex
    whenever it runs anything but the wait for I/O."""

    def __init__(self, inner: selectors.BaseSelector, mutex: threading.Lock) -> None:
        self._inner = inner
        self._mutex = mutex
        self.wants_mutex = False  # the loop thread is back from select, waiting for the mutex

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._inner.register(fileobj, events, data)

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        return self._inner.unregister(fileobj)

    def modify(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._inner.modify(fileobj, events, data)

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        self._mutex.release()
        try:
            return self._inner.select(timeout)
        finally:
            self.wants_mutex = True
            self._mutex.acquire()
            self.wants_mutex = False

    def get_map(self) -> Mapping[Any, selectors.SelectorKey]:
        return self._inner.get_map()

    def close(self) -> None:
        self._inner.close()


class CallerRunsPortal(Portal):
    """A portal whose `run` executes the coroutine in the *calling* thread when the loop
    thread is idle (waiting for I/O or a timer), instead of handing it over.

    Handing a coroutine to the loop thread and its result back costs two thread wake-ups,
    which on a small virtual machine took longer than a whole SQLite acquire and release.
    Here the loop thread holds a mutex whenever it runs callbacks and lets go of it only
    while it waits in ``select``; a caller that gets the mutex runs, in its own thread and as
    the loop's running thread for that while, the loop's ready callbacks, its task's first
    step among them, until the task is done or waits. Only one thread runs loop code at a
    time, so the loop's single-threaded invariants hold. A task that waits (for a server's
    reply, a timer) is finished by the loop thread, woken as usual, and the caller waits for
    it as with `Portal`; a caller that finds the loop thread busy, or is itself inside a
    running loop, or finds the loop thread back from its wait (I/O or a timer to serve, which a
    caller calling in a tight loop must not keep out), hands the coroutine over as `Portal`
    does. Timers due and I/O ready are left to the loop thread, which the caller wakes when it
    left callbacks or set an earlier timer.
    """

    _DRAIN = 64  # callbacks a caller runs at most before leaving the rest to the loop thread

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._selector = _Unlocking(selectors.DefaultSelector(), self._mutex)
        super().__init__()

    def _new_loop(self) -> asyncio.AbstractEventLoop:
        return asyncio.SelectorEventLoop(self._selector)

    def _serve(self) -> None:
        with self._mutex:
            self.loop.run_forever()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        if (
            threading.current_thread() is self._thread
            or asyncio.events._get_running_loop() is not None
            # The loop thread has I/O or a timer to serve (a renewal, say): a caller calling
            # in a tight loop must not keep it out, so it hands over and waits instead.
            or self._selector.wants_mutex
            or not self._mutex.acquire(blocking=False)
        ):
            return super().run(coro, timeout)
        loop: Any = self.loop  # its private _ready and _scheduled
        try:
            if not loop.is_running():
                coro.close()
                raise RuntimeError("the portal's loop is not running")
            asyncio.events._set_running_loop(loop)
            try:
                earliest = loop._scheduled[0].when() if loop._scheduled else math.inf
                task: asyncio.Task[T] = loop.create_task(coro)
                ready = loop._ready
                for _ in range(self._DRAIN):  # the task's steps and what they scheduled
                    if not ready:
                        break
                    handle = ready.popleft()
                    if not handle._cancelled:
                        handle._run()
                result: concurrent.futures.Future[T] | None = None
                if not task.done():  # it waits: the loop thread finishes it
                    result = concurrent.futures.Future()
                    asyncio.futures._chain_future(task, result)  # type: ignore[attr-defined]
            finally:
                asyncio.events._set_running_loop(None)
                if loop._ready or (loop._scheduled and loop._scheduled[0].when() < earliest):
                    loop._write_to_self()  # left callbacks, or a timer sooner than its wait
        finally:
            self._mutex.release()
        if result is None:
            return task.result()
        return result.result(timeout)


_portal: Portal | None = None
_caller_runs: CallerRunsPortal | None = None
_portal_lock = threading.Lock()


def portal() -> Portal:
    """The process's shared portal, started on first use."""
    global _portal  # noqa: PLW0603 - one portal per process by design
    with _portal_lock:
        if _portal is None:
            _portal = Portal()
            atexit.register(_portal.close)
        return _portal


def caller_runs_portal() -> CallerRunsPortal:
    """The process's shared `CallerRunsPortal` (its own loop and thread), started on first
    use."""
    global _caller_runs  # noqa: PLW0603 - one per process by design
    with _portal_lock:
        if _caller_runs is None:
            _caller_runs = CallerRunsPortal()
            atexit.register(_caller_runs.close)
        return _caller_runs
