"""``python -m bench locks``: Keel's locks beside tooz's on the same local servers.

Per backend and library: uncontended acquire+release per second with p50/p99 (one client, one
name, for ``--seconds``), and hand-off latency with ``--procs`` processes contending for one
name (time from one holder's release to the next holder's acquire), and *holder changes* per
second: a hand-off counts only when the next acquisition is another process's (a releaser
that takes the lock straight back is no hand-off). Keel does fencing and background renewal
in every cycle; tooz does neither. Servers come from scripts/servers. Last line:
``RESULT name=locks ratio_<backend>_vs_tooz=... handoff_ratio_<backend>_vs_tooz=...
sqlite_vs_tooz_file=... ...``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import multiprocessing
import statistics
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from tooz import coordination

import keel.coordination as kc
from bench import _tooz_api

ROOT = Path(__file__).resolve().parent.parent
TTL = 10


@dataclass
class Case:
    backend: str
    library: str
    url: str


def _server_url(name: str) -> str:
    script = str(ROOT / "scripts" / "servers")
    subprocess.run([script, "start", name], check=True, capture_output=True)
    out = subprocess.run([script, "url", name], check=True, capture_output=True, text=True)
    return out.stdout.strip()


def _tooz_url(backend: str, url: str, tmp: str) -> str:
    if backend == "etcd":
        return url.replace("etcd://", "etcd3+http://")
    if backend == "sqlite":
        return f"file://{tmp}/tooz-file"
    return url


def _percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


# --- one client, uncontended ----------------------------------------------------------------


async def _keel_cycles(url: str, seconds: float) -> list[float]:
    coord = await kc.connect(url, member_id=f"bench-{uuid.uuid4().hex[:6]}", ttl=TTL)
    name = f"bench-{uuid.uuid4().hex[:8]}"
    lat: list[float] = []
    try:
        for _ in range(20):  # warm-up: connections, scripts, leases
            async with coord.lock(name):
                pass
        end = time.perf_counter() + seconds
        while (t0 := time.perf_counter()) < end:
            async with coord.lock(name) as held:
                _ = held.fence
            lat.append(time.perf_counter() - t0)
    finally:
        await coord.close()
    return lat


def _tooz_coordinator(url: str) -> Any:
    coord = coordination.get_coordinator(url, f"bench-{uuid.uuid4().hex[:6]}".encode())
    coord.start()
    return coord


def _tooz_cycles(url: str, seconds: float) -> list[float]:
    coord = _tooz_coordinator(url)
    lock = coord.get_lock(f"bench-{uuid.uuid4().hex[:8]}".encode())
    lat: list[float] = []
    try:
        for _ in range(20):
            lock.acquire()
            lock.release()
        end = time.perf_counter() + seconds
        while (t0 := time.perf_counter()) < end:
            lock.acquire()
            lock.release()
            lat.append(time.perf_counter() - t0)
    finally:
        coord.stop()
    return lat


# --- many processes, one name ---------------------------------------------------------------


def _contend(library: str, url: str, name: str, start_at: float, seconds: float) -> list[Any]:
    """One contending process: returns [(acquired_at, released_at), ...] (wall clock)."""
    spans: list[tuple[float, float]] = []
    if library == "keel":

        async def run() -> None:
            coord = await kc.connect(url, member_id=f"c-{uuid.uuid4().hex[:6]}", ttl=TTL)
            await asyncio.sleep(max(0.0, start_at - time.time()))
            # A process that started late (slow import under load) still runs its share.
            end = max(start_at, time.time()) + seconds
            while time.time() < end:
                async with coord.lock(name, timeout=30):
                    got = time.time()
                    # The same 1 ms of work as tooz's holder below: in these processes
                    # `asyncio.sleep(0.001)` held 1.6-1.9 ms on average against 1.3 ms for
                    # `time.sleep`, on every hand-off.
                    time.sleep(0.001)  # noqa: ASYNC251 (the work being timed, as tooz's)
                    spans.append((got, time.time()))
            await coord.close()

        asyncio.run(run())
    else:
        coord = _tooz_coordinator(url)
        lock = coord.get_lock(name.encode())
        time.sleep(max(0.0, start_at - time.time()))
        end = max(start_at, time.time()) + seconds
        while time.time() < end:
            lock.acquire(blocking=True)
            got = time.time()
            time.sleep(0.001)
            released = time.time()
            lock.release()
            spans.append((got, released))
        coord.stop()
    return spans


@dataclass
class Handoff:
    gaps: list[float]  # release to the next acquire, seconds
    count: int  # acquisitions
    changes: int  # acquisitions by another process than the previous holder


def _handoff(library: str, url: str, procs: int, seconds: float) -> Handoff:
    name = f"handoff-{uuid.uuid4().hex[:8]}"
    start_at = time.time() + 3.0  # lets every process import and connect first
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(procs) as pool:
        results = pool.starmap(_contend, [(library, url, name, start_at, seconds)] * procs)
    spans = sorted((got, released, proc) for proc, r in enumerate(results) for got, released in r)
    gaps = [b[0] - a[1] for a, b in itertools.pairwise(spans) if b[0] >= a[1]]
    changes = sum(1 for a, b in itertools.pairwise(spans) if a[2] != b[2])
    return Handoff(gaps, len(spans), changes)


def _result_fields(
    backends: list[str],
    rates: dict[tuple[str, str], float],
    medians: dict[tuple[str, str], float],
    changes: dict[tuple[str, str], float],
) -> list[str]:
    fields = ["name=locks"]
    for backend in ("etcd", "zookeeper", "redis"):
        if (backend, "keel") in rates:
            ratio = rates[(backend, "keel")] / rates[(backend, "tooz")]
            fields.append(f"ratio_{backend}_vs_tooz={ratio:.2f}")
    for backend in ("etcd", "zookeeper", "redis"):
        if (backend, "keel") in medians:
            # The same comparison on the median cycle, which fsync stalls of a shared disk
            # (they dominate the mean on ZooKeeper and Redis with appendfsync) do not move.
            ratio = medians[(backend, "tooz")] / medians[(backend, "keel")]
            fields.append(f"p50_ratio_{backend}_vs_tooz={ratio:.2f}")
    for backend in backends:
        # Holder changes per second: how fast a contended lock moves between processes.
        if changes[(backend, "tooz")]:
            ratio = changes[(backend, "keel")] / changes[(backend, "tooz")]
            fields.append(f"handoff_ratio_{backend}_vs_tooz={ratio:.2f}")
    if ("sqlite", "keel") in rates:
        ratio = rates[("sqlite", "keel")] / rates[("sqlite", "tooz")]
        fields.append(f"sqlite_vs_tooz_file={ratio:.2f}")
    for backend in backends:
        fields.append(f"{backend}_per_s={rates[(backend, 'keel')]:.0f}")
        fields.append(f"tooz_{backend}_per_s={rates[(backend, 'tooz')]:.0f}")
    return fields


def main(argv: list[str]) -> int:
    if "--cluster" in argv:  # one server beside a cluster, the leader lost: locks_cluster.py
        from bench import locks_cluster  # noqa: PLC0415

        return locks_cluster.main([a for a in argv if a != "--cluster"])
    parser = argparse.ArgumentParser(prog="python -m bench locks")
    parser.add_argument("--seconds", type=float, default=5.0, help="uncontended, per library")
    parser.add_argument("--handoff-seconds", type=float, default=3.0)
    parser.add_argument("--procs", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5, help="alternations per backend")
    parser.add_argument("--backends", default="sqlite,etcd,zookeeper,redis")
    parser.add_argument(
        "--tooz-api",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run tooz's API on Keel (keel+<backend>://) beside tooz's drivers",
    )
    args = parser.parse_args(argv)

    tmp = tempfile.mkdtemp(prefix="keel-bench-locks-")
    urls = {"sqlite": f"sqlite://{tmp}/keel.db"}
    backends = args.backends.split(",")
    for b in backends:
        if b != "sqlite":
            urls[b] = _server_url(b)

    console = Console(width=120)
    table = Table(title=f"locks: Keel vs tooz (uncontended {args.seconds}s; {args.procs} procs)")
    for col in (
        "backend",
        "library",
        "acq+rel/s",
        "p50 ms",
        "p99 ms",
        "handoff p50 ms",
        "handoff p99 ms",
        "contended/s",
        "holder changes/s",
    ):
        table.add_column(col, justify="right" if col not in ("backend", "library") else "left")
    rates: dict[tuple[str, str], float] = {}
    medians: dict[tuple[str, str], float] = {}
    changes: dict[tuple[str, str], float] = {}
    for backend in backends:
        # Alternate short rounds of each library so that load from elsewhere on the machine
        # drifts onto both alike instead of onto whichever ran second.
        samples: dict[str, list[float]] = {"keel": [], "tooz": []}
        for _ in range(args.rounds):
            for library in ("keel", "tooz"):
                url = urls[backend] if library == "keel" else _tooz_url(backend, urls[backend], tmp)
                share = args.seconds / args.rounds
                if library == "keel":
                    samples[library] += asyncio.run(_keel_cycles(url, share))
                else:
                    samples[library] += _tooz_cycles(url, share)
        for library in ("keel", "tooz"):
            url = urls[backend] if library == "keel" else _tooz_url(backend, urls[backend], tmp)
            lat = samples[library]
            rate = len(lat) / sum(lat)
            rates[(backend, library)] = rate
            medians[(backend, library)] = statistics.median(lat)
            handoff = _handoff(library, url, args.procs, args.handoff_seconds)
            gaps = handoff.gaps
            changes[(backend, library)] = handoff.changes / args.handoff_seconds
            table.add_row(
                backend,
                library,
                f"{rate:,.0f}",
                f"{statistics.median(lat) * 1000:.2f}",
                f"{_percentile(lat, 0.99) * 1000:.2f}",
                f"{statistics.median(gaps) * 1000:.2f}" if gaps else "-",
                f"{_percentile(gaps, 0.99) * 1000:.2f}" if gaps else "-",
                f"{handoff.count / args.handoff_seconds:,.0f}",
                f"{changes[(backend, library)]:,.0f}",
            )
    console.print(table)
    fields = _result_fields(backends, rates, medians, changes)
    if args.tooz_api:
        tooz_urls = {b: _tooz_url(b, urls[b], tmp) for b in backends}
        fields += _tooz_api.compare(
            console, backends, urls, tooz_urls, args, cycles=_tooz_cycles, handoff=_handoff
        )
    print("RESULT " + " ".join(fields))
    return 0
