"""Sync handlers run in a bounded thread pool, with the caller's context variables."""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any


async def run_sync(
    executor: ThreadPoolExecutor, func: Callable[..., Any], *args: Any, **kwargs: Any
) -> Any:
    """Run ``func`` in ``executor``; the request context variable travels with it, so a sync
    handler's own calls are nested under the request it serves."""
    call = functools.partial(func, *args, **kwargs)
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(executor, contextvars.copy_context().run, call)
