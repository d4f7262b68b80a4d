"""Coordination histories: what each client saw, and a checker for the safety contract.

Clients append `Event`s (acquire, release, loss, fenced writes accepted or refused, each with
wall-clock start and end times on one host) to a JSON-lines file per client; the resource logs
the writes it accepted, in order. `check` then proves, or refutes with a list of violations:

1. fences never go backwards: for two acquires of one name where the first ended before the
   second began, the first fence is lower; no fence is handed out twice;
2. the resource accepted writes in non-decreasing fence order per key (so never a write from
   an older holder after a newer holder's write);
3. every accepted write carries a fence its writer was actually granted;
4. no update was lost: every accepted read-modify-write read the value the previous accepted
   write on its key had written (``Accepted.read``), so no write was computed from a value
   someone else had already replaced.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

import msgspec

from keel.errors import HistoryViolation

Kind = Literal["acquire", "release", "lost", "write", "refused"]


class Event(msgspec.Struct, frozen=True):
    client: str
    kind: Kind
    name: str
    fence: int
    start: float
    end: float


class Accepted(msgspec.Struct, frozen=True):
    """A write the fenced resource accepted, in the resource's own order; for a
    read-modify-write, ``read`` is the value its writer read and ``wrote`` the value written."""

    seq: int
    key: str
    fence: int
    client: str
    read: str | None = None
    wrote: str | None = None


class Recorder:
    """Appends one client's events to a JSON-lines file (flushed per event: a SIGKILLed
    client's history survives up to its last completed event)."""

    def __init__(self, path: str | Path, client: str) -> None:
        self.client = client
        self._file = open(path, "ab")  # noqa: SIM115 - kept open for the client's lifetime
        self._encoder = msgspec.json.Encoder()

    def record(self, kind: Kind, name: str, fence: int, start: float) -> None:
        event = Event(self.client, kind, name, fence, start, time.time())
        self._file.write(self._encoder.encode(event) + b"\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def load(paths: Iterable[str | Path]) -> list[Event]:
    decoder = msgspec.json.Decoder(Event)
    events: list[Event] = []
    for path in paths:
        lines = Path(path).read_bytes().splitlines()
        events.extend(decoder.decode(line) for line in lines if line.strip())
    return events


def violations(events: Sequence[Event], accepted: Sequence[Accepted]) -> list[str]:
    """Every way the history breaks the contract (empty when it is safe)."""
    acquires: dict[str, list[Event]] = defaultdict(list)
    for e in events:
        if e.kind == "acquire":
            acquires[e.name].append(e)
    granted = {(e.client, e.name, e.fence) for e in events if e.kind == "acquire"}
    return _fence_order(acquires) + _accepted_order(accepted, granted)


def _fence_order(acquires: dict[str, list[Event]]) -> list[str]:
    found: list[str] = []
    for name, acqs in acquires.items():
        seen: dict[int, Event] = {}
        for e in acqs:
            if e.fence in seen:
                found.append(f"{name}: fence {e.fence} granted twice ({seen[e.fence]}, {e})")
            seen[e.fence] = e
        by_end = sorted(acqs, key=lambda e: e.end)
        by_start = sorted(acqs, key=lambda e: e.start)
        # Compare each acquire with the highest fence among those that ended before it began.
        best: Event | None = None
        i = 0
        for e in by_start:
            while i < len(by_end) and by_end[i].end < e.start:
                if best is None or by_end[i].fence > best.fence:
                    best = by_end[i]
                i += 1
            if best is not None and e.fence <= best.fence:
                found.append(
                    f"{name}: fence went backwards: {e.client} got {e.fence} after "
                    f"{best.client} had got {best.fence}"
                )
    return found


def _accepted_order(accepted: Sequence[Accepted], granted: set[tuple[str, str, int]]) -> list[str]:
    found: list[str] = []
    last: dict[str, Accepted] = {}
    for w in sorted(accepted, key=lambda w: w.seq):
        prev = last.get(w.key)
        if prev is not None and w.fence < prev.fence:
            found.append(
                f"{w.key}: accepted fence {w.fence} from {w.client} after fence {prev.fence} "
                f"from {prev.client}"
            )
        if (w.client, w.key, w.fence) not in granted:
            found.append(f"{w.key}: accepted fence {w.fence} from {w.client}, never granted it")
        if w.read is not None and prev is not None and w.read != prev.wrote:
            found.append(
                f"{w.key}: lost update: {w.client} (fence {w.fence}) wrote {w.wrote!r} computed "
                f"from {w.read!r}, but {prev.client} (fence {prev.fence}) had already written "
                f"{prev.wrote!r}"
            )
        last[w.key] = w
    return found


def check(events: Sequence[Event], accepted: Sequence[Accepted]) -> None:
    """Raise `HistoryViolation` listing every violation, if any."""
    found = violations(events, accepted)
    if found:
        shown = "\n  ".join(found[:20])
        raise HistoryViolation(
            f"{len(found)} contract violation(s) in a history of {len(events)} events and "
            f"{len(accepted)} accepted writes:\n  {shown}",
            violations=found,
        )
