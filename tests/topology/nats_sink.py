"""What the NATS cluster tests share: a notification sink counting payloads, and a node's
number from its server name; a bounded wait for a condition."""

from __future__ import annotations

import asyncio
import collections
from typing import Any


class Sink:
    def __init__(self) -> None:
        self.seen: collections.Counter[int] = collections.Counter()

    async def info(
        self, ctx: Any, publisher_id: str, event_type: str, payload: Any, md: Any
    ) -> None:
        self.seen[int(payload)] += 1


def node_number(name: str | None) -> int:
    return int(str(name).removeprefix("keel-n"))


async def wait_until(check: Any, seconds: float) -> None:
    """Until ``check()`` holds, or ``seconds`` have passed (the caller asserts)."""
    for _ in range(int(seconds * 10)):
        if check():
            return
        await asyncio.sleep(0.1)
