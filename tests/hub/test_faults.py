"""The hub killed with SIGKILL during ingest loses no acknowledged event.

The memory transport dies with the hub's process, so the durable path here is the hub's own
ingest API (`POST /v1/events`, admins): a 202 is the acknowledgement, given only after the
commit to every matching queue, exactly as the NotificationListener acks the bus. Publishers
retry what was not acknowledged (as a bus redelivers), through the kill and the restart.
The history check: every subscription holds exactly the acknowledged events its filter and
tenant match, each once, in per-publisher order.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path
from typing import Any

import httpx

from keel.hub import StaticTokens
from tests.hub.conftest import TOKENS

PUBLISHERS = 4
PER_PUBLISHER = 100


class HubProcess:
    def __init__(self, tmp: Path) -> None:
        self.db = tmp / "hub.db"
        self.tokens = tmp / "tokens.json"
        StaticTokens(TOKENS).write(self.tokens)
        self.proc: asyncio.subprocess.Process | None = None
        self.port = 0

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.hub.hub_proc",
            str(self.db),
            str(self.tokens),
            str(self.port),
            stdout=asyncio.subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), 20)
        assert line.startswith(b"READY"), line
        self.port = int(line.split()[1])

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)

    async def wait(self) -> None:
        if self.proc is not None:
            await self.proc.wait()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def event(publisher: int, n: int) -> dict[str, Any]:
    tenant = "p-one" if n % 3 else "p-two"
    kind = "compute.instance.create.end" if n % 2 else "volume.attach.end"
    return {
        "specversion": "1.0",
        "id": f"p{publisher}-{n}",
        "source": f"pub-{publisher}",
        "type": kind,
        "tenant": tenant,
        "subject": f"r-{n}",
        "data": {"n": n},
    }


async def test_sigkill_during_ingest_loses_no_acknowledged_event(tmp_path: Path) -> None:
    hub = HubProcess(tmp_path)
    await hub.start()
    try:
        headers = {"X-Auth-Token": "tok-admin"}
        async with httpx.AsyncClient(base_url=hub.url, headers=headers, timeout=5) as admin:
            specs = {
                "compute": ("tok-alice", {"types": ["compute.*"]}),
                "all-one": ("tok-alice", {}),
                "two": ("tok-bob", {}),
                "everything": ("tok-admin", {"all_projects": True}),
            }
            subs: dict[str, tuple[str, str]] = {}
            for name, (token, spec) in specs.items():
                r = await admin.post(
                    "/v1/subscriptions", json=spec, headers={"X-Auth-Token": token}
                )
                subs[name] = (token, r.json()["id"])

        acked: set[str] = set()
        killed = asyncio.Event()
        a_third = asyncio.Event()

        async def publisher(p: int) -> None:
            n = 0
            while n < PER_PUBLISHER:
                try:
                    async with httpx.AsyncClient(timeout=3, headers=headers) as c:
                        while n < PER_PUBLISHER:
                            r = await c.post(hub.url + "/v1/events", json=event(p, n))
                            assert r.status_code == 202, r.text
                            acked.add(f"p{p}-{n}")
                            if len(acked) >= PUBLISHERS * PER_PUBLISHER // 3:
                                a_third.set()
                            n += 1
                except httpx.TransportError:
                    await asyncio.sleep(0.05)  # hub down: retry the unacknowledged one

        async def killer() -> None:
            await a_third.wait()
            hub.kill()
            await hub.wait()
            killed.set()
            await hub.start()  # same port, same file

        async with asyncio.timeout(120):
            await asyncio.gather(killer(), *(publisher(p) for p in range(PUBLISHERS)))
        assert killed.is_set()
        everything = {
            f"p{p}-{n}": event(p, n) for p in range(PUBLISHERS) for n in range(PER_PUBLISHER)
        }
        assert acked == set(everything)
        want = {
            "compute": {
                k
                for k, e in everything.items()
                if e["tenant"] == "p-one" and e["type"].startswith("compute.")
            },
            "all-one": {k for k, e in everything.items() if e["tenant"] == "p-one"},
            "two": {k for k, e in everything.items() if e["tenant"] == "p-two"},
            "everything": set(everything),
        }
        async with httpx.AsyncClient(base_url=hub.url, timeout=10) as c:
            for name, (token, sub_id) in subs.items():
                r = await c.get(
                    f"/v1/subscriptions/{sub_id}/events",
                    params={"after": 0, "limit": 1000},
                    headers={"X-Auth-Token": token},
                )
                body = r.json()
                assert body["gap"] is None
                ids = [m["event"]["id"] for m in body["messages"]]
                assert len(ids) == len(set(ids)), f"{name}: duplicates"
                assert set(ids) == want[name], name
                assert [m["seq"] for m in body["messages"]] == list(range(1, len(ids) + 1))
                for p in range(PUBLISHERS):
                    mine = [int(i.split("-")[1]) for i in ids if i.startswith(f"p{p}-")]
                    assert mine == sorted(mine), f"{name}: publisher {p} out of order"
    finally:
        if hub.proc is not None and hub.proc.returncode is None:
            hub.kill()
            await hub.wait()
