"""The agent's character-device channel (a pty standing in for /dev/virtio-ports/NAME), the
plugin API, version negotiation and the `keel agent run` command line."""

from __future__ import annotations

import asyncio
import os
import socket
import tty
from pathlib import Path
from typing import Any

import pytest
from agent_helpers import AgentProcess
from typer.testing import CliRunner

from keel.agent import Agent, AgentClient, AgentConfig, CommandContext, Plugin, command
from keel.agent import _protocol as p
from keel.agent._channel import _DeviceChannel, listen_unix
from keel.agent._plugin import load_plugins
from keel.cli import app
from keel.errors import BadArguments, CommandDenied, CommandFailed


async def test_agent_over_a_character_device(tmp_path: Path) -> None:
    """The guest end of virtio-serial is a character device the agent opens; a pty in raw
    mode is one, with the test holding the other end as the host."""
    master, slave = os.openpty()
    tty.setraw(slave)
    proc = AgentProcess(tmp_path, "--connect", f"virtio://{os.ttyname(slave)}")
    channel = _DeviceChannel("pty-master", os.dup(master))
    try:
        async with await AgentClient.from_channel(channel, timeout=20) as client:
            await client.ping()
            result = await client.exec(["echo", "through the device"])
            assert result.stdout == b"through the device\n"
            assert client.welcome is not None
            assert client.welcome.instance_id == "i-test"
        # The host reconnecting: a new controller on the same device resyncs the stream.
        async with await AgentClient.from_channel(
            _DeviceChannel("pty-master", master), timeout=20
        ) as again:
            await again.ping()
    finally:
        proc.stop()
        os.close(slave)
    assert any("virtio:" in line for line in proc.audit_lines())


class Greeter(Plugin):
    name = "greeter"
    version = "2.1"

    @command
    async def greet(self, ctx: CommandContext, *, who: str, times: int = 1) -> dict[str, Any]:
        if times > 3:
            raise CommandFailed("too many greetings")
        return {"text": " ".join([f"hello {who}"] * times), "peer": ctx.peer}

    @command
    async def count(self, ctx: CommandContext, *, upto: int) -> int:
        for i in range(upto):
            await ctx.send(str(i).encode())
        return upto


async def test_a_plugin_is_a_class_with_typed_commands(tmp_path: Path) -> None:
    config = AgentConfig(
        instance_id="i-plugin", deny=["greeter.count"], audit_log=str(tmp_path / "audit")
    )
    agent = Agent(config, plugins={"greeter": Greeter({})})
    sock = str(tmp_path / "p.sock")
    server = await listen_unix(sock, agent.serve)
    async with server, await AgentClient.connect(f"unix://{sock}", timeout=5) as client:
        await _exercise_greeter(client)
    agent.close()
    assert '"what": "greeter.greet"' in (tmp_path / "audit").read_text()


async def _exercise_greeter(client: AgentClient) -> None:
    assert client.welcome is not None
    assert client.welcome.plugins == {"greeter": p.PluginInfo("2.1", ("count", "greet"))}
    reply = await client.call("greeter", "greet", who="keel", times=2)
    assert reply["text"] == "hello keel hello keel"
    with pytest.raises(BadArguments):
        await client.call("greeter", "greet", who=3)
    with pytest.raises(BadArguments):
        await client.call("greeter", "greet")
    with pytest.raises(CommandFailed, match="too many"):
        await client.call("greeter", "greet", who="x", times=9)
    with pytest.raises(CommandDenied):
        await client.call("greeter", "count", upto=3)


def test_built_in_plugins_come_from_entry_points() -> None:
    problems: list[str] = []
    plugins = load_plugins({}, lambda name, why: problems.append(name))
    assert {"core", "exec", "files", "users", "services", "health"} <= set(plugins)
    assert problems == []


def test_allow_and_deny_lists() -> None:
    cfg = AgentConfig(allow=["core.*", "files.get"], deny=["core.info"])
    assert cfg.permits("core.ping")
    assert cfg.permits("files.get")
    assert not cfg.permits("core.info")
    assert not cfg.permits("files.put")
    assert not cfg.permits("exec.run")


async def test_no_common_version_is_an_error_not_a_crash(agent: AgentProcess) -> None:
    path = agent.url.removeprefix("unix://")
    reader, writer = await asyncio.open_unix_connection(path)
    try:
        writer.write(p.sync_token(1) + p.encode(p.Hello((99,), "future", 1 << 20)))
        decoder = p.FrameDecoder()
        decoder.hunt()
        events: list[p.Event] = []
        async with asyncio.timeout(5):
            while not any(isinstance(e, p.Frame) for e in events):
                events += decoder.feed(await reader.read(65536))
        frames = [p.decode(e.payload) for e in events if isinstance(e, p.Frame)]
        assert isinstance(frames[0], p.Error)
        assert frames[0].id == 0
        assert "version" in frames[0].message
    finally:
        writer.close()
        await writer.wait_closed()
    assert agent.alive()


def test_cli_refuses_bad_arguments(tmp_path: Path) -> None:
    runner = CliRunner()
    neither = runner.invoke(app, ["agent", "run"])
    assert neither.exit_code == 2
    bad = tmp_path / "bad.toml"
    bad.write_text("nonsense = 1\n")
    result = runner.invoke(app, ["agent", "run", "--listen", "unix:///x", "--config", str(bad)])
    assert result.exit_code == 2
    assert "unknown keys" in result.output
    tls = runner.invoke(app, ["agent", "run", "--listen", "tls://127.0.0.1:1", "--cert", "x"])
    assert tls.exit_code == 2


def test_agent_process_exits_cleanly_on_sigterm(tmp_path: Path) -> None:
    sock = tmp_path / "s.sock"
    proc = AgentProcess(tmp_path, "--listen", f"unix://{sock}", wait=sock)
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(sock))
    proc.stop()
    assert proc.proc.returncode == 0
    assert not sock.exists()


async def test_a_device_channel_keeps_order_under_back_pressure_and_ends_a_pending_read() -> None:
    """The device channel reads in the loop's callback and holds one chunk at most: a burst
    far over its buffer, taken slowly, arrives whole and in order; closing it ends a read
    that is waiting."""
    master, slave = os.openpty()
    tty.setraw(slave)
    tty.setraw(master)
    device = _DeviceChannel("pty-slave", slave)
    burst = os.urandom(200_000)
    got = bytearray()

    async def feed() -> None:
        view = memoryview(burst)
        while view:
            await asyncio.sleep(0)
            try:
                view = view[os.write(master, view[:4096]) :]
            except BlockingIOError:
                await asyncio.sleep(0.01)  # the pty is full: the reader is behind

    os.set_blocking(master, False)
    writer = asyncio.create_task(feed())
    try:
        while len(got) < len(burst):
            got += await asyncio.wait_for(device.read(3000), 10)
            await asyncio.sleep(0)  # a slow reader: the callback finds its chunk untaken
        await writer
        assert bytes(got) == burst
        pending = asyncio.create_task(device.read(100))
        await asyncio.sleep(0.05)
        await device.close()
        assert await asyncio.wait_for(pending, 5) == b""
    finally:
        writer.cancel()
        os.close(master)
