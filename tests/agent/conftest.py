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
from servers import server_url


class AgentProcess:
    """``keel agent run`` in its own process, with its audit log in a temp dir."""

    def __init__(
        self, workdir: Path, *args: str, config: str = "", wait: Path | None = None
    ) -> None:
        self.workdir = workdir
        self.audit = workdir / "audit.log"
        self.url = ""
        cfg = workdir / "agent.toml"
        cfg.write_text(f'audit_log = "{self.audit}"\ninstance_id = "i-test"\n{config}')
        if wait is not None:
            wait.unlink(missing_ok=True)  # a stale socket must not look ready
        self.log = (workdir / "agent.out").open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "keel", "agent", "run", "--config", str(cfg), *args],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        if wait is not None:
            self.wait_for(wait)

    def wait_for(self, path: Path) -> None:
        deadline = time.monotonic() + 20
        while not path.exists():
            if self.proc.poll() is not None:
                pytest.fail(f"agent exited with {self.proc.returncode}: {self.output()}")
            if time.monotonic() > deadline:
                pytest.fail(f"agent did not create {path} in 20s: {self.output()}")
            time.sleep(0.02)

    def output(self) -> str:
        return (self.workdir / "agent.out").read_text(errors="replace")

    def audit_lines(self) -> list[str]:
        return self.audit.read_text().splitlines() if self.audit.exists() else []

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def alive(self) -> bool:
        return self.proc.poll() is None


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


def shadow_hash(user: str) -> str:
    for line in Path("/etc/shadow").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == user:
            return fields[1]
    raise LookupError(user)
