"""Group membership: each member is a leased record under the group's prefix.

A member joins by taking its own key (with metadata) and keeps it by renewal; a member whose
process dies leaves when its lease runs out (ttl plus the backend's bound). If this member's
lease is lost (partition, pause), ``membership.lost`` is set and it is no longer listed; join
again to come back (``join()`` hands out only a live membership). ``watch()`` waits for the
backend's change notifications and reports joins and leaves by diffing listings, so a member
that joins and leaves between two looks can go unreported.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal
from urllib.parse import unquote

from keel.coordination._keys import key_for
from keel.coordination._lock import HeldLock, acquire_key, live

if TYPE_CHECKING:
    from keel.coordination._coordinator import Coordinator


@dataclass(frozen=True, slots=True)
class Member:
    member_id: str
    metadata: bytes
    fence: int


@dataclass(frozen=True, slots=True)
class MembershipChange:
    kind: Literal["join", "leave"]
    member: Member


class Group:
    """One named group; make it with ``coord.group(name)``."""

    def __init__(self, coord: Coordinator, name: str) -> None:
        self.coord = coord
        self.name = name
        self._prefix = key_for("group", name) + "/"
        self._key = key_for("group", name, coord.member_id)
        self.membership: HeldLock | None = None

    async def join(
        self, metadata: bytes = b"", *, ttl: float | None = None, timeout: float | None = None
    ) -> HeldLock:
        """Join with metadata. Waits (up to ``timeout``) while an earlier incarnation of this
        member id still holds its lease."""
        if live(self.membership):
            assert self.membership is not None
            return self.membership
        self.membership = await acquire_key(
            self.coord, self.coord.member_id, self._key, ttl=ttl, timeout=timeout, data=metadata
        )
        return self.membership

    async def leave(self) -> None:
        membership, self.membership = self.membership, None
        if membership is not None:
            await membership.release()

    async def members(self) -> dict[str, Member]:
        """The live members by id."""
        records = await self.coord.backend.children(self._prefix)
        members = (Member(unquote(r.key.rpartition("/")[2]), r.data, r.fence) for r in records)
        return {m.member_id: m for m in members}

    async def watch(self, *, poll: float | None = None) -> AsyncIterator[MembershipChange]:
        """Yield a join for every current member, then every join and leave as seen. Changes
        are waited for; ``poll`` only bounds the time between two listings when nothing is
        signalled (default: the coordinator's ttl)."""
        known: dict[str, Member] = {}
        async with self.coord.backend.changes(self._prefix) as changes:
            while True:
                current = await self.members()
                for member_id, member in current.items():
                    if known.get(member_id) != member:
                        if member_id in known:
                            yield MembershipChange("leave", known[member_id])
                        yield MembershipChange("join", member)
                for member_id, member in known.items():
                    if member_id not in current:
                        yield MembershipChange("leave", member)
                known = current
                await changes.wait(self.coord.ttl if poll is None else poll)
