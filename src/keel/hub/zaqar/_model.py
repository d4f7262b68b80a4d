"""How Zaqar's resources sit on hub subscriptions (pure functions and lookups; no HTTP).

- A **queue** is a hub subscription of the caller's project. One made through this API has
  the id ``zq:<project>:<name>`` and keeps its name and metadata in ``meta``; it receives
  what is posted to it and, when its metadata holds a Keel filter (``_keel_filter``), the
  cloud's events that match. A Keel subscription (``sub-...``) is the queue of that name.
- A **Zaqar subscription** is a hub subscription with a webhook that tees off the queue's
  (``parent``), with the id ``zs:<project>:<queue>:<id>``, so one range of ids lists a
  queue's subscriptions; it never appears as a queue.
- A **message id** is 24 hex digits: the sequence number and a tag of the queue's identity
  (id and creation time), so an id of a deleted queue never names a message of a new queue
  of the same name.
- A **posted message** is stored as a CloudEvent (type `POSTED`) whose ``data`` is the body,
  with the poster's ``Client-ID`` in the ``zaqarclientid`` extension; an event the hub
  ingested is read through this API with the whole CloudEvent as the body.
"""

from __future__ import annotations

import zlib
from datetime import UTC, datetime
from typing import Any

import msgspec

from keel.errors import NotFound
from keel.hub._core import Hub
from keel.hub._events import JSON, SPECVERSION
from keel.hub.stores.base import Message, Retention, Subscription
from keel.hub.zaqar._config import ZaqarConfig

POSTED = "org.openstack.zaqar.message"
NOTICE = "org.openstack.zaqar.notice"  # a confirmation notice for a subscriber
QUEUE = "queue"
SUBSCRIPTION = "subscription"
KEEL_FILTER = "_keel_filter"
# A queue that only gets what is posted to it.
NEVER: dict[str, Any] = {"filters": [{"any": []}]}
_RESERVED_NONE = ("_dead_letter_queue", "_dead_letter_queue_messages_ttl", "_max_claim_count")
UNLIMITED_CLAIMS = 1_000_000


def queue_id(project: str, name: str) -> str:
    return name if name.startswith("sub-") else f"zq:{project}:{name}"


def tee_prefix(project: str, queue: str) -> str:
    return f"zs:{project}:{queue}:"


def is_tee(sub: Subscription) -> bool:
    return sub.meta.get("kind") == SUBSCRIPTION


def is_queue_made_here(sub: Subscription) -> bool:
    return sub.meta.get("kind") == QUEUE


def name_of(sub: Subscription) -> str:
    name = sub.meta.get("name")
    return name if isinstance(name, str) else sub.id


def metadata_of(sub: Subscription) -> dict[str, Any]:
    meta = sub.meta.get("metadata")
    return dict(meta) if isinstance(meta, dict) else {}


def with_reserved(metadata: dict[str, Any], config: ZaqarConfig) -> dict[str, Any]:
    """Zaqar shows its reserved attributes with their defaults where unset (or falsy)."""
    out = dict(metadata)
    defaults: dict[str, Any] = {
        "_max_messages_post_size": config.max_messages_post_size,
        "_default_message_ttl": config.default_message_ttl,
        "_default_message_delay": 0,
        **dict.fromkeys(_RESERVED_NONE),
        "_enable_encrypt_messages": False,
    }
    for key, value in defaults.items():
        if not out.get(key):
            out[key] = value
    return out


async def find_queue(hub: Hub, project: str, name: str) -> Subscription | None:
    """The project's queue called ``name`` (never a Zaqar subscription), or None."""
    sub_id = queue_id(project, name)
    sub = hub.known(sub_id)
    if sub is None:
        try:
            sub = await hub.store.get_subscription(sub_id)
        except NotFound:
            return None
    if sub.project != project or is_tee(sub):
        return None
    return sub


def new_queue(
    config: ZaqarConfig,
    *,
    project: str,
    user: str,
    name: str,
    metadata: dict[str, Any],
    spec: dict[str, Any],
    now: float,
) -> Subscription:
    """A queue made through this API. It keeps its messages as long as the longest message
    life allows, up to ``queue_max_messages``; a claim never sends one to the dead letters
    unless the queue's ``_max_claim_count`` says so."""
    return Subscription(
        id=queue_id(project, name),
        project=project,
        user=user,
        spec=spec,
        retention=Retention(
            max_age_s=float(config.max_message_ttl + config.max_claim_grace),
            max_messages=config.queue_max_messages,
        ),
        max_deliveries=UNLIMITED_CLAIMS,
        created_at=now,
        meta={"kind": QUEUE, "name": name, "metadata": metadata},
    )


