"""The interpreter's thread switch interval, lowered while a component that waits on its
own threads is open.

CPython lets the thread holding the GIL keep it for `sys.getswitchinterval` (5 ms by
default) while another thread waits for it. The hub's SQLite store COMMITs on a thread, and
that thread needs the GIL for a few microseconds once the fsync returns; with the event loop
busy (a tenant flooding ingest and retrying refused requests at once), it waited up to the
whole interval, every commit, with every tenant's events in that commit (bench hub's
hostile-tenant run, SQLite: the quiet tenant's commits p99 7.4 and 11.2 ms at 5 ms, 4.3 and
3.9 ms at 0.5 ms). The interval is process-wide: it is lowered, never raised, while at
least one holder is open, and put back when the last one closes unless someone else
changed it meanwhile.
"""

from __future__ import annotations

import sys
import threading

INTERVAL = 0.0005


class _Holds:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.count = 0
        self.saved: float | None = None  # the interval before the first holder, if lowered

    def hold(self) -> None:
        with self.lock:
            self.count += 1
            if self.count == 1:
                current = sys.getswitchinterval()
                if current > INTERVAL:
                    self.saved = current
                    sys.setswitchinterval(INTERVAL)

    def release(self) -> None:
        with self.lock:
            if self.count == 0:
                return
            self.count -= 1
            if self.count == 0 and self.saved is not None:
                if abs(sys.getswitchinterval() - INTERVAL) < 1e-9:
                    sys.setswitchinterval(self.saved)
                self.saved = None


_holds = _Holds()
hold = _holds.hold
release = _holds.release
