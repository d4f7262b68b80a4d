"""The SQLite backend's own edges: many processes opening one new file at once, fences that
stay ahead of an OS crash, and a host suspended past its leases (docs/coordination-contract.md,
"SQLite")."""

from __future__ import annotations

import asyncio
import functools
import shutil
import threading
import time
from pathlib import Path

import pytest

import keel.coordination as kc
from keel.coordination import _clock
from keel.errors import LockLost

pytestmark = pytest.mark.timeout(60)


def test_concurrent_first_connects_all_succeed(tmp_path: Path) -> None:
    url = f"sqlite://{tmp_path}/coord.db"
    start = threading.Barrier(8)
    failures: list[BaseException] = []

    def one(i: int) -> None:
        async def go() -> None:
            start.wait()
            coord = await kc.connect(url, member_id=f"m{i}", ttl=2)
            async with coord.lock("x", timeout=10):
                pass
            await coord.close()

        try:
            asyncio.run(go())
        except BaseException as exc:  # collected and asserted below
            failures.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert failures == []


def _save(db: Path, saved: Path) -> None:
    saved.mkdir()
    for suffix in ("", "-wal"):
        src = Path(f"{db}{suffix}")
        if src.exists():
            shutil.copy(src, saved / src.name)


def _restore(db: Path, saved: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    for copy in saved.iterdir():
        shutil.copy(copy, db.parent / copy.name)


async def test_fences_stay_ahead_of_a_crash_that_loses_unsynced_commits(tmp_path: Path) -> None:
    db = tmp_path / "coord.db"
    url = f"sqlite://{db}"
    coord = await kc.connect(url, member_id="a", ttl=2)
    # What an OS crash may leave: the file as of the last fsync. Nothing is synced after
    # connect returns, so a copy taken now is a state the disk may legally come back in.
    _save(db, tmp_path / "saved")
    fences = []
    for _ in range(5):
        async with coord.lock("x") as held:
            fences.append(held.fence)
    await coord.close()
    _restore(db, tmp_path / "saved")  # the crash: every commit since then is gone
    after = await kc.connect(url, member_id="b", ttl=2)
    async with after.lock("x") as held:
        assert held.fence > max(fences), (held.fence, fences)
    await after.close()


def _suspended(monkeypatch: pytest.MonkeyPatch, seconds: float, *, wall: bool) -> None:
    """The clocks as a host finds them after sleeping ``seconds``: CLOCK_BOOTTIME (and, with
    ``wall``, the wall clock) moved on, CLOCK_MONOTONIC did not. The bound reads the boot clock
    through `_clock.now`, made once from ``time.clock_gettime`` and the clock it chose: rebuilt
    here on a faked ``clock_gettime``, so a bound kept on CLOCK_MONOTONIC misses the sleep."""
    real_time, real_clock = time.time, time.clock_gettime

    def after_sleep(clock: int) -> float:
        return real_clock(clock) + (seconds if clock == time.CLOCK_BOOTTIME else 0)

    monkeypatch.setattr(time, "clock_gettime", after_sleep)
    monkeypatch.setattr(_clock, "now", functools.partial(after_sleep, *_clock.now.args))
    if wall:
        monkeypatch.setattr(time, "time", lambda: real_time() + seconds)


async def test_a_suspended_host_resumes_with_its_leases_run_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite://{tmp_path}/coord.db"
    a = await kc.connect(url, member_id="a", ttl=2)
    b = await kc.connect(url, member_id="b", ttl=2)
    held = await a.acquire("x")
    _suspended(monkeypatch, 10, wall=True)
    other = await b.acquire("x", timeout=0)  # every process on the host sees the lease over
    with pytest.raises(LockLost):
        held.check()
    await other.release()
    await a.close()
    await b.close()


async def test_the_boot_clock_alone_ends_a_lease_the_host_slept_through(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 15: ``time.monotonic`` stops while a host is suspended. With the wall clock held
    back (not corrected yet, or stepped back meanwhile) the boot clock must still end the lease
    on the holder's first look: a bound on CLOCK_MONOTONIC would outlive the lease."""
    a = await kc.connect(f"sqlite://{tmp_path}/coord.db", member_id="a", ttl=2)
    held = await a.acquire("x")
    held.check()
    _suspended(monkeypatch, 10, wall=False)
    with pytest.raises(LockLost, match="ran out"):
        held.check()
    with pytest.raises(LockLost):
        _ = held.fence
    await a.close()
