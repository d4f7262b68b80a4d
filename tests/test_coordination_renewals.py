"""The fast path of an uncontended lock keeps its promises: the one renewal timer per
coordinator renews every held lock on time however many others came and went, and a
release merged into the next acquisition (SQLite) hands out the fence the file holds."""

from __future__ import annotations

import asyncio
import os
import time
import warnings
from pathlib import Path

import pytest

import keel.coordination as kc
from keel.coordination.backends import base

pytestmark = pytest.mark.timeout(60)


async def test_one_timer_renews_every_held_lock(tmp_path: Path) -> None:
    url = f"sqlite://{tmp_path}/coord.db"
    coord = await kc.connect(url, member_id="holder", ttl=1.0)
    other = await kc.connect(url, member_id="other", ttl=1.0)
    try:
        # Held across several ttls, with different ttls, while thousands of locks come and go
        # through the same timer (blanked entries must neither fire nor pile up).
        held = [await coord.acquire("a", ttl=1.0), await coord.acquire("b", ttl=2.0)]
        end = time.monotonic() + 4.0
        while time.monotonic() < end:
            for i in range(200):
                async with coord.lock(f"churn-{i % 7}"):
                    pass
                if i % 20 == 0:
                    await asyncio.sleep(0)  # an uncontended SQLite cycle never yields by itself
            await asyncio.sleep(0.1)
            for h in held:
                h.check()  # renewed in time, or this raises LockLost
            assert len(coord._renewals._heap) < 300 + len(held)
        for h in held:
            assert await other.try_acquire(h.name) is None  # the server agrees: still held
            record = await coord.backend.get(h.key)
            assert record is not None
            assert record.fence == h.granted_fence
        for h in held:
            await h.release()
        assert await other.try_acquire("a") is not None
    finally:
        await other.close()
        await coord.close()


async def test_merged_release_and_acquire_hands_out_the_stored_fence(tmp_path: Path) -> None:
    url = f"sqlite://{tmp_path}/coord.db"
    coord = await kc.connect(url, member_id="one", ttl=5)
    other = await kc.connect(url, member_id="two", ttl=5)
    try:
        fences: list[int] = []
        for i in range(30):
            if i % 10 == 9:  # another client takes it in between: the merge must not apply
                async with other.lock("x") as theirs:
                    fences.append(theirs.fence)
            async with coord.lock("x") as held:
                record = await coord.backend.get(held.key)
                assert record is not None
                assert record.fence == held.fence
                fences.append(held.fence)
        assert fences == sorted(set(fences)), fences  # strictly increasing, never reused
    finally:
        await other.close()
        await coord.close()


def test_forked_child_tokens_differ_from_the_parent() -> None:
    """Tokens name queue entries across processes: a forked child must not repeat them."""
    read, write = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # eventlet's, if a test loaded it
        pid = os.fork()
    if pid == 0:  # the child: report one token and leave at once
        os.write(write, base._token().encode())
        os._exit(0)
    os.close(write)
    theirs = os.read(read, 200).decode()
    os.close(read)
    os.waitpid(pid, 0)
    ours = base._token()
    assert theirs.rpartition("-")[0] != ours.rpartition("-")[0]
