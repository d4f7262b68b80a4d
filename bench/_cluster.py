"""A node lost under load: the drivers `bench rpc --cluster`, `bench locks --cluster` and the
cluster tests (tests/topology/) share.

Each driver runs sustained load on a cluster from scripts/servers, SIGKILLs the node that
leads or holds the data (``servers leader NAME``; PostgreSQL: the primary, then a promotion),
waits until the load succeeds again (the failover pause), restarts the node, and records what
every client saw, for the caller to check and print:

* RPC: calls, casts and notifications; a call fails retryably or completes; a confirmed cast or
  notification must arrive; duplicates are counted.
* Locks: workers acquire one lock and write under its fence to a `FencedRegister`; fences of
  successive grants must only grow, across the leader change too.

Every loop is bounded in time and count and stops by itself.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keel.coordination as kc
from keel import errors
from keel.messaging import (
    NotificationListener,
    Notifier,
    RPCClient,
    RPCServer,
    Target,
    connect,
)

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "servers"
MAX_PAUSE = 90.0  # a failover slower than this is a failure, not a figure


def servers(*args: str, timeout: float = 300) -> str:
    """Run scripts/servers; its stdout (raises with its stderr on failure)."""
    done = subprocess.run(
        [str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"servers {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return done.stdout.strip()


def cluster_url(name: str) -> str:
    servers("start", name)
    return servers("url", name)


async def _poll(check: Callable[[], bool], deadline: float) -> None:
    """Wait (10 ms steps) until ``check()`` or the monotonic ``deadline``."""
    for _ in range(int(max(0.0, deadline - time.monotonic()) / 0.01) + 1):
        if check() or time.monotonic() >= deadline:
            return
        await asyncio.sleep(0.01)


async def _whole(cluster: str, timeout: float = MAX_PAUSE) -> None:
    """Wait (bounded) until ``servers status`` says every node answers and the cluster is
    formed (Redis: the replica in sync). A node revived by the run before may still be
    resyncing: Sentinel turns a returned Redis primary into a replica about 10 s after it
    restarts, and the sync takes 5 s more; killing the primary then loses what only it held
    (fences went backwards in the lock run that followed the messaging run)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            await asyncio.to_thread(servers, "status", cluster, timeout=30)
        except (RuntimeError, subprocess.TimeoutExpired):
            if time.monotonic() >= deadline:
                raise
            await asyncio.sleep(0.5)
        else:
            return


@dataclass
class Outage:
    """When the node went down and came back, and what the clients saw in between."""

    node: int = 0
    killed: float = 0.0  # monotonic
    recovered: float = 0.0  # first success after the kill
    revived: float = 0.0  # the node answers again
    back: float = 0.0  # first success after the node came back

    @property
    def pause(self) -> float:
        return self.recovered - self.killed if self.recovered else float("inf")


async def lose_a_node(
    cluster: str | None,
    successes: Callable[[], float],
    *,
    before: float,
    between: float,
    after: float,
    leader: Callable[[], Awaitable[int]] | None = None,
    failover: bool = False,
) -> Outage:
    """Under load already running: kill the leading node, wait for the first success after
    (``successes()`` is when the last successful operation *started*, so one already in
    flight at the kill does not count), restart it, wait again. With no cluster (a single
    server, for the figures beside it) the load just runs ``before`` seconds."""
    outage = Outage()
    await asyncio.sleep(before)
    if cluster is None:
        outage.killed = time.monotonic()
        return outage
    await _whole(cluster)
    for attempt in range(60):  # an election may be under way (a node just rejoined)
        try:
            if leader is not None:
                outage.node = await leader()
            else:
                outage.node = int(await asyncio.to_thread(servers, "leader", cluster))
            break
        except (RuntimeError, ValueError, errors.KeelError):
            if attempt == 59:
                raise
            await asyncio.sleep(0.5)
    outage.killed = time.monotonic()
    await asyncio.to_thread(servers, "kill", cluster, str(outage.node))
    if failover:  # PostgreSQL: promote the replica, as Patroni would
        await asyncio.to_thread(servers, "failover", cluster)
    await _poll(lambda: successes() > outage.killed, outage.killed + MAX_PAUSE)
    if successes() > outage.killed:
        outage.recovered = time.monotonic()
    await asyncio.sleep(between)
    await asyncio.to_thread(servers, "revive", cluster, str(outage.node))
    outage.revived = time.monotonic()
    await _poll(lambda: successes() > outage.revived, outage.revived + MAX_PAUSE)
    outage.back = time.monotonic() if successes() > outage.revived else 0.0
    await asyncio.sleep(after)
    return outage


# --- RPC ---------------------------------------------------------------------------------


class _Sink:
    def __init__(self) -> None:
        self.cast_runs: collections.Counter[int] = collections.Counter()
        self.notes: collections.Counter[int] = collections.Counter()

    async def record(self, ctx: Any, value: int) -> None:
        self.cast_runs[value] += 1

    async def echo(self, ctx: Any, value: int) -> int:
        return value

    async def info(
        self, ctx: Any, publisher_id: str, event_type: str, payload: Any, md: Any
    ) -> None:
        self.notes[int(payload)] += 1


