"""keel.coordination: leased locks with fencing tokens, leader election, group membership,
semaphores and a partitioner — one contract on SQLite, etcd, ZooKeeper and Redis.

    coord = await keel.coordination.connect("etcd://127.0.0.1:2379", member_id="api-1")
    async with coord.lock("volume-42", ttl=10) as held:
        register.write("volume-42", held.fence, state)   # refused with StaleFence if stale

Failure semantics (the full contract is docs/coordination-contract.md): a lock's fence is
strictly greater than every fence handed out before for its name; a holder learns of a lost
lease at once (``held.lost``, `LockLost`) and the block is cancelled; a dead holder's lock frees
within its ttl plus the backend's bound. Two holders may briefly *believe* they hold a lock
(a paused process); fenced resources are what refuse the stale one.
"""

from keel.coordination._coordinator import Coordinator, connect, default_url
from keel.coordination._election import Election, Leader
from keel.coordination._fence import (
    FencedRegister,
    SqliteFencedRegister,
    fence_of,
    fenced_modify,
    fenced_update,
)
from keel.coordination._group import Group, Member, MembershipChange
from keel.coordination._history import Accepted, Event, Recorder, check, load, violations
from keel.coordination._lock import HeldLock, LockContext
from keel.coordination._partitioner import Partitioner, Rebalance
from keel.coordination._rwlock import ReadWriteLock
from keel.coordination._semaphore import Semaphore
from keel.coordination._support import support_table
from keel.coordination.backends.base import Characteristic

__all__ = [
    "Accepted",
    "Characteristic",
    "Coordinator",
    "Election",
    "Event",
    "FencedRegister",
    "Group",
    "HeldLock",
    "Leader",
    "LockContext",
    "Member",
    "MembershipChange",
    "Partitioner",
    "ReadWriteLock",
    "Rebalance",
    "Recorder",
    "Semaphore",
    "SqliteFencedRegister",
    "check",
    "connect",
    "default_url",
    "fence_of",
    "fenced_modify",
    "fenced_update",
    "load",
    "support_table",
    "violations",
]
