"""Real servers for tests, started through scripts/servers (never skipped: a server that does
not start fails the test with the server's log)."""

from __future__ import annotations

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
        result = _run("start", name)
        if result.returncode != 0:
            pytest.fail(
                f"server {name} failed to start:\n{result.stdout}\n{result.stderr}",
                pytrace=False,
            )
        _started[name] = _run("url", name).stdout.strip()
    return _started[name]


def restart(name: str) -> None:
    result = _run("restart", name)
    if result.returncode != 0:
        pytest.fail(f"server {name} failed to restart:\n{result.stderr}", pytrace=False)


def stop(name: str) -> None:
    _run("stop", name)


def start(name: str) -> None:
    _started.pop(name, None)
    server_url(name)
