"""Property tests of every decoder Keel runs on bytes from a bus, with a hostile writer's
strategies (tests/poison.py): deep nesting, huge integers, truncated frames, wrong envelope
versions, oversize bodies, valid msgpack or JSON of the wrong shape.

Whatever the bytes, a decoder returns its Struct within Keel's bounds or raises
`MalformedMessage`: never a RecursionError, OverflowError, MemoryError or a msgspec error.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keel import errors, wire
from keel.messaging import oslo
from keel.messaging._presence import decode_presence
from keel.messaging._target import parse_version
from tests import poison

LIMIT = 64 * 1024

Decoder = Callable[[bytes], Any]
KEEL_DECODERS: list[tuple[str, Decoder]] = [
    ("request", lambda b: wire.decode_request(b, LIMIT)),
    ("reply", lambda b: wire.decode_reply(b, LIMIT)),
    ("notification", lambda b: wire.decode_notification(b, LIMIT)),
    ("presence", lambda b: decode_presence(b, LIMIT, topic="t")),
]
OSLO_DECODER: Decoder = lambda b: oslo.decode_message(b, LIMIT)  # noqa: E731
ALL_DECODERS = [*KEEL_DECODERS, ("oslo", OSLO_DECODER)]


def total(decode: Decoder, data: bytes) -> Any:
    """Decode, returning the MalformedMessage instead of raising it; anything else fails."""
    try:
        return decode(data)
    except errors.MalformedMessage as exc:
        assert exc.problem in {
            "oversize", "depth", "containers", "range", "syntax", "version", "shape"
        }  # fmt: skip
        assert str(exc)
        return exc


def within_bounds(message: Any) -> None:
    """What a decoder returned carries no value deeper than MAX_DEPTH or ints past 64 bits."""
    if isinstance(message, errors.MalformedMessage):
        return
    values = [msgspec.to_builtins(message)]
    assert wire.nesting_problem(values[0], wire.MAX_DEPTH + 3, ints=True) is None


# --- strategies ------------------------------------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=wire.INT_MIN, max_value=wire.INT_MAX)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=8)
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=12,
)


@st.composite
def nested(draw: st.DrawFn) -> bytes:
    """A value nested anywhere from harmless to far past the recursion limit."""
    depth = draw(st.sampled_from([1, wire.MAX_DEPTH - 2, wire.MAX_DEPTH + 1, 500, 5000, 200_000]))
    opener = draw(st.sampled_from([b"\x91", b"\x81\xa1k", b"\xdc\x00\x01"]))
    return opener * depth + b"\xc0"


# Built once, outside the strategies (they use random ids).
_FIXED_CTX = wire.RequestContext(request_id="r", traceparent=f"00-{'0' * 32}-{'0' * 16}-01")
_CTX = msgspec.Raw(msgspec.msgpack.encode(poison._ctx_array()))
_REQUEST_POISON = [body for _, body in poison.request_bodies(LIMIT)]
_OSLO_POISON = [body for _, body in poison.oslo_bodies(LIMIT)]


@st.composite
def envelopes(draw: st.DrawFn) -> bytes:
    """Envelope-shaped arrays: the right length, any integers, nested or plain values."""
    head = draw(st.integers(min_value=wire.INT_MIN, max_value=wire.INT_MAX))
    field = st.one_of(
        values,
        st.integers(min_value=wire.INT_MIN, max_value=wire.INT_MAX),
        nested().map(msgspec.Raw),
        st.just(_CTX),
    )
    fields = draw(st.lists(field, max_size=11))
    return msgspec.msgpack.encode([head, *fields])


@st.composite
def damaged(draw: st.DrawFn) -> bytes:
    """A known poison body or a valid one, truncated, flipped or extended."""
    bodies = [
        *_REQUEST_POISON,
        wire.encode(wire.Reply(1, "r", draw(values)), 1 << 20),
        wire.encode(
            wire.Request(1, wire.CALL, "i", "m", _FIXED_CTX, {"a": draw(values)}),
            1 << 20,
        ),
    ]
    body = draw(st.sampled_from(bodies))
    how = draw(st.sampled_from(["as-is", "cut", "flip", "append"]))
    if how == "cut" and body:
        return body[: draw(st.integers(min_value=0, max_value=len(body) - 1))]
    if how == "flip" and body:
        at = draw(st.integers(min_value=0, max_value=min(len(body), 64) - 1))
        return body[:at] + bytes([body[at] ^ draw(st.integers(1, 255))]) + body[at + 1 :]
    if how == "append":
        return body + draw(st.binary(min_size=1, max_size=16))
    return body


hostile = st.one_of(st.binary(max_size=300), nested(), envelopes(), damaged())

json_hostile = st.one_of(
    st.binary(max_size=200),
    st.sampled_from(_OSLO_POISON),
    st.integers().map(lambda n: b'{"payload": %d}' % n),
    st.integers(min_value=1, max_value=50_000).map(lambda d: b"[" * d + b"]" * d),
    values.map(
        lambda v: msgspec.json.encode(
            {"oslo.version": "2.0", "oslo.message": msgspec.json.encode(
                {"message_id": "m", "publisher_id": "p", "event_type": "e",
                 "priority": "INFO", "timestamp": "t", "payload": v},
                enc_hook=repr).decode()},
        )
    ),
)  # fmt: skip

fast = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- properties ------------------------------------------------------------------------------


@fast
@given(data=hostile)
def test_keel_decoders_are_total_and_bounded(data: bytes) -> None:
    for _, decode in KEEL_DECODERS:
        within_bounds(total(decode, data))


@fast
@given(data=json_hostile)
def test_oslo_decoder_is_total_and_bounded(data: bytes) -> None:
    within_bounds(total(OSLO_DECODER, data))


@pytest.mark.parametrize(("name", "decode"), ALL_DECODERS, ids=[n for n, _ in ALL_DECODERS])
def test_every_known_poison_is_refused(name: str, decode: Decoder) -> None:
    bodies = {
        "request": poison.request_bodies(LIMIT),
        "reply": poison.keel_bodies(LIMIT),
        "notification": poison.notification_bodies(LIMIT),
        "presence": poison.presence_bodies(),
        "oslo": poison.oslo_bodies(LIMIT),
    }[name]
    for kind, body in bodies:
        found = total(decode, body)
        assert isinstance(found, errors.MalformedMessage), f"{name} accepted {kind}"


def test_an_oversize_body_is_refused_unread() -> None:
    garbage = b"\xc1" * (LIMIT + 1)  # not msgpack, not JSON: a reader that parsed it would say so
    for _, decode in ALL_DECODERS:
        found = total(decode, garbage)
        assert isinstance(found, errors.MalformedMessage)
        assert found.problem == "oversize"
        assert found.size == LIMIT + 1


@fast
@given(depth=st.integers(min_value=0, max_value=3 * wire.MAX_DEPTH))
def test_what_encodes_decodes_and_what_is_too_deep_fails_at_the_sender(depth: int) -> None:
    value: Any = None
    for _ in range(depth):
        value = [value]
    reply = wire.Reply(wire.ENVELOPE_VERSION, "id", value)
    request = wire.Request(1, wire.CAST, "i", "m", _FIXED_CTX, {"v": value})
    for message, decode in ((reply, wire.decode_reply), (request, wire.decode_request)):
        if depth > wire.MAX_DEPTH:
            with pytest.raises(errors.SerializationError, match="deep"):
                wire.encode(message, 1 << 20)
        else:
            assert decode(wire.encode(message, 1 << 20)) == message


def _too_deep() -> Any:
    value: Any = None
    for _ in range(wire.MAX_DEPTH + 2):
        value = [value]
    return value


def test_only_plain_values_skip_the_count_and_deep_ones_are_refused_wherever_they_hide() -> None:
    # Plain values whose text is full of container-marker bytes (UTF-8 continuation bytes
    # 0x80-0x9f) read back as they were: small and flat, they are never counted.
    text = "\u0400" * 300
    ctx = msgspec.structs.replace(_FIXED_CTX, deadline=time.time() + 30)
    flat = [
        wire.Request(1, wire.CALL, "i", "m", ctx, {"a": text, "b": 1, "c": None, "d": b"\x9f"}),
        wire.Reply(wire.ENVELOPE_VERSION, "id", text),
        wire.Notification(1, "m", "p", "e", "INFO", text, "t", ctx),
    ]
    decoders = (wire.decode_request, wire.decode_reply, wire.decode_notification)
    for message, decode in zip(flat, decoders, strict=True):
        body = wire.encode(message, 1 << 20)
        assert wire.openers(body, wire.NOT_MSGPACK_OPENERS) > wire.MAX_DEPTH
        assert decode(body, LIMIT) == message
    # A value too deep in a field the flat check looks at (not the arguments) is still refused,
    # by the sender and, sent past it, by the reader.
    deep = _too_deep()
    hidden = [
        (wire.Request(1, wire.CAST, "i", "m", msgspec.structs.replace(ctx, extra={"x": deep})),
         wire.decode_request),
        (wire.Reply(1, "id", None, wire.Failure("T", "m", fields={"x": deep})), wire.decode_reply),
        (wire.Notification(1, "m", "p", "e", "INFO", deep, "t", ctx), wire.decode_notification),
    ]  # fmt: skip
    for message, decode in hidden:
        with pytest.raises(errors.SerializationError, match="deep"):
            wire.encode(message, 1 << 20)
        with pytest.raises(errors.MalformedMessage) as refused:
            decode(msgspec.msgpack.encode(message), LIMIT)
        assert refused.value.problem == "depth"


@fast
@given(request_id=st.text(max_size=40), result=values)
def test_the_id_of_any_reply_is_read_from_its_first_bytes(request_id: str, result: Any) -> None:
    body = wire.encode(wire.Reply(wire.ENVELOPE_VERSION, request_id, result), 1 << 20)
    assert wire.reply_id(body) == request_id
    assert wire.reply_id(body[: 2 + len(request_id.encode()) + 2]) in (request_id, None)


@fast
@given(data=hostile)
def test_reply_id_is_total(data: bytes) -> None:
    found = wire.reply_id(data)
    assert found is None or isinstance(found, str)


def test_nesting_walk_is_iterative_and_counts_map_keys() -> None:
    deep: Any = None
    for _ in range(100_000):  # far past Python's recursion limit
        deep = [deep]
    assert wire.nesting_problem(deep) == "depth"
    key: Any = ()
    for _ in range(wire.MAX_DEPTH):
        key = (key,)
    assert wire.nesting_problem({key: 1}) == "depth"
    assert wire.nesting_problem({"a": [1, {"b": 2**64}]}, ints=True) == "range"
    assert wire.nesting_problem({"a": [1, {"b": 2**64 - 1}]}, ints=True) is None


# --- wide bombs: bounded cost ------------------------------------------------------------------

BOMB_CPU_SECONDS = 0.3  # CPU time to refuse one; it was 0.7 s and more before the collector
# was paused and the walk done in C (wall time on a loaded machine was several seconds)


def _bombs() -> list[tuple[str, Decoder, bytes]]:
    found: list[tuple[str, Decoder, bytes]] = []
    for name, body in poison.bomb_bodies():
        found.append((f"request-{name}", lambda b: wire.decode_request(b, 4 << 20), body))
    raw = msgspec.Raw(poison._array(b"\x90" * poison.WIDE, poison.WIDE))
    reply = msgspec.msgpack.encode([wire.ENVELOPE_VERSION, "r", raw])
    found.append(("reply", lambda b: wire.decode_reply(b, 4 << 20), reply))
    note = msgspec.msgpack.encode(
        [wire.ENVELOPE_VERSION, "m", "p", "e", "info", raw, "t", msgspec.Raw(_CTX)]
    )
    found.append(("notification", lambda b: wire.decode_notification(b, 4 << 20), note))
    for name, body in poison.oslo_bomb_bodies():
        found.append((f"oslo-{name}", lambda b: oslo.decode_message(b, 4 << 20), body))
    return found


@pytest.mark.parametrize(("name", "decode", "body"), _bombs(), ids=[n for n, _, _ in _bombs()])
def test_a_wide_bomb_is_refused_at_a_bounded_cost(name: str, decode: Decoder, body: bytes) -> None:
    # This thread's CPU, not the process's: threads other tests left (a blocking facade's
    # loop, an executor) must not count against the decode.
    started = time.thread_time()
    found = total(decode, body)
    spent = time.thread_time() - started
    assert spent < BOMB_CPU_SECONDS, f"{name}: {spent:.2f}s of CPU to read"
    assert isinstance(found, errors.MalformedMessage), name
    assert found.problem == "containers", found


def test_a_sender_is_told_before_readers_refuse_too_many_containers() -> None:
    many = [[] for _ in range(wire.MAX_CONTAINERS + 1)]
    with pytest.raises(errors.SerializationError, match="lists and maps"):
        wire.encode(wire.Reply(wire.ENVELOPE_VERSION, "r", many), 4 << 20)
    fine = [[] for _ in range(wire.MAX_CONTAINERS - 1)]
    body = wire.encode(wire.Reply(wire.ENVELOPE_VERSION, "r", fine), 4 << 20)
    assert wire.decode_reply(body).result == fine


def test_the_collector_is_running_after_any_decode() -> None:
    for _, decode, body in _bombs():
        total(decode, body)
        assert gc.isenabled()


def test_duplicate_keys_read_as_the_last_one_everywhere() -> None:
    """As Python's json and oslo.messaging read them: no reader sees another value."""
    args = b"\x82\xa5value\x01\xa5value\x02"
    request = wire.decode_request(poison._encode_request(args=msgspec.Raw(args)))
    assert request.args == {"value": 2}
    inner = (b'{"message_id": "m", "publisher_id": "p", "event_type": "e", "priority": "INFO",'
             b' "priority": "ERROR", "timestamp": "t", "payload": 1}')  # fmt: skip
    assert oslo.decode_message(inner).priority == "ERROR"
    outer = (
        b'{"oslo.version": "2.0", "oslo.message": "[]", "oslo.message": '
        + msgspec.json.encode(inner.decode())
        + b"}"
    )
    assert oslo.decode_message(outer).priority == "ERROR"


def test_nan_and_unicode_digits_never_pass_as_numbers() -> None:
    with pytest.raises(errors.ConfigError):
        parse_version("\u0661.\u0660")
    with pytest.raises(errors.ConfigError):
        parse_version("1.0\n")
    nan = msgspec.msgpack.encode(float("nan"))
    request = wire.decode_request(poison._encode_request(args=msgspec.Raw(b"\x81\xa1v" + nan)))
    assert request.args["v"] != request.args["v"]  # a NaN argument is data, passed as it is
