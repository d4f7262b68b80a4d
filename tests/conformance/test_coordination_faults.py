"""History checks under faults, on every backend: clients in their own processes record what
they saw, the fenced resource logs what it accepted, and `keel.coordination.check` proves that
no stale holder's write was accepted and no fence went backwards — while holders are paused
(SIGSTOP past the ttl), killed (SIGKILL), cut off (connections dropped) and the server restarts.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import pytest

import keel.coordination as kc
from coord_support import (
    FREE_BOUND,
    TTL,
    BackendUnderTest,
    backend_fixture,  # noqa: F401 - the one backend fixture
    reap_worker,
    spawn_worker,
    worker_line,
)

pytestmark = pytest.mark.timeout(120)


async def test_paused_holder_is_refused_and_learns_loss(
    backend: BackendUnderTest, tmp_path: Path
) -> None:
    name = backend.n("lock")
    reg_path = str(tmp_path / "reg.db")
    register = kc.SqliteFencedRegister(reg_path)
    victim = await spawn_worker(
        "victim", backend.url, name, str(TTL), str(tmp_path / "victim.jsonl"), reg_path, "victim"
    )
    try:
        assert (await worker_line(victim)).startswith("HOLDING")
        victim.send_signal(signal.SIGSTOP)
        # While it is frozen its lease runs out and another client takes over and writes.
        coord = await backend.connect("taker")
        recorder = kc.Recorder(tmp_path / "taker.jsonl", "taker")
        start = time.time()
        async with coord.lock(name, timeout=TTL * 4) as held:
            recorder.record("acquire", name, held.fence, start)
            start = time.time()
            register.write(name, held.fence, "taker")
            recorder.record("write", name, held.fence, start)
            victim.send_signal(signal.SIGCONT)
            outcome = [await worker_line(victim, TTL * 6) for _ in range(2)]
        assert outcome == ["REFUSED", "LOST"]
        recorder.close()
    finally:
        await reap_worker(victim)
    events = kc.load([tmp_path / "victim.jsonl", tmp_path / "taker.jsonl"])
    accepted = register.accepted()
    register.close()
    kc.check(events, accepted)
    assert [e.kind for e in events if e.client == "victim"] == [
        "acquire",
        "write",
        "refused",
        "lost",
    ]


def _first_acquire_after(events: list[kc.Event], instant: float) -> float:
    """Seconds from ``instant`` until some client next held the lock."""
    ends = [e.end for e in events if e.kind == "acquire" and e.end > instant]
    return min(ends) - instant if ends else float("inf")


async def test_randomized_workload_under_faults(backend: BackendUnderTest, tmp_path: Path) -> None:
    """Four processes take the lock and increment a fenced counter (read-modify-write) while
    one is killed, one is paused past its ttl, replies of applied writes are lost, requests
    are dropped, every connection is cut and the server restarts twice with releases in
    flight. The history must check, no increment may be lost, and the lock must be free again
    within ttl plus the contract's bound after each kill and restart."""
    name = backend.n("lock")
    reg_path = str(tmp_path / "reg.db")
    register = kc.SqliteFencedRegister(reg_path)
    url = backend.proxied_url()
    seconds = 90.0  # a bound: the test stops them (STOP) once the last fault has settled
    stop = tmp_path / "stop"
    workers = [
        await spawn_worker(
            "loop",
            url,
            name,
            str(TTL),
            str(tmp_path / f"w{i}.jsonl"),
            reg_path,
            f"w{i}",
            str(seconds),
            str(1000 + i),
            str(stop),
        )
        for i in range(4)
    ]
    marks: dict[str, float] = {}
    try:
        for w in workers:
            assert await worker_line(w) == "STARTED"
        await asyncio.sleep(1.0)
        workers[0].kill()  # a holder (or a waiter) dies at once
        marks["killed"] = time.time()
        await asyncio.sleep(1.0)
        workers[1].send_signal(signal.SIGSTOP)  # paused past its ttl
        await asyncio.sleep(TTL * 1.5)
        workers[1].send_signal(signal.SIGCONT)
        for _ in range(3):  # a write applied, its reply lost with the connection
            await backend.lose_next_reply()
            await backend.fault_fired()
            await asyncio.sleep(0.3)
        for _ in range(2):  # a request lost with the connection
            await backend.drop_next_request()
            await backend.fault_fired()
            await asyncio.sleep(0.3)
        backend.cut()  # every client connection drops
        await asyncio.sleep(1.0)
        for restart in ("restarted", "restarted again"):  # mid-load: releases in flight
            await asyncio.to_thread(backend.restart)
            marks[restart] = time.time()
            await asyncio.sleep(2.0)
        await asyncio.sleep(TTL + FREE_BOUND)  # long enough to see the lock taken again
        stop.touch()
        for w in workers[1:]:
            assert await worker_line(w, 60) == "DONE"
    finally:
        for w in workers:
            await reap_worker(w)
    events = kc.load([tmp_path / f"w{i}.jsonl" for i in range(len(workers))])
    accepted = register.accepted()
    counted = register.value(name)
    register.close()
    kc.check(events, accepted)  # fences in order, no stale write, no lost update
    assert counted == str(len(accepted)), (counted, len(accepted))
    assert len(accepted) > 20
    survivors = {w.client for w in accepted}
    assert len(survivors) >= 2, survivors
    for fault, at in marks.items():
        free = _first_acquire_after(events, at)
        assert free < TTL + FREE_BOUND, f"the lock was not taken for {free:.1f}s after {fault}"
