"""Poison bodies: what a hostile or broken publisher can put on a Keel queue.

Shared by the poison conformance test (tests/conformance/test_messaging_poison.py), the
decoder property tests (tests/test_wire_hostile.py) and the poison benchmark
(bench/rpc_poison.py), so all three attack with the same bytes. Every body here is one a Keel
reader must refuse with `MalformedMessage`, whatever it costs to find out.
"""

from __future__ import annotations

import random
from typing import Any

import msgspec

from keel import wire

DEEP = 200_000  # nesting levels of the deep bodies (the 200 KB bodies)
JUST_TOO_DEEP = 100  # over Keel's own limit (wire.MAX_DEPTH), under Python's recursion limit


def _encode_request(**changes: Any) -> bytes:
    """A cast of ``record``, every field in wire order, some replaced by values the Request
    Struct would never hold."""
    fields: dict[str, Any] = {
        "v": wire.ENVELOPE_VERSION,
        "kind": wire.CAST,
        "id": wire.new_id(),
        "method": "record",
        "ctx": _ctx_array(),
        "args": {"value": 1},
        "namespace": None,
        "version": "1.0",
        "reply_to": None,
        "server": None,
        "attempt": 1,
    }
    fields.update(changes)
    return msgspec.msgpack.encode(list(fields.values()))


def _ctx_array(**changes: Any) -> list[Any]:
    """A RequestContext in wire order with some fields replaced."""
    fields: dict[str, Any] = {
        "request_id": "req-poison",
        "user": None,
        "project": None,
        "roles": [],
        "traceparent": wire.new_traceparent(),
        "deadline": None,
        "service": None,
        "depth": 0,
        "extra": {},
    }
    fields.update(changes)
    return list(fields.values())


def nested_array(depth: int, leaf: bytes = b"\xc0") -> bytes:
    return b"\x91" * depth + leaf


def nested_map(depth: int) -> bytes:
    return b"\x81\xa1k" * depth + b"\xc0"


def _with_args_raw(raw: bytes) -> bytes:
    return _encode_request(args={"value": msgspec.Raw(raw)})


