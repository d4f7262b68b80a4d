"""A flood rides other tenants' commits (`Hub._flood_waits`): while a tenant that was not
held back at admission is active, the events of tenants that were commit with that tenant's
events, and on their own only ``flood_gap`` after the last commit ended. Before, the flood
kept the writer busy all the time: every quiet event waited for the flood's commit in
flight, then for its own (bench hub, SQLite: the quiet tenant's pending wait p50 0.8 ms,
now 0.04 ms; 560-690 commits of the flood's own in 5 s, now 15-120)."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from keel.hub import Hub, StaticTokens, Store
from tests.hub.conftest import TOKENS, Commits, tenant_event

FLOOD, QUIET, OTHER = "p-one", "p-two", "p-three"


@asynccontextmanager
async def _hub(store: Store, *, gap: float) -> AsyncIterator[tuple[Hub, Commits]]:
    hub = Hub(store, StaticTokens(TOKENS), fair_share=1, fair_window=30, flood_gap=gap)
    commits = Commits(store)
    await hub.start()
    try:
        yield hub, commits
    finally:
        await hub.stop()


def _flood(hub: Hub, tenant: str, n: int) -> list[asyncio.Task[None]]:
    return [asyncio.create_task(hub.ingest(tenant_event(tenant))) for _ in range(n)]


async def test_a_floods_own_commits_wait_the_gap_while_a_quiet_tenant_is_active(
    store: Store,
) -> None:
    gap = 0.05
    async with _hub(store, gap=gap) as (hub, commits):
        await hub.ingest(tenant_event(QUIET))  # active from now on (fair_window 30 s)
        flood = _flood(hub, FLOOD, 12)
        async with asyncio.timeout(30):
            await asyncio.gather(*flood)  # nothing starves
        own = commits.of_only({FLOOD})
        assert len(own) >= 10  # fair share 1: one event a commit
        # Each of the flood's own commits but its first started at least the gap after the
        # commit before it ended (a little slack for the loop's timer resolution); its last
        # was admitted with nobody left in its line, so it is held back no more.
        starts = [c[0] for c in commits.log]
        for i, (start, _, tenants) in enumerate(commits.log[:-1]):
            if i >= 2 and tenants == {FLOOD}:
                assert start - commits.log[i - 1][1] >= gap * 0.8, (i, starts)


async def _until_waiting(hub: Hub, commits: Commits) -> None:
    """Until the flood's events wait for a ride: pending, and none of them committed."""
    for _ in range(200):
        await asyncio.sleep(0.01)
        if hub._pending and hub._flood_wake is not None:
            break
    await asyncio.sleep(0.1)
    assert hub._pending
    assert not commits.of_only({FLOOD})


async def test_a_quiet_event_rides_at_once_with_the_floods_waiting_events(store: Store) -> None:
    async with _hub(store, gap=30.0) as (hub, commits):
        await hub.ingest(tenant_event(QUIET))  # QUIET active; FLOOD held back from its second event
        flood = _flood(hub, FLOOD, 4)
        await _until_waiting(hub, commits)
        async with asyncio.timeout(5):
            await hub.ingest(tenant_event(QUIET))  # not held: it commits now, the flood with it
        assert commits.log[-1][2] == {QUIET, FLOOD}
        for task in flood:
            task.cancel()
        await asyncio.gather(*flood, return_exceptions=True)


async def test_floods_alone_are_never_rationed(store: Store) -> None:
    # Two tenants both held back, nobody else: each one's commits go on back to back. With
    # the gap applied, 2 x 10 commits would take 20 x 30 s.
    async with _hub(store, gap=30.0) as (hub, commits):
        await hub.ingest(tenant_event(FLOOD))
        await hub.ingest(tenant_event(OTHER))  # both active: from now on each is held back
        tasks = _flood(hub, FLOOD, 10) + _flood(hub, OTHER, 10)
        async with asyncio.timeout(20):
            await asyncio.gather(*tasks)
        assert len(commits.log) >= 10


async def test_stop_during_the_gap_fails_the_waiting_events_and_leaves_no_timer(
    store: Store,
) -> None:
    hub = Hub(store, StaticTokens(TOKENS), fair_share=1, fair_window=30, flood_gap=30.0)
    commits = Commits(store)
    await hub.start()
    await hub.ingest(tenant_event(QUIET))
    flood = _flood(hub, FLOOD, 3)
    await _until_waiting(hub, commits)
    assert hub._flood_wake is not None
    await hub.stop()
    assert hub._flood_wake is None
    results = await asyncio.gather(*flood, return_exceptions=True)
    assert all(isinstance(r, ConnectionError) for r in results), results


async def test_a_negative_gap_is_refused(store: Store) -> None:
    with pytest.raises(ValueError, match="flood_gap"):
        Hub(store, StaticTokens(TOKENS), flood_gap=-1)


@pytest.mark.parametrize("bad", [math.inf, math.nan])
async def test_an_infinite_or_nan_gap_or_delay_is_refused(store: Store, bad: float) -> None:
    with pytest.raises(ValueError, match="flood_gap"):
        Hub(store, StaticTokens(TOKENS), flood_gap=bad)
    with pytest.raises(ValueError, match="refusal_delay"):
        Hub(store, StaticTokens(TOKENS), refusal_delay=bad)


async def test_a_quiet_tenant_that_waited_in_line_once_is_light_again_when_its_line_ends(
    store: Store,
) -> None:
    """Held back only while its line lasts: a quiet tenant whose events queued behind one
    slow commit counted as held back for the whole window, and the flood beside it was
    rationed no more (bench hub, PostgreSQL: the hostile tenant's arrival)."""
    async with _hub(store, gap=30.0) as (hub, commits):
        await hub.ingest(tenant_event(QUIET))
        flood = _flood(hub, FLOOD, 6)
        await _until_waiting(hub, commits)
        # Two at once with fair share 1: the second waits in line for the first's commit.
        async with asyncio.timeout(5):
            await asyncio.gather(hub.ingest(tenant_event(QUIET)), hub.ingest(tenant_event(QUIET)))
        await asyncio.sleep(0.3)
        assert not commits.of_only({FLOOD})  # still rationed: QUIET is light again
        assert not all(task.done() for task in flood)
        for task in flood:
            task.cancel()
        await asyncio.gather(*flood, return_exceptions=True)
