"""One timer per coordinator for the renewals of every lock it holds.

A timer per acquisition (``loop.call_later``, then ``cancel`` on release) was a fifth of the
core's cost of an uncontended acquire and release: most locks are released long before their
first renewal is due (ttl/3). Here an acquisition pushes ``[due, seq, held]`` on a heap, a
release blanks the entry, and one loop timer, armed for the earliest entry, calls each due
lock's ``_due()``. Blanked entries are dropped when they reach the top or, once they are most
of the heap, all at once, so the heap stays proportional to the locks actually held.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
from typing import TYPE_CHECKING, Any

from keel.coordination._clock import now

if TYPE_CHECKING:
    from keel.coordination._lock import HeldLock

Entry = list[Any]  # [due on the boot clock, sequence, HeldLock | None]
_COMPACT_AT = 256  # blanked entries tolerated before a compaction is considered


class Renewals:
    """The renewal timers of one coordinator's locks (one event loop)."""

    __slots__ = ("_armed", "_blank", "_heap", "_loop", "_seq", "_timer")

    def __init__(self) -> None:
        self._heap: list[Entry] = []
        self._seq = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._armed = math.inf  # the due time the timer is set for
        self._blank = 0

    def add(self, due: float, held: HeldLock, loop: asyncio.AbstractEventLoop) -> Entry:
        """Call ``held._due()`` at ``due`` (boot clock) unless `cancel` comes first."""
        self._loop = loop
        entry: Entry = [due, next(self._seq), held]
        heapq.heappush(self._heap, entry)
        if due < self._armed:
            self._arm(due)
        return entry

    def cancel(self, entry: Entry) -> None:
        if entry[2] is None:
            return
        entry[2] = None
        self._blank += 1
        if self._blank > _COMPACT_AT and self._blank * 2 > len(self._heap):
            self._heap = [e for e in self._heap if e[2] is not None]
            heapq.heapify(self._heap)
            self._blank = 0

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._armed = math.inf
        self._heap.clear()
        self._blank = 0

    def _arm(self, due: float) -> None:
        assert self._loop is not None
        if self._timer is not None:
            self._timer.cancel()
        self._armed = due
        self._timer = self._loop.call_later(max(0.0, due - now()), self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._armed = math.inf
        heap, current = self._heap, now()
        while heap and (heap[0][2] is None or heap[0][0] <= current):
            entry = heapq.heappop(heap)
            held = entry[2]
            if held is None:
                self._blank -= 1
                continue
            entry[2] = None
            held._due()
        if heap:
            self._arm(heap[0][0])
