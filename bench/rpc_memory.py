"""Contenders on the in-process transport (no anchor: it keeps framework costs honest)."""

from __future__ import annotations

from typing import Any

from bench._keel_rpc import measure


async def keel_memory(params: dict[str, Any]) -> dict[str, float]:
    return await measure("memory://bench", params)


CONTENDERS = {"keel-memory": keel_memory}
