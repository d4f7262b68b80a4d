"""The same AgentClient against the real qemu-guest-agent (Debian qemu-guest-agent, started
by scripts/servers on a unix socket, no VM)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from agent_helpers import shadow_hash

from keel.agent import AgentClient
from keel.errors import (
    AgentTimeout,
    AgentUnavailable,
    CommandDenied,
    CommandFailed,
    UnknownCommand,
)
from servers import restart, server_url


async def test_ping_and_info(qga_url: str) -> None:
    async with await AgentClient.connect(qga_url, timeout=10) as client:
        assert client.kind == "qga"
        await client.ping()
        info = await client.info()
        assert info["agent_version"].startswith("qemu-ga ")
        assert info["hostname"] == os.uname().nodename
        assert info["os"]["kernel"] == os.uname().release


async def test_exec(qga_url: str) -> None:
    async with await AgentClient.connect(qga_url, timeout=10) as client:
        result = await client.exec(
            ["/bin/sh", "-c", 'cat; echo "$WHO"; echo err >&2; exit 4'],
            env={"WHO": "qga", "PATH": "/usr/bin:/bin"},
            stdin=b"in\n",
        )
        assert (result.exit_code, result.stdout, result.stderr) == (4, b"in\nqga\n", b"err\n")
        seen: list[tuple[int, bytes]] = []
        await client.exec(["/bin/echo", "hi"], on_output=lambda s, d: seen.append((s, d)))
        assert seen == [(0, b"hi\n")]
        with pytest.raises(UnknownCommand, match="cwd"):
            await client.exec(["/bin/true"], cwd="/tmp")
        with pytest.raises(AgentTimeout):
            await client.exec(["/bin/sleep", "1"], timeout=0.2)
        with pytest.raises(CommandFailed):
            await client.exec(["/no/such/program"])
        await client.ping()


async def test_files(qga_url: str, tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 7)
    target = tmp_path / "qga.bin"
    async with await AgentClient.connect(qga_url, timeout=30) as client:
        info = await client.put_file(str(target), data)
        assert info.size == len(data)
        assert target.read_bytes() == data
        assert await client.get_file(str(target)) == data
        with pytest.raises(CommandFailed):
            await client.get_file(str(tmp_path / "missing"))
        with pytest.raises(UnknownCommand, match="mode"):
            await client.put_file(str(target), b"x", mode=0o600)


async def test_set_password_and_ssh_key(qga_url: str, throwaway_user: str) -> None:
    before = shadow_hash(throwaway_user)
    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIQgaTestKeyForKeelAgent keel@qga"
    async with await AgentClient.connect(qga_url, timeout=10) as client:
        await client.set_password(throwaway_user, "qga-s3cret")
        assert shadow_hash(throwaway_user) not in (before, "", "!")
        await client.add_ssh_key(throwaway_user, key)
    keys = Path(f"/home/{throwaway_user}/.ssh/authorized_keys").read_text()
    assert key in keys


async def test_keel_only_commands_are_typed_errors(qga_url: str) -> None:
    async with await AgentClient.connect(qga_url, timeout=10) as client:
        with pytest.raises(UnknownCommand):
            await client.health()
        with pytest.raises(UnknownCommand):
            await client.service("ssh", "status")
        with pytest.raises(UnknownCommand):
            await client.call("qga", "guest-no-such-command")
        assert (await client.call("qga", "guest-get-host-name"))["host-name"]


async def test_resync_after_garbage_and_a_stale_reply(qga_url: str) -> None:
    async with await AgentClient.connect(qga_url, timeout=10) as client:
        backend = client._backend
        await client.ping()
        # Garbage into qga's parser, and a reply nobody waits for left on the line.
        await backend.channel.write(b'{"execute": gar\x01bage\n{"execute": "guest-ping"}\n')  # type: ignore[attr-defined]
        await client.resync()
        await client.ping()
        assert (await client.info())["agent_version"].startswith("qemu-ga")


async def test_reconnects_after_qga_restarts(qga_url: str) -> None:
    async with await AgentClient.connect(qga_url, timeout=10) as client:
        await client.ping()
        await asyncio.to_thread(restart, "qemu-ga")
        with pytest.raises(AgentUnavailable):
            await client.ping()  # this channel died with the old qemu-ga
        await client.ping()  # a new channel, resynced
        assert (await client.info())["agent_version"].startswith("qemu-ga")


async def test_commands_disabled_with_block_rpcs_are_denied() -> None:
    """qemu-ga 7.2 answers a command disabled with --block-rpcs as CommandNotFound "has been
    disabled"; callers get CommandDenied, as for CommandDisabled."""
    url = server_url("qemu-ga-blocked")
    async with await AgentClient.connect(url, timeout=10) as client:
        with pytest.raises(CommandDenied, match="disabled"):
            await client.exec(["/bin/true"])
        with pytest.raises(CommandDenied):
            await client.get_file("/etc/hostname")
        with pytest.raises(CommandDenied):
            await client.set_password("nobody", "x")
        with pytest.raises(UnknownCommand):
            await client.call("qga", "guest-no-such-command")
        await client.ping()  # what is not blocked still works