@dataclass
class RpcRun:
    outage: Outage = field(default_factory=Outage)
    calls_ok: int = 0
    calls_retryable: int = 0
    unexpected: list[BaseException] = field(default_factory=list)
    casts_confirmed: set[int] = field(default_factory=set)
    notes_confirmed: set[int] = field(default_factory=set)
    sink: _Sink = field(default_factory=_Sink)
    ok_times: list[float] = field(default_factory=list)
    started: float = 0.0

    def steady_rate(self) -> float:
        """Calls per second before the kill (after a half-second warm-up)."""
        return self.rate(self.started + 0.5, self.outage.killed)

    @property
    def lost_casts(self) -> set[int]:
        return self.casts_confirmed - set(self.sink.cast_runs)

    @property
    def lost_notes(self) -> set[int]:
        return self.notes_confirmed - set(self.sink.notes)

    @property
    def duplicate_casts(self) -> int:
        return sum(n - 1 for n in self.sink.cast_runs.values() if n > 1)

    @property
    def duplicate_notes(self) -> int:
        return sum(n - 1 for n in self.sink.notes.values() if n > 1)

    def rate(self, start: float, end: float) -> float:
        """Successful calls per second between two monotonic times."""
        n = sum(1 for t in self.ok_times if start <= t < end)
        return n / (end - start) if end > start else 0.0


async def rpc_node_loss(
    url: str,
    cluster: str | None,
    *,
    before: float = 3.0,
    between: float = 2.0,
    after: float = 3.0,
    concurrency: int = 4,
    leader: Callable[[str], Awaitable[int]] | None = None,
    call_timeout: float = 5.0,
) -> RpcRun:
    """Calls, casts and notifications from ``concurrency`` workers through a node loss.
    ``leader(topic)`` names the node to kill (default: ``servers leader``)."""
    run = RpcRun()
    topic = f"loss-{uuid.uuid4().hex[:8]}"
    server_t, client_t = await connect(url), await connect(url)
    server = RPCServer(server_t, Target(topic), [run.sink])
    listener = NotificationListener(server_t, [Target(topic + "-n")], [run.sink])
    await server.start()
    await listener.start()
    run.started = time.monotonic()
    client = RPCClient(client_t, Target(topic), timeout=call_timeout)
    notifier = Notifier(client_t, "loadgen", topics=[topic + "-n"])
    stop = asyncio.Event()
    counter = iter(range(10_000_000))

    async def worker() -> None:
        while not stop.is_set():
            i = next(counter)
            try:
                await client.cast(None, "record", value=i)
                run.casts_confirmed.add(i)
            except errors.KeelError as exc:
                if not exc.retryable:
                    run.unexpected.append(exc)
            try:
                await notifier.info(None, "tick", i)
                run.notes_confirmed.add(i)
            except errors.KeelError as exc:
                if not exc.retryable:
                    run.unexpected.append(exc)
            try:
                started = time.monotonic()
                if await client.call(None, "echo", value=i) == i:
                    run.calls_ok += 1
                    run.ok_times.append(started)
            except errors.KeelError as exc:
                if exc.retryable:
                    run.calls_retryable += 1
                    await asyncio.sleep(0.05)
                else:
                    run.unexpected.append(exc)
            except Exception as exc:
                run.unexpected.append(exc)

    workers = [asyncio.ensure_future(worker()) for _ in range(concurrency)]
    try:
        run.outage = await lose_a_node(
            cluster,
            lambda: run.ok_times[-1] if run.ok_times else 0.0,
            before=before,
            between=between,
            after=after,
            leader=(lambda: leader(topic)) if leader is not None else None,
        )
    finally:
        stop.set()
        await asyncio.wait(workers, timeout=call_timeout * 3)
        for task in workers:
            task.cancel()
        # What was confirmed must arrive: give redeliveries time (bounded).
        await _poll(lambda: not (run.lost_casts or run.lost_notes), time.monotonic() + 60)
        await listener.stop()
        await server.stop()
        await client_t.close()
        await server_t.close()
    return run


# --- locks -------------------------------------------------------------------------------


@dataclass
class LockRun:
    outage: Outage = field(default_factory=Outage)
    grants: list[tuple[float, int]] = field(default_factory=list)  # (acquire started, fence)
    writes: int = 0
    stale_writes: int = 0
    retryable: int = 0
    unexpected: list[BaseException] = field(default_factory=list)
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    started: float = 0.0

    def steady_rate(self) -> float:
        """Grants per second before the kill (after a half-second warm-up)."""
        return self.rate(self.started + 0.5, self.outage.killed)

    @property
    def fences_backwards(self) -> int:
        """Grants whose fence is not above every fence granted before them."""
        top, backwards = 0, 0
        for _, fence in self.grants:  # in the order they were granted
            if fence <= top:
                backwards += 1
            top = max(top, fence)
        return backwards

    def rate(self, start: float, end: float) -> float:
        n = sum(1 for t, _ in self.grants if start <= t < end)
        return n / (end - start) if end > start else 0.0


