"""Property tests of the agent's wire format and frame decoder (pure, no I/O)."""

from __future__ import annotations

import contextlib

import msgspec
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from keel.agent import _protocol as p
from keel.agent._qga import parse
from keel.agent._qga import too_deep as too_deep_json
from keel.errors import FrameTooLarge, ProtocolError

ids = st.integers(min_value=0, max_value=2**63 - 1)
values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text() | st.binary(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=10,
)
messages = st.one_of(
    st.builds(p.Call, ids, st.text(), st.text(), st.dictionaries(st.text(), values, max_size=3)),
    st.builds(p.Data, ids, st.binary(max_size=5000), st.integers(0, 1), st.booleans()),
    st.builds(p.Credit, ids, st.integers(1, 1024)),
    st.builds(p.Cancel, ids),
    st.builds(p.Result, ids, values),
    st.builds(p.Error, ids, st.text(), st.text()),
    st.builds(p.Hello, st.tuples(st.integers(0, 10)), st.text(), st.integers(0, 2**31)),
)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for point in [*points, len(data)]:
        pieces.append(data[last:point])
        last = point
    return pieces


@given(st.lists(messages, max_size=8), st.lists(st.integers(0, 10**6), max_size=12))
def test_frames_round_trip_in_any_chunking(msgs: list[p.Message], cuts: list[int]) -> None:
    stream = b"".join(p.encode(m) for m in msgs)
    decoder = p.FrameDecoder()
    events = [e for piece in split(stream, cuts) for e in decoder.feed(piece)]
    assert all(isinstance(e, p.Frame) for e in events)
    assert [p.decode(e.payload) for e in events if isinstance(e, p.Frame)] == msgs
    assert decoder.buffered == 0


@settings(max_examples=300)
@given(st.binary(max_size=4096), st.lists(st.integers(0, 10**6), max_size=8))
def test_any_bytes_give_events_never_exceptions(data: bytes, cuts: list[int]) -> None:
    decoder = p.FrameDecoder(max_frame=1024)
    for piece in split(data, cuts):
        for event in decoder.feed(piece):
            if isinstance(event, p.Frame):
                with contextlib.suppress(ProtocolError):
                    p.decode(event.payload)
        # The decoder never holds more than one frame plus its header.
        assert decoder.buffered <= 1024 + p.HEADER.size


@given(st.binary(max_size=2048), st.integers(0, 2**64 - 1), st.lists(messages, max_size=3))
def test_garbage_then_sync_recovers(garbage: bytes, nonce: int, msgs: list[p.Message]) -> None:
    decoder = p.FrameDecoder(max_frame=4096)
    decoder.hunt()  # as after a reconnect: nothing before the sync token counts
    stream = garbage + p.sync_token(nonce) + b"".join(p.encode(m) for m in msgs)
    events = decoder.feed(stream)
    syncs = [i for i, e in enumerate(events) if isinstance(e, p.Sync) and e.nonce == nonce]
    assert syncs, events
    # Everything after our token is exactly our frames (garbage may hold its own tokens).
    tail = events[syncs[-1] + 1 :]
    assert [p.decode(e.payload) for e in tail if isinstance(e, p.Frame)] == msgs


def test_a_prefix_look_alike_before_the_token() -> None:
    # Found by hypothesis: a bare prefix right before a real token.
    decoder = p.FrameDecoder()
    decoder.hunt()
    assert decoder.feed(p.SYNC_PREFIX + p.sync_token(0)) == [p.Sync(0, ack=False)]


def test_oversize_length_is_refused_before_buffering() -> None:
    decoder = p.FrameDecoder(max_frame=1024)
    events = decoder.feed(p.HEADER.pack(p.MAGIC, 10**9) + b"x" * 100)
    assert len(events) == 1
    assert isinstance(events[0], p.Garbage)
    assert isinstance(events[0].error, FrameTooLarge)
    assert events[0].error.size == 10**9
    assert decoder.hunting
    assert decoder.buffered < 10


