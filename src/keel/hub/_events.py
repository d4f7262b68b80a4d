"""CloudEvents 1.0 (JSON format) from Keel notifications; pure functions, no I/O.

The event id is the notification's message id, so a notification the bus redelivers becomes
the same event and the store recognises it. The tenant is the payload's owner
(``project_id``/``tenant_id``, or a versioned payload's ``nova_object.data``), else the
context's project, on every bus: a context is the caller's, and an admin acting on a tenant's
server must not take the event away from that tenant. An event without one carries no
``tenant`` and reaches only admins' cross-project subscriptions.

The subject is looked up in the payload, then in the dict named after the resource (Neutron's
``{"port": {...}}``), then in a versioned payload's ``nova_object.data``; the keys tried are
``<resource>_id`` for the first two words of the event type (``volume_id`` for
``volume.create.end``), then ``instance_id``, ``resource_id``, ``uuid``, ``id``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import msgspec

from keel.errors import BadRequest
from keel.wire import RequestContext, new_id

_SUBJECT_KEYS = ("instance_id", "resource_id", "uuid", "id")
_RESOURCE_WORDS = 2  # ``compute.instance.create.end``: the resource is one of the first two
_TENANT_KEYS = ("project_id", "tenant_id")
_REQUIRED = ("id", "source", "type")
_STRING_ATTRIBUTES = ("id", "source", "type", "subject", "time", "priority", "tenant")


class CloudEvent(msgspec.Struct, omit_defaults=True):
    """One event as the hub stores and sends it (CloudEvents 1.0, JSON format)."""

    id: str
    source: str
    type: str
    specversion: str = "1.0"
    subject: str | None = None
    time: str | None = None
    datacontenttype: str | None = "application/json"
    data: Any = None
    priority: str | None = None
    tenant: str | None = None

    def attributes(self) -> dict[str, str]:
        """The string attributes filters look at (absent ones are missing, not empty)."""
        out = {}
        for name in _STRING_ATTRIBUTES:
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(CloudEvent)


def encode_event(event: CloudEvent) -> bytes:
    return _encoder.encode(event)


def decode_event(body: bytes) -> CloudEvent:
    """A CloudEvent from JSON; anything else is `BadRequest` naming what is wrong."""
    try:
        event = _decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise BadRequest(f"not a CloudEvent: {exc}", field="event") from None
    except msgspec.DecodeError as exc:
        raise BadRequest(f"body is not JSON: {exc}", field="event") from None
    if event.specversion != "1.0":
        raise BadRequest("specversion must be '1.0'", field="specversion")
    for name in _REQUIRED:
        value = getattr(event, name)
        if not value or len(value) > 512:
            raise BadRequest(f"{name} must be 1 to 512 characters", field=name)
    return event


def _nova_data(payload: Any) -> Mapping[str, Any]:
    if isinstance(payload, Mapping):
        obj = payload.get("nova_object.data")
        if isinstance(obj, Mapping):
            return obj
    return {}


def _first_string(sources: list[Mapping[str, Any]], keys: Sequence[str]) -> str | None:
    for source in sources:
        for key in keys:
            value = source.get(key)
            if isinstance(value, str) and value:
                return value
    return None


def rfc3339(timestamp: Any) -> str:
    """A notification's timestamp as RFC 3339; oslo's naive ``2026-11-25 17:43:04.1`` is UTC."""
    if not timestamp:
        return datetime.now(UTC).isoformat()
    text = str(timestamp)
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return text  # kept as sent rather than invented: the data still says when
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.isoformat()


def from_notification(
    ctx: RequestContext | None,
    publisher_id: str,
    event_type: str,
    payload: Any,
    metadata: Mapping[str, Any],
) -> CloudEvent:
    """The CloudEvent for a notification as a NotificationListener endpoint receives it.

    The tenant is the resource's owner named in the payload, else the context's project:
    a context is the caller's, and an admin acting on a tenant's resource must not move the
    event into the admin's project (the same rule on every bus)."""
    words = event_type.split(".")[:_RESOURCE_WORDS]
    sources: list[Mapping[str, Any]] = []
    if isinstance(payload, Mapping):
        sources.append(payload)
        sources.extend(nested for word in words if isinstance(nested := payload.get(word), Mapping))
    nova = _nova_data(payload)
    if nova:
        sources.append(nova)
    owner = _first_string(sources, _TENANT_KEYS)
    tenant = owner or (ctx.project if ctx is not None else None)
    subject_keys = [f"{word}_id" for word in words if word]
    subject_keys += [k for k in _SUBJECT_KEYS if k not in subject_keys]
    return CloudEvent(
        id=str(metadata.get("message_id") or new_id()),
        source=publisher_id or "unknown",
        type=event_type,
        subject=_first_string(sources, subject_keys),
        time=rfc3339(metadata.get("timestamp")),
        data=payload,
        priority=str(metadata["priority"]) if metadata.get("priority") else None,
        tenant=tenant,
    )
