"""Small helpers shared by tests."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest


async def eventually(check: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait until check() is true; fail the test past the timeout."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not check():
        if loop.time() > end:
            pytest.fail(f"condition not met within {timeout}s")
        await asyncio.sleep(0.01)
