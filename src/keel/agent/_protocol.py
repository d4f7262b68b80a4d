"""The Keel agent wire protocol: frames, sync tokens and messages. Pure data, no I/O.

A frame is ``MAGIC (2 bytes) | length (u32, big-endian) | msgpack message``. Both sides
refuse a frame whose length is over the negotiated maximum. At a frame boundary a reader may
also meet a sync token (``SYNC_PREFIX | kind | nonce``): the controller sends ``SYNC`` after a
reconnect or when it saw garbage, the agent answers ``SYNC_ACK`` with the same nonce and both
sides continue from a clean frame boundary (as qemu-guest-agent's guest-sync-delimited does).

Failure semantics: `FrameDecoder.feed` never raises on any input. Bad magic or an oversize
length yields one `Garbage` event and puts the decoder in *hunting* mode, where it drops bytes
(keeping at most a token's length) until the next sync token. Its buffer never holds more than
one maximum frame plus a header, and grows only as bytes arrive: an announced length costs
nothing until the peer sends that much. Decoding a payload raises `ProtocolError` only; a
payload nested deeper than `MAX_DEPTH` is refused before the decoder sees it (msgspec would
recurse into it and raise `RecursionError`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import msgspec

from keel.errors import BadArguments, FrameTooLarge, ProtocolError

PROTOCOL_VERSIONS: tuple[int, ...] = (1,)
MAGIC = b"K\xe1"
HEADER = struct.Struct(">2sI")
SYNC_PREFIX = b"\xff\xfeKEEL"
SYNC_KIND = b"S"
ACK_KIND = b"A"
TOKEN = struct.Struct(">6scQ")  # prefix, kind, nonce
DEFAULT_MAX_FRAME = 4 * 1024 * 1024
MIN_MAX_FRAME = 64 * 1024
_BIG = 64 * 1024  # frames at least this long are assembled in a buffer of their own
MAX_DEPTH = 64  # containers within containers in one payload, the message itself included
DEFAULT_WINDOW = 8  # chunks in flight per stream before the receiver grants more credit
CHUNK = 1024 * 1024


# --- messages -------------------------------------------------------------------------------


class PluginInfo(msgspec.Struct, array_like=True, frozen=True):
    version: str
    commands: tuple[str, ...]


class Hello(msgspec.Struct, tag="hello", array_like=True):
    """Controller -> agent, first frame after a sync: what the controller speaks."""

    versions: tuple[int, ...]
    client: str
    max_frame: int


class Welcome(msgspec.Struct, tag="welcome", array_like=True):
    """Agent -> controller: the chosen version, who the agent is and what it offers."""

    version: int
    agent_version: str
    instance_id: str
    plugins: dict[str, PluginInfo]
    max_frame: int
    window: int


class Call(msgspec.Struct, tag="call", array_like=True, omit_defaults=True):
    """Run ``plugin.command``. ``timeout`` is relative (seconds) so clocks need not agree.
    ``window`` is how many `Data` frames the agent may send before it needs a `Credit`."""

    id: int
    plugin: str
    command: str
    args: dict[str, Any] = {}
    timeout: float | None = None
    window: int = DEFAULT_WINDOW


class Data(msgspec.Struct, tag="data", array_like=True, omit_defaults=True):
    """A chunk of a stream. ``stream`` 0 is stdout or file content, 1 is stderr; an upload
    ends with ``end=True`` (its data may be empty)."""

    id: int
    data: bytes
    stream: int = 0
    end: bool = False


class Credit(msgspec.Struct, tag="credit", array_like=True):
    """The receiver of a stream allows ``n`` more `Data` frames for request ``id``."""

    id: int
    n: int


class Cancel(msgspec.Struct, tag="cancel", array_like=True):
    id: int


class Result(msgspec.Struct, tag="result", array_like=True):
    """The last frame of a successful request."""

    id: int
    value: Any


class Error(msgspec.Struct, tag="error", array_like=True, omit_defaults=True):
    """The last frame of a failed request (``id`` 0: about the connection, not a request)."""

    id: int
    code: str
    message: str
    fields: dict[str, Any] = {}


Message = Hello | Welcome | Call | Data | Credit | Cancel | Result | Error

_encoder = msgspec.msgpack.Encoder()
_decoder: msgspec.msgpack.Decoder[Message] = msgspec.msgpack.Decoder(Message)


def encode(message: Message) -> bytearray:
    """A whole frame (header and payload) for one message."""
    # Encoded behind room for the header, so a file chunk is copied once, not twice.
    frame = bytearray(HEADER.size)
    _encoder.encode_into(message, frame, HEADER.size)
    HEADER.pack_into(frame, 0, MAGIC, len(frame) - HEADER.size)
    return frame


def encode_checked(message: Message, limit: int) -> bytearray:
    """Like `encode`, but raise `FrameTooLarge` instead of producing a frame over ``limit``."""
    try:
        frame = encode(message)
    except (TypeError, ValueError, OverflowError) as exc:
        raise BadArguments(f"cannot send {type(message).__name__}: {exc}") from None
    if len(frame) - HEADER.size > limit:
        raise FrameTooLarge(
            f"a {type(message).__name__} frame of {len(frame) - HEADER.size} bytes is over "
            f"the {limit}-byte frame limit; send smaller chunks",
            size=len(frame) - HEADER.size,
            limit=limit,
        )
    return frame


def decode(payload: bytes | bytearray | memoryview) -> Message:
    """Decode one frame's payload; raise `ProtocolError` naming what was wrong."""
    # Each level of nesting costs at least one byte, so a short payload needs no scan.
    if len(payload) > MAX_DEPTH and too_deep(payload, MAX_DEPTH):
        raise ProtocolError(f"agent frame nested deeper than {MAX_DEPTH} levels")
    try:
        return _decoder.decode(payload)
    except (msgspec.DecodeError, ValueError) as exc:  # ValueError: e.g. bad UTF-8 in a tag
        raise ProtocolError(f"undecodable agent frame: {exc}") from None


