"""Partitioner: map keys to the live members of a group by consistent hashing.

Each member owns the arcs of a hash ring after its virtual nodes (``replicas`` per member), so
a join or leave moves only about 1/n of the keys. Ownership is computed locally from the last
membership listing: two members whose listings differ (one saw a leave the other has not yet
seen) may both believe they own a key for up to one notification round trip plus the lease
ttl. Guard the work itself with a lock or a fence if that matters.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass

from keel.coordination._group import Group
from keel.errors import CoordinationError


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


@dataclass(frozen=True, slots=True)
class Rebalance:
    """Membership changed: who was in the ring before and after."""

    before: frozenset[str]
    after: frozenset[str]

    @property
    def joined(self) -> frozenset[str]:
        return self.after - self.before

    @property
    def left(self) -> frozenset[str]:
        return self.before - self.after


class Partitioner:
    """``Partitioner(coord.group("workers"))``: call ``refresh()`` (or iterate
    ``rebalances()``) to follow membership; ``owner(key)`` answers locally."""

    def __init__(self, group: Group, *, replicas: int = 64) -> None:
        self.group = group
        self.replicas = replicas
        self._members: frozenset[str] = frozenset()
        self._ring: list[tuple[int, str]] = []
        self._points: list[int] = []

    @property
    def members(self) -> frozenset[str]:
        return self._members

    def _rebuild(self, members: Iterable[str]) -> None:
        ring = sorted((_hash(f"{m}#{i}"), m) for m in members for i in range(self.replicas))
        self._ring = ring
        self._points = [p for p, _ in ring]

    async def refresh(self) -> Rebalance | None:
        """Re-read the group; the rebalance if membership changed since the last look."""
        current = frozenset(await self.group.members())
        if current == self._members and self._ring:
            return None
        before, self._members = self._members, current
        self._rebuild(current)
        return Rebalance(before, current) if before != current else None

    def owner(self, key: str) -> str:
        """The member that owns ``key`` per the last listing."""
        if not self._ring:
            raise CoordinationError(
                f"group {self.group.name!r} has no members (or refresh() was never awaited)"
            )
        i = bisect.bisect(self._points, _hash(key)) % len(self._ring)
        return self._ring[i][1]

    def owns(self, key: str) -> bool:
        return self.owner(key) == self.group.coord.member_id

    async def rebalances(self, *, poll: float | None = None) -> AsyncIterator[Rebalance]:
        """Yield every membership change seen (the first listing counts as one); changes are
        waited for, ``poll`` only bounds the time between listings (default: the ttl)."""
        coord = self.group.coord
        async with coord.backend.changes(self.group._prefix) as changes:
            while True:
                change = await self.refresh()
                if change is not None:
                    yield change
                await changes.wait(coord.ttl if poll is None else poll)
