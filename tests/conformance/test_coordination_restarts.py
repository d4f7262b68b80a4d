"""A release across a server restart, on every backend (docs/coordination-contract.md, "After
restarts, pauses and lost replies"): the holder releases while the server is down, or its
release is lost (never sent, or applied with its reply lost) and the server restarts before
anything else happens. Once the server is back, the release is confirmed — retried until the
server says the record is gone — so another client gets the lock within the contract's bound
(its ttl plus FREE_BOUND, counted from the server being back), and fences stay in order.

The releasing client connects with a lease much longer than that bound: the lock must be freed
by its release, not by its lease running out. ZooKeeper was the historic defect: a release sent
without waiting for its answer, and a session that survives the restart (kazoo reconnects
within the session timeout) kept the node for as long as its holder's process ran.

On SQLite there is no server: the faults do nothing and the same assertions hold trivially.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from coord_support import (
    FREE_BOUND,
    TTL,
    BackendUnderTest,
    backend_fixture,  # noqa: F401 - the one backend fixture
)

pytestmark = pytest.mark.timeout(120)

# The holder's lease: far longer than the bound, so only a confirmed release frees the lock in
# time (etcd and ZooKeeper grant a lease its whole ttl again when the server comes back).
LONG_TTL = 15.0


async def _release_across(backend: BackendUnderTest, fault: str) -> None:
    a = await backend.connect("a", ttl=LONG_TTL, proxied=True)
    # The taker's own ttl is short: a kazoo client whose reconnect lands while the restarted
    # server is up but not serving yet waits out its handshake, which kazoo times by the
    # session timeout (seen: 15 s with a 15 s session).
    b = await backend.connect("b")
    name = backend.n("lock")
    held = await a.acquire(name)
    first, key = held.fence, held.key
    if fault == "down":  # released while the server is down
        await asyncio.to_thread(backend.stop)
        try:
            await held.release()
            await asyncio.sleep(0.5)  # the release is tried (and fails) with the server down
        finally:
            await asyncio.to_thread(backend.resume)
    else:
        if fault == "dropped":  # the release never reaches the server
            await backend.drop_next_request()
        else:  # "reply lost": applied, its answer lost with the connection
            await backend.lose_next_reply()
        await held.release()
        await backend.fault_fired()
        await asyncio.to_thread(backend.restart)  # before the client heard anything back
    back = time.monotonic()
    got = await b.acquire(name, timeout=LONG_TTL * 2)
    took = time.monotonic() - back
    assert took < TTL + FREE_BOUND, f"the lock was taken {took:.1f}s after the server was back"
    second = got.fence
    assert second > first
    await got.release_confirmed()
    # The first client's release is confirmed, not left to a retry that never ends.
    while [f for f in a._pending if not f.done()]:
        assert time.monotonic() - back < FREE_BOUND * 2, "the release was never confirmed"
        await asyncio.sleep(0.05)
    assert await b.backend.get(key) is None  # nothing of a's (or b's) left behind
    again = await a.acquire(name, timeout=FREE_BOUND)
    assert again.fence > second
    await again.release_confirmed()


@pytest.mark.parametrize("fault", ["down", "dropped", "reply lost"])
async def test_a_release_across_a_restart_is_confirmed_and_frees_the_lock(
    backend: BackendUnderTest, fault: str
) -> None:
    await _release_across(backend, fault)
