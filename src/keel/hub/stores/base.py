"""The hub store protocol: subscriptions and their durable queues, as a few I/O primitives.

Tenancy, filters, quotas and push live above the store, once (keel.hub's core). A store
promises:

- `append` commits a batch atomically and durably: when it returns, every event of the batch
  is in every queue it was routed to, and a crash before it returns leaves none of the batch.
  An event id seen before (within ``dedup_s``) is skipped, so a bus redelivery after a crash
  is not enqueued twice.
- Sequence numbers per queue start at 1, increase by one per message and never repeat.
- Retention removes only from the head of a queue and counts every message it removes.
- Claims (oldest first): a ready message is in at most one live claim; a claim past its
  ``expires_at`` no longer holds its messages; ack/release/extend of an expired claim raise
  `ClaimExpired`, of an unknown one `NotFound`. A message handed out ``max_deliveries``
  times moves to the dead letters instead of a further claim.
- Unknown subscription ids raise `NotFound` (the core has already checked the tenant).
- Per-message life (for faces such as the Zaqar API): a message appended with a ``ttl``
  expires ``ttl`` seconds after it was enqueued: it is no longer live (`live`,
  `get_messages`, `stats`) nor claimed, though replay (`read`) still shows it until retention
  drops it. One appended with a ``delay`` is neither claimed nor listed as live (unless asked)
  until the delay has passed. A claim with ``grace`` keeps every expiring message it holds
  alive at least ``grace`` seconds past the claim's own expiry.
- A subscription with a ``parent`` tees off it: the core appends a copy of every message it
  commits to the parent's queue to the child's queue too (routing lives in the core, the
  store keeps the field).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Protocol

import msgspec

from keel.errors import QuotaExceeded

READY = "ready"
ACKED = "acked"
DEAD = "dead"


class Retention(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    max_age_s: float | None = 7 * 86400.0
    max_messages: int | None = 10_000


class Webhook(msgspec.Struct, frozen=True):
    url: str
    secret: str
    # The CloudEvents HTTP content mode: "structured" (the event as
    # application/cloudevents+json) or "binary" (ce-* headers, the data as the body).
    mode: str = "structured"
    # How a message becomes the request body: None posts the stored event (a CloudEvent, in
    # ``mode``); another name picks a renderer a face registered with the dispatcher (the
    # Zaqar API's "zaqar": Zaqar's own body, not a CloudEvent, so ``mode`` does not apply).
    render: str | None = None


class Subscription(msgspec.Struct, kw_only=True):
    id: str
    project: str
    user: str
    spec: dict[str, Any]
    all_projects: bool = False
    retention: Retention = Retention()
    max_deliveries: int = 5
    webhook: Webhook | None = None
    created_at: float
    # The subscription whose queue this one tees off (see the module docstring).
    parent: str | None = None
    # Past this time the subscription receives nothing and the core deletes it.
    expires_at: float | None = None
    # Owned by a face (the Zaqar API keeps a queue's name and metadata here); the core and the
    # stores keep it as it is.
    meta: dict[str, Any] = msgspec.field(default_factory=dict)
    # Maintained by the store.
    last_seq: int = 0
    first_seq: int = 1
    dropped: int = 0


class Message(msgspec.Struct, kw_only=True):
    seq: int
    event: msgspec.Raw
    state: str
    deliveries: int
    enqueued_at: float
    # Not before this time may it be claimed: a delay, a claim's expiry, a webhook's backoff.
    visible_at: float = 0.0
    # The last claim that took it (still holding it while ``visible_at`` is in the future).
    claim_id: str | None = None
    # None: lives until retention drops it.
    expires_at: float | None = None

    def claimed(self, now: float) -> bool:
        return self.claim_id is not None and self.visible_at > now


class Gap(msgspec.Struct):
    """Messages ``first..last`` of the requested range were dropped by retention."""

    first: int
    last: int

    @property
    def count(self) -> int:
        return self.last - self.first + 1


class Claim(msgspec.Struct, kw_only=True):
    id: str
    subscription: str
    expires_at: float
    messages: list[Message]
    created_at: float = 0.0
    ttl: float = 0.0  # as last set (by the claim or its latest extension)


class QueueStats(msgspec.Struct, kw_only=True):
    """Live messages of a queue (see `Store.stats`)."""

    free: int
    claimed: int
    delayed: int
    oldest: Message | None = None
    newest: Message | None = None

    @property
    def total(self) -> int:
        return self.free + self.claimed + self.delayed


class Routed(msgspec.Struct, frozen=True):
    """One event of an ingest batch and the subscriptions it goes to; ``ttl`` and ``delay``
    (seconds from the commit) apply to each of its messages."""

    event_id: str
    body: bytes
    subscriptions: tuple[str, ...]
    ttl: float | None = None
    delay: float = 0.0


class Appended(msgspec.Struct, frozen=True):
    """A message `append` created (for waking streams): queue, seq, event body, and the id of
    the event it holds (so a caller learns the seqs its own events got)."""

    subscription: str
    seq: int
    body: bytes
    event_id: str = ""


def quota_exceeded(project: str, quota: int) -> QuotaExceeded:
    return QuotaExceeded(
        f"project {project} has {quota} subscriptions, its quota; delete one first",
        limit=quota,
    )


class Store(Protocol):
    # Whether several hub processes may open the same store at once (declared, and tested by
    # tests/hub/test_scale_out.py for every store that declares it).
    multi_process: ClassVar[bool]
    # Batches the hub commits at once: 1 for a store with one connection, where a second
    # batch would only wait behind the first; more where commits proceed in parallel.
    append_concurrency: ClassVar[int]

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def watch(self, on_change: Callable[[str, str], None]) -> None:
        """Call ``on_change(kind, subscription_id)`` when another process changed the store:
        kind ``"append"`` (new messages) or ``"subscription"`` (created or deleted), or
        ``("resync", "")`` when changes may have gone unreported (the notification channel
        was lost and is back): reload every subscription, catch every stream up. A
        single-process store never calls it."""
        ...

    async def unwatch(self, on_change: Callable[[str, str], None]) -> None:
        """Stop calling ``on_change``."""
        ...

    # subscriptions
    async def create_subscription(self, sub: Subscription, *, quota: int | None = None) -> None:
        """Insert ``sub``; with ``quota``, atomically refuse (`QuotaExceeded`, see
        `quota_exceeded`) if its project already holds ``quota`` subscriptions, however many
        creates run at once in however many processes."""
        ...

    async def get_subscription(self, sub_id: str) -> Subscription: ...

    async def update_subscription(self, sub: Subscription) -> None:
        """Replace what the subscription's creator set (everything but the fields the store
        maintains); `NotFound` if it does not exist. Other processes are told (``watch``)."""
        ...

    async def list_subscriptions(
        self, project: str | None, *, limit: int, marker: str | None
    ) -> list[Subscription]:
        """Ordered by id, after ``marker``; ``project=None`` lists every project's."""
        ...

    async def count_subscriptions(self, project: str) -> int: ...

    async def delete_subscription(self, sub_id: str) -> None: ...

    # queues
    async def append(self, batch: Sequence[Routed], *, now: float) -> list[Appended]: ...

    async def read(
        self, sub_id: str, *, after: int, limit: int
    ) -> tuple[Gap | None, list[Message]]: ...

    async def claim(
        self,
        sub_id: str,
        *,
        limit: int,
        ttl: float,
        now: float,
        max_deliveries: int,
        head_only: bool = False,
        grace: float = 0.0,
    ) -> Claim | None:
        """Claim the oldest visible, unexpired ready messages. ``head_only``: claim only if the
        oldest ready message is visible (in-order consumers such as webhooks wait for it).
        ``grace``: see the module docstring."""
        ...

    async def ack(
        self, sub_id: str, claim_id: str, seqs: Sequence[int] | None, *, now: float
    ) -> int: ...

    async def release(self, sub_id: str, claim_id: str, *, now: float) -> int: ...

    async def extend(
        self, sub_id: str, claim_id: str, *, ttl: float, now: float, grace: float = 0.0
    ) -> float: ...

    async def live(
        self,
        sub_id: str,
        *,
        after: int,
        limit: int,
        now: float,
        claimed: bool = False,
        delayed: bool = False,
    ) -> list[Message]:
        """Live messages after ``after`` in seq order: ready, not expired, and neither held by
        a claim (unless ``claimed``) nor delayed (unless ``delayed``)."""
        ...

    async def get_messages(self, sub_id: str, seqs: Sequence[int], *, now: float) -> list[Message]:
        """The listed messages that are ready and not expired (claimed or not), in seq order."""
        ...

    async def delete_messages(
        self, sub_id: str, seqs: Sequence[int] | None, *, now: float, unclaimed_only: bool
    ) -> int:
        """Mark the listed ready messages (every ready message without ``seqs``) acked; with
        ``unclaimed_only`` skip those a live claim holds. Returns how many it marked."""
        ...

    async def get_claim(self, sub_id: str, claim_id: str, *, now: float) -> Claim:
        """A live claim and the ready messages it still holds; `NotFound` for an unknown
        claim, `ClaimExpired` for one whose time ran out."""
        ...

    async def stats(self, sub_id: str, *, now: float) -> QueueStats: ...

    async def ack_upto(self, sub_id: str, seq: int) -> int:
        """Ack every ready, unclaimed message up to ``seq`` (a stream client's ack)."""
        ...

    async def acked_upto(self, sub_id: str) -> int:
        """The highest seq with every message up to it acked, dead or dropped."""
        ...

    async def dead_letters(self, sub_id: str, *, after: int, limit: int) -> list[Message]: ...

    async def redrive(self, sub_id: str, seqs: Sequence[int] | None) -> int: ...

    async def enforce_retention(self, *, now: float) -> int:
        """Drop messages past every queue's age limit; returns how many were dropped."""
        ...
