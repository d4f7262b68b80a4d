"""History checks under faults, on every backend: clients in their own processes record what
they saw, the fenced resource logs what it accepted, and `keel.coordination.check` proves that
no stale holder's write was accepted and no fence went backwards — while holders are paused
(SIGSTOP past the ttl), killed (SIGKILL), cut off (connections dropped) and the server restarts.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

import pytest

import keel.coordination as kc
from coord_support import (
    TTL,
    WORKER,
    BackendUnderTest,
    backend_fixture,  # noqa: F401 - the one backend fixture
)

pytestmark = pytest.mark.timeout(120)


def _accepted(register: kc.SqliteFencedRegister) -> list[kc.Accepted]:
    return [kc.Accepted(seq, key, fence, value) for seq, key, fence, value, _ in register.writes()]


async def _spawn(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, str(WORKER), *args, stdout=asyncio.subprocess.PIPE
    )


async def _line(proc: asyncio.subprocess.Process, within: float = 30) -> str:
    assert proc.stdout is not None
    return (await asyncio.wait_for(proc.stdout.readline(), within)).decode().strip()


async def test_paused_holder_is_refused_and_learns_loss(
    backend: BackendUnderTest, tmp_path: Path
) -> None:
    name = backend.n("lock")
    reg_path = str(tmp_path / "reg.db")
    register = kc.SqliteFencedRegister(reg_path)
    victim = await _spawn(
        "victim", backend.url, name, str(TTL), str(tmp_path / "victim.jsonl"), reg_path, "victim"
    )
    try:
        assert (await _line(victim)).startswith("HOLDING")
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
            outcome = [await _line(victim, TTL * 6) for _ in range(2)]
        assert outcome == ["REFUSED", "LOST"]
        recorder.close()
    finally:
        if victim.returncode is None:
            victim.send_signal(signal.SIGCONT)
            victim.kill()
        await victim.wait()
    events = kc.load([tmp_path / "victim.jsonl", tmp_path / "taker.jsonl"])
    accepted = _accepted(register)
    register.close()
    kc.check(events, accepted)
    assert [e.kind for e in events if e.client == "victim"] == [
        "acquire",
        "write",
        "refused",
        "lost",
    ]


async def test_randomized_workload_under_faults(backend: BackendUnderTest, tmp_path: Path) -> None:
    name = backend.n("lock")
    reg_path = str(tmp_path / "reg.db")
    register = kc.SqliteFencedRegister(reg_path)
    url = backend.proxied_url()
    seconds = 10.0
    workers = [
        await _spawn(
            "loop",
            url,
            name,
            str(TTL),
            str(tmp_path / f"w{i}.jsonl"),
            reg_path,
            f"w{i}",
            str(seconds),
            str(1000 + i),
        )
        for i in range(4)
    ]
    try:
        for w in workers:
            assert await _line(w) == "STARTED"
        await asyncio.sleep(1.0)
        workers[0].kill()  # a holder (or a waiter) dies at once
        await asyncio.sleep(1.0)
        workers[1].send_signal(signal.SIGSTOP)  # paused past its ttl
        await asyncio.sleep(TTL * 1.5)
        workers[1].send_signal(signal.SIGCONT)
        backend.cut()  # every client connection drops
        await asyncio.sleep(1.0)
        await asyncio.to_thread(backend.restart)  # the server restarts, same data
        for w in workers[1:]:
            assert await _line(w, seconds + 60) == "DONE"
    finally:
        for w in workers:
            if w.returncode is None:
                os.kill(w.pid, signal.SIGCONT)
                w.kill()
            await w.wait()
    events = kc.load([tmp_path / f"w{i}.jsonl" for i in range(len(workers))])
    accepted = _accepted(register)
    register.close()
    kc.check(events, accepted)
    assert len(accepted) > 20
    survivors = {w.client for w in accepted}
    assert len(survivors) >= 2, survivors
