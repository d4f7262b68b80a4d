"""Wire formats shared by every part of Keel: msgspec Structs and their codecs.

Pure data and pure functions, no I/O. Inside Keel messages travel as msgpack arrays (fast,
compact); where other systems read them (oslo notifications, CloudEvents, the hub API) the
parts use JSON. Every envelope starts with an integer envelope version so a reader can tell a
newer or a foreign message from a damaged one and dead-letter it with a clear reason.

What crosses the wire (arguments, results, payloads): None, bool, int, float, str, bytes,
list/tuple (arrive as list), dict with str keys, datetime (timezone-aware arrives aware),
and msgspec Structs, dataclasses, enums, UUIDs and sets (arrive as their plain encoding:
dict, value, str, list), nested at most `MAX_DEPTH` containers deep. Anything else raises
`SerializationError` at the sender.

Reading is total and bounded: a decoder either returns its Struct or raises
`MalformedMessage` (field ``problem`` says which bound or check failed), never a
`RecursionError`, `OverflowError`, `MemoryError` or a msgspec error. A body over the reader's
size limit is refused before a byte of it is parsed; nesting is bounded during parsing
(msgspec's recursion guard) and then to `MAX_DEPTH`, and a message holds at most
`MAX_CONTAINERS` lists and maps, both checked only when the body holds enough container
markers to exceed them (one ``bytes.translate`` counts them); a body of at most
`COLLECTOR_PAUSE_OPENERS` bytes whose free-form values hold no container (every call's
arguments of plain values, every plain result) cannot, and is not counted; integer fields
carry the ranges Keel writes (msgspec ``Meta`` constraints, checked in C).

What a hostile body costs the reader is bounded by its size: a body with many container
markers (a "wide bomb", a megabyte of empty lists) is decoded with the cyclic garbage
collector paused (it would otherwise walk every new list several times over, ten times the
cost of the decoding) and checked level by level in C (`gc.get_referents`), never one Python
step per value.
"""

from __future__ import annotations

import contextlib
import gc
import operator
import random
import time
from collections.abc import Iterator
from itertools import compress, repeat
from typing import Annotated, Any, TypeVar

import msgspec
from msgspec import Meta

from keel.errors import MalformedMessage, MessageTooLarge, SerializationError

ENVELOPE_VERSION = 1

# Message kinds. Integers keep the hot-path envelope small.
CALL = 1
CAST = 2
FANOUT = 3
NOTIFY = 4

MAX_DEPTH = 64  # containers a value (argument, result, payload, context extra) may nest
MAX_CONTAINERS = 100_000  # lists and maps (arrays and objects) one message may hold in all

# What the reader accepts in the envelope's own fields: what Keel writes, nothing a hostile
# writer could use to overflow, pin a deadline or flood a metric.
_EnvelopeVersion = Annotated[int, Meta(ge=1, le=ENVELOPE_VERSION)]
_Count = Annotated[int, Meta(ge=0, le=2**31)]
_Attempt = Annotated[int, Meta(ge=1, le=2**31)]
_Kind = Annotated[int, Meta(ge=CALL, le=FANOUT)]
_Deadline = Annotated[float, Meta(ge=0.0, le=1e11)]  # Unix seconds; NaN and inf fail too
# Its form (MAJOR.MINOR, ASCII digits) is checked where it is used (messaging's
# parse_version, a typed error to the sender); a regex here would cost every message.
_InterfaceVersion = Annotated[str, Meta(max_length=19)]


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


def new_call_ids() -> tuple[str, str, str]:
    """`new_root_ids` and a message id (`new_id`) for a call no other started, from one
    draw: a call's three ids cost one Python call."""
    bits = _bits(448).to_bytes(56, "big").hex()
    return "req-" + bits[:32], f"00-{bits[32:64]}-{bits[64:80]}-01", bits[80:]


