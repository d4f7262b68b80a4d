"""The history checker must catch every violation it claims to (it is useless if vacuous)."""

from __future__ import annotations

import pytest

from keel.coordination import Accepted, Event, check, violations
from keel.errors import HistoryViolation


def acq(client: str, fence: int, start: float, end: float) -> Event:
    return Event(client, "acquire", "l", fence, start, end)


def test_a_safe_history_passes() -> None:
    events = [acq("a", 1, 0, 1), acq("b", 2, 2, 3), acq("a", 5, 4, 5)]
    accepted = [Accepted(1, "l", 1, "a"), Accepted(2, "l", 2, "b"), Accepted(3, "l", 5, "a")]
    check(events, accepted)


def test_a_fence_going_backwards_is_caught() -> None:
    found = violations([acq("a", 5, 0, 1), acq("b", 3, 2, 3)], [])
    assert any("backwards" in v for v in found)


def test_a_fence_granted_twice_is_caught() -> None:
    found = violations([acq("a", 5, 0, 1), acq("b", 5, 0.5, 3)], [])
    assert any("twice" in v for v in found)


def test_a_stale_write_accepted_after_a_newer_one_is_caught() -> None:
    events = [acq("a", 1, 0, 1), acq("b", 2, 2, 3)]
    accepted = [Accepted(1, "l", 1, "a"), Accepted(2, "l", 2, "b"), Accepted(3, "l", 1, "a")]
    with pytest.raises(HistoryViolation) as info:
        check(events, accepted)
    assert len(info.value.violations) == 1  # type: ignore[attr-defined]


def test_a_write_with_a_fence_never_granted_is_caught() -> None:
    found = violations([acq("a", 1, 0, 1)], [Accepted(1, "l", 7, "a")])
    assert any("never granted" in v for v in found)


def test_overlapping_acquires_are_not_ordered() -> None:
    # b's acquire began before a's ended: either order of fences is linearizable.
    assert violations([acq("a", 5, 0, 2), acq("b", 3, 1, 3)], []) == []


def test_a_lost_update_is_caught() -> None:
    # b's increment was computed from the value a had already replaced.
    events = [acq("a", 1, 0, 1), acq("b", 2, 0.5, 3)]
    accepted = [
        Accepted(1, "l", 1, "a", read="0", wrote="1"),
        Accepted(2, "l", 2, "b", read="0", wrote="1"),
    ]
    found = violations(events, accepted)
    assert len(found) == 1
    assert "lost update" in found[0]


def test_a_chain_of_read_modify_writes_passes() -> None:
    events = [acq("a", 1, 0, 1), acq("b", 2, 2, 3)]
    accepted = [
        Accepted(1, "l", 1, "a", read="0", wrote="1"),
        Accepted(2, "l", 2, "b", read="1", wrote="2"),
        Accepted(3, "l", 2, "b", read=None, wrote="x"),  # a blind write, then a read of it
        Accepted(4, "l", 2, "b", read="x", wrote="y"),
    ]
    check(events, accepted)