def max_claims(sub: Subscription) -> int:
    count = metadata_of(sub).get("_max_claim_count")
    if isinstance(count, int) and not isinstance(count, bool) and count > 0:
        return count
    return sub.max_deliveries


# --- message ids -----------------------------------------------------------------------------


def _tag(sub: Subscription) -> int:
    return zlib.crc32(f"{sub.id}\x00{sub.created_at!r}".encode())


def message_id(sub: Subscription, seq: int) -> str:
    return f"{seq:016x}{_tag(sub):08x}"


def seq_of(sub: Subscription, mid: str) -> int | None:
    """The sequence number a message id names in this queue, or None."""
    if len(mid) != 24 or not all(c in "0123456789abcdef" for c in mid):
        return None
    if int(mid[16:], 16) != _tag(sub):
        return None
    seq = int(mid[:16], 16)
    # Stores keep sequences in signed 64-bit columns: a larger one names no message.
    return seq if 0 < seq < 2**63 else None


# --- stored events ---------------------------------------------------------------------------


class _Stored(msgspec.Struct):
    type: str = ""
    data: msgspec.Raw = msgspec.Raw(b"null")
    zaqarclientid: str | None = None


def _specversion() -> str:
    return SPECVERSION


def _json_type() -> str:
    return JSON


class _Posted(msgspec.Struct, omit_defaults=True):
    """A CloudEvent as the hub's own (``keel.hub._events``): streams and webhooks of a Keel
    subscription send it as it is stored. The factories keep omit_defaults from dropping the
    attributes CloudEvents requires."""

    id: str
    source: str
    type: str
    data: msgspec.Raw
    tenant: str
    zaqarclientid: str | None = None
    specversion: str = msgspec.field(default_factory=_specversion)
    datacontenttype: str = msgspec.field(default_factory=_json_type)


_stored = msgspec.json.Decoder(_Stored)
_encode = msgspec.json.Encoder().encode


def posted_event(
    event_id: str, project: str, name: str, body: msgspec.Raw, client_id: str | None
) -> bytes:
    return _encode(_Posted(event_id, f"/v2/queues/{name}", POSTED, body, project, client_id))


def notice_event(event_id: str, project: str, name: str, notice: dict[str, Any]) -> bytes:
    data = msgspec.Raw(_encode(notice))
    return _encode(_Posted(event_id, f"/v2/queues/{name}", NOTICE, data, project))


def unwrap(message: Message) -> tuple[msgspec.Raw, str | None, str]:
    """A stored message's Zaqar body, the poster's Client-ID and the event type."""
    raw = bytes(message.event)
    try:
        stored = _stored.decode(raw)
    except (msgspec.DecodeError, RecursionError):
        return msgspec.Raw(raw), None, ""
    if stored.type in (POSTED, NOTICE):
        return stored.data, stored.zaqarclientid, stored.type
    return msgspec.Raw(raw), None, stored.type


# --- representations -------------------------------------------------------------------------


def ttl_of(sub: Subscription, message: Message) -> int:
    if message.expires_at is not None:
        return round(message.expires_at - message.enqueued_at)
    age = sub.retention.max_age_s
    return round(age) if age is not None else 0


def message_view(
    sub: Subscription, base: str, message: Message, now: float, claim_id: str | None = None
) -> dict[str, Any]:
    """Zaqar's ``format_message``: id, href (with ``?claim_id=`` when claimed), ttl, age,
    body (python-zaqarclient builds its Message from exactly these keys)."""
    mid = message_id(sub, message.seq)
    href = f"{base}/messages/{mid}"
    if claim_id is None and message.claimed(now):
        claim_id = message.claim_id
    if claim_id:
        href += f"?claim_id={claim_id}"
    return {
        "id": mid,
        "href": href,
        "ttl": ttl_of(sub, message),
        "age": int(now - message.enqueued_at),
        "body": unwrap(message)[0],
    }


def popped_view(sub: Subscription, message: Message, now: float) -> dict[str, Any]:
    """A popped message as Zaqar's storage answers it (no href)."""
    return {
        "id": message_id(sub, message.seq),
        "age": int(now - message.enqueued_at),
        "ttl": ttl_of(sub, message),
        "body": unwrap(message)[0],
        "claim_id": None,
        "claim_count": message.deliveries,
    }


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
