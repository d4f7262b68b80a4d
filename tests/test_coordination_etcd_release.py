"""An etcd release whose member fails under it (seen in CI: tests/topology/
test_etcd_cluster_attack.py, the waiter's release_confirmed met "Stream removed" from the
member just killed). The delete is conditional on the fence, so the backend asks again
(gRPC has moved to a live member by then) instead of making the caller retry; when the delete
was applied and only its answer lost, the retry recognises its own delete."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

import keel.coordination as kc
from keel.coordination import HeldLock
from keel.coordination.backends.etcd import EtcdBackend
from keel.errors import BackendUnavailable
from tests import servers

pytestmark = pytest.mark.timeout(60)


def _fail_txns(backend: EtcdBackend, *, applied: bool, times: int = 1) -> list[int]:
    """The next ``times`` transactions fail as a member dying under them would: after the
    server applied them (``applied``) or before it saw them. Returns the count of failures."""
    real: Callable[[Any], Any] = backend._txn
    fired: list[int] = []

    async def txn(request: Any, timeout: float | None = None) -> Any:
        if len(fired) >= times:
            return await real(request, timeout)
        fired.append(1)
        if applied:
            await real(request, timeout)
        raise BackendUnavailable("etcd: Stream removed (injected)", backend="etcd")

    backend._txn = txn  # type: ignore[method-assign]
    return fired


def _hang_reads(
    backend: EtcdBackend, *, times: int, after: int = 0, longest: float = 3600.0
) -> list[float]:
    """After ``after`` reads, the next ``times`` reads of a release hang as on a stopped
    member, until the time the backend gives the call (or ``longest``), then fail. Returns
    the times given."""
    real: Callable[..., Any] = backend._entries
    given: list[float] = []
    passed: list[int] = []

    async def entries(key: str, timeout: float | None = None) -> Any:
        if len(passed) < after or len(given) >= times:
            passed.append(1)
            return await real(key, timeout)
        allowed = timeout if timeout is not None else backend._timeout
        given.append(allowed)
        await asyncio.sleep(min(allowed, longest))
        raise BackendUnavailable("etcd: deadline exceeded (injected)", backend="etcd")

    backend._entries = entries  # type: ignore[method-assign]
    return given


@contextlib.asynccontextmanager
async def _holding(
    member: str, *, ttl: float = 30, query: str = ""
) -> AsyncIterator[tuple[kc.Coordinator, str, HeldLock, EtcdBackend]]:
    """A coordinator on the etcd server holding a fresh lock: (it, the lock's name, the
    held lock, its backend)."""
    coord = await kc.connect(servers.server_url("etcd") + query, member_id=member, ttl=ttl)
    try:
        name = f"release-{uuid.uuid4().hex[:8]}"
        held = await coord.try_acquire(name)
        assert held is not None
        backend = coord.backend
        assert isinstance(backend, EtcdBackend)
        yield coord, name, held, backend
    finally:
        await coord.close()


@pytest.mark.parametrize("applied", [False, True], ids=["not-sent", "reply-lost"])
async def test_release_confirmed_survives_a_member_lost_under_it(applied: bool) -> None:
    b = await kc.connect(servers.server_url("etcd"), member_id="rel-b", ttl=30)
    try:
        async with _holding("rel-a") as (_, name, held, backend):
            fence = held.fence
            fired = _fail_txns(backend, applied=applied)
            assert await held.release_confirmed() is True
            assert fired == [1]
            # Free at once, not after the 30 s lease: no ghost entry left behind.
            mine = await b.try_acquire(name)
            assert mine is not None
            assert mine.fence > fence
            assert await mine.release_confirmed() is True
    finally:
        await b.close()


async def test_a_lease_that_ended_under_a_lost_delete_is_not_reported_ours() -> None:
    """The answer lost and the key gone because the lease ended (broken by an operator's
    revoke here): release_confirmed says False, as for any lock lost before its release."""
    async with _holding("rel-c") as (_, _name, held, backend):
        fence = held.fence
        attempt = backend._held[(held.key, fence)]
        real = backend._txn

        async def revoked_then_lost(request: Any, timeout: float | None = None) -> Any:
            backend._txn = real  # type: ignore[method-assign]
            await backend._revoke(attempt.lease)
            raise BackendUnavailable("etcd: Stream removed (injected)", backend="etcd")

        backend._txn = revoked_then_lost  # type: ignore[method-assign]
        assert await held.release_confirmed() is False
        assert (held.key, fence) not in backend._held


async def test_a_short_lease_outlives_the_retries_of_a_lost_delete() -> None:
    """Applied, its answer lost, then the next member slow for longer than the lease: the
    lease is kept alive while the release is settled, so its end still means "not ours"."""
    async with _holding("rel-e", ttl=2) as (_, _name, held, backend):
        fence = held.fence
        _fail_txns(backend, applied=True)
        given = _hang_reads(backend, times=1, after=1, longest=2.6)
        assert await held.release_confirmed() is True
        assert len(given) == 1
        assert (held.key, fence) not in backend._held


async def test_the_lease_keeper_does_not_wait_on_a_hanging_member() -> None:
    """The keeper's first refresh goes to a hanging member: it is given a third of the ttl and
    sent again at once, so a 2 s lease still outlives a 2.6 s read."""
    async with _holding("rel-g", ttl=2) as (_, _name, held, backend):
        fence = held.fence
        real = backend._keepalive
        hung: list[float] = []

        async def keepalive(lease: Any, timeout: float | None = None) -> None:
            if not hung and timeout is not None:  # the keeper's (a renewal gives none)
                hung.append(timeout)
                await asyncio.sleep(timeout)
                raise BackendUnavailable("etcd: deadline exceeded (injected)", backend="etcd")
            await real(lease, timeout)

        backend._keepalive = keepalive  # type: ignore[method-assign]
        _fail_txns(backend, applied=True)
        _hang_reads(backend, times=1, after=1, longest=2.6)
        assert await held.release_confirmed() is True
        assert len(hung) == 1
        assert hung[0] <= 1
        assert (held.key, fence) not in backend._held


async def test_a_short_timeout_still_asks_the_next_member() -> None:
    """connect_timeout=1: a member failing at once under the delete is still retried."""
    async with _holding("rel-h", query="?connect_timeout=1") as (_, _name, held, backend):
        fired = _fail_txns(backend, applied=False)
        assert await held.release_confirmed() is True
        assert fired == [1]


async def test_a_hanging_member_bounds_the_whole_release_by_one_timeout() -> None:
    """Every member silent: the release gives up within the backend's one timeout (2 s
    here), not the timeout per call and per try (4 tries of two calls: over 9 s)."""
    async with _holding("rel-f", query="?connect_timeout=2") as (_, _name, held, backend):
        real = backend._entries
        _hang_reads(backend, times=100)
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(BackendUnavailable):
            await held.release_confirmed()
        assert loop.time() - start < 2.5
        backend._entries = real  # type: ignore[method-assign]


async def test_a_member_down_for_good_still_ends_in_backend_unavailable() -> None:
    async with _holding("rel-d") as (coord, name, held, backend):
        real = backend._txn
        fired = _fail_txns(backend, applied=False, times=4)
        with pytest.raises(BackendUnavailable):
            await held.release_confirmed()
        assert len(fired) == 4  # _DELETE_TRIES, then the caller hears "retry later"
        backend._txn = real  # type: ignore[method-assign]
        # The release goes on in the background until confirmed: the lock frees itself.
        for _ in range(100):
            if await coord.try_acquire(name) is not None:
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the background release never freed the lock")


async def test_a_queued_waiter_keeps_one_watch_for_its_whole_wait() -> None:
    """etcd serves a watch starting at a past revision from its "unsynced" set, caught up
    every 100 ms: a watch made again after each event heard each release ahead of it ~85 ms
    late (contended hand-off p50 95 ms in `bench locks`). Three holders ahead released one
    after another: the waiter opens one watch, not one per release."""
    url = servers.server_url("etcd")
    waiter = await kc.connect(url, member_id="watch-w", ttl=30)
    ahead = [await kc.connect(url, member_id=f"watch-{i}", ttl=30) for i in range(3)]
    try:
        name = f"watch-{uuid.uuid4().hex[:8]}"
        first = await ahead[0].try_acquire(name)
        assert first is not None

        # Each takes its turn and gives it up: which of the two queues first is up to them.
        async def turn(client: kc.Coordinator) -> None:
            held = await client.acquire(name, timeout=20)
            await held.release_confirmed()

        queued = [asyncio.create_task(turn(c)) for c in ahead[1:]]
        await asyncio.sleep(0.3)
        backend = waiter.backend
        assert isinstance(backend, EtcdBackend)
        watcher = backend._client._watcher
        real = watcher.add_callback
        opened: list[int] = []

        async def counted(*args: Any, **kwargs: Any) -> Any:
            opened.append(1)
            return await real(*args, **kwargs)

        watcher.add_callback = counted
        mine = asyncio.create_task(waiter.acquire(name, timeout=20))
        await asyncio.sleep(0.3)
        await first.release_confirmed()
        await asyncio.gather(*queued)
        got = await mine
        assert await got.release_confirmed() is True
        assert opened == [1]
    finally:
        await waiter.close()
        for client in ahead:
            await client.close()