async def lock_node_loss(
    url: str,
    cluster: str | None,
    *,
    before: float = 3.0,
    between: float = 2.0,
    after: float = 3.0,
    workers: int = 3,
    ttl: float = 5.0,
    failover: bool = False,
) -> LockRun:
    """``workers`` coordinators taking one lock in turn and writing under its fence."""
    run = LockRun()
    name = f"loss-{uuid.uuid4().hex[:8]}"
    register = kc.FencedRegister()
    stop = asyncio.Event()
    coords = [await kc.connect(url, member_id=f"w{i}", ttl=ttl) for i in range(workers)]

    async def worker(coord: kc.Coordinator) -> None:
        while not stop.is_set():
            try:
                started = time.monotonic()
                async with coord.lock(name, ttl=ttl, timeout=ttl * 2) as held:
                    run.grants.append((started, held.fence))
                    try:
                        register.write(name, held.fence, coord.member_id)
                        run.writes += 1
                    except errors.StaleFence:
                        run.stale_writes += 1
            except errors.KeelError as exc:
                run.errors[type(exc).__name__] += 1
                if exc.retryable or isinstance(exc, errors.LockLost):
                    run.retryable += 1
                    await asyncio.sleep(0.05)
                else:
                    run.unexpected.append(exc)
            except asyncio.CancelledError:
                if stop.is_set():
                    raise
                run.retryable += 1  # the lock was lost while held (cancel_on_loss)
            except Exception as exc:
                run.unexpected.append(exc)

    run.started = time.monotonic()
    tasks = [asyncio.ensure_future(worker(c)) for c in coords]
    try:
        run.outage = await lose_a_node(
            cluster,
            lambda: run.grants[-1][0] if run.grants else 0.0,
            before=before,
            between=between,
            after=after,
            failover=failover,
        )
    finally:
        stop.set()
        await asyncio.wait(tasks, timeout=ttl * 3)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for coord in coords:
            with contextlib.suppress(errors.KeelError):
                await coord.close()
    return run


def nats_stream_leader(url: str) -> Callable[[str], Awaitable[int]]:
    """For `rpc_node_loss` on NATS: the server leading the stream of the RPC topic's queue
    (the data's leader; the meta leader may be another server)."""

    async def leader(topic: str) -> int:
        import nats  # noqa: PLC0415 - the NATS bench and tests only

        from keel.messaging.transports.nats import _token  # noqa: PLC0415

        nc = await nats.connect(url.split(",", maxsplit=1)[0])
        try:
            info = await nc.jetstream().stream_info("KQ_" + _token(f"keel.rpc.{topic}"))
        finally:
            await nc.close()
        name = info.cluster.leader if info.cluster is not None else None
        return int(str(name).removeprefix("keel-n")) if name else 1

    return leader


# --- the drivers' shared loop (bench rpc --cluster, bench locks --cluster) ---------------


@dataclass
class Figure:
    """One extra column of a driver's table, and its RESULT field (``None``: table only)."""

    column: str
    cell: Callable[[Any], str]  # from the cluster run
    result: str | None = None


def compare(
    *,
    title: str,
    name: str,
    kind: str,
    unit: str,
    keys: list[str],
    measure: Callable[[str], Coroutine[Any, Any, tuple[Any, Any]]],
    figures: list[Figure],
) -> None:
    """For each key (a transport, a backend): ``measure(key)`` gives (single run, cluster
    run), each with ``steady_rate()`` and ``outage``; print one table row per key and the
    last line ``RESULT name=NAME <key>_single_<unit>=... <key>_cluster_<unit>=...
    <key>_ratio=... <key>_pause_s=...`` then the figures' fields."""
    from rich.console import Console  # noqa: PLC0415 - the drivers only
    from rich.table import Table  # noqa: PLC0415

    table = Table(title=title)
    rate = unit.replace("_s", "/s")
    columns = [kind, f"single {rate}", f"cluster {rate}", "ratio", "failover pause s"]
    for column in [*columns, "back after restart s", *(f.column for f in figures)]:
        table.add_column(column, justify="right")
    result = [f"RESULT name={name}"]
    for key in keys:
        single, cluster = asyncio.run(measure(key))
        s_rate, c_rate = single.steady_rate(), cluster.steady_rate()
        outage: Outage = cluster.outage
        back = outage.back - outage.revived if outage.back else float("inf")
        ratio = c_rate / s_rate if s_rate else 0.0
        cells = [f.cell(cluster) for f in figures]
        table.add_row(
            key, f"{s_rate:.0f}", f"{c_rate:.0f}", f"{ratio:.2f}", f"{outage.pause:.2f}",
            f"{back:.2f}", *cells,
        )  # fmt: skip
        result += [
            f"{key}_single_{unit}={s_rate:.0f}",
            f"{key}_cluster_{unit}={c_rate:.0f}",
            f"{key}_ratio={ratio:.2f}",
            f"{key}_pause_s={outage.pause:.2f}",
        ]
        result += [f"{key}_{f.result}={c}" for f, c in zip(figures, cells, strict=True) if f.result]
    Console(width=160).print(table)
    print(" ".join(result))
