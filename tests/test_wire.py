"""Property tests for the wire codecs: whatever the contract says crosses, crosses intact;
anything else is a typed error; garbage never decodes silently."""

from __future__ import annotations

import datetime as dt
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from keel import errors, wire

values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text()
    | st.binary(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(), inner, max_size=5),
    max_leaves=20,
)


@given(args=st.dictionaries(st.text(min_size=1), values, max_size=5), method=st.text(min_size=1))
def test_requests_round_trip(args: dict[str, Any], method: str) -> None:
    request = wire.Request(
        wire.ENVELOPE_VERSION, wire.CALL, wire.new_id(), method, wire.RequestContext(), args
    )
    assert wire.decode_request(wire.encode(request, 1 << 30)) == request


@given(result=values)
def test_replies_round_trip(result: Any) -> None:
    reply = wire.Reply(wire.ENVELOPE_VERSION, "id", result)
    assert wire.decode_reply(wire.encode(reply, 1 << 30)) == reply


def test_datetimes_cross_aware() -> None:
    when = dt.datetime(2026, 11, 25, 12, 0, tzinfo=dt.UTC)
    reply = wire.decode_reply(wire.encode(wire.Reply(1, "id", {"at": when}), 1 << 20))
    assert reply.result == {"at": when}


@given(data=st.binary(max_size=200))
def test_garbage_is_a_malformed_message(data: bytes) -> None:
    for decode in (wire.decode_request, wire.decode_reply, wire.decode_notification):
        try:
            decoded = decode(data)
        except errors.MalformedMessage:
            continue
        assert isinstance(decoded, wire.Request | wire.Reply | wire.Notification)


def test_newer_envelope_says_upgrade() -> None:
    data = msgspec.msgpack.encode([wire.ENVELOPE_VERSION + 1, "x"])
    with pytest.raises(errors.MalformedMessage, match="upgrade"):
        wire.decode_request(data)


def test_unsupported_types_and_size() -> None:
    request = wire.Request(1, wire.CALL, "id", "m", wire.RequestContext(), {"x": {1, 2}})
    assert wire.decode_request(wire.encode(request, 1 << 20)).args == {"x": [1, 2]}
    with pytest.raises(errors.SerializationError, match="complex"):
        wire.encode(
            wire.Request(1, wire.CALL, "id", "m", wire.RequestContext(), {"x": 1j}), 1 << 20
        )
    with pytest.raises(errors.MessageTooLarge) as info:
        wire.encode(
            wire.Request(1, wire.CALL, "id", "m", wire.RequestContext(), {"x": b"1" * 100}), 50
        )
    assert info.value.limit == 50


def test_context_child_keeps_trace() -> None:
    parent = wire.RequestContext(user="u")
    child = parent.child(deadline=5.0, service="svc")
    assert child.trace_id == parent.trace_id
    assert child.traceparent != parent.traceparent
    assert child.depth == 1
    assert len(parent.traceparent.split("-")) == 4
