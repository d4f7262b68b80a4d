"""Wire formats shared by every part of Keel: msgspec Structs and their codecs.

Pure data and pure functions, no I/O. Inside Keel messages travel as msgpack arrays (fast,
compact); where other systems read them (oslo notifications, CloudEvents, the hub API) the
parts use JSON. Every envelope starts with an integer envelope version so a reader can tell a
newer or a foreign message from a damaged one and dead-letter it with a clear reason.

What crosses the wire (arguments, results, payloads): None, bool, int, float, str, bytes,
list/tuple (arrive as list), dict with str keys, datetime (timezone-aware arrives aware),
and msgspec Structs, dataclasses, enums, UUIDs and sets (arrive as their plain encoding:
dict, value, str, list). Anything else raises `SerializationError` at the sender.
"""

from __future__ import annotations

import random
import time
from typing import Any

import msgspec

from keel.errors import MalformedMessage, MessageTooLarge, SerializationError

ENVELOPE_VERSION = 1

# Message kinds. Integers keep the hot-path envelope small.
CALL = 1
CAST = 2
FANOUT = 3
NOTIFY = 4


# Ids must be unique, not secret: the module-level Mersenne Twister is seeded from the OS and
# reseeded in a forked child, and is several times faster than a syscall per id.
_bits = random.getrandbits


def new_id() -> str:
    """A random 128-bit id as 32 hex characters (message ids, request ids)."""
    # bytes.hex is twice as fast as formatting the int, and a call makes three of these.
    return _bits(128).to_bytes(16, "big").hex()


def new_traceparent(trace_id: str | None = None) -> str:
    """A W3C traceparent: version 00, a trace id (new unless given), a new span id, sampled."""
    return f"00-{trace_id or new_id()}-{_bits(64).to_bytes(8, 'big').hex()}-01"


class RequestContext(msgspec.Struct, array_like=True, omit_defaults=True):
    """What travels with every message: who asked, for which project, under which trace.

    ``deadline`` is absolute (Unix seconds); a server never starts a request past it.
    ``depth`` counts nested calls so call loops and chatty chains can be seen.
    """

    request_id: str = msgspec.field(default_factory=lambda: "req-" + new_id())
    user: str | None = None
    project: str | None = None
    roles: tuple[str, ...] = ()
    traceparent: str = msgspec.field(default_factory=new_traceparent)
    deadline: float | None = None
    service: str | None = None
    depth: int = 0
    extra: dict[str, Any] = {}

    @property
    def trace_id(self) -> str:
        parts = self.traceparent.split("-")
        return parts[1] if len(parts) == 4 else ""

    def remaining(self) -> float | None:
        """Seconds left before the deadline (negative once past), or None without one."""
        return None if self.deadline is None else self.deadline - time.time()

    def child(self, *, deadline: float | None, service: str | None) -> RequestContext:
        """The context for a request made on behalf of this one: same trace, new span."""
        return msgspec.structs.replace(
            self,
            traceparent=new_traceparent(self.trace_id),
            deadline=deadline,
            service=service or self.service,
            depth=self.depth + 1,
        )


class Request(msgspec.Struct, array_like=True, omit_defaults=True):
    """An RPC request (call, cast or fanout) as it sits on a server's queue."""

    v: int
    kind: int
    id: str  # unique per message; for casts also the idempotency key
    method: str
    ctx: RequestContext
    args: dict[str, Any] = {}
    namespace: str | None = None
    version: str = "1.0"
    reply_to: str | None = None
    server: str | None = None  # the named server a request was addressed to, if any
    attempt: int = 1
    # A call's monitor window (seconds): the server sends a heartbeat at least this often
    # while the method runs, and the caller gives up after a window without one.
    monitor: float | None = None


class Failure(msgspec.Struct, array_like=True, omit_defaults=True):
    """An exception raised by a remote endpoint, as the caller receives it."""

    type: str  # module.QualName of the remote exception
    message: str
    traceback: str = ""
    keel: bool = False  # a keel.errors class: the caller re-raises it as itself
    fields: dict[str, Any] = {}


class Reply(msgspec.Struct, array_like=True, omit_defaults=True):
    """The answer to a call: a result or a failure, with the id of the request."""

    v: int
    id: str
    result: Any = None
    failure: Failure | None = None
    server: str | None = None
    heartbeat: bool = False  # not the answer: the method still runs (see Request.monitor)


class Notification(msgspec.Struct, array_like=True, omit_defaults=True):
    """A notification as Keel carries it (oslo's JSON format lives in messaging.oslo)."""

    v: int
    message_id: str
    publisher_id: str
    event_type: str
    priority: str
    payload: Any
    timestamp: str
    ctx: RequestContext


def _enc_hook(obj: Any) -> Any:
    raise SerializationError(
        f"cannot send a value of type {type(obj).__module__}.{type(obj).__qualname__}: "
        "Keel sends None, bool, int, float, str, bytes, list, dict (str keys), datetime, "
        "Structs, dataclasses, enums, UUIDs and sets; pass an id or a plain dict instead",
        value_type=type(obj).__qualname__,
    )


_encoder = msgspec.msgpack.Encoder(enc_hook=_enc_hook)
_request_decoder = msgspec.msgpack.Decoder(Request)
_reply_decoder = msgspec.msgpack.Decoder(Reply)
_notification_decoder = msgspec.msgpack.Decoder(Notification)
_any_decoder = msgspec.msgpack.Decoder()


def encode(message: Request | Reply | Notification, limit: int) -> bytes:
    """Encode a message; raise `SerializationError` or `MessageTooLarge` (nothing is sent)."""
    try:
        data = _encoder.encode(message)
    except SerializationError:
        raise
    except (TypeError, ValueError, OverflowError) as exc:
        # e.g. a dict with non-str keys or an int beyond 64 bits
        raise SerializationError(f"cannot encode message: {exc}") from None
    if len(data) > limit:
        raise MessageTooLarge(
            f"message is {len(data)} bytes, over the {limit}-byte limit; send a reference "
            "(an object-store URL or a database id) instead of the data",
            size=len(data),
            limit=limit,
        )
    return data


def _check_version(data: bytes, what: str) -> None:
    # Called only after a decode failed, to say why in words an operator can act on.
    try:
        head = _any_decoder.decode(data)
    except (msgspec.DecodeError, ValueError):  # invalid UTF-8 is a ValueError
        raise MalformedMessage(f"not a Keel {what}: bytes are not msgpack") from None
    if isinstance(head, list) and head and isinstance(head[0], int) and head[0] > ENVELOPE_VERSION:
        raise MalformedMessage(
            f"{what} has envelope version {head[0]}; this Keel reads up to "
            f"{ENVELOPE_VERSION}: upgrade this side",
            envelope_version=head[0],
        )
    raise MalformedMessage(f"not a Keel {what}: unexpected structure")


def decode_request(data: bytes) -> Request:
    try:
        return _request_decoder.decode(data)
    except (msgspec.DecodeError, ValueError):  # invalid UTF-8 is a ValueError
        _check_version(data, "request")
        raise  # unreachable: _check_version always raises


def decode_reply(data: bytes) -> Reply:
    try:
        return _reply_decoder.decode(data)
    except (msgspec.DecodeError, ValueError):  # invalid UTF-8 is a ValueError
        _check_version(data, "reply")
        raise


def decode_notification(data: bytes) -> Notification:
    try:
        return _notification_decoder.decode(data)
    except (msgspec.DecodeError, ValueError):  # invalid UTF-8 is a ValueError
        _check_version(data, "notification")
        raise
