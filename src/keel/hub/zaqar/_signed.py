"""Zaqar's signed URLs (pre-signed access to one queue), as pure functions.

The signature is Zaqar's: hex HMAC-SHA256, keyed by the operator's secret, over
``paths`` (sorted, comma-joined), the two characters ``\\n``, ``methods`` (sorted, joined),
``\\n``, the project, ``\\n`` and the expiry as ``%Y-%m-%dT%H:%M:%S`` UTC (Zaqar builds the
text from a raw string, so the separators are a backslash and an ``n``, not newlines). A URL
signed by a Zaqar with the same key verifies here, and the other way round.

What a signature grants: the listed methods on the listed paths (a path and what is below
it) of that project until the expiry. Unlike Zaqar, the signature is checked before any
path is looked at, and paths are compared as strings, never as regular expressions: Zaqar
runs ``re.search`` with the request's own ``URL-Paths`` header as the pattern before it
checks the signature.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import msgspec

DATE_FORMAT = "%Y-%m-%dT%H:%M:%S"
DEFAULT_LIFETIME = timedelta(days=1)


class SignedURL(msgspec.Struct):
    paths: list[str]
    methods: list[str]
    project: str
    expires: str
    signature: str


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def parse_expires(text: str) -> datetime:
    """An ISO 8601 time (naive means UTC) as naive UTC; `ValueError` otherwise."""
    if text.strip().lstrip("-").isdigit():
        raise ValueError(
            f"`expires` should be date format, for example 2016-01-01T00:00:00, "
            f"not integer value: {text[:40]}"
        )
    parsed = datetime.fromisoformat(text.strip())
    if parsed.tzinfo is not None:
        try:
            parsed = parsed.astimezone(UTC).replace(tzinfo=None)
        except OverflowError:  # 0001-01-01T00:00:00+01:00 is before year 1 in UTC
            raise ValueError(f"`expires` is out of range: {text[:40]}") from None
    return parsed


def _mac(
    key: bytes, paths: Sequence[str], methods: Sequence[str], project: str, expires: str
) -> str:
    text = r"%s\n%s\n%s\n%s" % (",".join(paths), ",".join(methods), project, expires)  # noqa: UP031
    return hmac.new(key, text.encode(), hashlib.sha256).hexdigest()


def sign(
    key: bytes,
    paths: Sequence[str],
    *,
    project: str,
    methods: Sequence[str] | None = None,
    expires: str | None = None,
) -> SignedURL:
    """Zaqar's ``create_signed_url``: `ValueError` for a bad list, expiry or one in the past."""
    if not paths or not all(isinstance(p, str) for p in paths):
        raise ValueError("`paths` must be a non-empty list")
    methods = ["GET"] if methods is None else list(methods)
    if not all(isinstance(m, str) for m in methods):
        raise ValueError("`methods` should be a list")
    when = _now() + DEFAULT_LIFETIME if expires is None else parse_expires(expires)
    if when <= _now():
        raise ValueError("`expires` is lower than the current time")
    stamp = when.strftime(DATE_FORMAT)
    p, m = sorted(paths), sorted(methods)
    return SignedURL(p, m, project, stamp, _mac(key, p, m, project, stamp))


def allows(
    key: bytes,
    *,
    signature: str,
    paths: Sequence[str],
    methods: Sequence[str],
    project: str,
    expires: str,
    method: str,
    path: str,
) -> bool:
    """Whether the signed data (as the ``URL-*`` headers carry it) lets ``method path`` in."""
    try:
        when = parse_expires(expires)
    except ValueError:
        return False
    if when <= _now():
        return False
    stamp = when.strftime(DATE_FORMAT)
    want = _mac(key, sorted(paths), sorted(methods), project, stamp)
    # As bytes: compare_digest refuses str with non-ASCII characters (a TypeError, a 500).
    if not hmac.compare_digest(want.encode(), signature.encode("utf-8", "replace")):
        return False
    return method in methods and any(path == p or path.startswith(p + "/") for p in paths)