def _type_table() -> list[tuple[int, int, int]]:
    """Per msgpack type byte: (items, fixed, width). ``items`` > 0: a container of that many
    items (-1: a container whose item count is in the next ``width`` bytes, -2: the same for a
    map, two items per entry); otherwise a scalar of ``fixed`` bytes after the type byte plus
    a length field of ``width`` bytes and that many content bytes. (0, -1, 0): invalid."""
    table = [(0, 0, 0)] * 256  # fixints
    for b in range(0x80, 0x90):
        table[b] = ((b & 0x0F) * 2, 0, 0)  # fixmap
    for b in range(0x90, 0xA0):
        table[b] = (b & 0x0F, 0, 0)  # fixarray
    for b in range(0xA0, 0xC0):
        table[b] = (0, b & 0x1F, 0)  # fixstr
    sizes = {
        0xC1: (0, -1, 0),  # never used
        0xC4: (0, 0, 1), 0xC5: (0, 0, 2), 0xC6: (0, 0, 4),  # bin 8/16/32
        0xC7: (0, 1, 1), 0xC8: (0, 1, 2), 0xC9: (0, 1, 4),  # ext 8/16/32 (a type byte too)
        0xCA: (0, 4, 0), 0xCB: (0, 8, 0),  # float 32/64
        0xCC: (0, 1, 0), 0xCD: (0, 2, 0), 0xCE: (0, 4, 0), 0xCF: (0, 8, 0),  # uint 8..64
        0xD0: (0, 1, 0), 0xD1: (0, 2, 0), 0xD2: (0, 4, 0), 0xD3: (0, 8, 0),  # int 8..64
        0xD4: (0, 2, 0), 0xD5: (0, 3, 0), 0xD6: (0, 5, 0), 0xD7: (0, 9, 0), 0xD8: (0, 17, 0),
        0xD9: (0, 0, 1), 0xDA: (0, 0, 2), 0xDB: (0, 0, 4),  # str 8/16/32
        0xDC: (-1, 0, 2), 0xDD: (-1, 0, 4), 0xDE: (-2, 0, 2), 0xDF: (-2, 0, 4),  # array, map
    }  # fmt: skip
    for b, entry in sizes.items():
        table[b] = entry
    return table


_TYPES = _type_table()


def too_deep(buf: bytes | bytearray | memoryview, limit: int) -> bool:
    """True if the msgpack items in ``buf`` nest more than ``limit`` containers deep. Linear
    in the number of items; string and binary contents are skipped, not read. Truncated or
    invalid input returns False and is left for the decoder to refuse."""
    data = bytes(buf) if isinstance(buf, memoryview) else buf
    end = len(data)
    pos = 0
    left: list[int] = []  # items still to come in each open container
    while pos < end:
        kind = data[pos]
        items, fixed, width = _TYPES[kind]
        pos += 1
        if fixed < 0:
            return False
        if width:
            n = int.from_bytes(data[pos : pos + width], "big")
            pos += width
            if items < 0:
                items = n * -items
            else:
                pos += n
        pos += fixed
        if 0x80 <= kind <= 0x9F or 0xDC <= kind <= 0xDF:  # a container, even an empty one
            if len(left) >= limit:
                return True
            if items:
                left.append(items)
                continue
        while left:  # one item complete: close every container it completes
            left[-1] -= 1
            if left[-1]:
                break
            left.pop()
    return False


def sync_token(nonce: int) -> bytes:
    return TOKEN.pack(SYNC_PREFIX, SYNC_KIND, nonce)


def ack_token(nonce: int) -> bytes:
    return TOKEN.pack(SYNC_PREFIX, ACK_KIND, nonce)


# --- decoder --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Frame:
    payload: bytes | bytearray


@dataclass(frozen=True, slots=True)
class Sync:
    """A sync token: ``ack`` is False for a request (SYNC), True for an answer (SYNC_ACK)."""

    nonce: int
    ack: bool


