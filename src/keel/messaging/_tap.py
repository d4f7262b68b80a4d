"""Traffic taps: where the messaging core reports who talks to whom (off by default).

The core calls the hooks below only while a tap is installed (one attribute check per
message otherwise). keel.map installs the tap that records the service graph; anything else
implementing `Tap` may too. A tap must be fast and must not raise: an exception from it is
logged once and the tap is removed, so traffic never fails because of observation.
"""

from __future__ import annotations

import logging
import os
from importlib.metadata import entry_points
from typing import Protocol

from keel._log import event

log = logging.getLogger("keel.messaging.tap")


class Tap(Protocol):
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
    ) -> None: ...

    def on_serve(
        self, *, topic: str, service: str, versions: dict[str, str], methods: list[str]
    ) -> None: ...

    def on_notify(self, *, publisher: str, topic: str, priority: str, event_type: str) -> None: ...

    def on_listen(self, *, topic: str, service: str, pool: str | None) -> None: ...


class _State:
    tap: Tap | None = None


state = _State()


def install(tap: Tap | None) -> None:
    """Install a tap (None removes it)."""
    state.tap = tap


def install_from_env() -> None:
    """``KEEL_MAP_DB=path`` turns the map tap on (found through the ``keel.taps`` entry
    point group, so messaging never imports the map)."""
    if state.tap is not None or not os.environ.get("KEEL_MAP_DB"):
        return
    for ep in entry_points(group="keel.taps"):
        if ep.name == "map":
            state.tap = ep.load()()
            return


def failed(exc: Exception) -> None:
    event(log, logging.ERROR, "tap.removed", error=repr(exc))
    state.tap = None
