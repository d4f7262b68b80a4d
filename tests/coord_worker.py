"""A coordination client in its own process, for tests that kill, pause or cut it.

coord_worker.py hold URL NAME TTL          hold a lock, print "HOLDING fence", wait
coord_worker.py join URL GROUP TTL         join a group as "worker", print "JOINED", wait
coord_worker.py victim URL NAME TTL HIST REG CLIENT
    hold a lock, write once, print "HOLDING fence", then block synchronously (a stuck
    process) for 3*TTL, then try a second write and check the lock: records both.
coord_worker.py extend URL NAME TTL        hold a lock, extend it to 3*TTL, print "EXTENDED ttl"
coord_worker.py writer URL NAME TTL HIST REG CLIENT
    hold a lock and write under it every 10 ms (presenting ``held.fence`` each time) until the
    lock is lost; print "HOLDING fence" first and "LOST" or "REFUSED" at the end.
coord_worker.py loop URL NAME TTL HIST REG CLIENT SECONDS SEED [STOP]
    acquire, increment a fenced counter a few times (read-modify-write), release, repeat, until
    SECONDS pass or the file STOP exists; records everything.
"""

from __future__ import annotations

import asyncio
import os
import random
import sys
import time

import keel.coordination as kc
from keel.errors import BackendUnavailable, CoordinationError, LockLost, LockTimeout, StaleFence


async def hold(url: str, name: str, ttl: float) -> None:
    coord = await kc.connect(url, member_id="worker", ttl=ttl)
    held = await coord.acquire(name, timeout=30)
    print("HOLDING", held.fence, flush=True)
    await asyncio.sleep(600)


async def join(url: str, group: str, ttl: float) -> None:
    coord = await kc.connect(url, member_id="worker", ttl=ttl)
    await coord.group(group).join(b"w", timeout=30)
    print("JOINED", flush=True)
    await asyncio.sleep(600)


async def extend(url: str, name: str, ttl: float) -> None:
    coord = await kc.connect(url, member_id="worker", ttl=ttl)
    held = await coord.acquire(name, timeout=30)
    await held.extend(ttl * 3)
    print("EXTENDED", held.ttl, flush=True)
    await asyncio.sleep(600)


async def writer(url: str, name: str, ttl: float, *, hist: str, reg: str, client: str) -> None:
    coord = await kc.connect(url, member_id=client, ttl=ttl)
    recorder = kc.Recorder(hist, client)
    register = kc.SqliteFencedRegister(reg)
    start = time.time()
    held = await coord.acquire(name, timeout=60)
    fence = held.fence
    recorder.record("acquire", name, fence, start)
    print("HOLDING", fence, flush=True)
    for _ in range(6000):  # bounded: a minute of writes at most
        await asyncio.sleep(0.01)
        start = time.time()
        try:
            register.write(name, held.fence, client)
        except LockLost:
            recorder.record("lost", name, fence, start)
            print("LOST", flush=True)
            break
        except StaleFence:
            recorder.record("refused", name, fence, start)
            print("REFUSED", flush=True)
            break
        recorder.record("write", name, fence, start)
    await coord.close()


async def victim(url: str, name: str, ttl: float, *, hist: str, reg: str, client: str) -> None:
    coord = await kc.connect(url, member_id=client, ttl=ttl)
    recorder = kc.Recorder(hist, client)
    register = kc.SqliteFencedRegister(reg)
    start = time.time()
    held = await coord.acquire(name, timeout=60)
    fence = held.fence
    recorder.record("acquire", name, fence, start)
    start = time.time()
    register.write(name, fence, client)
    recorder.record("write", name, fence, start)
    print("HOLDING", fence, flush=True)
    time.sleep(ttl * 3)
    start = time.time()
    # The bare integer, not the lock: the resource's own check is what is under test here.
    try:
        register.write(name, fence, client)
        recorder.record("write", name, fence, start)
        print("WROTE", flush=True)
    except StaleFence:
        recorder.record("refused", name, fence, start)
        print("REFUSED", flush=True)
    try:
        held.check()
        print("STILL-HELD", flush=True)
    except LockLost:
        recorder.record("lost", name, fence, start)
        print("LOST", flush=True)
    await held.release()
    await coord.close()


def _stopped(stop: str | None) -> bool:
    """Whether the test asked the loop to end (a file it creates)."""
    return stop is not None and os.path.exists(stop)


async def loop(
    url: str,
    name: str,
    ttl: float,
    *,
    hist: str,
    reg: str,
    client: str,
    seconds: float,
    seed: int,
    stop: str | None = None,
) -> None:
    rng = random.Random(seed)
    recorder = kc.Recorder(hist, client)
    register = kc.SqliteFencedRegister(reg)
    end = time.monotonic() + seconds
    coord: kc.Coordinator | None = None
    print("STARTED", flush=True)
    while time.monotonic() < end and not _stopped(stop):
        try:
            if coord is None:
                coord = await kc.connect(url, member_id=client, ttl=ttl)
            start = time.time()
            async with coord.lock(name, timeout=ttl * 2) as held:
                fence = held.fence
                recorder.record("acquire", name, fence, start)
                for _ in range(rng.randint(1, 3)):
                    start = time.time()
                    try:  # a read-modify-write: the counter must never lose an increment
                        register.modify(name, held, lambda v: str(int(v) + 1), client)
                        recorder.record("write", name, fence, start)
                    except StaleFence:
                        recorder.record("refused", name, fence, start)
                    await asyncio.sleep(rng.uniform(0, 0.02))
                start = time.time()
            recorder.record("release", name, fence, start)
        except LockLost as exc:
            recorder.record("lost", name, getattr(exc, "fence", -1), time.time())
        except (LockTimeout, BackendUnavailable):
            await asyncio.sleep(0.05)
        except CoordinationError:
            await asyncio.sleep(0.05)
        await asyncio.sleep(rng.uniform(0, 0.01))
    print("DONE", flush=True)


def main(argv: list[str]) -> None:
    mode, url, name, ttl = argv[0], argv[1], argv[2], float(argv[3])
    if mode == "hold":
        asyncio.run(hold(url, name, ttl))
    elif mode == "join":
        asyncio.run(join(url, name, ttl))
    elif mode == "extend":
        asyncio.run(extend(url, name, ttl))
    elif mode == "writer":
        hist, reg, client = argv[4:7]
        asyncio.run(writer(url, name, ttl, hist=hist, reg=reg, client=client))
    elif mode == "victim":
        hist, reg, client = argv[4:7]
        asyncio.run(victim(url, name, ttl, hist=hist, reg=reg, client=client))
    elif mode == "loop":
        hist, reg, client, seconds, seed = argv[4:9]
        stop = argv[9] if len(argv) > 9 else None
        asyncio.run(
            loop(
                url,
                name,
                ttl,
                hist=hist,
                reg=reg,
                client=client,
                seconds=float(seconds),
                seed=int(seed),
                stop=stop,
            )
        )


if __name__ == "__main__":
    main(sys.argv[1:])