def new_root_ids() -> tuple[str, str]:
    """A request id and a traceparent for a request no other started, from one draw: the
    two default factories cost a caller four Python calls (and three draws) per request."""
    bits = _bits(320).to_bytes(40, "big").hex()
    return "req-" + bits[:32], f"00-{bits[32:64]}-{bits[64:]}-01"


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
    deadline: _Deadline | None = None
    service: str | None = None
    depth: _Count = 0
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

    v: _EnvelopeVersion
    kind: _Kind
    id: str  # unique per message; for casts also the idempotency key
    method: str
    ctx: RequestContext
    args: dict[str, Any] = {}
    namespace: str | None = None
    version: _InterfaceVersion = "1.0"
    reply_to: str | None = None
    server: str | None = None  # the named server a request was addressed to, if any
    attempt: _Attempt = 1
    # A call's monitor window (seconds): the server sends a heartbeat at least this often
    # while the method runs, and the caller gives up after a window without one. Not bounded
    # here: the server honours only a positive, finite window and ignores any other.
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

    v: _EnvelopeVersion
    id: str
    result: Any = None
    failure: Failure | None = None
    server: str | None = None
    heartbeat: bool = False  # not the answer: the method still runs (see Request.monitor)


class Notification(msgspec.Struct, array_like=True, omit_defaults=True):
    """A notification as Keel carries it (oslo's JSON format lives in messaging.oslo)."""

    v: _EnvelopeVersion
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
_decoders: dict[type[Any], msgspec.msgpack.Decoder[Any]] = {
    Request: _request_decoder,
    Reply: _reply_decoder,
    Notification: _notification_decoder,
}

_MSGPACK_OPENERS = bytes(range(0x80, 0xA0)) + b"\xdc\xdd\xde\xdf"  # fixmap/fixarray, 16, 32
NOT_MSGPACK_OPENERS = bytes(b for b in range(256) if b not in _MSGPACK_OPENERS)
NOT_JSON_OPENERS = bytes(b for b in range(256) if b not in b"[{")
INT_MIN, INT_MAX = -(2**63), 2**64 - 1  # what msgpack carries
_NESTED = (list, dict, tuple)
_is_nested = frozenset(_NESTED).__contains__
# Values that are one msgpack scalar whichever side holds them (exact types: a subclass, a
# Struct, a dataclass or a set may encode as a container).
_SCALARS = frozenset({str, int, float, bool, type(None), bytes})
_is_scalar = _SCALARS.__contains__
# Past this many container markers a body is decoded with the cyclic collector paused: a
# megabyte of empty lists costs msgspec ~0.1 s, and the collections its allocations trigger
# (each walking every list made so far) ten times that.
COLLECTOR_PAUSE_OPENERS = 4096
# While the collector is paused its first count rises by one per container the decoder makes
# (lists, dicts, tuples, Structs; fewer when a free list is reused, never more): past
# MAX_CONTAINERS and the few Structs of an envelope, a body is refused without a walk.
_OWN_OBJECTS = 8


def openers(data: bytes, not_openers: bytes) -> int:
    """How many bytes of ``data`` could open a container: at least as many as it holds."""
    return len(data.translate(None, not_openers))


def may_nest(data: bytes, not_openers: bytes, limit: int = MAX_DEPTH) -> bool:
    """Whether ``data`` holds enough container openers to nest deeper than ``limit``.

    False proves it cannot (every level needs one opener byte); True only means a walk of the
    decoded value must tell (strings and wide containers hold openers too).
    """
    return len(data) > limit and openers(data, not_openers) > limit


@contextlib.contextmanager
def collector_paused(paused: bool = True) -> Iterator[None]:
    """Pause the cyclic garbage collector for a bounded piece of work (decoding one body).

    What is made meanwhile is still freed by reference counting; only the collections that
    its allocations would trigger are skipped. Left enabled if someone else disabled it.
    """
    if not paused or not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def bounds_problem(
    values: list[tuple[Any, int]], *, ints: bool = False, budget: int = MAX_CONTAINERS
) -> str | None:
    """What is wrong with decoded free-form ``values`` (each with its depth limit), if anything:
    ``"depth"`` if one nests more than its limit (map keys count), ``"containers"`` if they
    hold more than ``budget`` lists, maps and tuples in all, ``"range"`` if ``ints`` and an
    integer is outside what msgpack carries; else None.

    Breadth first, one level at a time, each level in C (``gc.get_referents`` and
    ``itertools.compress``): never a recursion, never one Python step per value.
    """
    for value, limit in values:
        level = [value]
        depth = 0
        while level:
            if ints:
                found = list(compress(level, map(operator.is_, map(type, level), repeat(int))))
                if found and (min(found) < INT_MIN or max(found) > INT_MAX):
                    return "range"
            level = list(compress(level, map(_is_nested, map(type, level))))
            if not level:
                break
            depth += 1
            budget -= len(level)
            if depth > limit:
                return "depth"
            if budget < 0:
                return "containers"
            # A list's or tuple's items; a dict's values (and its keys unless all are str).
            level = gc.get_referents(*level)
    return None


