"""The blocking facade runs the async operations on a background loop (SQLite: no server)."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

from keel.coordination import FencedRegister
from keel.coordination.sync import connect
from keel.errors import LockLost, LockTimeout, StaleFence


def test_sync_lock_fences_and_excludes(tmp_path: Path) -> None:
    url = f"sqlite://{tmp_path}/c.db"
    with connect(url, member_id="a", ttl=2) as a, connect(url, member_id="b", ttl=2) as b:
        with a.lock("x") as held:
            assert b.try_acquire("x") is None
            with pytest.raises(LockTimeout):
                b.acquire("x", timeout=0.1)
            first = held.fence
        with b.lock("x", timeout=5) as again:
            assert again.fence > first
        assert b.run(lambda c: c.election("e").leader()) is None


def test_sync_holder_learns_of_loss(tmp_path: Path) -> None:
    url = f"sqlite://{tmp_path}/c.db"
    register = FencedRegister()
    with connect(url, member_id="a", ttl=1) as a, connect(url, member_id="b", ttl=1) as b:
        held = a.acquire("x")
        register.write("x", held.fence, "a")
        a._runner.loop.call_soon_threadsafe(time.sleep, 1.3)  # the loop stalls past the ttl
        newer = b.acquire("x", timeout=5)
        register.write("x", newer.fence, "b")
        with pytest.raises(StaleFence):
            register.write("x", held.granted_fence, "a")
        assert held.lost.wait(5)
        with pytest.raises(LockLost):
            held.check()
        held.release()
        newer.release()


def test_sync_check_runs_on_the_loop(tmp_path: Path) -> None:
    url = f"sqlite://{tmp_path}/c.db"
    with connect(url, member_id="a", ttl=1) as a:
        held = a.acquire("x")
        loop = a._runner.loop
        loop.set_debug(True)  # asyncio then refuses loop state touched from another thread
        try:
            waiting, woke = threading.Event(), threading.Event()

            async def wait_for_loss() -> None:
                waiting.set()  # the await below registers the waiter in this same step
                await held._held.lost.wait()
                woke.set()

            asyncio.run_coroutine_threadsafe(wait_for_loss(), loop)
            assert waiting.wait(5)
            loop.call_soon_threadsafe(time.sleep, 1.5)  # the loop stalls past the ttl
            time.sleep(1.2)
            with pytest.raises(LockLost):
                held.check()  # noticed from this thread, while the loop is still stalled
            assert woke.wait(5)
        finally:
            loop.set_debug(False)
        held.release()
