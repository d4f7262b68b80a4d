"""What the core does with a body it cannot read, or a delivery whose handling failed.

The promise (docs/messaging-contract.md, "Bad input from the network"): such a delivery is
settled once and the consumer goes on. Where the transport still holds it for us, it is
dead-lettered to ``<queue>.dlq`` with the reason; on an auto-acknowledged queue (replies,
fanout, presence: at most once, the broker already forgot it) there is nothing left to settle
and it is dropped. Either way it is counted in ``keel_messages_malformed_total{kind, queue,
problem}`` and logged in one structured line, at most `LOG_RATE` lines a second per kind and
queue (logging costs more than the rest of it: a flood must not turn the server into a
log writer); the next line logged says how many were not (``unlogged=N``). If the
dead-letter step itself fails (the broker is away) that is logged too, and the transport
hands the delivery back to its queue or lets its redelivery timer do so: at-least-once,
nothing lost.
"""

from __future__ import annotations

import logging
import time
from collections import Counter

from keel._log import event
from keel.errors import MalformedMessage
from keel.messaging import _metrics
from keel.messaging.transports.base import Delivery

REASON_LIMIT = 300  # characters of a reason: it lands in headers, logs and stream fields
LOG_RATE = 10.0  # lines a second per (kind, queue), in bursts of as many


class LogBudget:
    """A token bucket per (kind, queue), and what it did not let through."""

    def __init__(self) -> None:
        self.tokens = LOG_RATE
        self.at = time.monotonic()
        self.unlogged = 0

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(LOG_RATE, self.tokens + (now - self.at) * LOG_RATE)
        self.at = now
        if self.tokens < 1:
            self.unlogged += 1
            return False
        self.tokens -= 1
        return True


_budgets: dict[tuple[str, str], LogBudget] = {}  # keys: kinds x Keel's own queue names


class _Counts:
    """The one object behind ``keel_messages_malformed_total`` (labels in the key)."""

    def __init__(self) -> None:
        self.metric_labels: dict[str, str] = {}
        self.counts: Counter[tuple[str, ...]] = Counter()

    def gauges(self) -> dict[str, float]:
        return {}


COUNTS = _Counts()
_metrics.track(COUNTS)


def reason(exc: BaseException) -> str:
    """One line of bounded length saying why."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= REASON_LIMIT else text[: REASON_LIMIT - 3] + "..."


def crashed(kind: str, exc: BaseException) -> MalformedMessage:
    """The `MalformedMessage` for a delivery Keel read but failed to handle."""
    return MalformedMessage(
        f"internal error handling a {kind}: {type(exc).__name__}: {exc}", problem="internal"
    )


def note(
    log: logging.Logger, kind: str, queue: str, exc: MalformedMessage, size: int, **fields: object
) -> str:
    """Count and log one unreadable (or unhandled) delivery; return the reason."""
    problem = str(getattr(exc, "problem", "internal"))
    COUNTS.counts["keel_messages_malformed", kind, queue, problem] += 1
    why = reason(exc)
    budget = _budgets.get((kind, queue))
    if budget is None:
        budget = _budgets[kind, queue] = LogBudget()
    if budget.take():
        unlogged, budget.unlogged = budget.unlogged, 0
        event(
            log,
            logging.ERROR if problem == "internal" else logging.WARNING,
            f"{kind}.malformed",
            queue=queue,
            problem=problem,
            bytes=size,
            reason=why,
            unlogged=unlogged or None,
            **fields,
        )
    return why


async def settle(
    log: logging.Logger, kind: str, queue: str, delivery: Delivery, exc: MalformedMessage
) -> None:
    """Count, log and dead-letter (when still ours to settle) one delivery. Never raises."""
    why = note(log, kind, queue, exc, len(delivery.body))
    if delivery.settled:
        return
    try:
        await delivery.dead_letter(why)
    except Exception as failure:  # the transport hands it back or lets it be redelivered
        event(log, logging.WARNING, "dead_letter.failed", queue=queue, error=repr(failure))


def count(kind: str, queue: str) -> int:
    """Deliveries counted for ``kind`` on ``queue``, every problem (for tests and the CLI)."""
    return sum(n for key, n in COUNTS.counts.items() if key[1] == kind and key[2] == queue)
