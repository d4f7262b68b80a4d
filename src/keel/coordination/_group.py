"""Group membership: each member is a leased record under the group's prefix.

A member joins by taking its own key (with metadata) and keeps it by renewal; a member whose
process dies leaves when its lease runs out (ttl plus the backend's bound). If this member's
lease is lost (partition, pause), ``membership.lost`` is set and it is no longer listed; join
again to come back (``join()`` hands out only a live membership). ``watch()`` waits for the
backend's change notifications and reports joins and leaves by diffing listings, so a member
that joins and leaves between two looks can go unreported.

Groups are implicit (a group is its members) unless *created*: ``create()`` writes a
persistent record that lives until ``delete()``, which refuses while live members remain
(`GroupNotEmpty`, checked atomically by the backend). ``join(created=True)`` joins only a
created group: it takes the membership first and then checks the record, so a join racing
a delete either makes the delete fail or itself fails with `GroupNotFound`, never leaves a
member in a deleted group. ``update()`` replaces this member's metadata in place (same lease,
same fence); ``expel()`` ends another holder's membership of a member id.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal
from urllib.parse import unquote

from keel.coordination._keys import key_for
from keel.coordination._lock import HeldLock, acquire_key, live
from keel.errors import (
    BackendUnavailable,
    GroupExists,
    GroupNotEmpty,
    GroupNotFound,
    LockLost,
    NotMember,
)

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
        self._record = key_for("group", name)
        self._prefix = self._record + "/"
        self._key = key_for("group", name, coord.member_id)
        self.membership: HeldLock | None = None

    async def create(self) -> None:
        """Create the group's persistent record; `GroupExists` if it already is."""
        if await self.coord.backend.create(self._record, b"") is None:
            raise GroupExists(f"group {self.name!r} is already created", group=self.name)

    async def exists(self) -> bool:
        """Whether the group is created (implicit groups are not)."""
        return await self.coord.backend.get(self._record) is not None

    async def delete(self) -> None:
        """Delete a created group: `GroupNotFound` if it is not, `GroupNotEmpty` while it has
        live members."""
        record = await self.coord.backend.get(self._record)
        if record is not None and await self.coord.backend.delete(self._record, record.fence):
            return
        if record is None or await self.coord.backend.get(self._record) is None:
            raise GroupNotFound(f"group {self.name!r} is not created", group=self.name)
        raise GroupNotEmpty(
            f"group {self.name!r} still has members; they must leave (or expire) first",
            group=self.name,
        )

    async def join(
        self,
        metadata: bytes = b"",
        *,
        ttl: float | None = None,
        timeout: float | None = None,
        created: bool = False,
    ) -> HeldLock:
        """Join with metadata. Waits (up to ``timeout``) while an earlier incarnation of this
        member id still holds its lease. ``created=True``: only a created group
        (`GroupNotFound` otherwise)."""
        if live(self.membership):
            assert self.membership is not None
            return self.membership
        membership = await acquire_key(
            self.coord, self.coord.member_id, self._key, ttl=ttl, timeout=timeout, data=metadata
        )
        if created and not await self.exists():
            await membership.release()
            raise GroupNotFound(f"group {self.name!r} is not created", group=self.name)
        self.membership = membership
        return membership

    async def update(self, metadata: bytes) -> None:
        """Replace this member's metadata (same lease and fence): `NotMember` when not joined,
        `LockLost` when the membership has ended."""
        membership = self.membership
        if membership is None:
            raise NotMember(
                f"{self.coord.member_id!r} has not joined group {self.name!r}",
                group=self.name,
                member=self.coord.member_id,
            )
        membership.check()
        if not await self.coord.backend.update(membership.key, membership.fence, metadata):
            membership._mark_lost("the backend no longer has this membership")
            membership.check()
            raise LockLost(f"membership of {self.name!r} was lost", name=self.name)
        membership.data = metadata

    async def expel(self, member_id: str) -> bool:
        """End the membership of ``member_id``, whoever holds it (a forced leave; the holder
        learns at its next renewal). False if it was not a member."""
        key = key_for("group", self.name, member_id)
        record = await self.coord.backend.get(key)
        return record is not None and await self.coord.backend.delete(key, record.fence)

    async def leave(self) -> bool:
        """Leave, and wait until the backend confirms (others no longer list this member once
        this returns). False if the membership had already ended or the answer could not be
        had (the release is then retried in the background until confirmed)."""
        membership, self.membership = self.membership, None
        if membership is None:
            return False
        try:
            return await membership.release_confirmed()
        except BackendUnavailable:
            return False

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
