"""A poison flood is counted in full but logged at a bounded rate (keel.messaging._poison)."""

from __future__ import annotations

import logging
import time

import pytest

from keel.errors import MalformedMessage
from keel.messaging import _poison

log = logging.getLogger("keel.messaging.test")


def test_a_flood_is_counted_whole_and_logged_at_a_bounded_rate(
    caplog: pytest.LogCaptureFixture,
) -> None:
    queue = f"q-{time.monotonic_ns()}"
    bad = MalformedMessage("not a Keel request: bytes are not msgpack", problem="syntax")
    with caplog.at_level(logging.WARNING, logger="keel.messaging.test"):
        for _ in range(1000):
            _poison.note(log, "request", queue, bad, 3)
        lines = [r.getMessage() for r in caplog.records if queue in r.getMessage()]
        assert 1 <= len(lines) <= _poison.LOG_RATE + 1
        assert _poison.count("request", queue) == 1000
        time.sleep(1.5 / _poison.LOG_RATE)
        _poison.note(log, "request", queue, bad, 3)
    last = [r.getMessage() for r in caplog.records if queue in r.getMessage()][-1]
    assert f"unlogged={1000 - len(lines)}" in last
    assert "event=request.malformed" in last
    assert "problem=syntax" in last
