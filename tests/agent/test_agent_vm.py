"""Keel's agent and qemu-guest-agent in a real guest (scripts/servers.d/vm.sh): QEMU, a
Debian kernel, virtio-serial ports named as libvirt and nova name them, and AgentClient on
the host through QEMU's chardev sockets. Booted once per session; the reboot test runs last.

Under TCG on a shared machine the guest is slow (a process start takes seconds), so the
deadlines here are generous; what is measured is correctness, and the benchmark
(``python -m bench agent --vm``) measures speed."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from agent_helpers import Vm

from keel.agent import AgentClient
from keel.errors import AgentError, CommandFailed, UnknownCommand

T = 120.0  # a command's deadline in the slow guest
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKeelVmTestKey keel@vm"
pytestmark = pytest.mark.timeout(900)


@pytest.fixture
async def keel(vm: Vm) -> AsyncIterator[AgentClient]:
    async with await AgentClient.connect(vm.keel_url, timeout=T) as client:
        yield client


@pytest.fixture
async def qga(vm: Vm) -> AsyncIterator[AgentClient]:
    async with await AgentClient.connect(vm.qga_url, timeout=T) as client:
        yield client


async def sh(client: AgentClient, script: str) -> str:
    result = await client.exec(["/bin/sh", "-c", script], timeout=T)
    assert result.exit_code == 0, (script, result)
    return result.stdout.decode()


async def until(check: Callable[[], Awaitable[bool]], within: float, what: str) -> float:
    """Retry ``check`` (typed agent errors count as not yet) until it holds; seconds taken."""
    started = time.monotonic()
    while True:
        try:
            if await check():
                return time.monotonic() - started
        except AgentError:
            pass
        if time.monotonic() - started > within:
            pytest.fail(f"{what}: not within {within:.0f}s")
        await asyncio.sleep(1)


async def test_every_plugin_command_in_the_guest(keel: AgentClient) -> None:
    welcome = keel.welcome
    assert welcome is not None
    assert welcome.instance_id == "keel-vm"
    assert {"core", "exec", "files", "users", "services", "health"} <= set(welcome.plugins)
    await keel.ping()
    info = await keel.info()
    assert info["hostname"] == "keel-vm"
    assert info["os"]["kernel"].endswith("-amd64")  # Debian's kernel, not the host's
    assert info["uptime"] > 0
    health = await keel.health()
    assert health["memory"]["total"] > 0
    assert set(health["disks"]) == {"/"}
    out = await keel.exec(["uname", "-n"], timeout=T)
    assert out.stdout == b"keel-vm\n"

    data = os.urandom(100_000)
    put = await keel.put_file("/tmp/keel-vm-small.bin", data, mode=0o640)
    assert put.sha256 == hashlib.sha256(data).hexdigest()
    assert await keel.get_file("/tmp/keel-vm-small.bin") == data
    st = await keel.call("files", "stat", path="/tmp/keel-vm-small.bin")
    assert (st["size"], st["mode"]) == (len(data), 0o640)

    user = "keelvm"
    await sh(keel, f"id {user} >/dev/null 2>&1 || useradd -m {user}")
    before = await sh(keel, f"grep '^{user}:' /etc/shadow | cut -d: -f2")
    await keel.set_password(user, "vm-s3cret")
    after = await sh(keel, f"grep '^{user}:' /etc/shadow | cut -d: -f2")
    assert after.strip() not in ("", "!", before.strip())
    await keel.add_ssh_key(user, KEY)
    keys = await sh(
        keel,
        f"cat /home/{user}/.ssh/authorized_keys; stat -c '%U %a' /home/{user}/.ssh/authorized_keys",
    )
    assert keys.splitlines() == [KEY, f"{user} 600"]

    # No systemd in this guest (its init is scripts/vm/guest.sh): systemctl's own refusal,
    # as a typed error naming the unit, for every services command.
    for action in ("status", "start", "stop", "restart"):
        with pytest.raises(CommandFailed, match="keel-vm-test"):
            await keel.service("keel-vm-test.service", action)


async def test_a_guest_users_links_do_not_redirect_the_root_agent(keel: AgentClient) -> None:
    user = "keelvm2"
    home = f"/home/{user}"
    as_user = f"setpriv --reuid={user} --regid={user} --init-groups"
    await sh(keel, f"id {user} >/dev/null 2>&1 || useradd -m {user}; rm -rf {home}/.ssh")
    await sh(keel, f"{as_user} mkdir -m 700 {home}/.ssh")
    await sh(keel, f"{as_user} ln -s /etc/passwd {home}/.ssh/authorized_keys.keel-tmp")
    passwd = await sh(keel, "sha256sum /etc/passwd; stat -c %U /etc/passwd")
    await keel.add_ssh_key(user, KEY)
    assert await sh(keel, "sha256sum /etc/passwd; stat -c %U /etc/passwd") == passwd
    await sh(keel, f"{as_user} ln -sfn /etc {home}/conf")
    with pytest.raises(CommandFailed, match="symlink"):
        await keel.put_file(f"/home/{user}/conf/keel-owned", b"x")
    assert "keel-owned" not in await sh(keel, "ls /etc")


async def test_a_32_mib_file_round_trip(keel: AgentClient, qga: AgentClient) -> None:
    data = os.urandom(32 * 1024 * 1024)
    digest = hashlib.sha256(data).hexdigest()
    for client, path in ((keel, "/tmp/keel-32m.bin"), (qga, "/tmp/qga-32m.bin")):
        info = await client.put_file(path, data, timeout=600)
        assert info.size == len(data)
        assert (await sh(keel, f"sha256sum {path}")).split()[0] == digest
        assert await client.get_file(path, timeout=600) == data


async def test_exec_streams_output_as_it_is_written(keel: AgentClient) -> None:
    seen: list[tuple[float, int, bytes]] = []
    started = time.monotonic()
    result = await keel.exec(
        ["/bin/sh", "-c", "for i in 1 2 3; do echo out$i; echo err$i >&2; sleep 1; done; exit 7"],
        on_output=lambda stream, data: seen.append((time.monotonic(), stream, data)),
        timeout=T,
    )
    ended = time.monotonic()
    assert result.exit_code == 7
    assert b"".join(d for _, s, d in seen if s == 0) == b"out1\nout2\nout3\n"
    assert b"".join(d for _, s, d in seen if s == 1) == b"err1\nerr2\nerr3\n"
    # Streamed: the first line came while the program still ran (it sleeps 3 s in all).
    assert seen[0][0] < ended - 1.5, (seen[0][0] - started, ended - started)


async def test_one_client_drives_keels_agent_and_qemu_ga_in_the_same_guest(
    keel: AgentClient, qga: AgentClient
) -> None:
    assert (keel.kind, qga.kind) == ("keel", "qga")
    infos = [await c.info() for c in (keel, qga)]
    assert {i["hostname"] for i in infos} == {"keel-vm"}
    assert infos[0]["os"]["kernel"] == infos[1]["os"]["kernel"]
    assert infos[1]["agent_version"].startswith("qemu-ga ")
    for client in (keel, qga):
        await client.ping()
        result = await client.exec(["/bin/echo", client.kind], timeout=T)
        assert result.stdout == f"{client.kind}\n".encode()
    await qga.put_file("/tmp/from-qga", b"written by qemu-ga")
    assert await keel.get_file("/tmp/from-qga") == b"written by qemu-ga"
    await keel.put_file("/tmp/from-keel", b"written by keel")
    assert await qga.get_file("/tmp/from-keel") == b"written by keel"
    with pytest.raises(UnknownCommand):
        await qga.health()  # Keel's own plugins, a typed error on qemu-ga


async def agent_pid(qga: AgentClient) -> int:
    return int((await qga.exec(["/bin/cat", "/run/keel-vm/agent.pid"], timeout=T)).stdout)


async def test_the_controller_restarts_while_the_agent_runs(vm: Vm, qga: AgentClient) -> None:
    pid = await agent_pid(qga)
    for _ in range(2):
        async with await AgentClient.connect(vm.keel_url, timeout=T) as client:
            await client.ping()
            assert (await client.exec(["/bin/true"], timeout=T)).exit_code == 0
    assert await agent_pid(qga) == pid  # the same agent served both controllers


async def test_the_agent_restarts_in_the_guest_while_the_controller_is_connected(
    keel: AgentClient, qga: AgentClient
) -> None:
    await keel.ping()
    channel = keel._keel().conn.channel
    old = await agent_pid(qga)
    await qga.exec(["/bin/kill", str(old)], timeout=T)  # the guest's init starts it again

    async def new_agent() -> bool:
        return await agent_pid(qga) != old

    await until(new_agent, 120, "the guest did not start the agent again")

    async def answers() -> bool:
        await keel.ping(timeout=30)
        return True

    took = await until(answers, 300, "the client did not get back to the new agent")
    info = await keel.info()
    assert info["agent_uptime"] < took + 120  # a new agent process answers
    assert keel._keel().conn.channel is channel  # resynced on the same channel, no reconnect
    assert (await keel.exec(["/bin/echo", "again"], timeout=T)).stdout == b"again\n"


async def test_a_guest_reboot(vm: Vm) -> None:
    """Last: the guest reboots (QEMU stays), both agents come back on the same sockets."""
    async with await AgentClient.connect(vm.keel_url, timeout=T) as keel:
        boot_id = await sh(keel, "cat /proc/sys/kernel/random/boot_id")
        with pytest.raises(AgentError):
            # sysrq b: reboot at once (no init system to ask); the answer never comes.
            await keel.exec(["/bin/sh", "-c", "echo b > /proc/sysrq-trigger"], timeout=20)

    async def back() -> bool:
        async with await AgentClient.connect(vm.keel_url, timeout=30) as client:
            return await sh(client, "cat /proc/sys/kernel/random/boot_id") != boot_id

    took = await until(back, 900, "the guest did not come back after a reboot")
    print(f"vm: the guest rebooted and Keel's agent answered after {took:.0f}s")
    async with await AgentClient.connect(vm.qga_url, timeout=T) as qga:
        await qga.ping()
        assert (await qga.info())["hostname"] == "keel-vm"
