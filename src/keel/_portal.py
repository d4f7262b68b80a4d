"""One event loop in a background thread, for every blocking facade in the process.

Each blocking operation is the async one run here (`Portal.run`), so blocking and async
objects in one process share connections and the memory:// broker. A blocking call made
from the portal's own thread would wait for itself; it is refused with a clear error.
"""

from __future__ import annotations

import asyncio
import atexit
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class Portal:
    """An event loop in a daemon thread; `run` executes a coroutine there and waits."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="keel-portal", daemon=True
        )
        self._thread.start()

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


_portal: Portal | None = None
_portal_lock = threading.Lock()


def portal() -> Portal:
    """The process's shared portal, started on first use."""
    global _portal  # noqa: PLW0603 - one portal per process by design
    with _portal_lock:
        if _portal is None:
            _portal = Portal()
            atexit.register(_portal.close)
        return _portal
