"""Contenders on the in-process transport: Keel beside a bare asyncio + msgspec loop.

The bare loop (bench/_bare_rpc.py) runs in the same process as keel-memory, before and
after it (its better run counts, so a quieter moment never flatters Keel); the row
``bare-asyncio`` and ``ratio_memory_vs_bare`` are the framework's own cost per call.
"""

from __future__ import annotations

from typing import Any

from bench import _bare_rpc
from bench._keel_rpc import measure


async def keel_memory(params: dict[str, Any]) -> dict[str, float]:
    before = await _bare_rpc.measure(params)
    figures = await measure("memory://bench", params)
    after = await _bare_rpc.measure(params)
    bare = max(before, after, key=lambda run: run["conc_calls_per_s"])
    return {**figures, **{f"bare_{key}": value for key, value in bare.items()}}


CONTENDERS = {"keel-memory": keel_memory}
