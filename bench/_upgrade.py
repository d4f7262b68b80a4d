"""The figures of a rolling-upgrade run, computed the same way for Keel and oslo.messaging."""

from __future__ import annotations

from collections import Counter
from typing import Any

from bench._stats import percentile


def upgrade_figures(
    latencies: list[tuple[float, float]],
    failed: list[str],
    *,
    sent: list[str],
    executed: Counter[str],
    window: dict[str, float],
    replacements: list[float],
) -> dict[str, Any]:
    """Failed calls, lost and duplicated casts, p99 during and outside the upgrade window."""
    inside = [lat for at, lat in latencies if window["start"] <= at <= window["end"]]
    outside = [lat for at, lat in latencies if not window["start"] <= at <= window["end"]]
    p99_out = percentile(outside, 99) * 1000
    p99_during = percentile(inside, 99) * 1000
    return {
        "calls": len(latencies) + len(failed),
        "failed": len(failed),
        "lost": sum(1 for k in sent if executed[k] == 0),
        "duplicated": sum(n - 1 for n in executed.values() if n > 1),
        "p99_outside_ms": p99_out,
        "p99_during_ms": p99_during,
        "p99_ratio": p99_during / p99_out if p99_out else float("nan"),
        "replace_s": max(replacements),
        "first_failure": failed[0] if failed else "",
    }