def nesting_problem(value: Any, limit: int = MAX_DEPTH, *, ints: bool = False) -> str | None:
    """``"depth"`` if ``value`` nests more than ``limit`` containers deep (map keys count),
    ``"containers"`` if it holds more than `MAX_CONTAINERS`, ``"range"`` if ``ints`` and an
    integer is outside what msgpack carries, else None (see `bounds_problem`)."""
    return bounds_problem([(value, limit)], ints=ints)


def _values(message: Request | Reply | Notification) -> list[tuple[Any, int]]:
    """The free-form values of a message with their limits (a dict of values: one more)."""
    if isinstance(message, Request):
        return [(message.args, MAX_DEPTH + 1), (message.ctx.extra, MAX_DEPTH + 1)]
    if isinstance(message, Reply):
        found: list[tuple[Any, int]] = [(message.result, MAX_DEPTH)]
        if message.failure is not None:
            found.append((message.failure.fields, MAX_DEPTH + 1))
        return found
    return [(message.payload, MAX_DEPTH), (message.ctx.extra, MAX_DEPTH + 1)]


def _flat(message: Request | Reply | Notification) -> bool:
    """Whether no free-form value of ``message`` holds a container (a call's arguments map
    aside): then nothing in it nests deeper than 2 or adds up to `MAX_CONTAINERS`, whatever
    bytes its strings hold. False only means the body must be counted (`openers`)."""
    if type(message) is Request:
        return not message.ctx.extra and all(map(_is_scalar, map(type, message.args.values())))
    if type(message) is Reply:
        failure = message.failure
        return type(message.result) in _SCALARS and (failure is None or not failure.fields)
    if type(message) is Notification:
        return type(message.payload) in _SCALARS and not message.ctx.extra
    return False


def encode(message: Request | Reply | Notification, limit: int) -> bytes:
    """Encode a message; raise `SerializationError` or `MessageTooLarge` (nothing is sent)."""
    try:
        data = _encoder.encode(message)
    except SerializationError:
        raise
    except RecursionError:
        raise _too_deep_to_send() from None
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
    # The reader refuses what nests deeper than MAX_DEPTH: say so here, to the sender.
    # openers(), inlined; not even that for a message of plain values (nearly every one):
    # _flat's checks of a request and a reply inlined too.
    if len(data) <= MAX_DEPTH:
        return data
    if type(message) is Request:
        if not message.ctx.extra and all(map(_is_scalar, map(type, message.args.values()))):
            return data
    elif type(message) is Reply:
        if type(message.result) in _SCALARS and message.failure is None:
            return data
    elif _flat(message):
        return data
    _check_sendable(message, data)
    return data


def _check_sendable(message: Request | Reply | Notification, data: bytes) -> None:
    """Raise `SerializationError` if readers would refuse ``message`` (encoded as ``data``)
    for its nesting or its number of containers."""
    found = len(data.translate(None, NOT_MSGPACK_OPENERS))
    if found > MAX_DEPTH:
        try:
            with collector_paused(found > COLLECTOR_PAUSE_OPENERS):
                problem = bounds_problem(_values(_decoders[type(message)].decode(data)))
        except msgspec.ValidationError as exc:  # e.g. a context deadline out of range
            raise SerializationError(
                f"cannot send this message, readers refuse it: {exc}"
            ) from None
        if problem == "containers":
            raise SerializationError(
                f"cannot send a message holding more than {MAX_CONTAINERS} lists and maps "
                "(readers refuse it); send a reference or split it",
                limit=MAX_CONTAINERS,
            )
        if problem is not None:
            raise _too_deep_to_send()


def _too_deep_to_send() -> SerializationError:
    return SerializationError(
        f"cannot send a value nested more than {MAX_DEPTH} containers deep (readers refuse "
        "deeper ones); flatten it or send a reference",
        limit=MAX_DEPTH,
    )


# --- reading -------------------------------------------------------------------------------

M = TypeVar("M")


