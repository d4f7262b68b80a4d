"""What the hub reads from clients, parsed strictly: pure functions, no I/O.

Every failure is `BadRequest` (a 400, or a WebSocket ``error`` frame) naming the field and the
limit, never a `RecursionError`, `OverflowError` or `ValueError` from below:

- JSON nests at most `MAX_DEPTH` levels. The depth is measured on the bytes before anything
  is decoded (strings blanked out, then one pass per level removes the innermost empty
  pairs), so a body of 10^5 brackets costs a few scans in C, never a decoder's recursion.
- A JSON object names each member once: ``{"type": "a", "type": "b"}`` is refused (which
  one a decoder keeps differs from one to the next, so a filter and a consumer could read
  different events). Counting colons outside strings against the members decoded finds a
  repeat without a second decoder.
- Numbers a client writes (sequence numbers, limits, ``Last-Event-ID``, ``Content-Length``)
  are ASCII decimal digits only (``str.isdigit`` also passes ``²`` and ``٣``, which ``int``
  refuses) of at most 19 digits, in a range: `MAX_SEQ` unless told otherwise.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

from keel.errors import BadRequest

MAX_DEPTH = 64
MAX_SEQ = 2**62  # what both stores hold in a signed 64-bit column, with room to add

_DIGITS = re.compile(r"[0-9]{1,19}")  # a str pattern's [0-9] is ASCII, unlike \d
# A JSON string; one left open runs to the end of the body (the closing quote is optional):
# else the scan failing at the end would restart at each quote inside it, and a body of
# escaped quotes (``"\"\"...``) cost a scan per quote. Such a body is invalid JSON anyway,
# and its decoder stops at that string, never reaching the brackets blanked out with it.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"?', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_ONE_KIND = bytes.maketrans(b"{}", b"[]")  # mismatched pairs are bad JSON anyway
_TOO_DEEP = b"[" * (MAX_DEPTH + 1)


def parse_uint(raw: str, name: str, *, maximum: int = MAX_SEQ, minimum: int = 0) -> int:
    """``raw`` as an integer in ``minimum..maximum``, written in ASCII digits."""
    if not _DIGITS.fullmatch(raw):
        raise BadRequest(
            f"{name} must be a decimal integer {minimum}..{maximum} in ASCII digits, "
            f"not {raw[:40]!r}",
            field=name,
        )
    value = int(raw)
    if not minimum <= value <= maximum:
        raise BadRequest(f"{name} must be {minimum}..{maximum}, not {value}", field=name)
    return value


def integer(value: Any, name: str, *, minimum: int, maximum: int) -> int:
    """A JSON number that is an integer (``3`` or ``3.0``, as JSON Schema counts them) in
    ``minimum..maximum``; booleans, fractions, strings and the rest are refused."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if type(value) is not int or not minimum <= value <= maximum:
        raise BadRequest(f"{name} must be an integer {minimum}..{maximum}", field=name)
    return value


def depth(body: bytes) -> int | None:
    """None when ``body`` nests at most `MAX_DEPTH` levels, else a depth it exceeds."""
    if body.count(b"[") + body.count(b"{") <= MAX_DEPTH:
        return None
    brackets = _STRING.sub(b"", body).translate(_ONE_KIND, _NOT_BRACKETS)
    if _TOO_DEEP in brackets:
        return MAX_DEPTH + 1
    # One level per pass: replace() scans once, left to right, without overlaps.
    for _ in range(MAX_DEPTH):
        brackets = brackets.replace(b"[]", b"")
        if not brackets:
            return None
    return MAX_DEPTH + 1


def check_depth(body: bytes, what: str = "body") -> None:
    if depth(body) is not None:
        raise BadRequest(
            f"{what} nests deeper than {MAX_DEPTH} levels of arrays and objects",
            field=what,
            limit=MAX_DEPTH,
        )


def decode_json(body: bytes | str, what: str = "body") -> Any:
    """Decode JSON of bounded depth; `BadRequest` for anything else."""
    raw = body.encode() if isinstance(body, str) else body
    check_depth(raw, what)
    try:
        value = msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise BadRequest(f"{what} is not valid JSON: {exc}", field=what) from None
    except RecursionError:  # unreachable after check_depth; kept as the last line of defence
        raise BadRequest(f"{what} nests too deeply", field=what, limit=MAX_DEPTH) from None
    check_unique(raw, value, what)
    return value


def _members(value: Any) -> int:
    """Object members in a decoded JSON value (of bounded depth: the recursion is too)."""
    if isinstance(value, dict):
        return len(value) + sum(_members(v) for v in value.values() if isinstance(v, dict | list))
    if isinstance(value, list):
        return sum(_members(v) for v in value if isinstance(v, dict | list))
    return 0


def check_unique(raw: bytes, value: Any, what: str = "body") -> None:
    """Refuse an object in ``raw`` (valid JSON, decoded as ``value``) naming a member twice.

    Every member has one colon outside strings; a decoder keeps one member per name. So
    colons outside strings exceeding the members decoded means a repeat. The count of all
    colons bounds the first from above: when it equals the members, no string is scanned."""
    colons = raw.count(b":")
    if not colons:
        return
    members = _members(value)
    if colons == members:
        return
    if _STRING.sub(b"", raw).count(b":") != members:
        raise BadRequest(f"{what} names a member of an object more than once", field=what)


def no_repeats(items: list[tuple[str, str]]) -> None:
    """Refuse a query parameter given twice (which of the values would count is a guess)."""
    seen: set[str] = set()
    for name, _ in items:
        if name in seen:
            raise BadRequest(f"query parameter {name!r} is given more than once", field=name)
        seen.add(name)
