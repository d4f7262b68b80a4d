"""Duplicate suppression for casts, by idempotency key (the message id unless the caller set
one).

A server records a key after the handler succeeded and skips a later message with the same
key. `MemoryDedup` remembers a bounded window in the process (lost on restart);
`SQLiteDedup` keeps keys in a file, so duplicates are still caught after a restart, for
servers on one host sharing the file. Keys expire after ``ttl`` seconds.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections import OrderedDict
from typing import Protocol


class DedupStore(Protocol):
    def seen(self, key: str) -> bool: ...

    def remember(self, key: str) -> None: ...


class MemoryDedup:
    def __init__(self, max_keys: int = 100_000, ttl: float = 3600.0) -> None:
        self._keys: OrderedDict[str, float] = OrderedDict()
        self._max = max_keys
        self._ttl = ttl

    def seen(self, key: str) -> bool:
        stamp = self._keys.get(key)
        return stamp is not None and time.monotonic() - stamp < self._ttl

    def remember(self, key: str) -> None:
        self._keys[key] = time.monotonic()
        self._keys.move_to_end(key)
        while len(self._keys) > self._max:
            self._keys.popitem(last=False)


class SQLiteDedup:
    def __init__(self, path: str, ttl: float = 7 * 86400.0) -> None:
        self._ttl = ttl
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS keys (key TEXT PRIMARY KEY, at REAL)")
        self._db.execute("DELETE FROM keys WHERE at < ?", (time.time() - ttl,))

    def seen(self, key: str) -> bool:
        with self._lock:
            row = self._db.execute("SELECT at FROM keys WHERE key = ?", (key,)).fetchone()
        return row is not None and time.time() - float(row[0]) < self._ttl

    def remember(self, key: str) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO keys (key, at) VALUES (?, ?)", (key, time.time())
            )

    def close(self) -> None:
        self._db.close()
