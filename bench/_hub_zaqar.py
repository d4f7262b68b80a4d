"""`python -m bench hub --zaqar`: messages posted and claimed per second through the Zaqar v2
API beside the hub's native API, on the same store and hub process, and (when it starts
here: scripts/servers start zaqar) OpenStack Zaqar itself with its Redis message store and
SQLAlchemy management store, under the same workload in the same run.

Workload, the same for every API: ``--messages`` posts of one message each (a 200-byte body)
from ``--concurrency`` clients on keep-alive connections, then the same clients claim 10 at a
time and delete what they claimed until the queue is empty. Native: ``POST /v1/events`` and
``POST .../claims`` + ``.../ack``; Zaqar: ``POST .../messages``, ``POST .../claims`` and
``DELETE .../messages?ids=``. The hub runs as ``keel hub serve`` in its own process, as
Zaqar does under gunicorn, so clients and servers never share an event loop. Goal: Zaqar
API >= 0.8x the native API. Keel's SQLite store commits with fsync; Zaqar's Redis store
keeps messages in memory (no fsync): the ratio against it is not like for like.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from bench._servers import url as server_url
from bench._stats import result_line, table

ADMIN_TOKEN = "bench-admin"
PROJECT = "p-bench"
CLIENT_ID = "6e0ff7a8-94b4-4cd9-8f1b-0f9b7d8e0c11"
BODY = {"payload": "x" * 200}


class Api:
    """One API's post, claim and delete, over one pooled HTTP client."""

    def __init__(self, client: httpx.AsyncClient, *, native_sub: str | None) -> None:
        self.c = client
        self.native_sub = native_sub
        self.queue = f"/v2/queues/bench-{uuid.uuid4().hex[:8]}"

    async def post(self, n: int) -> None:
        if self.native_sub is not None:
            event = {
                "specversion": "1.0",
                "id": uuid.uuid4().hex,
                "source": "bench",
                "type": "bench.zaqar",
                "tenant": PROJECT,
                "data": BODY,
            }
            r = await self.c.post("/v1/events", json=event)
            expect(r, 202)
        else:
            r = await self.c.post(
                self.queue + "/messages", json={"messages": [{"body": BODY, "ttl": 3600}]}
            )
            expect(r, 201)

    async def claim_and_delete(self) -> int:
        if self.native_sub is not None:
            base = f"/v1/subscriptions/{self.native_sub}/claims"
            r = await self.c.post(base, json={"limit": 10, "ttl": 60})
            if r.status_code == 204:
                return 0
            expect(r, 201)
            claim = r.json()
            expect(await self.c.post(f"{base}/{claim['claim_id']}/ack", json={}), 200)
            return len(claim["messages"])
        r = await self.c.post(self.queue + "/claims?limit=10", json={"ttl": 60, "grace": 60})
        if r.status_code == 204:
            return 0
        expect(r, 201)
        ids = [m["id"] for m in r.json()["messages"]]
        expect(await self.c.delete(self.queue + "/messages", params={"ids": ",".join(ids)}), 204)
        return len(ids)


def expect(r: httpx.Response, status: int) -> None:
    if r.status_code != status:
        raise RuntimeError(f"{r.request.method} {r.request.url.path}: {r.status_code} {r.text}")


async def workload(
    api: Api, messages: int, concurrency: int, *, strict: bool = True
) -> tuple[float, float]:
    counter = iter(range(messages))

    async def poster() -> None:
        for n in counter:
            await api.post(n)

    start = time.perf_counter()
    await asyncio.gather(*(poster() for _ in range(concurrency)))
    posted = messages / (time.perf_counter() - start)

    async def claimer() -> int:
        done, empty = 0, 0
        while empty < 2:  # twice nothing: the queue is drained (claims of others ran out)
            got = await api.claim_and_delete()
            done += got
            empty = empty + 1 if got == 0 else 0
        return done

    start = time.perf_counter()
    claimed = sum(await asyncio.gather(*(claimer() for _ in range(concurrency))))
    rate = claimed / (time.perf_counter() - start)
    if claimed != messages:
        # OpenStack Zaqar's Redis claims can answer 204 while messages remain (concurrent
        # claimers): its rate is over what it handed out, and the shortfall is printed.
        if strict:
            raise RuntimeError(f"claimed {claimed} of {messages} messages")
        print(f"OpenStack Zaqar handed out {claimed} of {messages} messages", file=sys.stderr)
    return posted, rate


def client(base: str, headers: dict[str, str], concurrency: int) -> httpx.AsyncClient:
    # Idle connections closed before the server's keep-alive timeout (uvicorn: 5 s) closes
    # them under a request about to reuse one.
    limits = httpx.Limits(
        max_connections=concurrency, max_keepalive_connections=concurrency, keepalive_expiry=2
    )
    return httpx.AsyncClient(base_url=base, headers=headers, limits=limits, timeout=60)