@dataclass(frozen=True, slots=True)
class Garbage:
    """Bytes that are not a frame; the decoder now hunts for the next sync token."""

    error: ProtocolError


Event = Frame | Sync | Garbage


class _Again:
    """A step made progress without producing an event."""


_AGAIN = _Again()


class FrameDecoder:
    """Incremental frame decoder: feed it bytes in any chunking, get whole events back."""

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.max_frame = max_frame
        self.hunting = False
        self._buf = bytearray()
        self._pos = 0
        # A large frame's body is kept as the pieces it arrived in (a header alone holds
        # nothing) and joined once, when whole: no growing, compacting or copying meanwhile.
        self._parts: list[bytes | bytearray | memoryview] | None = None
        self._have = 0
        self._need = 0

    @property
    def buffered(self) -> int:
        """Bytes held that are not yet a whole event."""
        return len(self._buf) - self._pos + self._have

    @property
    def mid_frame(self) -> bool:
        """True when part of a frame or token has arrived but not all of it."""
        return not self.hunting and self.buffered > 0

    def hunt(self) -> None:
        """Drop what is buffered and skip bytes until the next sync token."""
        self.hunting = True
        self._buf.clear()
        self._pos = 0
        self._parts = None
        self._have = 0
        self._need = 0

    def feed(self, data: bytes | bytearray | memoryview) -> list[Event]:
        events: list[Event] = []
        view = memoryview(data)
        parts = self._parts
        if parts is not None:
            take = min(self._need - self._have, len(view))
            # A piece that is all of ``data`` is kept as it is (a channel hands over its
            # receive buffer and never touches it again); a part of one is copied.
            parts.append(data if take == len(view) == len(data) else bytes(view[:take]))
            self._have += take
            if self._have < self._need:
                return events
            events.append(Frame(b"".join(parts)))
            self._parts = None
            self._have = 0
            self._need = 0
            view = view[take:]
        self._buf += view
        while True:
            event = self._hunt_step() if self.hunting else self._frame_step()
            if event is None:
                break
            if not isinstance(event, _Again):
                events.append(event)
        if self._pos:
            if self._pos == len(self._buf):
                self._buf.clear()  # and give its memory back: a connection may sit idle
            else:
                del self._buf[: self._pos]
            self._pos = 0
        return events

    def _hunt_step(self) -> Event | _Again | None:
        at = self._buf.find(SYNC_PREFIX, self._pos)
        if at < 0:
            # Keep only a tail that might be the start of a prefix split across reads.
            self._pos = max(self._pos, len(self._buf) - (len(SYNC_PREFIX) - 1))
            return None
        self._pos = at
        event = self._token()
        if isinstance(event, Sync):
            self.hunting = False
        return event

    def _token(self) -> Event | _Again | None:
        if len(self._buf) - self._pos < TOKEN.size:
            return None
        _, kind, nonce = TOKEN.unpack_from(self._buf, self._pos)
        if kind not in (SYNC_KIND, ACK_KIND):
            if not self.hunting:
                return self._garbage(ProtocolError("garbage on the agent channel: bad token"))
            self._pos += 1  # a prefix look-alike; keep hunting past it
            return _AGAIN
        self._pos += TOKEN.size
        return Sync(nonce=nonce, ack=kind == ACK_KIND)

    def _frame_step(self) -> Event | _Again | None:
        avail = len(self._buf) - self._pos
        if avail < 2:
            return None
        if self._buf[self._pos] == SYNC_PREFIX[0]:
            if self._buf[self._pos : self._pos + len(SYNC_PREFIX)] == SYNC_PREFIX[:avail]:
                return self._token()
            return self._garbage(ProtocolError("garbage on the agent channel: bad frame magic"))
        if avail < HEADER.size:
            if self._buf[self._pos : self._pos + 2] != MAGIC:
                return self._garbage(ProtocolError("garbage on the agent channel: bad frame magic"))
            return None
        magic, length = HEADER.unpack_from(self._buf, self._pos)
        if magic != MAGIC:
            return self._garbage(ProtocolError("garbage on the agent channel: bad frame magic"))
        if length > self.max_frame:
            return self._garbage(
                FrameTooLarge(
                    f"peer announced a {length}-byte frame; the limit is {self.max_frame}",
                    size=length,
                    limit=self.max_frame,
                )
            )
        end = self._pos + HEADER.size + length
        if end > len(self._buf):
            if length >= _BIG:
                start = self._pos + HEADER.size
                with memoryview(self._buf) as held:
                    self._parts = [bytes(held[start:])]
                self._have = len(self._buf) - start
                self._need = length
                self._pos = len(self._buf)
            return None
        with memoryview(self._buf) as view:
            payload = bytes(view[self._pos + HEADER.size : end])
        self._pos = end
        return Frame(payload)

    def _garbage(self, error: ProtocolError) -> Event:
        self.hunt()
        return Garbage(error)
