"""Property tests for the oslo notification codec (pure: no broker)."""

from __future__ import annotations

import contextlib
import json
import warnings
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from keel import errors
from keel.messaging.oslo import (
    OsloMessage,
    context_from_oslo,
    context_to_oslo,
    decode_message,
    encode_message,
)
from keel.wire import RequestContext

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # eventlet's deprecation notice on import
    from oslo_context import context as oslo_context
    from oslo_messaging._drivers import amqp as oslo_amqp
    from oslo_messaging._drivers import common as oslo_common

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**53), max_value=2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=15,
)
_RESERVED = {"user", "user_id", "project", "project_id", "tenant", "roles", "request_id"}
_RESERVED |= {"traceparent", "auth_token", "auth_token_info", "service_token", "password"}
extra_keys = st.text(min_size=1).filter(lambda k: k not in _RESERVED)

messages = st.builds(
    OsloMessage,
    message_id=st.uuids().map(str),
    publisher_id=st.text(),
    event_type=st.text(),
    priority=st.sampled_from(["INFO", "WARN", "ERROR", "AUDIT", "DEBUG", "CRITICAL", "SAMPLE"]),
    payload=json_values,
    timestamp=st.text(),
    context=st.dictionaries(st.text(), json_values, max_size=5),
    unique_id=st.uuids().map(lambda u: u.hex),
)


@given(messages)
def test_messages_round_trip(message: OsloMessage) -> None:
    assert decode_message(encode_message(message)) == message


@given(messages)
def test_the_envelope_is_what_oslo_messaging_reads(message: OsloMessage) -> None:
    outer = json.loads(encode_message(message))
    assert outer["oslo.version"] == "2.0"
    inner = oslo_common.deserialize_msg(outer)
    context = oslo_amqp.unpack_context(inner)
    assert inner["event_type"] == message.event_type
    assert inner["payload"] == message.payload
    assert inner["priority"] == message.priority
    assert {k: context.to_dict()[k] for k in message.context} == message.context


@given(messages, st.booleans())
def test_what_oslo_messaging_writes_decodes(message: OsloMessage, envelope: bool) -> None:
    # The driver's own steps: the message dict, _unique_id, _context_* keys, the envelope.
    raw: dict[str, Any] = {
        "message_id": message.message_id,
        "publisher_id": message.publisher_id,
        "event_type": message.event_type,
        "priority": message.priority,
        "payload": message.payload,
        "timestamp": message.timestamp,
    }
    oslo_amqp._add_unique_id(raw)
    oslo_amqp.pack_context(raw, message.context)
    body = json.dumps(oslo_common.serialize_msg(raw) if envelope else raw).encode()
    got = decode_message(body)
    assert got.payload == message.payload
    assert got.context == message.context
    assert got.unique_id == raw["_unique_id"]


@given(st.binary())
def test_garbage_is_malformed_never_a_crash(body: bytes) -> None:
    with contextlib.suppress(errors.MalformedMessage):
        decode_message(body)


@given(st.dictionaries(st.text(), json_values, max_size=6))
def test_foreign_json_is_malformed_or_complete(value: dict[str, Any]) -> None:
    try:
        got = decode_message(json.dumps(value).encode())
    except errors.MalformedMessage:
        return
    assert got.event_type == value["event_type"]


def test_wrong_envelope_versions_are_malformed() -> None:
    body = json.dumps({"oslo.version": "3.0", "oslo.message": "{}"}).encode()
    with pytest.raises(errors.MalformedMessage, match=r"3\.0"):
        decode_message(body)
    with pytest.raises(errors.MalformedMessage):
        decode_message(json.dumps({"oslo.version": "2.0", "oslo.message": "[1]"}).encode())
    with pytest.raises(errors.MalformedMessage, match="event_type"):
        decode_message(json.dumps({"oslo.version": "2.0", "oslo.message": "{}"}).encode())


def test_non_json_payloads_fail_at_the_sender() -> None:
    message = OsloMessage(
        message_id="m", publisher_id="p", event_type="e", priority="INFO",
        payload={"x": object()}, timestamp="t",
    )  # fmt: skip
    with pytest.raises(errors.SerializationError, match="object"):
        encode_message(message)


@given(
    user=st.none() | st.text(min_size=1),
    project=st.none() | st.text(min_size=1),
    roles=st.lists(st.text(), max_size=3).map(tuple),
    extra=st.dictionaries(extra_keys, json_values, max_size=4),
)
def test_context_round_trips(
    user: str | None, project: str | None, roles: tuple[str, ...], extra: dict[str, Any]
) -> None:
    ctx = RequestContext(user=user, project=project, roles=roles, extra=extra)
    back = context_from_oslo(msgspec.json.decode(msgspec.json.encode(context_to_oslo(ctx))))
    assert (back.user, back.project, back.roles) == (user, project, roles)
    assert (back.request_id, back.traceparent, back.extra) == (
        ctx.request_id,
        ctx.traceparent,
        extra,
    )


def test_oslo_context_maps_to_keel() -> None:
    oslo_ctx = oslo_context.RequestContext(
        user_id="u-1",
        project_id="p-1",
        roles=["admin", "member"],
        request_id="req-7f",
        global_request_id="req-global",
        auth_token="secret",
    )
    ctx = context_from_oslo(oslo_ctx.to_dict())
    assert (ctx.user, ctx.project, ctx.roles, ctx.request_id) == (
        "u-1",
        "p-1",
        ("admin", "member"),
        "req-7f",
    )
    assert ctx.extra["global_request_id"] == "req-global"
    assert "auth_token" not in ctx.extra
    assert context_from_oslo({"tenant": "t-1", "user": "u-2"}).project == "t-1"
