"""Shared benchmark helpers: percentiles, a rich table, the RESULT line."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from rich.console import Console
from rich.table import Table


def percentile(samples: Sequence[float], q: float) -> float:
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def table(title: str, columns: Sequence[str], rows: Sequence[Mapping[str, object]]) -> None:
    out = Table(title=title)
    for column in columns:
        out.add_column(column, justify="left" if column == columns[0] else "right")
    for row in rows:
        out.add_row(*(_cell(row.get(c)) for c in columns))
    Console(width=200).print(out)


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.3f}" if value < 100 else f"{value:,.0f}"
    return str(value)


def result_line(name: str, values: Mapping[str, float | int | str]) -> str:
    parts = [f"name={name}"]
    for key, value in values.items():
        if isinstance(value, float):
            parts.append(f"{key}={value:.0f}" if abs(value) >= 1000 else f"{key}={value:.4g}")
        else:
            parts.append(f"{key}={value}")
    return "RESULT " + " ".join(parts)
