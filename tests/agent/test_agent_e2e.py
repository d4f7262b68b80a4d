"""End to end: the real agent in its own process, driven by AgentClient over a unix socket
(the host end of virtio-serial stands in as a unix socket)."""

from __future__ import annotations

import asyncio
import json
import os
import stat
from pathlib import Path

import pytest
from agent_helpers import AgentProcess, shadow_hash

from keel.agent import AgentClient
from keel.errors import (
    AgentTimeout,
    AgentUnavailable,
    BadArguments,
    CommandDenied,
    CommandFailed,
    IntegrityError,
    StreamLimitExceeded,
    UnknownCommand,
)


async def connect(agent: AgentProcess, **kw: float) -> AgentClient:
    return await AgentClient.connect(agent.url, timeout=kw.get("timeout", 20.0))


async def test_handshake_lists_plugins_with_versions(agent: AgentProcess) -> None:
    async with await connect(agent) as client:
        welcome = client.welcome
        assert welcome is not None
        assert welcome.version == 1
        assert welcome.instance_id == "i-test"
        assert {"core", "exec", "files", "users", "services", "health"} <= set(welcome.plugins)
        assert "run" in welcome.plugins["exec"].commands
        assert welcome.plugins["files"].version == "1.0"
        await client.ping()


async def test_info_and_health(agent: AgentProcess) -> None:
    async with await connect(agent) as client:
        info = await client.info()
        assert info["hostname"] == os.uname().nodename
        assert info["agent_version"]
        assert info["uptime"] > 0
        health = await client.health()
        assert health["memory"]["total"] > 0
        assert "/" in health["disks"]
        assert len(health["load"]) == 3


async def test_exec_streams_output_and_exit_code(agent: AgentProcess, tmp_path: Path) -> None:
    async with await connect(agent) as client:
        result = await client.exec(
            ["sh", "-c", 'cat; echo "$GREETING" in "$(pwd)"; echo oops >&2; exit 3'],
            env={"GREETING": "hello"},
            cwd=str(tmp_path),
            stdin=b"from stdin\n",
        )
        assert result.exit_code == 3
        assert result.stdout == f"from stdin\nhello in {tmp_path}\n".encode()
        assert result.stderr == b"oops\n"
        seen: list[tuple[int, bytes]] = []
        streamed = await client.exec(
            ["sh", "-c", "for i in 1 2 3; do echo $i; sleep 0.05; done"],
            on_output=lambda stream, data: seen.append((stream, data)),
        )
        assert streamed.exit_code == 0
        assert streamed.stdout == b""
        assert b"".join(d for s, d in seen if s == 0) == b"1\n2\n3\n"
        assert len(seen) >= 2  # it arrived in pieces, as it was written


async def test_exec_large_output_with_flow_control(agent: AgentProcess) -> None:
    async with await connect(agent) as client:
        result = await client.exec(["head", "-c", str(20 * 1024 * 1024), "/dev/zero"])
        assert len(result.stdout) == 20 * 1024 * 1024
        with pytest.raises(StreamLimitExceeded):
            await client.exec(["cat", "/dev/zero"], max_output=4 * 1024 * 1024)
        await client.ping()  # the connection is still good


async def test_exec_timeout_kills_the_process(agent: AgentProcess, tmp_path: Path) -> None:
    marker = tmp_path / "survived"
    argv = ["sh", "-c", f"sleep 1.5; touch {marker}"]
    async with await connect(agent) as client:
        assert (await client.exec(argv)).exit_code == 0
        marker.unlink()
        timed = await client.exec(argv, timeout=0.2)
        assert timed.timed_out
        assert timed.signal == 9
        # The controller's own deadline: the request is cancelled and the agent kills it.
        with pytest.raises(AgentTimeout):
            await client._keel().conn.call("exec", "run", {"argv": argv}, timeout=0.3)
        await client.ping()
    await asyncio.sleep(2)
    assert not marker.exists(), "a timed-out or cancelled program kept running"


async def test_exec_of_missing_program(agent: AgentProcess) -> None:
    async with await connect(agent) as client:
        with pytest.raises(CommandFailed, match="no-such-program"):
            await client.exec(["/no-such-program"])


async def test_put_and_get_file(agent: AgentProcess, tmp_path: Path) -> None:
    target = tmp_path / "sub.bin"
    data = os.urandom(5 * 1024 * 1024 + 123)
    async with await connect(agent) as client:
        info = await client.put_file(str(target), data, mode=0o600)
        assert info.size == len(data)
        assert target.read_bytes() == data
        assert stat.S_IMODE(target.stat().st_mode) == 0o600
        assert await client.get_file(str(target)) == data
        local = tmp_path / "local.bin"
        local.write_bytes(data[:1000])
        await client.put_file(str(target), local)
        assert target.read_bytes() == data[:1000]
        assert await client.get_file(str(target)) == data[:1000]
        with pytest.raises(StreamLimitExceeded):
            await client.get_file(str(target), max_size=100)
        with pytest.raises(CommandFailed, match="cannot open"):
            await client.get_file(str(tmp_path / "missing"))
        assert [p.name for p in tmp_path.iterdir() if "keel" in p.name] == []


async def test_put_with_wrong_sha256_leaves_target_untouched(
    agent: AgentProcess, tmp_path: Path
) -> None:
    target = tmp_path / "keep.txt"
    target.write_text("old")
    async with await connect(agent) as client:
        conn = client._keel().conn
        stream = await conn.request(
            "files", "put", {"path": str(target), "sha256": "00" * 32}, timeout=10
        )
        await stream.send(b"new contents", end=True)
        with pytest.raises(IntegrityError):
            await stream.result()
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


