"""Prometheus metrics for servers, clients and listeners.

Counting on the hot path is a plain dict increment; a collector registered once with
prometheus_client reads the live objects' counters at scrape time, so metrics cost nothing
until someone scrapes.
"""

from __future__ import annotations

import threading
import weakref
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from prometheus_client.core import REGISTRY, CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector


class Measured(Protocol):
    metric_labels: dict[str, str]
    counts: Counter[tuple[str, ...]]

    def gauges(self) -> dict[str, float]: ...


_live: weakref.WeakSet[Measured] = weakref.WeakSet()
_lock = threading.Lock()
_registered = False

# family name -> (help, label names of the count key)
FAMILIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "keel_rpc_server_requests": (
        "RPC requests handled by servers, by kind, method and outcome",
        ("kind", "method", "outcome"),
    ),
    "keel_rpc_client_requests": (
        "RPC requests sent by clients, by kind, method and outcome",
        ("kind", "method", "outcome"),
    ),
    "keel_notifications": (
        "Notifications published or handled, by priority and outcome",
        ("priority", "outcome"),
    ),
    "keel_messages_malformed": (
        "Deliveries Keel could not read or handle (dead-lettered, or dropped from an "
        "auto-acknowledged queue), by kind, queue and problem",
        ("kind", "queue", "problem"),
    ),
}


class _KeelCollector(Collector):
    def describe(self) -> list[CounterMetricFamily]:
        # Families depend on what is live at scrape time; describing none keeps
        # registration from calling collect() (and so from taking our lock).
        return []

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        with _lock:
            objs = list(_live)
        for family, (doc, labels) in FAMILIES.items():
            metric: CounterMetricFamily | None = None
            for obj in objs:
                for key, value in list(obj.counts.items()):
                    if key[0] != family:
                        continue
                    if metric is None:
                        metric = CounterMetricFamily(
                            family, doc, labels=[*obj.metric_labels, *labels]
                        )
                    metric.add_metric([*obj.metric_labels.values(), *key[1:]], value)
            if metric is not None:
                yield metric
        gauges: dict[str, GaugeMetricFamily] = {}
        for obj in objs:
            for name, gauge_value in obj.gauges().items():
                gauge = gauges.get(name)
                if gauge is None:
                    gauge = gauges[name] = GaugeMetricFamily(
                        name, name.replace("_", " "), labels=list(obj.metric_labels)
                    )
                gauge.add_metric(list(obj.metric_labels.values()), gauge_value)
        yield from gauges.values()


class Tally:
    """One outcome counted by method on the hot path, added to a Counter of full keys when
    that is read (`fold`).

    Every call counts its outcome: a tuple key (built and hashed twice per increment) in a
    Counter cost a call more than the rest of its metrics; ``tally.by[method]`` is a plain
    dict keyed by a string whose hash is cached. Only the event loop's thread counts; a
    scrape on another thread folds under the lock, adding what was counted since its last
    fold, so nothing is counted twice or lost.
    """

    __slots__ = ("_folded", "_label", "_lock", "_prefix", "_suffix", "by")

    def __init__(
        self,
        prefix: tuple[str, ...],
        suffix: tuple[str, ...],
        label: Callable[[str], str] | None = None,
    ) -> None:
        self.by: dict[str, int] = {}
        self._folded: dict[str, int] = {}
        self._lock = threading.Lock()
        self._prefix = prefix
        self._suffix = suffix
        self._label = label  # a method's label in the key (servers bound what senders send)

    def fold(self, into: Counter[tuple[str, ...]]) -> None:
        """Add to ``into`` what was counted since the last fold."""
        with self._lock:
            folded = self._folded
            for method, count in list(self.by.items()):
                done = folded.get(method, 0)
                if count != done:
                    label = method if self._label is None else self._label(method)
                    into[(*self._prefix, label, *self._suffix)] += count - done
                    folded[method] = count


class FoldedCounts:
    """The ``counts`` of a client or server: its ``_counts`` Counter, with its ``_ok`` tally
    folded in first whenever it is read (`Tally`)."""

    def __init__(self, doc: str) -> None:
        self.__doc__ = doc

    def __get__(self, obj: Any, owner: type | None = None) -> Counter[tuple[str, ...]]:
        counts: Counter[tuple[str, ...]] = obj._counts
        obj._ok.fold(counts)
        return counts

    def __set__(self, obj: Any, value: Counter[tuple[str, ...]]) -> None:
        obj._counts = value


def track(obj: Measured) -> None:
    global _registered  # noqa: PLW0603 - one collector per process, registered on first use
    with _lock:
        if not _registered:
            REGISTRY.register(_KeelCollector())
            _registered = True
        _live.add(obj)
