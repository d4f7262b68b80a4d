"""The recorded service graph, and what it says: smells and islands.

Edges are recorded per calling service and method; the callee service of a topic is whoever
registered as serving it (a topic nobody was seen serving shows as ``?topic``). Only what
was recorded is known: a dependency never exercised while the tap ran is not in the map.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from keel.map._record import bucket_seconds, connect_db
from keel.messaging._target import parse_version

SYNC = "call"


@dataclass
class Edge:
    caller: str
    caller_method: str
    callee: str
    topic: str
    method: str
    pattern: str
    version: str
    count: int
    errors: int = 0
    timeouts: int = 0
    p50_ms: float | None = None
    p99_ms: float | None = None
    rate_per_s: float = 0.0


@dataclass
class Service:
    name: str
    topics: list[str] = field(default_factory=list)
    methods: list[str] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)


@dataclass
class Graph:
    services: dict[str, Service]
    edges: list[Edge]

    def to_json(self) -> dict[str, Any]:
        return {
            "services": {name: asdict(s) for name, s in sorted(self.services.items())},
            "edges": [asdict(e) for e in self.edges],
        }


def _percentile_ms(hist: list[int], q: float) -> float | None:
    total = sum(hist)
    if not total:
        return None
    goal = q / 100 * total
    seen = 0
    for index, n in enumerate(hist):
        seen += n
        if seen >= goal:
            return round(bucket_seconds(index) * 1000, 3)
    return None


def load(path: str | Path) -> Graph:
    db = connect_db(path)
    try:
        services: dict[str, Service] = {}
        by_topic: dict[str, str] = {}
        for topic, service, versions, methods, _ in db.execute("SELECT * FROM serves"):
            entry = services.setdefault(service, Service(service))
            entry.topics.append(topic)
            entry.methods = sorted(set(entry.methods) | set(json.loads(methods)))
            entry.versions.update(json.loads(versions))
            by_topic[topic] = service
        edges: list[Edge] = []
        rows = db.execute("SELECT * FROM edges ORDER BY caller, caller_method, topic, method")
        for (
            caller,
            caller_method,
            topic,
            method,
            pattern,
            version,
            count,
            errors,
            timeouts,
            hist_text,
            first,
            last,
        ) in rows:
            hist = json.loads(hist_text)
            callee = by_topic.get(topic, f"?{topic}")
            services.setdefault(caller, Service(caller))
            services.setdefault(callee, Service(callee))
            span = max(last - first, 1.0)
            edges.append(
                Edge(caller, caller_method, callee, topic, method, pattern, version, count,
                     errors, timeouts, _percentile_ms(hist, 50), _percentile_ms(hist, 99),
                     round(count / span, 2))
            )  # fmt: skip
        listeners: dict[str, set[str]] = defaultdict(set)
        for topic, service, _pool, _ in db.execute("SELECT * FROM listens"):
            listeners[topic].add(service)
            services.setdefault(service, Service(service))
        for publisher, topic, priority, event_type, count, first, last in db.execute(
            "SELECT * FROM notifies ORDER BY publisher, topic, event_type"
        ):
            services.setdefault(publisher, Service(publisher))
            for listener in sorted(listeners.get(topic, {f"?{topic}"})):
                services.setdefault(listener, Service(listener))
                edges.append(
                    Edge(publisher, "", listener, topic, event_type, "notify", priority, count,
                         rate_per_s=round(count / max(last - first, 1.0), 2))
                )  # fmt: skip
        return Graph(services, edges)
    finally:
        db.close()


@dataclass
class Smell:
    kind: str  # cycle, deep-chain, fan-in, version-skew
    summary: str
    evidence: list[str]


def _service_calls(graph: Graph) -> dict[str, set[str]]:
    out: dict[str, set[str]] = defaultdict(set)
    for e in graph.edges:
        if e.pattern == SYNC:
            out[e.caller].add(e.callee)
    return out


def _cycles(adj: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one service, or a service calling itself."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(adj.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1 or v in adj.get(v, ()):
                found.append(sorted(group))

    for v in sorted(adj):
        if v not in index:
            visit(v)
    return found


def _method_calls(graph: Graph) -> dict[tuple[str, str], set[tuple[str, str]]]:
    out: dict[tuple[str, str], set[tuple[str, str]]] = defaultdict(set)
    for e in graph.edges:
        if e.pattern == SYNC:
            out[(e.caller, e.caller_method)].add((e.callee, e.method))
    return out


def _longest_chain(calls: dict[tuple[str, str], set[tuple[str, str]]]) -> list[tuple[str, str]]:
    best: list[tuple[str, str]] = []

    def walk(node: tuple[str, str], path: list[tuple[str, str]]) -> None:
        nonlocal best
        if len(path) > len(best):
            best = list(path)
        for nxt in sorted(calls.get(node, ())):
            if nxt not in path:  # cycles are reported separately
                path.append(nxt)
                walk(nxt, path)
                path.pop()

    for start in sorted(calls):
        walk(start, [start])
    return best


def smells(graph: Graph, *, max_depth: int = 3, fan_in: int = 3) -> list[Smell]:
    found: list[Smell] = []
    calls = _service_calls(graph)
    for group in _cycles(calls):
        evidence = [
            f"{e.caller}.{e.caller_method or '?'} -call-> {e.callee}.{e.method} ({e.count}x)"
            for e in graph.edges
            if e.pattern == SYNC and e.caller in group and e.callee in group
        ]
        found.append(Smell("cycle", "synchronous call cycle: " + " <-> ".join(group), evidence))
    chain = _longest_chain(_method_calls(graph))
    if len(chain) - 1 > max_depth:
        found.append(
            Smell(
                "deep-chain",
                f"synchronous call chain {len(chain) - 1} deep (threshold {max_depth})",
                [" -> ".join(f"{s}.{m or '?'}" for s, m in chain)],
            )
        )
    callers: dict[str, set[str]] = defaultdict(set)
    for e in graph.edges:
        if e.pattern == SYNC and e.caller != e.callee:
            callers[e.callee].add(e.caller)
    for callee, who in sorted(callers.items()):
        if len(who) >= fan_in:
            found.append(
                Smell(
                    "fan-in",
                    f"{callee} is called synchronously by {len(who)} services",
                    sorted(who),
                )
            )
    for e in graph.edges:
        offered = graph.services.get(e.callee, Service(e.callee)).versions.get("")
        if e.pattern != "notify" and offered and parse_version(e.version) < parse_version(offered):
            found.append(
                Smell(
                    "version-skew",
                    f"{e.caller} calls {e.callee}.{e.method} at {e.version}; "
                    f"{e.callee} offers {offered}",
                    [f"{e.count} requests at {e.version}"],
                )
            )
    return found


@dataclass
class IslandMethod:
    method: str
    needs: list[str]  # services it needs synchronously (transitively)
    async_deps: list[str]  # services it only casts or notifies to

    @property
    def works_alone(self) -> bool:
        return not self.needs


def island(graph: Graph, service: str) -> list[IslandMethod]:
    """For each method of ``service``: which services it needs synchronously, transitively."""
    calls = _method_calls(graph)
    methods = set(graph.services.get(service, Service(service)).methods)
    methods |= {e.method for e in graph.edges if e.callee == service and e.pattern != "notify"}
    methods |= {e.caller_method for e in graph.edges if e.caller == service and e.caller_method}
    result = []
    for method in sorted(methods):
        needs: set[str] = set()
        todo = [(service, method)]
        seen: set[tuple[str, str]] = set()
        while todo:
            node = todo.pop()
            if node in seen:
                continue
            seen.add(node)
            for callee, callee_method in calls.get(node, ()):
                if callee != service:
                    needs.add(callee)
                todo.append((callee, callee_method))
        async_deps = {
            e.callee
            for e in graph.edges
            if e.caller == service
            and e.caller_method == method
            and e.pattern != SYNC
            and e.callee != service
        }
        result.append(IslandMethod(method, sorted(needs), sorted(async_deps - needs)))
    return result
