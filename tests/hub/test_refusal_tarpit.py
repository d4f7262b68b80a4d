"""A tenant refused again moments after its last refusal is answered only after
``refusal_delay`` (`keel.hub._core._Refusals`): a client retrying refused requests in a loop
spent the hub's loop on refusals (bench hub: 14,000 a second from one caller), under every
other tenant's events. Nobody else is held meanwhile, and a client that waits as told is
never held."""

from __future__ import annotations

import asyncio
import time
import uuid

import httpx
import pytest

from keel.errors import TooManyRequests
from keel.hub import CloudEvent, Hub, HubServer, StaticTokens, Store
from keel.hub._core import _Refusals
from tests.hub.conftest import TOKENS

ALICE, BOB = TOKENS["tok-alice"], TOKENS["tok-bob"]


def _event(tenant: str) -> CloudEvent:
    return CloudEvent(id=uuid.uuid4().hex, source="t", type="t.e", tenant=tenant, data={})


async def _hub(store: Store, *, delay: float, burst: int = 1) -> Hub:
    """One subscription create a second past ``burst`` while another tenant is active (bob
    ingests first in every test), refusals repeated within 30 s held ``delay``."""
    hub = Hub(
        store,
        StaticTokens(TOKENS),
        quota_subscriptions=1000,
        subscription_rate=1,
        subscription_burst=burst,
        fair_window=30,
        refusal_delay=delay,
    )
    await hub.start()
    await hub.ingest(_event(BOB.project))
    return hub


async def _refused_in(coro: object) -> float:
    start = time.monotonic()
    with pytest.raises(TooManyRequests):
        await coro  # type: ignore[misc]
    return time.monotonic() - start


async def test_the_first_refusal_is_at_once_the_next_one_held(store: Store) -> None:
    hub = await _hub(store, delay=1.0)
    try:
        await hub.create_subscription(ALICE, {})
        assert await _refused_in(hub.create_subscription(ALICE, {})) < 0.5
        assert await _refused_in(hub.create_subscription(ALICE, {})) >= 1.0
    finally:
        await hub.stop()


async def test_a_caller_retrying_at_once_is_refused_a_few_times_not_thousands(
    store: Store,
) -> None:
    # Before the tarpit this loop made thousands of attempts in its half second.
    hub = await _hub(store, delay=0.1, burst=1)
    try:
        await hub.create_subscription(ALICE, {})
        attempts = 0
        until = time.monotonic() + 0.5
        while time.monotonic() < until:
            attempts += 1
            with pytest.raises(TooManyRequests):
                await hub.create_subscription(ALICE, {"types": ["*" * 250 + "y"]})
        assert attempts <= 8, attempts
    finally:
        await hub.stop()


async def test_another_tenant_is_not_held_while_one_is(store: Store) -> None:
    hub = await _hub(store, delay=5.0, burst=3)
    try:
        await hub.create_subscription(ALICE, {})
        for _ in range(2):
            await hub.create_subscription(ALICE, {})
        with pytest.raises(TooManyRequests):
            await hub.create_subscription(ALICE, {})
        held = asyncio.create_task(hub.create_subscription(ALICE, {}))
        await asyncio.sleep(0.05)
        assert not held.done()
        async with asyncio.timeout(2):  # bob's writes go through while alice is held
            for _ in range(3):
                await hub.create_subscription(BOB, {})
            await hub.ingest(_event(BOB.project))
        assert not held.done()
        held.cancel()
        with pytest.raises(asyncio.CancelledError):
            await held
    finally:
        await hub.stop()


async def test_a_client_that_waits_as_told_is_never_held() -> None:
    refusals = _Refusals(delay=0.1)
    assert refusals.hold_for("events", "p", 1) == 0.0
    assert refusals.hold_for("events", "p", 1) == 0.1
    assert refusals.hold_for("events", "q", 1) == 0.0  # per tenant
    assert refusals.hold_for("writes", "p", 1) == 0.0  # and per kind
    refusals._until["events", "p"] -= 1.2  # it waited the Retry-After the last one gave
    assert refusals.hold_for("events", "p", 1) == 0.0


def test_the_refusal_table_is_pruned() -> None:
    refusals = _Refusals(delay=0.1)
    for i in range(1025):
        refusals.hold_for("writes", f"p-{i}", 1)
    for k in list(refusals._until):
        refusals._until[k] -= 2.0
    refusals.hold_for("writes", "new", 1)
    assert list(refusals._until) == [("writes", "new")]


def test_a_negative_delay_is_refused() -> None:
    with pytest.raises(ValueError, match="refusal_delay"):
        _Refusals(delay=-1)


async def test_http_ingest_past_its_share_is_held_then_429_with_its_body(store: Store) -> None:
    hub = Hub(store, StaticTokens(TOKENS), fair_share=1, fair_window=30, refusal_delay=0.5)
    await hub.start()
    try:
        async with HubServer(hub, heartbeat=0.5) as server:
            # bob's event waits for its commit, p-one has its one in flight: p-one is refused.
            gate = asyncio.Event()
            append = hub.store.append

            async def held_append(*args: object, **kwargs: object) -> object:
                await gate.wait()
                return await append(*args, **kwargs)  # type: ignore[arg-type]

            hub.store.append = held_append  # type: ignore[method-assign]
            quiet = asyncio.create_task(hub.ingest(_event(BOB.project)))
            mine = asyncio.create_task(hub.ingest(_event(ALICE.project)))
            await asyncio.sleep(0.05)
            body = {"specversion": "1.0", "id": "x", "source": "s", "type": "t"}
            body["tenant"] = ALICE.project
            async with httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{server.port}", headers={"X-Auth-Token": "tok-admin"}
            ) as alice:
                start = time.monotonic()
                first = await alice.post("/v1/events", json=body)
                at_once = time.monotonic() - start
                second = await alice.post("/v1/events", json=body)
                held = time.monotonic() - start - at_once
            for r in (first, second):
                assert r.status_code == 429, r.text
                assert r.headers["Retry-After"] == "1"
                assert r.json()["error"]["code"] == "too_many_requests"
            assert at_once < 0.4
            assert held >= 0.5
            gate.set()
            async with asyncio.timeout(10):
                await asyncio.gather(quiet, mine)
    finally:
        await hub.stop()
