"""Attacks on the one-statement subscription writes of the PostgreSQL store (schema
functions `create_subscription`, `update_subscription`, `delete_subscription`), on the hub's
delete by the route it knows, and on `_FairShare` holding a tenant back only while its line
lasts (`pressed`, `held`, `light_active`)."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import types
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest

from keel.errors import BadRequest, Conflict, NotFound, QuotaExceeded, TooManyRequests
from keel.hub import Hub, StaticTokens, Store, _core
from keel.hub._core import _FairShare
from keel.hub.stores import postgres
from keel.hub.stores.base import Subscription, quota_exceeded
from keel.hub.stores.postgres import PostgresStore
from tests.hub.conftest import (
    TOKENS,
    Commits,
    another_view,
    fresh_pg_store,
    plain_sub,
    tenant_event,
)

pytestmark = pytest.mark.timeout(120)

ALICE, BOB = TOKENS["tok-alice"], TOKENS["tok-bob"]


def _sub(sub_id: str, project: str = "p") -> Subscription:
    sub = plain_sub(sub_id)
    sub.project = project
    return sub


@pytest.fixture
async def pg() -> AsyncIterator[PostgresStore]:
    async with fresh_pg_store() as store:
        yield store


async def _create(store: PostgresStore, sub: Subscription, quota: int | None) -> bool:
    try:
        await store.create_subscription(sub, quota=quota)
    except QuotaExceeded:
        return False
    return True


# --- the store's quota, across processes ----------------------------------------------


async def test_concurrent_creates_from_two_processes_never_pass_the_quota(
    pg: PostgresStore,
) -> None:
    other = await another_view(pg)
    try:
        for rnd in range(4):
            project = f"proj-{rnd}"
            made = await asyncio.gather(
                *(
                    _create(pg if i % 2 else other, _sub(f"s{rnd}-{i}", project), 3)
                    for i in range(30)
                )
            )
            assert made.count(True) == 3
            assert await pg.count_subscriptions(project) == 3

        async def churn(i: int) -> None:
            view = pg if i % 2 else other
            for k in range(8):
                await _create(view, _sub(f"c{i}-{k}", "churn"), 4)
                with contextlib.suppress(NotFound):
                    await view.delete_subscription(f"c{i}-{k}")
                assert await pg.count_subscriptions("churn") <= 4

        await asyncio.gather(*(churn(i) for i in range(6)))
    finally:
        await other.close()


@pytest.mark.parametrize(
    "project", ["q'\"; DROP TABLE x; --", "é😀\u202e", "P" * 10_000, "$fn$", "%s{s}"]
)
async def test_odd_project_names_count_alone(pg: PostgresStore, project: str) -> None:
    assert await _create(pg, _sub("a", project), 1)
    assert not await _create(pg, _sub("b", project), 1)
    assert await _create(pg, _sub("c", project + "x"), 1)  # another project's quota
    assert await pg.count_subscriptions(project) == 1


async def test_a_quota_of_zero_or_below_refuses_every_create(pg: PostgresStore) -> None:
    for quota in (0, -1, -(2**40)):
        with pytest.raises(QuotaExceeded):
            await pg.create_subscription(_sub(f"z{quota}"), quota=quota)
    assert await pg.count_subscriptions("p") == 0


async def test_a_quota_past_int32_is_a_quota_not_a_database_error(pg: PostgresStore) -> None:
    # `Hub(quota_subscriptions=...)` is an int; the function's parameter is a PostgreSQL
    # int: 2**31 failed every create with asyncpg's DataError (a 500), where the code before
    # compared in Python.
    for quota in (2**31, 10**12, 2**63):
        await pg.create_subscription(_sub(f"s{quota}"), quota=quota)
    assert await pg.count_subscriptions("p") == 3


@pytest.mark.parametrize(("sub_id", "project"), [("sub-\x00", "p"), ("ok", "p\x00")])
async def test_nul_in_a_created_id_or_project_is_a_bad_request(
    pg: PostgresStore, sub_id: str, project: str
) -> None:
    with pytest.raises(BadRequest):
        await pg.create_subscription(_sub(sub_id, project), quota=5)
    with pytest.raises(BadRequest):
        await pg.create_subscription(_sub(sub_id, project))


async def test_nul_in_an_updated_or_deleted_id_is_not_found(pg: PostgresStore) -> None:
    with pytest.raises(NotFound):
        await pg.update_subscription(_sub("sub-\x00"))
    with pytest.raises(NotFound):
        await pg.delete_subscription("sub-\x00")


async def test_an_id_too_long_for_its_notification_is_a_bad_request(pg: PostgresStore) -> None:
    # Its NOTIFY failed the statement ("payload string too long"), asyncpg's error a 500.
    with pytest.raises(BadRequest):
        await pg.create_subscription(_sub("x" * 10_000))
    longest = "y" * postgres._NOTIFY_BYTES
    other = await another_view(pg)
    heard: list[str] = []
    await other.watch(lambda kind, sub_id: heard.append(sub_id))
    try:
        await pg.create_subscription(_sub(longest), quota=5)  # the longest still heard
        for _ in range(100):
            if heard:
                break
            await asyncio.sleep(0.02)
        assert heard == [longest]
        with pytest.raises(NotFound):
            await pg.update_subscription(_sub("x" * 10_000))
        with pytest.raises(NotFound):
            await pg.delete_subscription("x" * 10_000)
        await pg.delete_subscription(longest)
    finally:
        await other.close()


async def test_a_concurrent_double_delete_deletes_once(pg: PostgresStore) -> None:
    other = await another_view(pg)
    try:
        for n in range(5):
            await pg.create_subscription(_sub(f"d{n}"))
            got = await asyncio.gather(
                pg.delete_subscription(f"d{n}"),
                other.delete_subscription(f"d{n}"),
                return_exceptions=True,
            )
            assert sorted(type(r).__name__ for r in got) == ["NoneType", "NotFound"], got
    finally:
        await other.close()


# --- a rolling upgrade: the code before (seven round trips, no schema functions) -------


class _OldStore(PostgresStore):
    """The subscription writes as they were before the schema functions (f0ea37f^), and
    the schema without them: its mark is another, so each opens the other's DDL again."""

    async def _set_up(self) -> None:
        fns = postgres._SUBSCRIPTION_FNS
        postgres._SUBSCRIPTION_FNS = ""
        try:
            await super()._set_up()
        finally:
            postgres._SUBSCRIPTION_FNS = fns

    async def _notify(self, conn: Any, sub_id: str) -> None:
        await conn.execute(
            "SELECT pg_notify($1, $2)", self.channel, f"{self.origin} subscription {sub_id}"
        )

    async def create_subscription(self, sub: Subscription, *, quota: int | None = None) -> None:
        import asyncpg  # noqa: PLC0415

        r = sub.retention
        async with self._tx() as conn:
            if quota is not None:
                await conn.execute(
                    "SELECT pg_advisory_xact_lock(hashtext($1), hashtext($2))",
                    self.schema,
                    sub.project,
                )
                n = await conn.fetchval(
                    self._q("SELECT count(*) FROM {s}.subscriptions WHERE project = $1"),
                    sub.project,
                )
                if n >= quota:
                    raise quota_exceeded(sub.project, quota)
            try:
                await conn.execute(
                    self._q(
                        "INSERT INTO {s}.subscriptions (id, project, body, max_messages, "
                        "max_age_s) VALUES ($1, $2, $3, $4, $5)"
                    ),
                    sub.id,
                    sub.project,
                    msgspec.json.encode(sub).decode(),
                    r.max_messages,
                    r.max_age_s,
                )
            except asyncpg.UniqueViolationError:
                raise Conflict(f"subscription {sub.id} exists") from None
            await self._notify(conn, sub.id)

    async def delete_subscription(self, sub_id: str) -> None:
        async with self._tx() as conn:
            done = await conn.execute(
                self._q("DELETE FROM {s}.subscriptions WHERE id = $1"), sub_id
            )
            if done.endswith(" 0"):
                raise NotFound(f"no subscription {sub_id!r}", subscription=sub_id)
            await conn.execute(self._q("DELETE FROM {s}.messages WHERE sub_id = $1"), sub_id)
            await conn.execute(self._q("DELETE FROM {s}.claims WHERE sub_id = $1"), sub_id)
            await self._notify(conn, sub_id)