class KeelHub:
    """``keel hub serve`` on a store, in its own process."""

    def __init__(self, store: str, tmp: Path) -> None:
        tokens = tmp / "tokens.json"
        tokens.write_text(
            json.dumps({ADMIN_TOKEN: {"user": "bench", "project": PROJECT, "roles": ["admin"]}})
        )
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "keel", "hub", "serve", "--store", store,
             "--tokens", str(tokens), "--port", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=(tmp / "hub.log").open("ab"),  # a pipe nobody reads would stall it
        )  # fmt: skip
        self.log = tmp / "hub.log"
        self.url = f"http://127.0.0.1:{self.port}"

    async def ready(self) -> None:
        async with httpx.AsyncClient() as c:
            for _ in range(300):
                if self.proc.poll() is not None:
                    raise RuntimeError(f"keel hub serve exited: {self.log.read_text()[-2000:]}")
                try:
                    if (await c.get(self.url + "/healthz")).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.1)
        raise RuntimeError("keel hub serve did not answer in 30 s")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def free_port() -> int:
    import socket  # noqa: PLC0415

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def store_url(kind: str, tmp: Path) -> str:
    if kind == "sqlite":
        return f"sqlite:///{tmp}/hub-zaqar-{uuid.uuid4().hex[:6]}.db"
    return server_url("postgres")


async def keel_rates(kind: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    hub = KeelHub(store_url(kind, tmp), tmp)
    try:
        await hub.ready()
        headers = {"X-Auth-Token": ADMIN_TOKEN, "Client-ID": CLIENT_ID}
        async with client(hub.url, headers, args.concurrency) as c:
            r = await c.post("/v1/subscriptions", json={"types": ["bench.zaqar"]})
            expect(r, 201)
            native = Api(c, native_sub=r.json()["id"])
            n_post, n_claim = await workload(native, args.messages, args.concurrency)
            zq_post, zq_claim = await workload(
                Api(c, native_sub=None), args.messages, args.concurrency
            )
    finally:
        hub.stop()
    return {
        "store": kind,
        "native_post_per_s": n_post,
        "zaqar_post_per_s": zq_post,
        "post_ratio": zq_post / n_post,
        "native_claim_per_s": n_claim,
        "zaqar_claim_per_s": zq_claim,
        "claim_ratio": zq_claim / n_claim,
    }


async def openstack_zaqar_rates(args: argparse.Namespace) -> dict[str, Any] | None:
    try:
        base = server_url("zaqar")
    except RuntimeError as exc:
        print(f"OpenStack Zaqar not measured: {str(exc).splitlines()[0]}", file=sys.stderr)
        return None
    headers = {"X-Project-Id": PROJECT, "Client-ID": CLIENT_ID}
    async with client(base, headers, args.concurrency) as c:
        post, claim = await workload(
            Api(c, native_sub=None), args.messages, args.concurrency, strict=False
        )
    return {"store": "zaqar-redis", "zaqar_post_per_s": post, "zaqar_claim_per_s": claim}


def run(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench hub --zaqar")
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--stores", default="sqlite,postgres")
    parser.add_argument("--no-openstack", action="store_true", help="skip OpenStack Zaqar")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-zaqar-") as tmp:
        rows = [asyncio.run(keel_rates(k, args, Path(tmp))) for k in args.stores.split(",")]
    theirs = None if args.no_openstack else asyncio.run(openstack_zaqar_rates(args))
    if theirs is not None:
        rows.append(theirs)
    columns = ["store", "native_post_per_s", "zaqar_post_per_s", "post_ratio",
               "native_claim_per_s", "zaqar_claim_per_s", "claim_ratio"]  # fmt: skip
    table(
        f"Zaqar v2 API vs native API: {args.messages} messages, {args.concurrency} clients "
        f"(machine load {os.getloadavg()[0]:.1f})",
        columns,
        rows,
    )
    values: dict[str, float | int | str] = {}
    for row in rows:
        prefix = {"sqlite": "", "postgres": "scale_", "zaqar-redis": "openstack_"}[row["store"]]
        for key in columns[1:]:
            if key in row:
                values[prefix + key] = row[key]
    if theirs is not None and rows[0]["store"] == "sqlite":
        values["vs_openstack_post"] = rows[0]["zaqar_post_per_s"] / theirs["zaqar_post_per_s"]
        values["vs_openstack_claim"] = rows[0]["zaqar_claim_per_s"] / theirs["zaqar_claim_per_s"]
    print(result_line("hub-zaqar", values))
