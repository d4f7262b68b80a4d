"""RPC benchmark: Keel beside its anchors, each measured in its own process, in one run.

    python -m bench rpc [--transport memory,rabbit,nats,redis] [--calls N] [--concurrency C]
                        [--uvloop]

Per contender: sequential call latency (p50, p99) and calls/s, C-way concurrent calls/s,
casts/s and notifications/s; for Keel, notifications/s both with a window of 64 in flight
(``notifications_per_s``) and waiting for the broker on each (``notifications_seq_per_s``).
Ratios are Keel over its anchor on the same server in this run. Contenders for a transport
live in bench/rpc_<transport>.py as ``CONTENDERS = {name: measure}`` where
``measure(params) -> dict`` is an async function.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import subprocess
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from bench._stats import result_line, table

Params = dict[str, Any]
Measure = Callable[[Params], Awaitable[dict[str, float]]]

# result key -> (Keel contender, anchor contender, metric); omitted when a side did not run
RATIOS: dict[str, tuple[str, str, str]] = {
    "ratio_rabbit_vs_oslo": ("keel-rabbit", "oslo-rabbit", "conc_calls_per_s"),
    "ratio_rabbit_vs_aiopika": ("keel-rabbit", "aiopika-rabbit", "conc_calls_per_s"),
    "ratio_rabbit_p50_vs_oslo": ("keel-rabbit", "oslo-rabbit", "call_p50_ms"),
    "ratio_nats_vs_natspy": ("keel-nats", "natspy-nats", "conc_calls_per_s"),
    "ratio_nats_vs_oslo": ("keel-nats", "oslo-rabbit", "conc_calls_per_s"),
    "ratio_redis_vs_redispy": ("keel-redis", "redispy-redis", "conc_calls_per_s"),
    "ratio_notify_rabbit_vs_oslo": ("keel-rabbit", "oslo-rabbit", "notifications_per_s"),
    # Keel waiting for the broker on each notify() (window=0), against the same oslo figure.
    "ratio_notify_seq_rabbit_vs_oslo": (
        "keel-rabbit",
        "oslo-rabbit",
        "notifications_seq_per_s",
    ),
    "ratio_memory_vs_bare": ("keel-memory", "bare-asyncio", "conc_calls_per_s"),
    # Unchanged oslo.messaging API code: on Keel's driver beside oslo's own rabbit driver.
    "ratio_oslo_keel_rabbit_vs_oslo": ("oslo-keel-rabbit", "oslo-rabbit", "conc_calls_per_s"),
    "ratio_oslo_keel_nats_vs_oslo": ("oslo-keel-nats", "oslo-rabbit", "conc_calls_per_s"),
    "ratio_oslo_keel_redis_vs_oslo": ("oslo-keel-redis", "oslo-rabbit", "conc_calls_per_s"),
    "ratio_oslo_keel_notify_rabbit_vs_oslo": (
        "oslo-keel-rabbit",
        "oslo-rabbit",
        "notifications_per_s",
    ),
}

COLUMNS = [
    "contender",
    "call_p50_ms",
    "call_p99_ms",
    "seq_calls_per_s",
    "conc_calls_per_s",
    "casts_per_s",
    "notifications_per_s",
    "notifications_seq_per_s",
]


def contenders(transport: str) -> dict[str, Measure]:
    module = importlib.import_module(f"bench.rpc_{transport}")
    found: dict[str, Measure] = module.CONTENDERS
    return found


def _run_one(name: str, transport: str, params: Params) -> dict[str, float]:
    """Run one contender in a fresh interpreter so contenders never share a process."""
    cmd = [
        sys.executable,
        "-m",
        "bench",
        "rpc",
        "--one",
        name,
        "--transport",
        transport,
        "--params",
        json.dumps(params),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{done.stderr[-3000:]}")
    figures: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return figures


def main(argv: list[str]) -> None:
    if "--cluster" in argv:  # one server beside a cluster, and a node lost: bench/rpc_cluster.py
        from bench import rpc_cluster  # noqa: PLC0415

        rpc_cluster.main([a for a in argv if a != "--cluster"])
        return
    parser = argparse.ArgumentParser(prog="python -m bench rpc")
    parser.add_argument(
        "--transport", default="memory", help="comma-separated: memory,rabbit,nats,redis"
    )
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--uvloop", action="store_true", help="run every contender on uvloop")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--params", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        params = json.loads(args.params)
        measure = contenders(args.transport)[args.one]
        runner: Any = asyncio.run
        if params.get("uvloop"):
            import uvloop  # noqa: PLC0415 - optional, only when asked for

            runner = uvloop.run
        print(json.dumps(runner(measure(params))))
        return
    params = {"calls": args.calls, "concurrency": args.concurrency, "uvloop": args.uvloop}
    rows: list[dict[str, Any]] = []
    figures: dict[str, dict[str, float]] = {}
    from rich.console import Console  # noqa: PLC0415

    console = Console(stderr=True)
    for transport in args.transport.split(","):
        for name in contenders(transport):
            with console.status(f"measuring {name} ({args.calls} calls)"):
                measured = _run_one(name, transport, params)
            # A contender may time a second one in its own process (keel-memory: the bare
            # loop); its figures come back prefixed and get a row of their own.
            inner = {k[5:]: v for k, v in measured.items() if k.startswith("bare_")}
            figures[name] = {k: v for k, v in measured.items() if not k.startswith("bare_")}
            rows.append({"contender": name, **figures[name]})
            if inner:
                figures["bare-asyncio"] = inner
                rows.append({"contender": "bare-asyncio (same process)", **inner})
    loop = "uvloop" if args.uvloop else "asyncio"
    table(f"RPC, {args.calls} calls, {args.concurrency}-way concurrent, {loop}", COLUMNS, rows)
    result: dict[str, float | int | str] = {}
    keel_rows = [n for n in figures if n.startswith("keel-")]  # native Keel contenders
    if len(keel_rows) == 1 or "keel-memory" in figures:
        main_row = figures["keel-memory"] if "keel-memory" in figures else figures[keel_rows[0]]
        for key in ("seq_calls_per_s", "conc_calls_per_s", "call_p50_ms", "call_p99_ms"):
            result[key] = main_row[key]
    for name, row in figures.items():
        for key in ("seq_calls_per_s", "conc_calls_per_s", "call_p50_ms", "call_p99_ms"):
            result[f"{name.replace('-', '_')}_{key}"] = row[key]
    for key, (ours, theirs, metric) in RATIOS.items():
        if ours in figures and theirs in figures and figures[theirs].get(metric):
            result[key] = figures[ours][metric] / figures[theirs][metric]
    result["loop"] = loop
    print(result_line("rpc", result))