async def test_old_and_new_processes_share_one_schema_and_one_quota(pg: PostgresStore) -> None:
    old = _OldStore(pg.url, schema=pg.schema)
    await old.open()  # the new one opened first; the old one's DDL runs again
    heard_new: list[str] = []
    heard_old: list[str] = []
    await pg.watch(lambda kind, sub_id: heard_new.append(sub_id))
    await old.watch(lambda kind, sub_id: heard_old.append(sub_id))
    try:
        for rnd in range(3):
            project = f"q{rnd}"
            made = await asyncio.gather(
                *(_create(pg if i % 2 else old, _sub(f"s{rnd}-{i}", project), 3) for i in range(24))
            )
            assert made.count(True) == 3
            assert await pg.count_subscriptions(project) == 3
        # Each reopens after the other (the marks flip): both still work.
        again = PostgresStore(pg.url, schema=pg.schema)
        await again.open()
        old_again = _OldStore(pg.url, schema=pg.schema)
        await old_again.open()
        await again.create_subscription(_sub("n-1"), quota=10)
        await old_again.delete_subscription("n-1")
        await old_again.create_subscription(_sub("o-1"), quota=10)
        await again.delete_subscription("o-1")
        await again.close()
        await old_again.close()
        for _ in range(100):
            if "o-1" in heard_new and "n-1" in heard_old:
                break
            await asyncio.sleep(0.02)
        assert "o-1" in heard_new
        assert "n-1" in heard_old
    finally:
        await old.close()


