"""scripts/servers itself: a server that is down is reported as down, plainly."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from tests.servers import ROOT, SCRIPT

PROBE = ROOT / "tests" / "servers_lifecycle_probe.py"


def test_status_of_a_stopped_qemu_ga_prints_no_traceback(tmp_path: Path) -> None:
    # What a killed qemu-ga leaves behind: its socket file, with nobody listening.
    (tmp_path / "qemu-ga").mkdir()
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(tmp_path / "qemu-ga" / "qga.sock"))
    stale.close()
    result = subprocess.run(
        [str(SCRIPT), "status", "qemu-ga"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "KEEL_SERVERS_DIR": str(tmp_path)},
    )
    assert result.returncode == 1
    assert result.stdout.strip() == "qemu-ga down"
    assert "Traceback" not in result.stderr, result.stderr


def test_cluster_commands_refuse_a_single_server() -> None:
    result = subprocess.run(
        [str(SCRIPT), "leader", "redis"], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 2
    assert "not a cluster" in result.stderr


def _redis_up(env: dict[str, str]) -> bool:
    return (
        subprocess.run(
            [str(SCRIPT), "status", "redis"], capture_output=True, timeout=60, env=env, check=False
        ).returncode
        == 0
    )


def _pytest_run(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(PROBE)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=ROOT,
        check=False,
    )


def test_a_test_run_stops_the_servers_it_started_and_keeps_the_others(tmp_path: Path) -> None:
    env = {**os.environ, "KEEL_SERVERS_DIR": str(tmp_path), "KEEL_REDIS_PORT": "31990"}
    env.pop("KEEL_KEEP_SERVERS", None)
    try:
        result = _pytest_run(env)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "stopped the servers this run started: redis" in result.stdout
        assert not _redis_up(env)
        # Started before the run: reused, and left running.
        subprocess.run([str(SCRIPT), "start", "redis"], env=env, timeout=120, check=True)
        result = _pytest_run(env)
        assert result.returncode == 0, result.stdout + result.stderr
        assert _redis_up(env)
    finally:
        subprocess.run([str(SCRIPT), "stop", "redis"], env=env, timeout=120, check=False)
