"""`keel._portal.CallerRunsPortal`: calls run in the caller's thread while the loop thread
waits, the rest on the loop thread, and the loop thread is never kept out of its timers."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import pytest

from keel._portal import CallerRunsPortal


@pytest.fixture(name="portal")
def _portal() -> Iterator[CallerRunsPortal]:
    portal = CallerRunsPortal()
    time.sleep(0.05)  # the loop thread reaches its first select
    yield portal
    portal.close()


async def _where() -> threading.Thread:
    return threading.current_thread()


def test_a_call_that_does_not_wait_runs_in_the_callers_thread(portal: CallerRunsPortal) -> None:
    assert portal.run(_where()) is threading.current_thread()


def test_a_call_that_waits_is_finished_by_the_loop_thread(portal: CallerRunsPortal) -> None:
    async def wait_then_where() -> tuple[threading.Thread, asyncio.AbstractEventLoop]:
        await asyncio.sleep(0.01)
        return threading.current_thread(), asyncio.get_running_loop()

    thread, loop = portal.run(wait_then_where(), timeout=5)
    assert thread is not threading.current_thread()
    assert loop is portal.loop


def test_errors_reach_the_caller(portal: CallerRunsPortal) -> None:
    async def fail() -> None:
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        portal.run(fail())


def test_callbacks_a_call_leaves_run_soon(portal: CallerRunsPortal) -> None:
    done = threading.Event()

    async def later() -> None:
        asyncio.get_running_loop().call_later(0.01, done.set)

    portal.run(later())
    assert done.wait(2)


def test_a_tight_loop_of_calls_does_not_keep_the_loop_thread_from_its_timers(
    portal: CallerRunsPortal,
) -> None:
    fired: list[float] = []

    async def arm() -> None:
        loop = asyncio.get_running_loop()
        for i in range(20):
            loop.call_later(0.01 * (i + 1), lambda: fired.append(time.monotonic()))

    async def nothing() -> None:
        return None

    start = time.monotonic()
    portal.run(arm())
    while time.monotonic() < start + 0.5:
        portal.run(nothing())
    assert len(fired) == 20
    assert max(fired) - start < 0.45  # each served close to when it was due


def test_many_threads_at_once(portal: CallerRunsPortal) -> None:
    counter = {"n": 0}

    async def bump() -> None:
        value = counter["n"]
        await asyncio.sleep(0)
        counter["n"] = value + 1

    lock = asyncio.Lock()

    async def bump_locked() -> None:
        async with lock:
            await bump()

    def work() -> None:
        for _ in range(200):
            portal.run(bump_locked(), timeout=10)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert counter["n"] == 800