# --- the hub's delete by the route it knows (two hub processes) ------------------------


def _spec() -> dict[str, Any]:
    return {"types": ["t.e"]}


async def _eventually(check: Any) -> None:
    for _ in range(200):
        if check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("never")


async def test_deletes_between_two_hub_processes(pg: PostgresStore) -> None:
    other = await another_view(pg)
    a = Hub(pg, StaticTokens(TOKENS))
    b = Hub(other, StaticTokens(TOKENS))
    await a.start()
    await b.start()
    try:
        # Made by B, deleted through A before A heard of it.
        sub = await b.create_subscription(ALICE, _spec())
        a._routes.pop(sub.id, None)
        await a.delete_subscription(ALICE, sub.id)
        with pytest.raises(NotFound):
            await pg.get_subscription(sub.id)
        # Another tenant's id, known to A or not: NotFound, and nothing deleted.
        sub = await b.create_subscription(ALICE, _spec())
        await _eventually(lambda: a.known(sub.id) is not None)
        with pytest.raises(NotFound):
            await a.delete_subscription(BOB, sub.id)
        a._routes.pop(sub.id, None)
        with pytest.raises(NotFound):
            await a.delete_subscription(BOB, sub.id)
        assert (await pg.get_subscription(sub.id)).project == ALICE.project
        # Deleted by B while still in A's routes: NotFound, A's route gone.
        a._routes[sub.id] = _core._Route(await pg.get_subscription(sub.id))
        await other.delete_subscription(sub.id)  # behind B's hub: A may not hear at once
        with pytest.raises(NotFound):
            await a.delete_subscription(ALICE, sub.id)
        assert a.known(sub.id) is None
        # Twice at once through both hubs: one deletes, one is NotFound.
        sub = await a.create_subscription(ALICE, _spec())
        await _eventually(lambda: b.known(sub.id) is not None)
        got = await asyncio.gather(
            a.delete_subscription(ALICE, sub.id),
            b.delete_subscription(ALICE, sub.id),
            return_exceptions=True,
        )
        assert sorted(type(r).__name__ for r in got) == ["NoneType", "NotFound"], got
    finally:
        await a.stop()
        await b.stop()
        await other.close()


# --- _FairShare: the cached answers against a scan -------------------------------------


def _scan(fs: _FairShare, now: float, besides: set[str | None]) -> bool:
    return any(not fs.pressed(t, now) for t in fs._seen if t not in besides)


