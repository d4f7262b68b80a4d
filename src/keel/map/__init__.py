"""keel.map: how services are intertwined, from live traffic.

Turn the tap on with ``KEEL_MAP_DB=path`` in a service's environment (or `enable`), then
render the graph with `keel map`, list what it smells of, and play the island game with
`keel island SERVICE`. `FakeServer` stands in for a neighbour from its interface spec.
"""

from __future__ import annotations

from pathlib import Path

from keel.map._fake import FakeServer
from keel.map._graph import Edge, Graph, IslandMethod, Service, Smell, island, load, smells
from keel.map._otel import OtelExport
from keel.map._record import MapTap
from keel.map._render import to_dot, to_image, to_json
from keel.messaging import _tap


def enable(path: str | Path | None = None) -> MapTap:
    """Record this process's traffic into ``path`` (default ``$KEEL_MAP_DB`` or .keel/map.db)."""
    tap = MapTap(path)
    _tap.install(tap)
    return tap


def disable() -> None:
    tap = _tap.state.tap
    _tap.install(None)
    if isinstance(tap, MapTap):
        tap.close()


__all__ = [
    "Edge",
    "FakeServer",
    "Graph",
    "IslandMethod",
    "MapTap",
    "OtelExport",
    "Service",
    "Smell",
    "disable",
    "enable",
    "island",
    "load",
    "smells",
    "to_dot",
    "to_image",
    "to_json",
]