def test_sync_and_ack_tokens_at_frame_boundaries() -> None:
    decoder = p.FrameDecoder()
    stream = p.encode(p.Cancel(1)) + p.ack_token(7) + p.encode(p.Cancel(2)) + p.sync_token(9)
    events = decoder.feed(stream)
    assert events[1] == p.Sync(7, ack=True)
    assert events[3] == p.Sync(9, ack=False)
    assert p.decode(events[2].payload) == p.Cancel(2)  # type: ignore[union-attr]


def test_encode_checked_refuses_large_frames() -> None:
    with pytest.raises(FrameTooLarge) as info:
        p.encode_checked(p.Data(1, b"x" * 5000), limit=1024)
    assert info.value.limit == 1024


@example(b"\x91\xa1\x80")  # found by hypothesis: bad UTF-8 in the tag was a UnicodeDecodeError
@given(st.binary(max_size=512))
def test_decode_raises_only_protocol_error(payload: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        p.decode(payload)


def depth(value: object) -> int:
    if isinstance(value, list):
        return 1 + max((depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((depth(v) for v in value.values()), default=0)
    return 0


nested = st.recursive(
    st.none() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=300) | st.binary(max_size=300)
    | st.floats(allow_nan=False) | st.booleans(),
    lambda inner: st.lists(inner, max_size=20) | st.dictionaries(st.text(max_size=3), inner),
    max_leaves=30,
)  # fmt: skip


@settings(max_examples=100)
@given(nested, st.integers(0, 12))
def test_depth_scan_agrees_with_the_value(value: object, limit: int) -> None:
    data = msgspec.msgpack.encode(value)
    assert p.too_deep(data, limit) == (depth(value) > limit)
    assert not p.too_deep(data[: len(data) // 2], 10**6)  # truncated: left to the decoder


def test_deep_nesting_is_a_protocol_error_not_a_recursion_error() -> None:
    for opener in (b"\x91", b"\x81\xa1k", b"\xdc\x00\x01", b"\xdf\x00\x00\x00\x01\xa1k"):
        payload = b"\x93\xa6result\x01" + opener * 200_000 + b"\xc0"
        with pytest.raises(ProtocolError, match="nested"):
            p.decode(payload)
    ok = msgspec.msgpack.encode(["result", 1, [[[[[[]]]]]]])
    assert p.decode(ok) == p.Result(1, [[[[[[]]]]]])


def test_a_header_alone_allocates_nothing() -> None:
    decoder = p.FrameDecoder()
    assert decoder.feed(p.HEADER.pack(p.MAGIC, p.DEFAULT_MAX_FRAME)) == []
    assert decoder.buffered <= p.HEADER.size
    body = msgspec.msgpack.encode(["data", 1, b"x" * (p.DEFAULT_MAX_FRAME - 20)])
    frame = p.HEADER.pack(p.MAGIC, len(body)) + body
    decoder = p.FrameDecoder()
    decoder.feed(frame[:100_000])
    assert 90_000 < decoder.buffered <= 100_000  # what arrived, not what was announced
    events = decoder.feed(frame[100_000:])
    assert len(events) == 1
    assert decoder.buffered == 0


def test_qga_json_depth() -> None:
    assert too_deep_json(b"[" * 100_000, 64)
    assert not too_deep_json(b'["' + b"[" * 1000 + b'"]', 64)  # inside a string
    assert not too_deep_json(b'["\\"' + b"[" * 1000 + b'"]', 64)  # after an escaped quote
    assert too_deep_json(b'{"a": [{"b": [1]}]}', 3)
    assert not too_deep_json(b'{"a": [{"b": [1]}]}', 4)
    with pytest.raises(ProtocolError, match="nested"):
        parse(b"[" * 100_000 + b"]" * 100_000, "guest-ping")
    with pytest.raises(ProtocolError, match="not JSON"):
        parse(b"1" * 5000, "guest-ping")  # over Python's integer digit limit
