"""Attacks on the etcd backend's merge (per-attempt leases and the waiter queue, with member
rotation and auth-token refresh): real etcd with auth (scripts/servers.d/etcd-tls.sh, simple
tokens that expire after KEEL_ETCD_TLS_TOKEN_TTL, default 3 s, of disuse) and the 3-member
cluster."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from urllib.parse import urlsplit

import pytest

import keel.coordination as kc
from tests.coord_support import HEARTBEATS, CutProxy, handed_over
from tests.servers import server_url

pytestmark = [pytest.mark.timeout(120)]

TOKEN_TTL = float(os.environ.get("KEEL_ETCD_TLS_TOKEN_TTL", "3"))


async def _queued_behind(holder: kc.Coordinator, waiter: kc.Coordinator, name: str) -> int:
    """``waiter`` queues for ``name`` while ``holder`` holds it; the waiter's fence."""
    held = await holder.try_acquire(name)
    assert held is not None
    task = asyncio.create_task(waiter.acquire(name, timeout=20))
    await asyncio.sleep(0.5)
    assert not task.done()
    return await handed_over(held, task, 20)


async def test_a_waiter_whose_token_expired_is_still_woken() -> None:
    """A waiter's watch stream carries the token it was opened with: once that token expires
    (disuse), every later wait on the stream is refused, though the unary calls log in
    again. The waiter must still get the lock when the holder lets go."""
    url = server_url("etcd-tls")
    a = await kc.connect(url, member_id="tok-a", ttl=3)
    b = await kc.connect(url, member_id="tok-b", ttl=3)
    try:
        name = f"attack-{uuid.uuid4().hex[:8]}"
        await _queued_behind(a, b, name)  # b's watch stream is open now
        await asyncio.sleep(TOKEN_TTL + 2)  # both idle: both tokens expire
        started = time.monotonic()
        await _queued_behind(a, b, name)
        assert time.monotonic() - started < 10
    finally:
        await a.close()
        await b.close()


async def test_a_held_lock_outlives_its_token() -> None:
    """Holding past the token's lifetime: renewals go on (keep-alive stream refreshed), the
    release works, and a queued waiter gets the lock at once."""
    url = server_url("etcd-tls")
    a = await kc.connect(url, member_id="hold-a", ttl=2)
    b = await kc.connect(url, member_id="hold-b", ttl=2)
    try:
        name = f"attack-{uuid.uuid4().hex[:8]}"
        held = await a.try_acquire(name)
        assert held is not None
        task = asyncio.create_task(b.acquire(name, timeout=30))
        await asyncio.sleep(3 * TOKEN_TTL)
        held.check()  # still ours
        assert not task.done()
        await handed_over(held, task, 10)
    finally:
        await a.close()
        await b.close()


async def test_keepalive_stream_cut_again_and_again() -> None:
    """Every connection to etcd cut each second for three leases' time (a flapping link):
    the keep-alive stream is opened again each time, the holder keeps its lock, a waiter is
    not granted while it is held, and gets it with a higher fence after the release."""
    url = server_url("etcd")
    parts = urlsplit(url)
    assert parts.hostname
    assert parts.port
    proxy = CutProxy(parts.hostname, parts.port, HEARTBEATS["etcd"])
    proxied = url.replace(f":{parts.port}", f":{proxy.port}", 1)
    a = await kc.connect(proxied, member_id="flap-a", ttl=3)
    b = await kc.connect(url, member_id="flap-b", ttl=3)
    try:
        name = f"attack-{uuid.uuid4().hex[:8]}"
        held = await a.try_acquire(name)
        assert held is not None
        fence = held.fence
        waiting = asyncio.create_task(b.acquire(name, timeout=40))
        for _ in range(9):
            await asyncio.sleep(1)
            proxy.cut()
        await asyncio.sleep(1)
        held.check()
        assert not waiting.done(), "granted to the waiter while the holder held it"
        assert await handed_over(held, waiting, 10) > fence
    finally:
        await a.close()
        await b.close()
        proxy.close()
