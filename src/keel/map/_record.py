"""The map tap: records who calls whom into a small SQLite file, shared by processes.

Each process aggregates in memory (counts, errors, a log-spaced latency histogram per edge)
and adds its aggregates to the file every ``flush_interval`` seconds and on `close`. Several
processes may write one file (SQLite serializes them). What is recorded: for every request a
client sends, the calling service and method, the topic, method, pattern, version and outcome;
for every server and listener that starts, what it serves or hears. No payloads are recorded.
Losing the tail of a killed process (at most one interval) loses counts, not correctness.
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
import time
from pathlib import Path

from keel import urls
from keel.map._otel import OtelExport

BUCKETS = 48  # log-spaced latency buckets: 10 us * 1.5**i, up to about 2.5 hours


def bucket_of(seconds: float) -> int:
    if seconds <= 1e-5:
        return 0
    return min(BUCKETS - 1, int(math.log(seconds / 1e-5, 1.5)) + 1)


def bucket_seconds(index: int) -> float:
    return 1e-5 * 1.5**index


SCHEMA = """
CREATE TABLE IF NOT EXISTS edges (
    caller TEXT, caller_method TEXT, topic TEXT, method TEXT, pattern TEXT, version TEXT,
    count INTEGER, errors INTEGER, timeouts INTEGER, hist TEXT, first REAL, last REAL,
    PRIMARY KEY (caller, caller_method, topic, method, pattern, version)
);
CREATE TABLE IF NOT EXISTS serves (
    topic TEXT PRIMARY KEY, service TEXT, versions TEXT, methods TEXT, at REAL
);
CREATE TABLE IF NOT EXISTS notifies (
    publisher TEXT, topic TEXT, priority TEXT, event_type TEXT, count INTEGER, first REAL,
    last REAL, PRIMARY KEY (publisher, topic, priority, event_type)
);
CREATE TABLE IF NOT EXISTS listens (
    topic TEXT, service TEXT, pool TEXT, at REAL, PRIMARY KEY (topic, service, pool)
);
"""

_EdgeKey = tuple[str, str, str, str, str, str]


def connect_db(path: str | Path) -> sqlite3.Connection:
    db = sqlite3.connect(str(path), timeout=30, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(SCHEMA)
    return db


class MapTap:
    """A `keel.messaging` tap that writes the service graph to ``path``."""

    def __init__(
        self,
        path: str | Path | None = None,
        *,
        flush_interval: float = 1.0,
        otel: OtelExport | None = None,
    ) -> None:
        if otel is None and urls.from_env("map_otel", "") in ("1", "true", "yes"):
            otel = OtelExport()
        self._otel = otel
        self.path = Path(path or urls.from_env("map_db", ".keel/map.db"))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = connect_db(self.path)
        self._lock = threading.Lock()
        self._edges: dict[_EdgeKey, list[int | float]] = {}
        self._hists: dict[_EdgeKey, list[int]] = {}
        self._notes: dict[tuple[str, str, str, str], list[float]] = {}
        self._flush_interval = flush_interval
        self._last_flush = time.monotonic()

    def on_request(
        self,
        *,
        caller: str,
        caller_method: str | None,
        topic: str,
        method: str,
        pattern: str,
        version: str,
        outcome: str,
        seconds: float,
        traceparent: str,
    ) -> None:
        if self._otel is not None:
            self._otel.span(
                caller=caller,
                topic=topic,
                method=method,
                pattern=pattern,
                version=version,
                outcome=outcome,
                seconds=seconds,
                traceparent=traceparent,
            )
        key = (caller, caller_method or "", topic, method, pattern, version)
        now = time.time()
        with self._lock:
            row = self._edges.get(key)
            if row is None:
                row = self._edges[key] = [0, 0, 0, now, now]
                self._hists[key] = [0] * BUCKETS
            row[0] += 1
            row[1] += outcome == "error"
            row[2] += outcome == "timeout"
            row[4] = now
            if pattern == "call":
                self._hists[key][bucket_of(seconds)] += 1
        self._maybe_flush()

    def on_serve(
        self, *, topic: str, service: str, versions: dict[str, str], methods: list[str]
    ) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO serves VALUES (?, ?, ?, ?, ?)",
                (topic, service, json.dumps(versions), json.dumps(methods), time.time()),
            )

    def on_notify(self, *, publisher: str, topic: str, priority: str, event_type: str) -> None:
        now = time.time()
        with self._lock:
            row = self._notes.setdefault((publisher, topic, priority, event_type), [0, now, now])
            row[0] += 1
            row[2] = now
        self._maybe_flush()

    def on_listen(self, *, topic: str, service: str, pool: str | None) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO listens VALUES (?, ?, ?, ?)",
                (topic, service, pool or "", time.time()),
            )

    def _maybe_flush(self) -> None:
        if time.monotonic() - self._last_flush >= self._flush_interval:
            self.flush()

    def flush(self) -> None:
        with self._lock:
            edges, hists, notes = self._edges, self._hists, self._notes
            self._edges, self._hists, self._notes = {}, {}, {}
            self._last_flush = time.monotonic()
            if not edges and not notes:
                return
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                for key, row in edges.items():
                    count, errors, timeouts = int(row[0]), int(row[1]), int(row[2])
                    first, last = float(row[3]), float(row[4])
                    old = db.execute(
                        "SELECT count, errors, timeouts, hist, first FROM edges WHERE caller=? "
                        "AND caller_method=? AND topic=? AND method=? AND pattern=? AND version=?",
                        key,
                    ).fetchone()
                    hist = hists[key]
                    if old is not None:
                        hist = [a + b for a, b in zip(hist, json.loads(old[3]), strict=True)]
                        count, errors, timeouts = count + old[0], errors + old[1], timeouts + old[2]
                        first = min(first, old[4])
                    db.execute(
                        "INSERT OR REPLACE INTO edges VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                        (*key, count, errors, timeouts, json.dumps(hist), first, last),
                    )
                for nkey, (ncount, nfirst, nlast) in notes.items():
                    db.execute(
                        "INSERT INTO notifies VALUES (?,?,?,?,?,?,?) ON CONFLICT DO UPDATE SET "
                        "count = count + excluded.count, last = excluded.last",
                        (*nkey, int(ncount), nfirst, nlast),
                    )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    def close(self) -> None:
        self.flush()
        self._db.close()
