"""The service graph as JSON, Graphviz DOT, and SVG or PNG (through Graphviz's `dot`)."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections import defaultdict

from keel.errors import ConfigError
from keel.map._graph import Graph

STYLE = {
    "call": 'color="#c0392b" penwidth=2',
    "cast": 'color="#2471a3" style=dashed',
    "fanout": 'color="#7d3c98" style=dotted',
    "notify": 'color="#1e8449" style=dashed arrowhead=open',
}


def to_json(graph: Graph) -> str:
    return json.dumps(graph.to_json(), indent=2, sort_keys=True)


def _q(text: str) -> str:
    # Labels carry Graphviz's own escapes (\n, \l) on purpose; only quotes need escaping.
    return '"' + text.replace('"', '\\"') + '"'


def to_dot(graph: Graph) -> str:
    """Services as boxes listing their methods; one edge per (caller, callee, pattern)."""
    lines = [
        "digraph keel {",
        '  rankdir=LR; node [shape=box style="rounded,filled" fillcolor="#f4f6f7" '
        'fontname="Helvetica"]; edge [fontname="Helvetica" fontsize=10];',
    ]
    for name, service in sorted(graph.services.items()):
        methods = "\\l".join(service.methods) + ("\\l" if service.methods else "")
        version = service.versions.get("")
        title = f"{name}" + (f" v{version}" if version else "")
        label = f"{title}\\n{methods}" if methods else title
        missing = ' fillcolor="#fdebd0"' if name.startswith("?") else ""
        lines.append(f"  {_q(name)} [label={_q(label)}{missing}];")
    grouped: dict[tuple[str, str, str], list[str]] = defaultdict(list)
    totals: dict[tuple[str, str, str], tuple[float, float]] = defaultdict(lambda: (0.0, 0.0))
    for e in graph.edges:
        key = (e.caller, e.callee, e.pattern)
        grouped[key].append(e.method)
        rate, p99 = totals[key]
        totals[key] = (rate + e.rate_per_s, max(p99, e.p99_ms or 0.0))
    for (caller, callee, pattern), names in sorted(grouped.items()):
        rate, p99 = totals[(caller, callee, pattern)]
        label = f"{pattern}: {', '.join(sorted(set(names)))}\\n{rate:g}/s"
        if pattern == "call":
            label += f" p99 {p99:g} ms"
        lines.append(f"  {_q(caller)} -> {_q(callee)} [label={_q(label)} {STYLE[pattern]}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def to_image(graph: Graph, fmt: str) -> bytes:
    """SVG or PNG bytes, drawn by Graphviz."""
    if fmt not in ("svg", "png"):
        raise ConfigError(f"image format {fmt!r}: use svg or png")
    dot = shutil.which("dot")
    if dot is None:
        raise ConfigError(
            "drawing needs Graphviz's `dot`: apt-get install graphviz (or use --format dot)"
        )
    done = subprocess.run(
        [dot, f"-T{fmt}"],
        input=to_dot(graph).encode(),
        capture_output=True,
        timeout=60,
        check=False,
    )
    if done.returncode != 0:
        raise ConfigError(f"dot failed: {done.stderr.decode(errors='replace')[:500]}")
    return done.stdout
