"""Leader election on a leased, fenced key.

The leader is whoever holds the election's key; each term's fence is that key's fence, so a
deposed leader's writes are refused by any resource fenced with it. Candidates wait in the
key's queue, so terms go to them in the order they campaigned. A leader that dies loses the
term by lease expiry (ttl plus the backend's bound). ``campaign()`` hands out only a live term:
one released, lost or run out (a stalled process) is never returned again. ``observe()`` waits
for the backend's change notifications (SQLite: a cheap poll of the file's change counter) and
reports each change as it sees it: a term shorter than one notification round trip can go
unreported; it never reports a leader out of order.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from keel.coordination._keys import key_for
from keel.coordination._lock import HeldLock, acquire_key, live
from keel.errors import BackendUnavailable

if TYPE_CHECKING:
    from keel.coordination._coordinator import Coordinator


@dataclass(frozen=True, slots=True)
class Leader:
    """Who leads, and the fence of the term."""

    member_id: str
    fence: int


class Election:
    """One named election; make it with ``coord.election(name)``."""

    def __init__(self, coord: Coordinator, name: str) -> None:
        self.coord = coord
        self.name = name
        self._key = key_for("election", name)
        self.term: HeldLock | None = None

    async def campaign(self, *, ttl: float | None = None, timeout: float | None = None) -> HeldLock:
        """Wait (up to ``timeout``) to become leader; the term's lease, with its fence."""
        if live(self.term):
            assert self.term is not None
            return self.term
        self.term = await acquire_key(
            self.coord,
            self.name,
            self._key,
            ttl=ttl,
            timeout=timeout,
            data=self.coord.member_id.encode(),
        )
        return self.term

    async def leader(self) -> Leader | None:
        """The current leader, or None between terms."""
        record = await self.coord.backend.get(self._key)
        if record is None:
            return None
        return Leader(record.data.decode(), record.fence)

    async def observe(self, *, poll: float | None = None) -> AsyncIterator[Leader | None]:
        """Yield the leader now and then at every change (None when nobody leads). Changes
        are waited for, not polled; ``poll`` only bounds the time between two re-reads when
        nothing is signalled (default: the coordinator's ttl)."""
        last: Leader | bool | None = False  # False: nothing yielded yet
        async with self.coord.backend.changes(self._key) as changes:
            while True:
                current = await self.leader()
                if current != last:
                    last = current
                    yield current
                await changes.wait(self.coord.ttl if poll is None else poll)

    async def resign(self) -> None:
        """End this member's term (no-op when not leading) and wait until the backend confirms,
        so that another member's next campaign can win at once."""
        term, self.term = self.term, None
        if term is not None:
            with contextlib.suppress(BackendUnavailable):  # retried in the background
                await term.release_confirmed()
