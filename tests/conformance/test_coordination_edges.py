"""The edges of the coordination contract, on every backend: a release or an acquire lost with
its connection, a lease extended, the lease the server enforces rather than the one asked for,
stale terms, paused holders, fair hand-off and waiting without polling
(docs/coordination-contract.md, "After restarts, pauses and lost replies").

On SQLite there is no connection to lose: the proxy faults do nothing there and the same
assertions hold trivially.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import time
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

import keel.coordination as kc
from coord_support import (
    TTL,
    BackendUnderTest,
    backend_fixture,  # noqa: F401 - the one backend fixture
    reap_worker,
    spawn_worker,
    worker_line,
)
from keel.errors import BackendUnavailable, LockLost, LockTimeout

pytestmark = pytest.mark.timeout(90)


# --- lost requests and replies ----------------------------------------------------------------


async def test_a_release_lost_with_its_connection_still_frees_the_lock(
    backend: BackendUnderTest,
) -> None:
    a = await backend.connect("a", proxied=True)
    b = await backend.connect("b")
    name = backend.n("lock")
    held = await a.acquire(name)
    await backend.drop_next_request()  # the release never reaches the server
    released = time.monotonic()
    await held.release()
    got = await b.acquire(name, timeout=TTL * 5)
    # Freed by the release being retried after the reconnect, not by the lease running out
    # (and on ZooKeeper the session survives the reconnect: nothing would ever free it).
    assert time.monotonic() - released < TTL * 0.75
    await got.release()


async def test_a_confirmed_release_lost_with_its_connection_still_frees_the_lock(
    backend: BackendUnderTest,
) -> None:
    """``release_confirmed()`` (resign, leave, tooz's release) without an answer: it says so,
    and the release is still retried until the server confirms it."""
    a = await backend.connect("a", proxied=True)
    b = await backend.connect("b")
    name = backend.n("lock")
    held = await a.acquire(name)
    await backend.drop_next_request()  # the delete never reaches the server
    released = time.monotonic()
    with contextlib.suppress(BackendUnavailable):
        await held.release_confirmed()
    got = await b.acquire(name, timeout=TTL * 5)
    assert time.monotonic() - released < TTL * 0.75
    await got.release()


async def test_an_acquire_applied_with_its_reply_lost_is_recognised_as_ours(
    backend: BackendUnderTest,
) -> None:
    a = await backend.connect("a", proxied=True)
    b = await backend.connect("b")
    name = backend.n("lock")
    await backend.lose_next_reply()
    held = await a.acquire(name, timeout=TTL * 4)
    await backend.fault_fired()
    first = held.fence
    assert await b.try_acquire(name) is None
    await held.release()
    other = await b.acquire(name, timeout=TTL)
    assert other.fence > first
    await other.release()


async def test_an_abandoned_ambiguous_acquire_leaves_no_ghost(backend: BackendUnderTest) -> None:
    a = await backend.connect("a", proxied=True)
    b = await backend.connect("b")
    name = backend.n("lock")
    # A lock a keeps renewing meanwhile: its renewals must not keep the ghost alive.
    keeper = await a.acquire(backend.n("other"))
    await backend.lose_next_reply()
    with contextlib.suppress(BackendUnavailable):
        got = await a.try_acquire(name)
        if got is not None:
            await got.release()
    await backend.fault_fired()
    started = time.monotonic()
    other = await b.acquire(name, timeout=TTL * 3)
    assert time.monotonic() - started < TTL + 1.5
    await other.release()
    keeper.check()
    await keeper.release()


# --- what the holder believes vs what the server enforces -------------------------------------


async def test_extend_moves_the_servers_expiry_and_the_bound_never_outlives_it(
    backend: BackendUnderTest,
) -> None:
    b = await backend.connect("b")
    name = backend.n("lock")
    proc = await spawn_worker("extend", backend.url, name, str(TTL))
    try:
        line = await worker_line(proc)
        assert line.startswith("EXTENDED"), line
        believed = float(line.split()[1])
        told = time.monotonic()
        proc.send_signal(signal.SIGSTOP)  # no renewal from here on: only the server's clock
        while (got := await b.try_acquire(name)) is None:
            assert time.monotonic() - told < believed + TTL + 5, "never freed"
            await asyncio.sleep(0.05)
        taken = time.monotonic() - told
        await got.release()
    finally:
        await reap_worker(proc)
    # The holder believed it held the lock for `believed` seconds after it said so; nobody
    # else may have it sooner (a little slack: the line took a moment to arrive).
    assert taken >= believed - 0.3, (taken, believed)


async def test_the_lease_is_the_one_the_server_enforces(backend: BackendUnderTest) -> None:
    a = await backend.connect("a", ttl=90)  # beyond what ZooKeeper's server allows
    held = await a.acquire(backend.n("lock"))
    assert held.ttl <= backend.server_max_ttl
    # The expiry bound too, not only the number reported: ZooKeeper's negotiated timeout.
    assert held.remaining() <= backend.server_max_ttl
    await held.release()


# --- live when handed out -----------------------------------------------------------------------


async def test_campaign_and_join_hand_out_only_live_terms(backend: BackendUnderTest) -> None:
    a = await backend.connect("a")
    election = a.election(backend.n("e"))
    term = await election.campaign(timeout=5)
    await term.release()  # released directly, not through resign()
    again = await election.campaign(timeout=5)
    assert again is not term
    again.check()
    time.sleep(TTL * 1.3)  # a stall: the term's lease runs out before anything notices
    third = await election.campaign(timeout=5)
    assert third is not again
    third.check()
    await election.resign()

    group = a.group(backend.n("g"))
    membership = await group.join(b"m", timeout=5)
    time.sleep(TTL * 1.3)
    rejoined = await group.join(b"m", timeout=5)
    assert rejoined is not membership
    rejoined.check()
    await group.leave()


async def test_every_fence_use_checks_the_lease(backend: BackendUnderTest) -> None:
    a = await backend.connect("a")
    name = backend.n("lock")
    register = kc.FencedRegister()
    held = await a.acquire(name)
    register.write(name, held, "first")
    time.sleep(TTL * 1.3)  # paused past the lease, nothing has run since
    with pytest.raises(LockLost):
        _ = held.fence
    with pytest.raises(LockLost):
        register.write(name, held, "late")
    assert register.read(name) == (held.granted_fence, "first")


async def test_lock_lost_after_a_normal_exit_keeps_its_reason(backend: BackendUnderTest) -> None:
    a = await backend.connect("a")

    async def body() -> None:
        async with a.lock(backend.n("lock")):
            time.sleep(TTL * 1.3)  # the body ends normally, after the lease ran out

    with pytest.raises(LockLost) as info:
        await body()
    assert "ran out" in str(info.value), str(info.value)


async def test_a_paused_holder_writes_nothing_once_it_resumes(
    backend: BackendUnderTest, tmp_path: Path
) -> None:
    name = backend.n("lock")
    reg_path = str(tmp_path / "reg.db")
    register = kc.SqliteFencedRegister(reg_path)
    writer = await spawn_worker(
        "writer", backend.url, name, str(TTL), str(tmp_path / "w.jsonl"), reg_path, "victim"
    )
    try:
        assert (await worker_line(writer)).startswith("HOLDING")
        await asyncio.sleep(0.1)
        writer.send_signal(signal.SIGSTOP)
        taker = await backend.connect("taker")
        held = await taker.acquire(name, timeout=TTL * 4)
        taken_at = time.time()
        writer.send_signal(signal.SIGCONT)
        await asyncio.sleep(0.5)  # the victim runs first; the new holder has not written yet
        register.write(name, held.fence, "taker")
        assert await worker_line(writer, TTL * 4) in ("LOST", "REFUSED")
        await held.release()
    finally:
        await reap_worker(writer)
    late = [w for w in register.writes() if w[3] == "victim" and w[4] > taken_at]
    register.close()
    # The contract leaves one window open: a write whose lease check passed just before the
    # pause reaches the resource after it (only the resource's fence covers that instant).
    # So at most that one write lands late, and none that began after the lock was taken.
    begun_late = [
        e for e in kc.load([tmp_path / "w.jsonl"]) if e.kind == "write" and e.start > taken_at
    ]
    assert begun_late == [], f"the paused holder checked and wrote after it lost the lock: {late}"
    assert len(late) <= 1, f"the paused holder wrote {len(late)} times after it lost the lock"


# --- fair hand-off ------------------------------------------------------------------------------


async def test_a_released_lock_goes_to_the_waiter_not_back_to_the_releaser(
    backend: BackendUnderTest,
) -> None:
    a, b = await backend.connect("a"), await backend.connect("b")
    name = backend.n("lock")
    held = await a.acquire(name)
    waiter = asyncio.create_task(b.acquire(name, timeout=30))
    await asyncio.sleep(0.3)  # b is queued
    await held.release()
    stolen = await a.try_acquire(name)  # must not cut in front of the queued waiter
    if stolen is not None:
        await stolen.release()
    got = await asyncio.wait_for(waiter, 10)
    assert stolen is None
    assert got.fence > held.granted_fence
    await got.release()


async def test_release_then_acquire_again_hands_out_a_new_stored_fence(
    backend: BackendUnderTest,
) -> None:
    """A release and the same client's next acquisition of the name are one write where the
    backend can merge them (SQLite, ZooKeeper): the fence handed out is still new and is the
    one the backend stores, and a waiter queued meanwhile still comes first."""
    a, b = await backend.connect("a"), await backend.connect("b")
    name = backend.n("lock")
    fences: list[int] = []
    for _ in range(20):
        async with a.lock(name) as held:
            record = await a.backend.get(held.key)
            assert record is not None
            assert record.fence == held.fence
            fences.append(held.fence)
    held = await a.acquire(name)
    waiter = asyncio.create_task(b.acquire(name, timeout=30))
    await asyncio.sleep(0.3)  # b is queued
    await held.release()
    with pytest.raises(LockTimeout):
        await a.acquire(name, timeout=1.0)  # queued behind b, which holds it by now
    got = await asyncio.wait_for(waiter, 10)
    fences.append(got.fence)
    await got.release()
    async with a.lock(name, timeout=10) as last:
        fences.append(last.fence)
    assert fences == sorted(set(fences)), fences  # strictly increasing, never reused


async def test_waiters_are_served_in_arrival_order(backend: BackendUnderTest) -> None:
    holder = await backend.connect("h")
    waiters = [await backend.connect(f"w{i}") for i in range(4)]
    name = backend.n("lock")
    held = await holder.acquire(name)
    order: list[int] = []

    async def turn(i: int, coord: kc.Coordinator) -> None:
        async with coord.lock(name, timeout=30):
            order.append(i)
            await asyncio.sleep(0.02)

    tasks = []
    for i, coord in enumerate(waiters):
        tasks.append(asyncio.create_task(turn(i, coord)))
        await asyncio.sleep(0.2)  # queued before the next one arrives
    await held.release()
    await asyncio.wait_for(asyncio.gather(*tasks), 30)
    assert order == [0, 1, 2, 3]


# --- waiting on the server, not polling it -----------------------------------------------------


class _CountingReads:
    """The coordinator's real backend, with its reads counted (everything is forwarded)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.reads = 0

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if name not in ("get", "children"):
            return attr

        async def counted(*args: Any, **kwargs: Any) -> Any:
            self.reads += 1
            return await attr(*args, **kwargs)

        return counted


async def _zookeeper_received(coord: kc.Coordinator) -> int:
    """What the server counts as received on this coordinator's own connection (the ``stat``
    four-letter command lists each connection's ``recved``): other clients do not count."""
    port = coord.backend._client._connection._socket.getsockname()[1]  # type: ignore[attr-defined]
    host, server_port = urlsplit(coord.url).hostname, urlsplit(coord.url).port
    reader, writer = await asyncio.open_connection(host, server_port)
    writer.write(b"stat")
    answer = (await reader.read()).decode()
    writer.close()
    found = re.search(rf"/127\.0\.0\.1:{port}\[\d+\]\([^)]*recved=(\d+)", answer)
    assert found, answer
    return int(found.group(1))


async def _redis_requests(url: str, ns: str, seconds: float) -> int:
    """Commands the server ran, over ``seconds``, that name this test's keys (MONITOR on a
    connection of its own; other clients' keys never hold this test's namespace)."""
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    writer.write(b"MONITOR\r\n")
    assert (await reader.readline()).startswith(b"+OK")
    count = 0
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            while line := await reader.readline():
                count += ns.encode() in line
    writer.close()
    return count


def _etcd_requests(url: str) -> int:
    """Every read etcd counts (Range and Txn calls, Watch requests) from every client: its
    metrics are per server, not per connection."""
    parts = urlsplit(url)
    with urllib.request.urlopen(f"http://{parts.hostname}:{parts.port}/metrics", timeout=5) as r:
        text = r.read().decode()
    total = 0
    for line in text.splitlines():
        started = line.startswith("grpc_server_started_total") and (
            'grpc_method="Range"' in line or 'grpc_method="Txn"' in line
        )
        watched = line.startswith("grpc_server_msg_received_total") and (
            'grpc_method="Watch",grpc_service="etcdserverpb.Watch"' in line
        )
        if started or watched:
            total += int(float(line.rsplit(" ", 1)[1]))
    return total


async def _etcd_least(url: str) -> int:
    """The median of the requests etcd got in three seconds, one by one: another client's
    burst in one of them does not count, a steady load does."""
    seconds = []
    for _ in range(3):
        before = await asyncio.to_thread(_etcd_requests, url)
        await asyncio.sleep(1.0)
        seconds.append(await asyncio.to_thread(_etcd_requests, url) - before)
    return sorted(seconds)[1]


async def _server_requests(
    backend: BackendUnderTest, coord: kc.Coordinator, baseline: int
) -> int | None:
    """Requests the server got from ``coord`` in one second, as the server counts them (None
    on SQLite: there is no server). ZooKeeper counts per connection and Redis's MONITOR is
    filtered by this test's keys, so other clients of the shared server do not count. etcd's
    metrics count every client: ``baseline`` is the same count taken before ``coord`` began
    (`_etcd_least`), and only what comes on top of it counts."""
    if backend.kind == "zookeeper":
        before = await _zookeeper_received(coord)
        await asyncio.sleep(1.0)
        return await _zookeeper_received(coord) - before
    if backend.kind == "redis":
        return await _redis_requests(backend.url, backend.ns, 1.0)
    if backend.kind == "etcd":
        return await _etcd_least(backend.url) - baseline
    return None


@pytest.mark.parametrize("poll", [None, 0.1], ids=["default-poll", "poll-0.1"])
async def test_observers_wait_for_the_server_instead_of_polling(
    backend: BackendUnderTest, poll: float | None
) -> None:
    a, b = await backend.connect("a"), await backend.connect("b")
    counting = _CountingReads(a.backend)
    a.backend = counting  # type: ignore[assignment]
    seen: list[kc.Leader | None] = []
    # One re-read per poll when nothing is signalled (at most three requests each: ZooKeeper
    # lists the key, reads its holder and sets its watch), and kazoo's pings, etc.: a loop
    # that polls the server reads it hundreds of times a second (ZooKeeper 356/s, Redis 87/s).
    reads_allowed = 3 if poll is None else 1 / poll + 3
    sent_allowed = 10 if poll is None else 3 / poll + 15

    async def observe() -> None:
        async for leader in a.election(backend.n("e")).observe(poll=poll):
            seen.append(leader)
            if leader is not None:
                return

    baseline = await _etcd_least(backend.url) if backend.kind == "etcd" else 0
    watcher = asyncio.create_task(observe())
    await asyncio.sleep(0.3)  # the first read is done
    counting.reads = 0
    await asyncio.sleep(1.0)  # nobody leads: an observer should be waiting, not reading
    idle_reads = counting.reads
    assert idle_reads <= reads_allowed, f"{idle_reads} reads in one idle second"
    sent = await _server_requests(backend, a, baseline)
    if sent is not None:
        assert sent < sent_allowed, f"the server got {sent} requests in one idle second"
    campaigned = time.monotonic()
    term = await b.election(backend.n("e")).campaign(timeout=5)
    await asyncio.wait_for(watcher, 5)
    assert time.monotonic() - campaigned < 1.0
    assert seen == [None, kc.Leader("b", term.granted_fence)]

    counting.reads = 0
    changes = a.group(backend.n("g")).watch()
    first = asyncio.create_task(anext(changes))
    await asyncio.sleep(1.0)
    assert counting.reads <= 3, f"{counting.reads} listings in one idle second"
    await b.group(backend.n("g")).join(b"x")
    change = await asyncio.wait_for(first, 5)
    assert (change.kind, change.member.member_id) == ("join", "b")
    await changes.aclose()
    await term.release()