def _clip(text: str, size: int = 300) -> str:
    """One line of bounded length: reasons end up in logs, headers and metrics' neighbours."""
    text = " ".join(text.split())
    return text if len(text) <= size else text[: size - 3] + "..."


def oversize(what: str, size: int, limit: int) -> MalformedMessage:
    return MalformedMessage(
        f"{what} is {size} bytes, over this side's {limit}-byte limit (max_message_bytes); "
        "not read",
        problem="oversize",
        size=size,
        limit=limit,
    )


def decode_bounded(
    decoder: msgspec.msgpack.Decoder[M], data: bytes, what: str, limit: int | None = None
) -> M:
    """``decoder.decode(data)`` made total: the Struct, or `MalformedMessage` with the reason.

    ``limit`` (the reader's ``max_message_bytes``) refuses a longer body without reading it.
    """
    if limit is not None and len(data) > limit:
        raise oversize(what, len(data), limit)
    try:
        return decoder.decode(data)
    except Exception as exc:  # RecursionError, msgspec's errors, invalid UTF-8, anything
        raise _unreadable(data, what, exc) from None


def _unreadable(data: bytes, what: str, exc: Exception) -> MalformedMessage:
    if isinstance(exc, RecursionError):
        problem, reason = "depth", "nested deeper than this reader's recursion limit"
    elif isinstance(exc, msgspec.ValidationError):
        problem, reason = _invalid(data, str(exc))
    elif isinstance(exc, msgspec.DecodeError | ValueError):  # ValueError: invalid UTF-8
        problem, reason = "syntax", f"bytes are not msgpack ({exc})"
    else:  # OverflowError, MemoryError, ... : whatever msgspec may raise one day
        problem, reason = "range", f"{type(exc).__name__}: {exc}"
    return MalformedMessage(_clip(f"not a Keel {what}: {reason}"), problem=problem, size=len(data))


def _invalid(data: bytes, detail: str) -> tuple[str, str]:
    """Why a msgpack value is not the Struct: a version this side does not read, or its shape."""
    version = _head_int(data)
    if version is not None and version > ENVELOPE_VERSION:
        return "version", (
            f"envelope version {version}; this Keel reads up to {ENVELOPE_VERSION}: upgrade "
            "this side"
        )
    if version is not None and version < 1:
        return "version", f"envelope version {version}, which no Keel writes"
    problem = "range" if any(op in detail for op in (">=", "<=", "` <", "` >")) else "shape"
    return problem, f"unexpected structure ({detail})"


def _head_int(data: bytes) -> int | None:
    """The first element of a msgpack array if it is an integer (the envelope version)."""
    at = _array_body(data)
    if at is None or at >= len(data):
        return None
    value, _ = _read_int(data, at)
    return value


def _array_body(data: bytes) -> int | None:
    """Offset of an array's first element, or None if ``data`` does not start an array."""
    if not data:
        return None
    head = data[0]
    if 0x90 <= head <= 0x9F:
        return 1
    return {0xDC: 3, 0xDD: 5}.get(head)


_INT_SIZES = {0xCC: (1, False), 0xCD: (2, False), 0xCE: (4, False), 0xCF: (8, False),
              0xD0: (1, True), 0xD1: (2, True), 0xD2: (4, True), 0xD3: (8, True)}  # fmt: skip


def _read_int(data: bytes, at: int) -> tuple[int | None, int]:
    head = data[at]
    if head <= 0x7F:
        return head, at + 1
    if head >= 0xE0:
        return head - 0x100, at + 1
    found = _INT_SIZES.get(head)
    if found is None or at + 1 + found[0] > len(data):
        return None, at
    size, signed = found
    return int.from_bytes(data[at + 1 : at + 1 + size], "big", signed=signed), at + 1 + size


def reply_id(data: bytes) -> str | None:
    """The request id of a reply's body, read from its first bytes alone (None if absent).

    A reply too large or too broken to decode still names the call it answers, so that call
    can fail now instead of at its deadline. Reads at most the header of three elements.
    """
    at = _array_body(data)
    if at is None or at >= len(data):
        return None
    version, at = _read_int(data, at)
    if version is None or at >= len(data):
        return None
    head = data[at]
    if 0xA0 <= head <= 0xBF:
        size, at = head & 0x1F, at + 1
    elif head == 0xD9 and at + 1 < len(data):
        size, at = data[at + 1], at + 2
    else:
        return None
    if size > 128 or at + size > len(data):
        return None
    try:
        return data[at : at + size].decode()
    except UnicodeDecodeError:
        return None