async def test_errors_are_typed_and_the_agent_survives(agent: AgentProcess) -> None:
    async with await connect(agent) as client:
        with pytest.raises(UnknownCommand):
            await client.call("nope", "nothing")
        with pytest.raises(BadArguments):
            await client.call("exec", "run", argv="not a list")
        with pytest.raises(BadArguments):
            await client.call("core", "ping", surprise=1)
        with pytest.raises(CommandDenied):
            await client.service("ssh", "restart")
        with pytest.raises(CommandFailed):
            await client.service("keel-no-such-unit", "start")
        await client.ping()
    assert agent.alive()


async def test_concurrent_requests_on_one_channel(agent: AgentProcess) -> None:
    async with await connect(agent) as client:
        results = await asyncio.gather(
            *(client.exec(["sh", "-c", f"sleep 0.{i}; echo {i}"]) for i in range(1, 6)),
            *(client.ping() for _ in range(20)),
        )
        outs = [r.stdout for r in results[:5]]  # type: ignore[union-attr]
        assert outs == [f"{i}\n".encode() for i in range(1, 6)]


async def test_users_password_and_ssh_key(agent: AgentProcess, throwaway_user: str) -> None:
    before = shadow_hash(throwaway_user)
    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKeelTestKeyForAgent keel@test"
    async with await connect(agent) as client:
        await client.set_password(throwaway_user, "s3cret-pass")
        assert shadow_hash(throwaway_user) not in (before, "", "!")
        await client.add_ssh_key(throwaway_user, key)
        await client.add_ssh_key(throwaway_user, key)  # idempotent
        with pytest.raises(CommandFailed):
            await client.set_password("keel-no-such-user", "x")
    keys = Path(f"/home/{throwaway_user}/.ssh/authorized_keys")
    assert keys.read_text().splitlines() == [key]
    assert stat.S_IMODE(keys.stat().st_mode) == 0o600


async def test_every_command_writes_one_audit_line(agent: AgentProcess) -> None:
    before = len(agent.audit_lines())
    async with await connect(agent) as client:
        await client.ping()
        with pytest.raises(CommandDenied):
            await client.service("ssh", "restart")
        with pytest.raises(CommandFailed):
            await client.set_password("keel-no-user", "hunter2")
    lines = [json.loads(line) for line in agent.audit_lines()[before:]]
    audits = [r for r in lines if r["event"] == "audit"]
    assert [r["what"] for r in audits] == ["core.ping", "services.restart", "users.set_password"]
    assert [r["result"] for r in audits] == ["ok", "error:denied", "error:failed"]
    assert all(r["who"].startswith("unix:uid=") and r["when"] for r in audits)
    assert "hunter2" not in agent.audit.read_text()


async def test_client_reconnects_after_agent_restart(tmp_path: Path) -> None:
    sock = tmp_path / "a.sock"
    first = AgentProcess(tmp_path, "--listen", f"unix://{sock}", wait=sock)
    client = await AgentClient.connect(f"unix://{sock}", timeout=10)
    try:
        await client.ping()
        first.stop()
        for _ in range(500):  # the client sees the channel end (bounded: 5 s on a busy machine)
            if client._backend.closed:
                break
            await asyncio.sleep(0.01)
        second = AgentProcess(tmp_path, "--listen", f"unix://{sock}", wait=sock)
        try:
            await client.ping()  # a new channel, resynced, without a failed call
        finally:
            second.stop()
        # The agent died and nobody noticed before the next call: it fails, typed.
        with pytest.raises(AgentUnavailable):
            await client.ping()
        third = AgentProcess(tmp_path, "--listen", f"unix://{sock}", wait=sock)
        try:
            await client.ping()
        finally:
            third.stop()
    finally:
        await client.close()


async def test_cancelling_exec_kills_the_program(agent: AgentProcess, tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    async with await connect(agent) as client:
        task = asyncio.create_task(client.exec(["sh", "-c", f"echo $$ > {pidfile}; exec sleep 30"]))
        for _ in range(100):
            if pidfile.exists() and pidfile.read_text().strip():
                break
            await asyncio.sleep(0.05)
        pid = int(pidfile.read_text())
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(100):
            if not Path(f"/proc/{pid}").exists():
                break
            await asyncio.sleep(0.05)
        assert not Path(f"/proc/{pid}").exists(), "cancel did not kill the program"
        await client.ping()
    audits = [json.loads(line) for line in agent.audit_lines()]
    assert any(r.get("what") == "exec.run" and r["result"] == "cancelled" for r in audits)


async def test_agent_chunks_to_the_controllers_frame_limit(
    agent: AgentProcess, tmp_path: Path
) -> None:
    target = tmp_path / "small-frames.bin"
    data = os.urandom(1024 * 1024)
    target.write_bytes(data)
    async with await AgentClient.connect(agent.url, max_frame=64 * 1024) as client:
        assert await client.get_file(str(target)) == data
        await client.put_file(str(target), data[::-1])
        assert target.read_bytes() == data[::-1]


async def test_pings_interleave_with_a_large_upload(agent: AgentProcess, tmp_path: Path) -> None:
    data = os.urandom(24 * 1024 * 1024)
    async with await connect(agent) as client:

        async def pings() -> int:
            done = 0
            for _ in range(20):
                await client.ping(timeout=5)
                done += 1
            return done

        info, done = await asyncio.gather(client.put_file(str(tmp_path / "big"), data), pings())
        assert info.size == len(data)
        assert done == 20
