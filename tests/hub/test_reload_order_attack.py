"""Attacks on the reload ordering of tests/hub/test_reload_order.py (commit 50d997e): each
test is an interleaving after which, all reloads done, the route is still wrong (or the
bookkeeping kept)."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import pytest

from keel.errors import BackendUnavailable
from keel.hub import Hub, Store
from tests.helpers import eventually
from tests.hub.test_reload_order import ALICE, Gate


@pytest.mark.parametrize(
    ("change", "read"),
    [("subscription", "get_subscription"), ("resync", "list_subscriptions")],
    ids=["reload", "resync"],
)
async def test_a_reload_started_between_the_route_pop_and_the_store_delete_brings_it_back(
    hub: Hub, store: Store, change: str, read: str
) -> None:
    # delete_subscription numbered its change and popped the route *before* the store
    # delete: a reload (another process changed the subscription) or a resync (the
    # notification channel came back) that starts then takes a higher number, reads the
    # still-present row, and is not overtaken.
    sub = await hub.create_subscription(ALICE, {})
    gate = Gate(store, read)
    real_delete = store.delete_subscription

    async def delete(sub_id: str) -> Any:
        hub._on_store_change(change, sub_id if change == "subscription" else "")
        await gate.read.wait()  # its read saw the row before the delete
        return await real_delete(sub_id)

    store.delete_subscription = delete  # type: ignore[method-assign]
    await hub.delete_subscription(ALICE, sub.id)
    await gate.open(hub)
    assert hub.known(sub.id) is None  # the deleted subscription is routed again


async def test_a_failed_reload_overtakes_an_older_reload_that_read_the_new_version(
    hub: Hub, store: Store
) -> None:
    # A reload that fails (store unreachable for a moment) still numbered its change at
    # the start: the older reload, which read the current version, is then dropped.
    sub = await hub.create_subscription(ALICE, {})
    newer = msgspec.structs.replace(sub, max_deliveries=sub.max_deliveries + 1)
    await store.update_subscription(newer)  # another process updates it, and says so
    gate = Gate(store, "get_subscription")
    hub._on_store_change("subscription", sub.id)
    await gate.read.wait()  # the reload holds the new version

    async def unreachable(sub_id: str) -> Any:
        raise BackendUnavailable("PostgreSQL connection lost")

    store.get_subscription = unreachable  # type: ignore[method-assign]
    hub._on_store_change("subscription", sub.id)  # a second notification; its read fails
    await asyncio.sleep(0.05)
    await gate.open(hub)
    known = hub.known(sub.id)
    assert known is not None
    assert known.max_deliveries == newer.max_deliveries  # the old version is kept


async def test_a_reload_failing_during_a_resync_retry_keeps_the_deleted_route(
    hub: Hub, store: Store
) -> None:
    # The documented outage: the channel returns before the pool, so the resync's first
    # listing fails and it retries. A subscription notification meanwhile fails too
    # ("the resync after the outage fixes it") but takes a number above the resync's:
    # the resync's successful listing then skips that subscription.
    sub = await hub.create_subscription(ALICE, {})
    real_list = store.list_subscriptions
    real_get = store.get_subscription
    listed_once = asyncio.Event()

    async def list_once_down(*args: Any, **kw: Any) -> Any:
        if not listed_once.is_set():
            listed_once.set()
            raise BackendUnavailable("PostgreSQL is unreachable")
        return await real_list(*args, **kw)

    async def get_down(sub_id: str) -> Any:
        raise BackendUnavailable("PostgreSQL is unreachable")

    store.list_subscriptions = list_once_down  # type: ignore[method-assign]
    store.get_subscription = get_down  # type: ignore[method-assign]
    hub._on_store_change("resync", "")
    await listed_once.wait()  # the resync now sleeps before its next attempt
    await real_delete_by_other(store, sub.id)
    hub._on_store_change("subscription", sub.id)  # its reload fails: store still down
    await asyncio.sleep(0.01)
    store.get_subscription = real_get  # type: ignore[method-assign]
    await eventually(lambda: not hub._reloads)  # the resync's retry listed the store
    assert hub.known(sub.id) is None  # deleted everywhere, still routed here


async def real_delete_by_other(store: Store, sub_id: str) -> None:
    await type(store).delete_subscription(store, sub_id)  # type: ignore[arg-type]


async def test_changed_at_is_kept_while_reloads_overlap(hub: Hub, store: Store) -> None:
    # _changed_at is cleared only when no reload is in flight: with reloads that overlap
    # (one notification after another) it keeps every route changed meanwhile, deleted
    # ones included, though no reload older than those changes is left.
    other = await hub.create_subscription(ALICE, {})
    real_get = store.get_subscription
    gates: list[asyncio.Event] = []

    async def held(sub_id: str) -> Any:
        answer = await real_get(sub_id)
        gate = asyncio.Event()
        gates.append(gate)
        await gate.wait()
        return answer

    store.get_subscription = held  # type: ignore[method-assign]
    hub._on_store_change("subscription", other.id)
    await eventually(lambda: len(gates) == 1)
    for round_ in range(1, 6):
        for _ in range(4):
            sub = await hub.create_subscription(ALICE, {})
            await hub.delete_subscription(ALICE, sub.id)
        hub._on_store_change("subscription", other.id)  # the next reload starts ...
        await eventually(lambda n=round_ + 1: len(gates) == n)
        gates[round_ - 1].set()  # ... before the older one ends
        await eventually(lambda: len(hub._reloads) == 1)
    # One reload in flight, started after every one of those 20 deleted subscriptions.
    assert len(hub._changed_at) <= 1, len(hub._changed_at)
    gates[-1].set()
