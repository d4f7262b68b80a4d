"""Real servers for tests, started through scripts/servers (never skipped: a server that does
not start fails the test with the server's log).

A test session stops, at its end, the servers it started (tests/conftest.py), and leaves
those it found running: start them first (`scripts/servers start NAME...`), or set
``KEEL_KEEP_SERVERS=1``, and re-runs reuse them. The ledger is a file, not module state:
this module is imported both as ``servers`` and as ``tests.servers``.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "servers"
_started: dict[str, str] = {}


def _run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def server_url(name: str) -> str:
    """Start the named server once per test session (if not up) and return its URL."""
    if name not in _started:
        was_up = _run("status", name).returncode == 0
        result = _run("start", name)
        if not was_up:
            with _ledger().open("a") as ledger:
                ledger.write(name + "\n")
        if result.returncode != 0:
            pytest.fail(
                f"server {name} failed to start:\n{result.stdout}\n{result.stderr}",
                pytrace=False,
            )
        _started[name] = _run("url", name).stdout.strip()
    return _started[name]


def sentinel_replica_port() -> int:
    """The port of redis-sentinel's server that is a replica now (the URL names the three
    sentinels; the two servers listen on the two ports just below them)."""
    hosts = server_url("redis-sentinel").split("//", 1)[1].split("/", 1)[0]
    first_sentinel = int(hosts.split(",")[0].rsplit(":", 1)[1])
    leader = _run("leader", "redis-sentinel").stdout.strip()
    return first_sentinel - 2 + (1 if leader == "1" else 0)


def restart(name: str) -> None:
    result = _run("restart", name)
    if result.returncode != 0:
        pytest.fail(f"server {name} failed to restart:\n{result.stderr}", pytrace=False)


def stop(name: str) -> None:
    _run("stop", name)


def start(name: str) -> None:
    _started.pop(name, None)
    server_url(name)


def _ledger() -> Path:
    root = Path(os.environ.get("KEEL_SERVERS_DIR", "/tmp/keel-servers"))
    root.mkdir(parents=True, exist_ok=True)
    return root / f".started-by-pytest-{os.getpid()}"


def stop_started() -> list[str]:
    """Stop every server this process started (last started first); return their names."""
    ledger = _ledger()
    if not ledger.exists():
        return []
    names = list(dict.fromkeys(ledger.read_text().split()))
    for name in reversed(names):
        _run("stop", name)
    ledger.unlink()
    _started.clear()
    return names


def release(name: str) -> None:
    """Stop a server now if this process started it (a cluster, once its module is done)."""
    ledger = _ledger()
    names = ledger.read_text().split() if ledger.exists() else []
    if name not in names:
        return
    _run("stop", name)
    ledger.write_text("".join(n + "\n" for n in names if n != name))
    _started.pop(name, None)


def resume(name: str) -> None:
    """Start a server a test stopped (`stop`) again, and wait until it is ready. Unlike
    `start`, never books it as started by this session: a server that was running before the
    test stays running after the session."""
    result = _run("start", name)
    if result.returncode != 0:
        pytest.fail(f"server {name} failed to start:\n{result.stderr}", pytrace=False)
