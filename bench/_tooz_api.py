"""tooz's API on Keel (``keel+<backend>://``) beside tooz's own drivers, on the same servers.

Called from ``python -m bench locks`` (``--no-tooz-api`` to leave it out). The same unchanged
tooz code runs twice per backend, once per driver, in alternating rounds; the contended
figure is acquisitions per second with ``--procs`` processes contending for one name.
Keel's face pays for what tooz's drivers do not do: a fence and background renewal per
acquisition, the reader check of a reader-writer lock on every exclusive acquire, and a
release that waits for the server. Returns the RESULT fields
``ratio_tooz_api_<backend>_vs_tooz=...`` (acquire+release per second) and
``contended_ratio_tooz_api_<backend>_vs_tooz=...`` (contended acquisitions per second).
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.table import Table

Cycles = Callable[[str, float], list[float]]
Handoff = Callable[[str, str, int, float], Any]  # bench.locks.Handoff


def compare(
    console: Console,
    backends: list[str],
    urls: dict[str, str],
    tooz_urls: dict[str, str],
    args: argparse.Namespace,
    *,
    cycles: Cycles,
    handoff: Handoff,
) -> list[str]:
    """Measure, print a table, and return the RESULT fields."""
    table = Table(title="tooz API: Keel's driver vs tooz's own, same servers, same code")
    for col in ("backend", "driver", "acq+rel/s", "p50 ms", "contended acq/s"):
        table.add_column(col, justify="left" if col in ("backend", "driver") else "right")
    fields: list[str] = []
    for backend in backends:
        drivers = {"keel": f"keel+{urls[backend]}", "tooz": tooz_urls[backend]}
        samples: dict[str, list[float]] = {"keel": [], "tooz": []}
        for _ in range(args.rounds):
            for driver, url in drivers.items():
                samples[driver] += cycles(url, args.seconds / args.rounds)
        rates, changes = {}, {}
        for driver, url in drivers.items():
            lat = samples[driver]
            rates[driver] = len(lat) / sum(lat)
            changes[driver] = handoff("tooz", url, args.procs, args.handoff_seconds).count / (
                args.handoff_seconds
            )
            table.add_row(
                backend,
                f"{'keel+' if driver == 'keel' else ''}{backend} ({driver})",
                f"{rates[driver]:,.0f}",
                f"{statistics.median(lat) * 1000:.2f}",
                f"{changes[driver]:,.0f}",
            )
        fields.append(f"ratio_tooz_api_{backend}_vs_tooz={rates['keel'] / rates['tooz']:.2f}")
        fields.append(
            f"contended_ratio_tooz_api_{backend}_vs_tooz={changes['keel'] / changes['tooz']:.2f}"
        )
        fields.append(f"tooz_api_{backend}_per_s={rates['keel']:.0f}")
    console.print(table)
    return fields
