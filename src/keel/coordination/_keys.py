"""Backend keys for coordination objects (pure functions, no I/O)."""

from __future__ import annotations

from functools import lru_cache
from urllib.parse import quote


@lru_cache(maxsize=4096)  # the same names are locked over and over
def key_for(kind: str, *names: str) -> str:
    """The backend key of an object: ``kind/quoted-name/...`` (names may hold any text)."""
    return "/".join([kind, *(quote(n, safe="") or "%00" for n in names)])
