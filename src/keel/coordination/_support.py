"""The backend support table, generated from each backend's declared characteristics (the
contract document embeds it; a test fails when the two drift)."""

from __future__ import annotations

from keel import urls
from keel.coordination.backends.base import Characteristic

SCHEMES = ("sqlite", "etcd", "zookeeper", "redis")


def support_table() -> str:
    """A Markdown table: one row per characteristic, one column per built-in backend."""
    declared = {
        scheme: urls.resolve("coordination", f"{scheme}://x/")[0].characteristics
        for scheme in SCHEMES
    }
    lines = [
        "| guarantee | " + " | ".join(SCHEMES) + " |",
        "|---|" + "---|" * len(SCHEMES),
    ]
    for c in Characteristic:
        marks = " | ".join("yes" if c in declared[s] else "no" for s in SCHEMES)
        lines.append(f"| `{c.name}`: {c.value} | {marks} |")
    return "\n".join(lines) + "\n"
