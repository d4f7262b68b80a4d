"""A reload of a route (another process changed the subscription) reads the store, then sets
the route. A change made in this process in between, or a newer reload, must not be undone
by the older read: a deleted subscription stayed routed until the next resync."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from keel.hub import Hub, Store
from tests.helpers import eventually
from tests.hub.conftest import TOKENS

ALICE = TOKENS["tok-alice"]


class Gate:
    """Holds a store read after it has been answered, until `open`: the read is old by the
    time the hub uses it."""

    def __init__(self, store: Store, name: str) -> None:
        self.read = asyncio.Event()
        self._open = asyncio.Event()
        real: Callable[..., Awaitable[Any]] = getattr(store, name)

        async def held(*args: Any, **kw: Any) -> Any:
            answer = await real(*args, **kw)
            self.read.set()
            await self._open.wait()
            return answer

        setattr(store, name, held)

    async def open(self, hub: Hub) -> None:
        self._open.set()
        await eventually(lambda: not hub._reloads)


async def test_a_reload_read_before_a_delete_here_does_not_bring_the_route_back(
    hub: Hub, store: Store
) -> None:
    sub = await hub.create_subscription(ALICE, {})
    gate = Gate(store, "get_subscription")
    hub._on_store_change("subscription", sub.id)  # another process changed it
    await gate.read.wait()
    await hub.delete_subscription(ALICE, sub.id)
    await gate.open(hub)
    assert hub.known(sub.id) is None


async def test_a_reload_read_before_an_update_here_does_not_undo_it(hub: Hub, store: Store) -> None:
    sub = await hub.create_subscription(ALICE, {})
    gate = Gate(store, "get_subscription")
    hub._on_store_change("subscription", sub.id)
    await gate.read.wait()
    newer = msgspec.structs.replace(sub, max_deliveries=sub.max_deliveries + 1)
    await hub.update_subscription(newer)
    await gate.open(hub)
    known = hub.known(sub.id)
    assert known is not None
    assert known.max_deliveries == sub.max_deliveries + 1


async def test_an_older_reload_finishing_last_does_not_win(hub: Hub, store: Store) -> None:
    sub = await hub.create_subscription(ALICE, {})
    gate = Gate(store, "get_subscription")
    hub._on_store_change("subscription", sub.id)  # reads the subscription, then waits
    await gate.read.wait()
    await store.delete_subscription(sub.id)  # another process deletes it, and says so
    store.get_subscription = type(store).get_subscription.__get__(store)  # type: ignore[method-assign]
    hub._on_store_change("subscription", sub.id)
    await eventually(lambda: hub.known(sub.id) is None)
    await gate.open(hub)  # the first reload's read is older than the deletion
    assert hub.known(sub.id) is None


async def test_a_resync_listing_read_before_a_delete_here_does_not_bring_it_back(
    hub: Hub, store: Store
) -> None:
    sub = await hub.create_subscription(ALICE, {})
    kept = await hub.create_subscription(ALICE, {})
    gate = Gate(store, "list_subscriptions")
    hub._on_store_change("resync", "")
    await gate.read.wait()
    await hub.delete_subscription(ALICE, sub.id)
    made = await hub.create_subscription(ALICE, {})  # after the listing: not in it
    await gate.open(hub)
    assert hub.known(sub.id) is None
    assert hub.known(made.id) is not None
    assert hub.known(kept.id) is not None
