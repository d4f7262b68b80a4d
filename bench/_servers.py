"""Real servers for benchmarks, started through scripts/servers like the tests do."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "servers"
SERVER_OF = {"rabbit": "rabbitmq", "nats": "nats", "redis": "redis"}


def url(transport: str) -> str:
    """Start the transport's server if needed and return its URL; memory needs none."""
    if transport == "memory":
        return "memory://bench"
    name = SERVER_OF.get(transport, transport)
    started = subprocess.run(
        [str(SCRIPT), "start", name], capture_output=True, text=True, check=False
    )
    if started.returncode != 0:
        raise RuntimeError(f"{name} did not start:\n{started.stderr}")
    out = subprocess.run([str(SCRIPT), "url", name], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def url_dir(name: str) -> str:
    """The directory where scripts/servers keeps the named server's files."""
    base = os.environ.get("KEEL_SERVERS_DIR", "/tmp/keel-servers")
    return str(Path(base) / name)