def keel_bodies(limit: int) -> list[tuple[str, bytes]]:
    """Bodies no Keel reader (request, reply or notification queue) may accept.

    ``limit`` is the reader's ``max_message_bytes``: one body is just over it.
    """
    valid = _encode_request()
    rng = random.Random(16)
    return [
        ("deep-array", nested_array(DEEP)),
        ("deep-map", nested_map(DEEP // 3)),
        ("deep-inside-args", _with_args_raw(nested_array(DEEP))),
        ("just-too-deep", _with_args_raw(nested_array(JUST_TOO_DEEP))),
        ("just-too-deep-map-key", _with_args_raw(b"\x81" + nested_array(JUST_TOO_DEEP) + b"\xc0")),
        ("just-too-deep-context", _encode_request(ctx=_ctx_array(
            extra={"x": msgspec.Raw(nested_array(JUST_TOO_DEEP))}))),
        ("huge-version", _encode_request(v=2**64 - 1)),
        ("huge-kind", _encode_request(kind=2**63)),
        ("negative-attempt", _encode_request(attempt=-(2**63))),
        ("nan-deadline", _encode_request(ctx=_ctx_array(deadline=float("nan")))),
        ("infinite-deadline", _encode_request(ctx=_ctx_array(deadline=float("inf")))),
        ("huge-depth", _encode_request(ctx=_ctx_array(depth=2**64 - 1))),
        ("huge-version-digits", _encode_request(version="9" * 5000 + ".0")),
        ("truncated", valid[: len(valid) // 2]),
        ("array-header-lies", b"\xdd\xff\xff\xff\xff"),
        ("string-header-lies", valid[:3] + b"\xdb\xff\xff\xff\xff"),
        ("newer-version", msgspec.msgpack.encode([wire.ENVELOPE_VERSION + 1, "from the future"])),
        ("version-zero", _encode_request(v=0)),
        ("unknown-kind", _encode_request(kind=7)),
        ("oversize", _encode_request(args={"value": b"x" * (limit + 1)})),
        ("wrong-shape-map", msgspec.msgpack.encode({"v": 1, "kind": 1})),
        ("wrong-shape-scalar", msgspec.msgpack.encode(42)),
        ("wrong-shape-types", _encode_request(id=123, method=["m"])),
        ("bad-utf8", _encode_request(method=msgspec.Raw(b"\xa2\xff\xfe"))),
        ("empty", b""),
        ("json", msgspec.json.encode({"oslo.message": "{}"})),
        ("random", rng.randbytes(256)),
    ]  # fmt: skip


WIDE = 500_000  # containers in a wide bomb (the "1 MiB of 500k empty lists")


def _array(items: list[bytes] | bytes, count: int | None = None) -> bytes:
    body = items if isinstance(items, bytes) else b"".join(items)
    n = count if count is not None else len(items)
    return b"\xdd" + n.to_bytes(4, "big") + body


def wide_bomb(count: int = WIDE, item: bytes = b"\x90") -> bytes:
    """A cast whose one argument is ``count`` containers side by side (empty lists by
    default): shallow and small enough for every size limit, costly to decode."""
    return _with_args_raw(_array(item * count, count))


def bomb_bodies() -> list[tuple[str, bytes]]:
    """Wide container bombs of every shape a reader decodes: past `wire.MAX_CONTAINERS`."""
    just_over = wire.MAX_CONTAINERS + 1
    ctx = _ctx_array(extra={"x": msgspec.Raw(_array(b"\x90" * just_over, just_over))})
    key_arrays = b"".join(
        b"\x91" + b"\xce" + i.to_bytes(4, "big") + b"\xc0" for i in range(WIDE // 4)
    )
    return [
        ("empty-lists", wide_bomb()),
        ("empty-maps", wide_bomb(item=b"\x80")),
        ("lists-of-one", wide_bomb(WIDE // 2, b"\x91\xc0")),
        ("just-over", wide_bomb(just_over)),
        ("in-the-context", _encode_request(ctx=ctx)),
        ("array-map-keys", _with_args_raw(b"\xdf" + (WIDE // 4).to_bytes(4, "big") + key_arrays)),
    ]  # fmt: skip


def oslo_bomb_bodies() -> list[tuple[str, bytes]]:
    """Wide JSON bombs, in both oslo envelope versions."""
    lists = "[" + ",".join(["[]"] * (WIDE // 2)) + "]"
    inner = ('{"message_id": "m", "publisher_id": "p", "event_type": "e", "priority": "INFO", '
             '"timestamp": "t", "payload": ' + lists + "}")  # fmt: skip
    return [
        ("v1", inner.encode()),
        ("v2", msgspec.json.encode({"oslo.version": "2.0", "oslo.message": inner})),
    ]


def request_bodies(limit: int) -> list[tuple[str, bytes]]:
    """Poison for a request queue: the Keel poison, plus valid Keel messages of another kind."""
    reply = wire.encode(wire.Reply(wire.ENVELOPE_VERSION, wire.new_id(), 1), 1 << 20)
    return [*keel_bodies(limit), ("a-reply", reply)]


def notification_bodies(limit: int) -> list[tuple[str, bytes]]:
    return [*keel_bodies(limit), ("a-request", _encode_request())]


def oslo_bodies(limit: int) -> list[tuple[str, bytes]]:
    """Bodies oslo's JSON decoder (both envelope versions) must refuse."""
    inner: dict[str, Any] = {
        "message_id": "m-1",
        "publisher_id": "compute.host1",
        "event_type": "compute.instance.create.end",
        "priority": "INFO",
        "payload": {"id": 1},
        "timestamp": "2026-01-01 00:00:00.000000",
    }

    def v2(message: str, version: str = "2.0") -> bytes:
        return msgspec.json.encode({"oslo.version": version, "oslo.message": message})

    deep_json = "[" * (DEEP // 2) + "]" * (DEEP // 2)  # 200 KB
    deep_payload = ('{"message_id": "m", "publisher_id": "p", "event_type": "e", '
                    '"priority": "INFO", "timestamp": "t", "payload": '
                    + "[" * JUST_TOO_DEEP + "]" * JUST_TOO_DEEP + "}")  # fmt: skip
    return [
        ("deep-json", deep_json.encode()),
        ("deep-json-inside-v2", v2(deep_json)),
        ("just-too-deep-v1", deep_payload.encode()),
        ("just-too-deep-v2", v2(deep_payload)),
        ("huge-int", b'{"payload": ' + b"9" * 5000 + b"}"),
        ("int-over-64-bits", msgspec.json.encode({**inner, "payload": {"n": 2**70}})),
        ("int-over-64-bits-v2", v2(msgspec.json.encode({**inner, "payload": 2**70}).decode())),
        ("float-overflow", b'{"payload": 1e400}'),
        ("nan", b'{"payload": NaN}'),
        ("truncated", v2(msgspec.json.encode(inner).decode())[:40]),
        ("newer-envelope", v2(msgspec.json.encode(inner).decode(), "3.0")),
        ("envelope-not-a-string", msgspec.json.encode({"oslo.version": "2.0",
                                                       "oslo.message": {"a": 1}})),
        ("inner-not-an-object", v2("[1, 2]")),
        ("v1-missing-fields", msgspec.json.encode({"payload": 1})),
        ("not-an-object", b"[]"),
        ("bad-utf8", b'{"payload": "\xff\xfe"}'),
        ("empty", b""),
        ("msgpack", _encode_request()),
        ("oversize", msgspec.json.encode({**inner, "payload": "x" * (limit + 1)})),
    ]  # fmt: skip


def presence_bodies() -> list[tuple[str, bytes]]:
    """Announcements no client may believe: they would pin or lift a version cap forever."""

    def announce(**changes: Any) -> bytes:
        fields: dict[str, Any] = {
            "v": wire.ENVELOPE_VERSION,
            "topic": "t",
            "server": "evil",
            "state": "serving",
            "versions": {"": "1.0"},
            "interval": 2.0,
            "at": 1.0,
        }
        fields.update(changes)
        return msgspec.msgpack.encode(list(fields.values()))

    return [
        ("deep", nested_array(DEEP)),
        ("nan-interval", announce(interval=float("nan"))),
        ("infinite-interval", announce(interval=float("inf"))),
        ("negative-interval", announce(interval=-1.0)),
        ("bad-version", announce(versions={"": "one"})),
        ("unicode-digits", announce(versions={"": "\u0661.\u0660"})),
        ("huge-version", announce(versions={"": "9" * 5000 + ".0"})),
        ("bad-state", announce(state="x" * 10_000)),
        ("truncated", announce()[:10]),
        ("empty", b""),
        ("another-topic", announce(topic="not-t")),
        ("too-large", announce(server="s" * 200, versions={f"n{i}": "1.0" for i in range(256)},
                               state="x" * 32) + b"\x00" * (200 * 1024)),
    ]  # fmt: skip
