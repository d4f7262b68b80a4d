"""Hub stores: the protocol (`base`), SQLite (embedded default); scale-out store per ADR 0001."""

from keel.hub.stores.base import Store
from keel.hub.stores.sqlite import SQLiteStore

__all__ = ["SQLiteStore", "Store"]
