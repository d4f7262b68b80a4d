"""Built-in plugins ``core`` (ping, info) and ``health`` (load, memory, disk).

Failure semantics: read-only and side-effect free; an unreadable /proc file yields a
`CommandFailed` naming it.
"""

from __future__ import annotations

import os
import platform
import shutil
import socket
import time
from typing import Any

import keel
from keel.agent._plugin import CommandContext, Plugin, command
from keel.errors import CommandFailed


def _os_release() -> dict[str, str]:
    info: dict[str, str] = {}
    try:
        with open("/etc/os-release") as f:
            for line in f:
                key, _, value = line.strip().partition("=")
                if key:
                    info[key] = value.strip('"')
    except OSError:
        pass
    return info


def _uptime() -> float:
    try:
        with open("/proc/uptime") as f:
            return float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0


def _meminfo() -> dict[str, int]:
    mem: dict[str, int] = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("MemTotal", "MemAvailable", "SwapTotal", "SwapFree"):
                    mem[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError) as exc:
        raise CommandFailed(f"cannot read /proc/meminfo: {exc}") from None
    return mem


class CorePlugin(Plugin):
    """Liveness and identity."""

    name = "core"
    version = "1.0"
    inline = frozenset({"ping", "info"})

    @command
    async def ping(self, ctx: CommandContext) -> dict[str, Any]:
        return {}

    @command
    async def info(self, ctx: CommandContext) -> dict[str, Any]:
        release = _os_release()
        agent = getattr(self, "agent", None)
        started = agent.started if agent is not None else time.time()
        return {
            "os": {
                "name": release.get("NAME", platform.system()),
                "id": release.get("ID", ""),
                "version": release.get("VERSION_ID", ""),
                "pretty_name": release.get("PRETTY_NAME", ""),
                "kernel": platform.release(),
                "machine": platform.machine(),
            },
            "hostname": socket.gethostname(),
            "agent_version": keel.__version__,
            "agent_uptime": time.time() - started,
            "uptime": _uptime(),
        }


class HealthPlugin(Plugin):
    """Load, memory and disk, as numbers a controller can alarm on."""

    name = "health"
    version = "1.0"
    inline = frozenset({"report"})

    @command
    async def report(
        self, ctx: CommandContext, *, paths: list[str] | None = None
    ) -> dict[str, Any]:
        mem = _meminfo()
        disks: dict[str, dict[str, int]] = {}
        for path in paths or ["/"]:
            try:
                usage = shutil.disk_usage(path)
            except OSError as exc:
                raise CommandFailed(f"cannot stat {path}: {exc.strerror}") from None
            disks[path] = {"total": usage.total, "used": usage.used, "free": usage.free}
        return {
            "load": list(os.getloadavg()),
            "cpus": os.cpu_count() or 0,
            "memory": {
                "total": mem.get("MemTotal", 0),
                "available": mem.get("MemAvailable", 0),
                "swap_total": mem.get("SwapTotal", 0),
                "swap_free": mem.get("SwapFree", 0),
            },
            "disks": disks,
        }