_Message = TypeVar("_Message", Request, Reply, Notification)


def _decode_message(
    decoder: msgspec.msgpack.Decoder[_Message], data: bytes, what: str, limit: int | None
) -> _Message:
    """`decode_bounded`, then `MAX_DEPTH` and `MAX_CONTAINERS` for the free-form values. Runs
    on every message: the size check and the opener count are cheap, the walk rare."""
    size = len(data)
    if limit is not None and size > limit:
        raise oversize(what, size, limit)
    if size <= COLLECTOR_PAUSE_OPENERS:
        # No more openers than bytes: no collector pause, never too many containers. Every
        # call and reply comes here; one of plain values is not even counted.
        try:
            message = decoder.decode(data)
        except Exception as exc:
            raise _unreadable(data, what, exc) from None
        if size <= MAX_DEPTH or _flat(message):
            return message
        return _small_checked(message, data, what)
    found = openers(data, NOT_MSGPACK_OPENERS)
    if found <= MAX_DEPTH:
        try:
            return decoder.decode(data)
        except Exception as exc:
            raise _unreadable(data, what, exc) from None
    many = found > COLLECTOR_PAUSE_OPENERS
    with collector_paused(many):
        made = gc.get_count()[0]
        try:
            message = decoder.decode(data)
        except Exception as exc:
            raise _unreadable(data, what, exc) from None
        problem = None
        if many and gc.get_count()[0] - made > MAX_CONTAINERS + _OWN_OBJECTS:
            problem = "containers"  # counted by the allocator, no walk needed
        elif found > MAX_DEPTH:
            problem = bounds_problem(_values(message))
        if problem is not None:
            del message  # freed here, with the collector still paused
            raise bounds_error(f"not a Keel {what}", problem, len(data))
    return message


def _small_checked(message: _Message, data: bytes, what: str) -> _Message:
    """A decoded body of at most `COLLECTOR_PAUSE_OPENERS` bytes (never too many containers)
    whose free-form values hold a container: walked if it has openers enough to nest too
    deep."""
    if openers(data, NOT_MSGPACK_OPENERS) > MAX_DEPTH:
        problem = bounds_problem(_values(message))
        if problem is not None:
            del message
            raise bounds_error(f"not a Keel {what}", problem, len(data))
    return message


def bounds_error(what: str, problem: str, size: int) -> MalformedMessage:
    """The `MalformedMessage` for a `bounds_problem` of a body that reads as ``what``."""
    return MalformedMessage(f"{what}: {bounds_reason(problem)}", problem=problem, size=size)


def bounds_reason(problem: str) -> str:
    if problem == "containers":
        return f"holds more than {MAX_CONTAINERS} lists and maps"
    if problem == "range":
        return "an integer is outside the 64 bits Keel carries"
    return f"a value nests more than {MAX_DEPTH} containers deep"


def decode_request(data: bytes, limit: int | None = None) -> Request:
    # _decode_message's path for a small body of plain values (every call), inlined.
    size = len(data)
    if size <= COLLECTOR_PAUSE_OPENERS and (limit is None or size <= limit):
        try:
            request = _request_decoder.decode(data)
        except Exception as exc:
            raise _unreadable(data, "request", exc) from None
        if size <= MAX_DEPTH or (
            not request.ctx.extra and all(map(_is_scalar, map(type, request.args.values())))
        ):
            return request
        return _small_checked(request, data, "request")
    return _decode_message(_request_decoder, data, "request", limit)


def decode_reply(data: bytes, limit: int | None = None) -> Reply:
    # _decode_message's path for a small body of a plain result (every call), inlined.
    size = len(data)
    if size <= COLLECTOR_PAUSE_OPENERS and (limit is None or size <= limit):
        try:
            reply = _reply_decoder.decode(data)
        except Exception as exc:
            raise _unreadable(data, "reply", exc) from None
        if size <= MAX_DEPTH or (type(reply.result) in _SCALARS and reply.failure is None):
            return reply
        return _small_checked(reply, data, "reply")
    return _decode_message(_reply_decoder, data, "reply", limit)


def decode_notification(data: bytes, limit: int | None = None) -> Notification:
    return _decode_message(_notification_decoder, data, "notification", limit)
