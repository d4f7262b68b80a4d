"""Fixtures for keel.agent: the real agent as a separate process, the real qemu-ga."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from agent_helpers import AgentProcess, Vm

from servers import server_url


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    """One agent per test module, listening on a unix socket (virtio-serial's host end)."""
    work = tmp_path_factory.mktemp("agent")
    sock = work / "agent.sock"
    proc = AgentProcess(
        work,
        "--listen",
        f"unix://{sock}",
        config='deny = ["services.restart"]\nframe_timeout = 0.5\n',
        wait=sock,
    )
    proc.url = f"unix://{sock}"
    yield proc
    proc.stop()
    assert proc.proc.returncode == 0, proc.output()


@pytest.fixture(scope="session")
def qga_url() -> str:
    """The real qemu-guest-agent (Debian qemu-guest-agent) from scripts/servers."""
    return server_url("qemu-ga")


@pytest.fixture
def throwaway_user() -> Iterator[str]:
    """A real local user for password and SSH key tests, removed afterwards."""
    name = f"keelt{os.getpid() % 100000}"
    subprocess.run(["userdel", "-r", name], capture_output=True, check=False)
    subprocess.run(["useradd", "-m", name], check=True, capture_output=True)
    yield name
    subprocess.run(["userdel", "-r", name], capture_output=True, check=False)


@pytest.fixture(scope="session")
def vm() -> Vm:
    """Boots the guest once per test session (or reuses one already up). A machine that
    cannot boot it fails here with the VM's log; it is never a skip."""
    started = time.monotonic()
    keel_url, qga_url = server_url("vm").split()
    where = Path(os.environ.get("KEEL_SERVERS_DIR", "/tmp/keel-servers")) / "vm"
    boot = (where / "boot.txt").read_text().strip() if (where / "boot.txt").exists() else ""
    waited = time.monotonic() - started
    print(f"\nvm: ready after {waited:.1f}s in this session; {boot}")  # shown with -s / -rA
    return Vm(keel_url, qga_url, boot, where)
