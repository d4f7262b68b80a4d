"""CloudEvents 1.0 (JSON format) from Keel notifications; pure functions, no I/O.

The event id is the notification's message id, so a notification the bus redelivers becomes
the same event and the store recognises it. The tenant is the payload's owner, found by the
rules per payload shape in `keel.hub._owners`, else the context's project, on every bus: a
context is the caller's, and an admin acting on a tenant's server must not take the event
away from that tenant. An event without one carries no ``tenant`` and reaches only admins'
cross-project subscriptions.

The subject is the rule's subject path if it has one, else looked up in the payload, then in
the dict named after the resource (Neutron's ``{"port": {...}}``), then in a versioned
payload's ``nova_object.data``; the keys tried are ``<resource>_id`` for the first two words
of the event type (``volume_id`` for ``volume.create.end``), then ``instance_id``,
``resource_id``, ``uuid``, ``id``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import msgspec
from msgspec import UNSET, UnsetType

from keel.errors import BadRequest
from keel.hub._input import decode_json
from keel.hub._owners import first, rule_for
from keel.wire import RequestContext, new_id

_SUBJECT_KEYS = ("instance_id", "resource_id", "uuid", "id")
_RESOURCE_WORDS = 2  # ``compute.instance.create.end``: the resource is one of the first two
_REQUIRED = ("id", "source", "type")
_OPTIONAL = ("subject", "datacontenttype", "dataschema", "priority", "tenant")
_STRING_ATTRIBUTES = ("id", "source", "type", "subject", "time", "priority", "tenant")
_KNOWN = frozenset(
    ("specversion", "data", "data_base64", "time", *_REQUIRED, *_OPTIONAL, "extensions")
)
EXTENSION_NAME = "^[a-z0-9]{1,20}$"
_EXTENSION_NAME = re.compile(EXTENSION_NAME)
# RFC 3339 exactly, as a regular expression the OpenAPI document carries too: real calendar
# dates (leap years included, year 0000 excluded), hours 00-23, seconds 00-59, a fraction of
# 1-9 digits, Z or an offset under 24 hours. ASCII digits only.
_YEAR = "(?:[0-9]{3}[1-9]|[0-9]{2}[1-9]0|[0-9][1-9]00|[1-9]000)"
_LEAP = "(?:[0-9]{2}(?:0[48]|[2468][048]|[13579][26])|(?:0[48]|[2468][048]|[13579][26])00)"
_DATE = (
    f"(?:{_YEAR}-(?:(?:0[1-9]|1[0-2])-(?:0[1-9]|1[0-9]|2[0-8])|(?:0[13-9]|1[0-2])-(?:29|30)"
    f"|(?:0[13578]|1[02])-31)|{_LEAP}-02-29)"
)
_HOURS = "(?:[01][0-9]|2[0-3])"
TIME_PATTERN = (
    f"^{_DATE}[Tt]{_HOURS}:[0-5][0-9]:[0-5][0-9](?:[.][0-9]{{1,9}})?"
    f"(?:[Zz]|[+-]{_HOURS}:[0-5][0-9])$"
)
_RFC3339 = re.compile(TIME_PATTERN)
# RFC 2045's media type (type/subtype, then parameters): it becomes a Content-Type header.
_TOKEN = "[A-Za-z0-9!#$%&'*+.^_`|~-]+"
MEDIA_TYPE = (
    f'^{_TOKEN}/{_TOKEN}(?: *; *{_TOKEN}=(?:{_TOKEN}|"[\\x20\\x21\\x23-\\x5b\\x5d-\\x7e]*"))*$'
)
_MEDIA_TYPE = re.compile(MEDIA_TYPE)
BASE64 = "^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"
_BASE64 = re.compile(BASE64)
MAX_ATTRIBUTE = 512
# What CloudEvents 1.0 forbids in a string attribute: control characters (U+0000-U+001F,
# U+007F-U+009F), surrogates and noncharacters; they would also break an SSE line or a
# PostgreSQL text column (NUL). Of the noncharacters only the BMP's: a pattern JSON Schema
# (ECMA-262) can state too, so the OpenAPI document says this. Surrogates are left
# out of that pattern: the decoder refuses a lone one (as I-JSON does), and a surrogate
# escape is ECMA-262 only with the "u" flag (without it a character past the BMP is a pair
# and fails) and no regular expression in Rust's regex (jsonschema-rs refuses the schema).
# The hub's own check and `clean` (a notification's text, whatever decoded it) include them.
_FORBIDDEN_CHARS = "\\x00-\\x1f\\x7f-\\x9f\\ufdd0-\\ufdef\\ufffe\\uffff"
ATTRIBUTE_TEXT = f"^[^{_FORBIDDEN_CHARS}]*$"
_FORBIDDEN = re.compile(f"[{_FORBIDDEN_CHARS}\\ud800-\\udfff]")
# Attributes in all, null ones and the standard ones included (13 standard ones and the
# hub's: room for 32 extension attributes).
MAX_ATTRIBUTES = 45
KNOWN_ATTRIBUTES = tuple(sorted(_KNOWN))
JSON = "application/json"
SPECVERSION = "1.0"
# The queue position a WebSocket stream adds to each event (``cloudevents.json``); reserved.
SEQ_ATTRIBUTE = "hubseq"

Extension = str | int | bool


def _specversion() -> str:
    return SPECVERSION  # a factory, so omit_defaults never drops the required attribute


class CloudEvent(msgspec.Struct, omit_defaults=True):
    """One event as the hub stores and sends it (CloudEvents 1.0, JSON format).

    ``specversion`` is always written; ``datacontenttype`` is ``application/json`` whenever
    there is ``data`` and none was given. Extension attributes other than the hub's own
    ``priority`` and ``tenant`` live in ``extensions`` and are written as top-level
    attributes, as the JSON format wants."""

    id: str
    source: str
    type: str
    specversion: str = msgspec.field(default_factory=_specversion)
    subject: str | None = None
    time: str | None = None
    datacontenttype: str | None = None
    dataschema: str | None = None
    data: Any = None
    data_base64: str | None = None
    priority: str | None = None
    tenant: str | None = None
    extensions: dict[str, Extension] | UnsetType = UNSET

    def __post_init__(self) -> None:
        if self.datacontenttype is None and self.data is not None:
            self.datacontenttype = JSON

    def attributes(self) -> dict[str, str]:
        """The string attributes filters look at (absent ones are missing, not empty)."""
        out = {}
        for name in _STRING_ATTRIBUTES:
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        if self.extensions:
            for name, ext in self.extensions.items():
                out.setdefault(name, ext if isinstance(ext, str) else str(ext).lower())
        return out


_encoder = msgspec.json.Encoder()


def encode_event(event: CloudEvent) -> bytes:
    if not event.extensions:
        return _encoder.encode(event)
    flat = msgspec.to_builtins(event)
    extensions = flat.pop("extensions")
    return _encoder.encode({**flat, **extensions})


def decode_event(body: bytes) -> CloudEvent:
    """A CloudEvent from its JSON format; anything else is `BadRequest` naming what is wrong."""
    return event_from_json(decode_json(body, "event"))


def _bad(name: str, why: str) -> BadRequest:
    return BadRequest(f"CloudEvent attribute {name} {why}", field=name)


def _text(obj: Mapping[str, Any], name: str) -> str | None:
    value = obj.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_ATTRIBUTE:
        raise _bad(name, f"must be a string of 1 to {MAX_ATTRIBUTE} characters")
    _printable(name, value)
    return value


def _printable(name: str, value: str) -> None:
    if _FORBIDDEN.search(value):
        raise _bad(
            name[:40],
            "holds a character CloudEvents forbids (a control character, a surrogate or a "
            "noncharacter)",
        )


def clean(value: str) -> str:
    """``value`` with what CloudEvents forbids in an attribute replaced by U+FFFD: for
    attributes taken from a notification, whose sender the hub cannot send back a 400."""
    return _FORBIDDEN.sub("\ufffd", value)


def _timestamp(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, str) and _RFC3339.fullmatch(value):
        return value
    raise _bad("time", "must be an RFC 3339 timestamp such as 2026-01-02T03:04:05Z")


def _check_name(name: str) -> None:
    if name in _KNOWN:
        return
    if not _EXTENSION_NAME.fullmatch(name) or name == SEQ_ATTRIBUTE:
        raise _bad(
            name[:40],
            "is not an attribute the hub accepts: extension names are 1-20 lowercase "
            f"letters or digits, and {SEQ_ATTRIBUTE} is reserved",
        )


def _extension(name: str, value: Any) -> Extension:
    if isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # JSON Schema, and so the OpenAPI document, counts 3.0 an integer
    if type(value) is int and -(2**31) <= value < 2**31:
        return value
    if isinstance(value, str) and len(value) <= MAX_ATTRIBUTE:
        _printable(name, value)
        return value
    raise _bad(name, "must be a boolean, a 32-bit integer or a string of up to 512 characters")


def event_from_json(obj: Any) -> CloudEvent:
    """Check a decoded JSON value against CloudEvents 1.0 (JSON format) and build the event.

    Null attributes are absent (as the JSON format says); ``data`` and ``data_base64`` are
    exclusive; extension attributes keep their JSON types (boolean, integer, string)."""
    if not isinstance(obj, dict):
        raise BadRequest("a CloudEvent is a JSON object", field="event")
    if len(obj) > MAX_ATTRIBUTES:
        raise BadRequest(
            f"a CloudEvent may carry up to {MAX_ATTRIBUTES} attributes", limit=MAX_ATTRIBUTES
        )
    for name in obj:
        _check_name(name)  # null or not: a name the hub would refuse is refused either way
    present = {k: v for k, v in obj.items() if v is not None}
    if present.get("specversion") != SPECVERSION:
        raise _bad("specversion", "must be '1.0'")
    required = {name: _text(present, name) for name in _REQUIRED}
    for name, value in required.items():
        if value is None:
            raise _bad(name, "is required")
    optional = {name: _text(present, name) for name in _OPTIONAL}
    if "data" in present and "data_base64" in present:
        raise _bad("data_base64", "and data are exclusive: send one")
    b64 = present.get("data_base64")
    if b64 is not None and not (isinstance(b64, str) and _BASE64.fullmatch(b64)):
        raise _bad("data_base64", "must be a base64 string (padded, no whitespace)")
    extra = {k: v for k, v in present.items() if k not in _KNOWN}
    if "extensions" in present:
        raise _bad("extensions", "is reserved (extension attributes are top-level)")
    ctype = optional["datacontenttype"]
    if ctype is not None and not _MEDIA_TYPE.fullmatch(ctype):
        raise _bad("datacontenttype", "must be a media type such as application/json")
    extensions = {name: _extension(name, value) for name, value in extra.items()}
    return CloudEvent(
        id=str(required["id"]),
        source=str(required["source"]),
        type=str(required["type"]),
        time=_timestamp(present.get("time")),
        data=present.get("data"),
        data_base64=b64,
        subject=optional["subject"],
        datacontenttype=optional["datacontenttype"],
        dataschema=optional["dataschema"],
        priority=optional["priority"],
        tenant=optional["tenant"],
        extensions=extensions or UNSET,
    )


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


def rfc3339(timestamp: Any) -> str | None:
    """A notification's timestamp as RFC 3339; oslo's naive ``2026-11-25 17:43:04.1`` is UTC."""
    if not timestamp:
        return datetime.now(UTC).isoformat()
    if not isinstance(timestamp, str) or len(timestamp) > 64:
        return None  # not invented either: absent (the payload may still say when)
    try:
        parsed = datetime.fromisoformat(timestamp)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    text = parsed.isoformat()
    # fromisoformat takes ISO 8601 forms RFC 3339 has no words for (offsets in seconds).
    return text if _RFC3339.fullmatch(text) else None


def from_notification(
    ctx: RequestContext | None,
    publisher_id: str,
    event_type: str,
    payload: Any,
    metadata: Mapping[str, Any],
) -> CloudEvent:
    """The CloudEvent for a notification as a NotificationListener endpoint receives it.

    The tenant is the resource's owner named in the payload (the rules per payload shape in
    `keel.hub._owners`), else the context's project: a context is the caller's, and an admin
    acting on a tenant's resource must not move the event into the admin's project (the same
    rule on every bus)."""
    words = event_type.split(".")[:_RESOURCE_WORDS]
    sources: list[Mapping[str, Any]] = []
    if isinstance(payload, Mapping):
        sources.append(payload)
        sources.extend(nested for word in words if isinstance(nested := payload.get(word), Mapping))
    nova = _nova_data(payload)
    if nova:
        sources.append(nova)
    rule = rule_for(event_type)
    tenant = first(payload, rule.owner, words) or (ctx.project if ctx is not None else None)
    subject_keys = [f"{word}_id" for word in words if word]
    subject_keys += [k for k in _SUBJECT_KEYS if k not in subject_keys]
    subject = first(payload, rule.subject, words) or _first_string(sources, subject_keys)
    priority = str(metadata["priority"]) if metadata.get("priority") else None
    return CloudEvent(
        id=clean(str(metadata.get("message_id") or new_id())),
        source=clean(publisher_id) if publisher_id else "unknown",
        type=clean(event_type),
        subject=clean(subject[:MAX_ATTRIBUTE]) if subject else None,
        time=rfc3339(metadata.get("timestamp")),
        data=payload,
        priority=clean(priority) if priority else None,
        tenant=clean(tenant) if tenant else tenant,
    )
