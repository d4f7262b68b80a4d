"""The live service map for the dashboard: the tap's database, watched and pushed over SSE.

The tap (`keel.map.MapTap`) writes edges to a SQLite file from whichever processes record
traffic; the hub reads that file, never the processes. One background task loads the graph
every ``interval`` seconds (in a worker thread: the read and the smell search are blocking)
and, only when it differs from the last one, stores the encoded snapshot and wakes every
stream. So a thousand open map pages cost one read per interval, each browser gets one frame
per change, and no browser polls. A read that fails (file not there yet, locked) keeps the
last snapshot and is logged once per kind of failure, not once per interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec

from keel._log import event as log_event
from keel.map import load, smells

log = logging.getLogger("keel.hub.map")


def snapshot(path: Path) -> dict[str, Any]:
    """The graph in ``path`` as the dashboard draws it: services, edges and smells."""
    graph = load(path)
    data = graph.to_json()
    data["smells"] = [
        {"kind": s.kind, "summary": s.summary, "evidence": s.evidence} for s in smells(graph)
    ]
    return data


class MapFeed:
    def __init__(self, path: str | Path, *, interval: float = 1.0) -> None:
        self.path = Path(path)
        self.interval = interval
        self.version = 0
        self.body = b""
        self._changed = asyncio.Event()
        self._closed = False
        self._task: asyncio.Task[None] | None = None
        self._last_error = ""

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(self._watch())

    async def stop(self) -> None:
        self._closed = True
        self._changed.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def refresh(self) -> bool:
        """Read the graph now; True when it changed (and streams were woken)."""
        if not self.path.exists():
            return False
        try:
            data = await asyncio.to_thread(snapshot, self.path)
        except Exception as exc:
            if repr(exc) != self._last_error:
                self._last_error = repr(exc)
                log_event(log, logging.WARNING, "map.read_failed", path=self.path, error=repr(exc))
            return False
        self._last_error = ""
        body = msgspec.json.encode(data)
        if body == self.body:
            return False
        self.version += 1
        self.body = body
        # Replace the event before setting the old one, so a stream that wakes and waits
        # again waits for the next change, not this one.
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
        return True

    async def _watch(self) -> None:
        while not self._closed:
            await asyncio.sleep(self.interval)
            await self.refresh()

    def current(self) -> bytes:
        """The snapshot as the JSON API answers it (an empty map before the first edge)."""
        head = f'{{"version":{self.version},"at":{time.time():.3f},"map":'.encode()
        return head + (self.body or b'{"services":{},"edges":[],"smells":[]}') + b"}"

    async def frames(self, *, heartbeat: float) -> AsyncIterator[bytes]:
        """SSE frames: the current map at once, then one per change, heartbeats when idle."""
        yield b"retry: 2000\n\n"
        sent = -1
        while not self._closed:
            if self.version != sent:
                sent = self.version
                yield b"id: %d\nevent: map\ndata: " % sent + self.current() + b"\n\n"
                continue
            waiter = self._changed
            try:
                await asyncio.wait_for(waiter.wait(), heartbeat)
            except TimeoutError:
                yield b": hb\n\n"
