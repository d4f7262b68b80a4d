"""Helpers for the keel.agent tests (a uniquely named module, so merging other parts'
tests/conftest.py cannot shadow it): the real agent as a separate process."""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest


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


def shadow_hash(user: str) -> str:
    for line in Path("/etc/shadow").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == user:
            return fields[1]
    raise LookupError(user)


@dataclass(frozen=True)
class Vm:
    """The test VM (scripts/servers.d/vm.sh): Keel's agent and qemu-ga in one guest, reached
    through QEMU's chardev sockets. ``boot`` says how long the boot took and how it ran."""

    keel_url: str
    qga_url: str
    boot: str
    dir: Path
