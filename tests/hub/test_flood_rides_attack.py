"""Attacks on the flood rides (`Hub._flood_waits`, `_FairShare.light_active`) and the refusal
tarpit (`_Refusals`): what they cost per batch with many tenants, whether they ever hold a
flood for good, and whether one client's refusals hold another's."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from keel.errors import TooManyRequests
from keel.hub import CloudEvent, Hub, StaticTokens, Store
from keel.hub._core import _FairShare
from tests.hub.conftest import TOKENS

ALICE, BOB, ADMIN = TOKENS["tok-alice"], TOKENS["tok-bob"], TOKENS["tok-admin"]


def _event(tenant: str) -> CloudEvent:
    return CloudEvent(id=f"{tenant}/{uuid.uuid4().hex}", source="t", type="t.e", tenant=tenant)


class _CountingDict(dict[Any, float]):
    """A dict that counts the keys iterated over: the cost of a scan of it."""

    iterated = 0

    def __iter__(self) -> Iterator[Any]:
        for key in super().__iter__():
            self.iterated += 1
            yield key


def _crowd(n: int, *, light: bool) -> tuple[_FairShare, _CountingDict, float]:
    """``n`` tenants seen and held back just now, and (``light``) one seen last, not held."""
    fs = _FairShare(4, 30.0)
    seen = _CountingDict()
    fs._seen = seen
    now = time.monotonic()
    fs._pruned = now  # no pruning pass in the counts
    for i in range(n):
        seen[f"p-{i}"] = now
        fs._pressed[f"p-{i}"] = now
    if light:
        seen["quiet"] = now
    return fs, seen, now


@pytest.mark.parametrize("light", [True, False])
def test_light_active_is_not_a_scan_of_every_tenant_per_batch(light: bool) -> None:
    # `_flood_waits` asks on every committer wake-up while only held-back tenants wait.
    # With 5,000 held-back tenants seen it walked all of them each time (2 ms a call
    # measured at 10,000, on the loop every commit waits on), 500,000 keys in 100 calls.
    n, calls = 5000, 100
    fs, seen, now = _crowd(n, light=light)
    for _ in range(calls):
        assert fs.light_active(now) is light
    assert seen.iterated <= 2 * (n + 1) + calls, seen.iterated


@pytest.mark.parametrize("seed", range(8))
def test_light_active_agrees_with_a_scan_under_any_history(seed: int) -> None:
    # The cached answer must be the scan's: a tenant becomes light by entering unpressed, or
    # once its press is older than the window (also one that left and came back pressed);
    # it stops by being pressed, or leaving.
    rng = random.Random(seed)
    fs = _FairShare(2, 1.0)
    now = 1000.0
    tenants = [f"p-{i}" for i in range(6)] + [None]
    for step in range(4000):
        op = rng.random()
        t = rng.choice(tenants)
        if op < 0.35:
            fs._enter(t, now)
        elif op < 0.6:
            fs._pressed[t] = now
        elif op < 0.75 and fs._inflight.get(t):
            fs.release(t)
        else:
            now += rng.choice([0.001, 0.05, 0.1, 0.2, 0.3, 0.9, 1.2])
        got = fs.light_active(now)
        want = any(not fs.pressed(x, now) for x in fs._seen)
        assert got == want, (step, now, dict(fs._seen), dict(fs._pressed))


def test_a_tenant_back_with_an_old_press_turns_light_when_it_expires() -> None:
    fs = _FairShare(2, 1.0)
    fs._enter("x", 100.0)
    fs.release("x")
    fs._pressed["x"] = 100.5
    fs._enter("y", 100.9)
    fs._pressed["y"] = 100.9
    assert not fs.light_active(101.2)  # x left (seen 1.2 s ago), y pressed
    fs._enter("x", 101.3)  # back, still pressed (0.8 s ago)
    assert not fs.light_active(101.4)
    assert fs.light_active(101.6)  # x's press is 1.1 s old: x is light


@asynccontextmanager
async def _in_flight(hub: Hub) -> AsyncIterator[None]:
    """Bob and alice each have an event in flight (its commit held) until the block ends."""
    gate = asyncio.Event()
    append = hub.store.append

    async def held(*args: Any, **kwargs: Any) -> Any:
        await gate.wait()
        return await append(*args, **kwargs)

    hub.store.append = held  # type: ignore[method-assign]
    quiet = asyncio.create_task(hub.ingest(_event(BOB.project)))
    mine = asyncio.create_task(hub.ingest(_event(ALICE.project)))
    await asyncio.sleep(0.05)
    try:
        yield
    finally:
        gate.set()
        async with asyncio.timeout(10):
            await asyncio.gather(quiet, mine)


async def _refused_in(coro: Any) -> tuple[float, TooManyRequests]:
    start = time.monotonic()
    with pytest.raises(TooManyRequests) as refused:
        await coro
    return time.monotonic() - start, refused.value


async def test_a_client_that_waits_its_retry_after_is_not_held_in_a_longer_fair_window(
    store: Store,
) -> None:
    # The tarpit held any refusal within fair_window of the last one; with a fair_window
    # longer than the Retry-After (1 s) it held a client that waited exactly as told.
    hub = Hub(store, StaticTokens(TOKENS), fair_share=1, fair_window=30, refusal_delay=2.0)
    await hub.start()
    try:
        async with _in_flight(hub):
            took, refused = await _refused_in(hub.ingest_as(ADMIN, _event(ALICE.project)))
            assert took < 1.0
            await asyncio.sleep(refused.retry_after + 0.05)
            took, _ = await _refused_in(hub.ingest_as(ADMIN, _event(ALICE.project)))
            assert took < 1.0, took  # refused again (still in flight), but not held
            took, _ = await _refused_in(hub.ingest_as(ADMIN, _event(ALICE.project)))
            assert took >= 2.0  # retried at once: held
    finally:
        await hub.stop()


async def test_a_projects_write_refusals_do_not_hold_an_admins_event_refusals(
    store: Store,
) -> None:
    # Only admins post events, for any project: the tarpit keyed both kinds of refusal by
    # the project, so a member looping on refused subscription creates had the admin's
    # first refusal (of an event for that project) held as a repeat.
    hub = Hub(
        store,
        StaticTokens(TOKENS),
        fair_share=1,
        fair_window=30,
        refusal_delay=2.0,
        subscription_rate=1,
        subscription_burst=1,
    )
    await hub.start()
    try:
        async with _in_flight(hub):
            await hub.create_subscription(ALICE, {})
            took, _ = await _refused_in(hub.create_subscription(ALICE, {}))
            assert took < 1.0
            took, _ = await _refused_in(hub.ingest_as(ADMIN, _event(ALICE.project)))
            assert took < 1.0, took  # the admin's first refusal
            took, _ = await _refused_in(hub.create_subscription(ALICE, {}))
            assert took >= 2.0  # alice's own repeat is still held
    finally:
        await hub.stop()


async def test_floods_beside_a_trickle_with_failing_and_cancelled_commits_all_finish(
    store: Store,
) -> None:
    # Held: two floods (held back) ride a trickle's commits and commit on their own between
    # them, while every 5th append fails and some callers give up; every caller is
    # answered, and nothing is left counted in flight.
    hub = Hub(store, StaticTokens(TOKENS), fair_share=1, fair_window=30, flood_gap=0.01)
    append = store.append
    n = 0

    async def flaky(batch: Any, *, now: float) -> Any:
        nonlocal n
        n += 1
        if n % 5 == 0:
            raise ConnectionError("injected")
        return await append(batch, now=now)

    store.append = flaky  # type: ignore[method-assign]
    await hub.start()
    try:
        await hub.ingest(_event("p-quiet"))
        floods = [
            asyncio.create_task(hub.ingest(_event(t))) for t in ("p-f1", "p-f2") for _ in range(25)
        ]
        for task in floods[3::7]:
            task.cancel()
        async with asyncio.timeout(60):
            for _ in range(10):
                with contextlib.suppress(ConnectionError):  # an injected failure answers too
                    await hub.ingest(_event("p-quiet"))
                await asyncio.sleep(0.02)
            results = await asyncio.gather(*floods, return_exceptions=True)
        answers = (ConnectionError, asyncio.CancelledError)
        assert all(r is None or isinstance(r, answers) for r in results), results
        assert sum(r is None for r in results) >= 20
        assert hub._floods_in_flight == 0
        assert not hub._committing
        assert hub._busy_slots == 0
        assert not hub.admission._inflight
    finally:
        await hub.stop()


async def test_a_light_tenant_that_floods_too_frees_both_floods(store: Store) -> None:
    # Held: light while it sent one event, then held back itself: nobody is light any
    # more, so neither flood waits for a gap (30 s here) to commit on its own.
    hub = Hub(store, StaticTokens(TOKENS), fair_share=1, fair_window=30, flood_gap=30.0)
    await hub.start()
    try:
        await hub.ingest(_event("p-light"))
        first = [asyncio.create_task(hub.ingest(_event("p-flood"))) for _ in range(5)]
        await asyncio.sleep(0.2)  # p-flood's events wait for a ride (p-light is light)
        assert not all(t.done() for t in first)
        both = [asyncio.create_task(hub.ingest(_event("p-light"))) for _ in range(5)]
        async with asyncio.timeout(10):
            await asyncio.gather(*first, *both)
    finally:
        await hub.stop()


async def test_stop_during_a_floods_own_commit_then_start_leaves_nothing_counted(
    store: Store,
) -> None:
    # Held: the flood's own commit cancelled by stop() is no longer counted in flight, so
    # after start() the next flood commits on its own at once (gap 0.01 s).
    hub = Hub(store, StaticTokens(TOKENS), fair_share=1, fair_window=30, flood_gap=0.01)
    await hub.start()
    await hub.ingest(_event("p-light"))
    gate = asyncio.Event()
    append = store.append

    async def held(*args: Any, **kwargs: Any) -> Any:
        await gate.wait()
        return await append(*args, **kwargs)

    store.append = held  # type: ignore[method-assign]
    flood = [asyncio.create_task(hub.ingest(_event("p-flood"))) for _ in range(3)]
    for _ in range(100):
        await asyncio.sleep(0.01)
        if hub._floods_in_flight:
            break
    assert hub._floods_in_flight == 1
    await hub.stop()
    results = await asyncio.gather(*flood, return_exceptions=True)
    assert all(isinstance(r, ConnectionError) for r in results), results
    assert hub._floods_in_flight == 0
    store.append = append  # type: ignore[method-assign]
    await hub.start()
    try:
        await hub.ingest(_event("p-light"))
        async with asyncio.timeout(10):
            await asyncio.gather(*(hub.ingest(_event("p-flood")) for _ in range(5)))
    finally:
        await hub.stop()


async def test_a_flood_goes_full_speed_once_the_light_tenant_is_out_of_the_window(
    store: Store,
) -> None:
    # Held: rationed (one event per commit, one commit per 0.1 s gap) while p-light is
    # active, window 0.3 s (pruned up to a quarter of it late); then p-flood is alone, its
    # line goes at once, and the 30 events are done well before 30 gaps (3 s).
    hub = Hub(store, StaticTokens(TOKENS), fair_share=1, fair_window=0.3, flood_gap=0.1)
    await hub.start()
    try:
        await hub.ingest(_event("p-light"))
        t0 = time.monotonic()
        flood = [asyncio.create_task(hub.ingest(_event("p-flood"))) for _ in range(30)]
        async with asyncio.timeout(20):
            await asyncio.gather(*flood)
        assert time.monotonic() - t0 < 1.0
    finally:
        await hub.stop()
