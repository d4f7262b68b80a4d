"""Large bodies take turns: one decode of a body over `HEAVY_BYTES` at a time, at most half
of the event loop's time.

Decoding is bounded by a body's size (keel.wire), but a megabyte of containers still costs
tens of milliseconds, all of it on the event loop (msgspec holds the GIL, so a thread would
not help). A consumer with a credit window of N would decode N such bodies back to back in
one iteration while every other call of the process waits, and a flood of them on several
queues would leave the loop nothing else. Here each large decode waits for the one before it
and then for as long as that one took, so other calls, replies and heartbeats run between
two of them and get at least half of the loop whatever arrives: one publisher's large bodies
delay a call by about one decode, not by a window of them. Small bodies (all of Keel's own
hot path) never wait here.
"""

from __future__ import annotations

import asyncio
import time
import weakref

HEAVY_BYTES = 64 * 1024


class _Turns:
    __slots__ = ("lock", "spent", "started")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.spent = 0.0  # how long the last large decode took
        self.started = 0.0


_turns: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Turns] = weakref.WeakKeyDictionary()


async def acquire() -> None:
    """Wait for this loop's turn, then as long as the last turn took; pair with `release`."""
    loop = asyncio.get_running_loop()
    turns = _turns.get(loop)
    if turns is None:
        turns = _turns[loop] = _Turns()
    await turns.lock.acquire()
    try:
        await asyncio.sleep(min(turns.spent, 1.0))  # what else is ready runs first
    except BaseException:
        turns.lock.release()
        raise
    turns.started = time.perf_counter()


def release() -> None:
    turns = _turns[asyncio.get_running_loop()]
    turns.spent = time.perf_counter() - turns.started
    turns.lock.release()