@pytest.mark.parametrize("seed", range(8))
async def test_light_active_agrees_with_a_scan_with_lines_cancels_and_closes(  # noqa: PLR0912
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Callers waiting in line, cancelled in line, failed by `close` (a hub's stop), and
    `light_active` asked with and without a batch's tenants aside. `close` ended every line
    without telling the cache: with every tenant seen in line, its oldest press was inf, and
    `light_active` said False until some tenant entered again."""
    rng = random.Random(seed)
    clock = [1000.0]
    monkeypatch.setattr(
        _core, "time", types.SimpleNamespace(monotonic=lambda: clock[0], time=time.time)
    )
    fs = _FairShare(2, 1.0)
    tenants: list[str | None] = [f"p-{i}" for i in range(4)] + [None]
    admitted = dict.fromkeys(tenants, 0)
    waiting: list[asyncio.Task[None]] = []

    async def waiter(t: str | None) -> None:
        try:
            await fs.admit(t, wait=True)
        except ConnectionError:
            return
        admitted[t] += 1

    try:
        for step in range(2500):
            op = rng.random()
            t = rng.choice(tenants)
            if op < 0.3:
                waiting.append(asyncio.create_task(waiter(t)))
            elif op < 0.4:
                try:
                    await fs.admit(t, wait=False)
                    admitted[t] += 1
                except TooManyRequests:
                    pass
            elif op < 0.65:
                if admitted[t]:
                    admitted[t] -= 1
                    fs.release(t)
            elif op < 0.72:
                if waiting:
                    rng.choice(waiting).cancel()
            elif op < 0.74:
                fs.close(ConnectionError("hub stopped"))
            else:
                clock[0] += rng.choice([0.001, 0.05, 0.2, 0.5, 1.2])
            for _ in range(3):
                await asyncio.sleep(0)
            waiting = [w for w in waiting if not w.done()]
            now = clock[0]
            besides = {x for x in tenants if rng.random() < 0.3}
            for aside in (set(), besides):
                got, want = fs.light_active(now, aside), _scan(fs, now, aside)
                if got != want:
                    raise AssertionError(
                        f"step {step} op {op:.3f} aside {aside}: {got} != {want}; seen "
                        f"{fs._seen} pressed {fs._pressed} lines {list(fs._waiters)} "
                        f"oldest {fs._oldest_press} light {fs._light}"
                    )
            for x in tenants:
                if fs.inflight(x) != admitted[x]:
                    raise AssertionError(f"step {step}: {x} {fs.inflight(x)} != {admitted[x]}")
                if x in fs._waiters and not fs._waiters[x]:
                    raise AssertionError(f"step {step}: {x} has an empty line")
                if fs._let_out.get(x, 0) > fs.inflight(x):
                    raise AssertionError(f"step {step}: {x} let out more than in flight")
    finally:
        for w in waiting:
            w.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)


async def test_a_waiter_cancelled_just_after_close_releases_nothing() -> None:
    # `close` fails the caller in line; cancelled before it ran, it took the failure for an
    # admission and released a slot it never had: the tenant's event in flight was no
    # longer counted, and the tenant could pass its share.
    fs = _FairShare(1, 30.0)
    await fs.admit("a", wait=True)
    await fs.admit("b", wait=True)  # another tenant active: a's next waits in line
    task = asyncio.create_task(fs.admit("a", wait=True))
    await asyncio.sleep(0)
    assert "a" in fs._waiters
    fs.close(ConnectionError("hub stopped"))
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert fs.inflight("a") == 1


# --- a flood whose line empties at every commit -----------------------------------------


@pytest.mark.parametrize(("producers", "yields"), [(2, 0), (2, 1), (2, 3), (6, 1)])
async def test_a_flood_one_caller_past_its_share_is_still_rationed(
    store: Store, producers: int, yields: int
) -> None:
    """Fair share 1, two callers that each publish again after a little I/O (a loop turn):
    at every commit end the one in line is let out and queued before the other comes back
    to wait, so the flood had no line when the committer looked, counted as light, and its
    commits of its own went back to back beside the quiet tenant (765 in a second, gap
    50 ms; before the line-only press, none unrationed). Every event still commits."""
    gap = 0.05
    hub = Hub(store, StaticTokens(TOKENS), fair_share=1, fair_window=30, flood_gap=gap)
    commits = Commits(store)
    await hub.start()
    try:
        await hub.ingest(tenant_event("p-two"))  # the quiet tenant: active, light
        until = time.monotonic() + 0.6
        sent = 0

        async def producer() -> None:
            nonlocal sent
            while time.monotonic() < until:
                await hub.ingest(tenant_event("p-one"))
                sent += 1
                for _ in range(yields):
                    await asyncio.sleep(0)

        async with asyncio.timeout(30):  # nothing starves
            await asyncio.gather(*(producer() for _ in range(producers)))
        log = commits.log
        unrationed = [
            i
            for i in range(1, len(log))
            if log[i][2] == {"p-one"} and log[i][0] - log[i - 1][1] < gap * 0.8
        ]
        assert len(unrationed) <= 1, (len(unrationed), len(log))
        assert sent >= 5
    finally:
        await hub.stop()


async def test_stop_with_lines_then_start_rations_the_flood_again(store: Store) -> None:
    gap = 0.05
    hub = Hub(store, StaticTokens(TOKENS), fair_share=1, fair_window=30, flood_gap=gap)
    commits = Commits(store)
    await hub.start()
    await hub.ingest(tenant_event("p-two"))
    flood = [asyncio.create_task(hub.ingest(tenant_event("p-one"))) for _ in range(4)]
    for _ in range(100):
        await asyncio.sleep(0.01)
        if "p-one" in hub.admission._waiters:
            break
    await hub.stop()
    results = await asyncio.gather(*flood, return_exceptions=True)
    assert all(r is None or isinstance(r, ConnectionError) for r in results), results
    assert not hub.admission._waiters
    await hub.start()
    try:
        await hub.ingest(tenant_event("p-two"))
        assert hub.admission.light_active(time.monotonic())
        commits.log.clear()
        tasks = [asyncio.create_task(hub.ingest(tenant_event("p-one"))) for _ in range(6)]
        async with asyncio.timeout(30):
            await asyncio.gather(*tasks)
        log = commits.log
        fast = [
            i
            for i in range(2, len(log))
            if log[i][2] == {"p-one"} and log[i][0] - log[i - 1][1] < gap * 0.8
        ]
        assert not fast, fast
    finally:
        await hub.stop()
