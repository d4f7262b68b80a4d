"""The agent runs as root; a guest user controls parts of the paths it touches. Each test
plays that user: it plants links the way the user could (owned by the user, in the user's
directories) and checks that the root agent neither writes, chowns nor reads through them.
The victims are root-owned files the user must not be able to reach."""

from __future__ import annotations

import asyncio
import os
import pwd
import stat
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from agent_helpers import AgentProcess

from keel.agent import AgentClient
from keel.errors import AgentError, CommandFailed

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKeelPrivilegedTestKey keel@attack"
SECRET = "root-only secret line\n"


@dataclass
class Victim:
    """A root-owned file and directory (mode 0600/0700) that the attack aims at."""

    file: Path
    dir: Path

    def untouched(self) -> None:
        st = self.file.stat()
        assert self.file.read_text() == SECRET, "the root-owned victim file was overwritten"
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o600), "the victim was chowned"
        dst = self.dir.stat()
        assert dst.st_uid == 0, "the victim directory was chowned to the user"
        assert list(self.dir.iterdir()) == [], "the agent wrote into the victim directory"


@pytest.fixture
def victim(tmp_path: Path) -> Victim:
    root = tmp_path / "root-only"
    root.mkdir(mode=0o700)
    secret = root / "secret"
    secret.write_text(SECRET)
    secret.chmod(0o600)
    vdir = root / "dir"
    vdir.mkdir(mode=0o700)
    return Victim(secret, vdir)


def as_user(user: str, path: Path) -> None:
    """Give ``path`` (a link or a directory) to ``user``, as if the user had made it."""
    pw = pwd.getpwnam(user)
    os.lchown(path, pw.pw_uid, pw.pw_gid)


def ssh_dir(user: str) -> Path:
    home = Path(pwd.getpwnam(user).pw_dir)
    ssh = home / ".ssh"
    ssh.mkdir(mode=0o700, exist_ok=True)
    as_user(user, ssh)
    return ssh


async def connect(agent: AgentProcess) -> AgentClient:
    return await AgentClient.connect(agent.url, timeout=10)


async def test_add_ssh_key_ignores_a_planted_temporary_link(
    agent: AgentProcess, throwaway_user: str, victim: Victim
) -> None:
    """The old agent wrote ``authorized_keys.keel-tmp`` with open(): a link there made root
    overwrite the link's target and chown it to the user."""
    ssh = ssh_dir(throwaway_user)
    link = ssh / "authorized_keys.keel-tmp"
    link.symlink_to(victim.file)
    as_user(throwaway_user, link)
    async with await connect(agent) as client:
        await client.add_ssh_key(throwaway_user, KEY)
    victim.untouched()
    keys = ssh / "authorized_keys"
    assert keys.read_text().splitlines() == [KEY]
    st = keys.lstat()
    assert stat.S_ISREG(st.st_mode)
    assert st.st_uid == pwd.getpwnam(throwaway_user).pw_uid
    assert stat.S_IMODE(st.st_mode) == 0o600


async def test_add_ssh_key_refuses_a_symlinked_ssh_directory(
    agent: AgentProcess, throwaway_user: str, victim: Victim
) -> None:
    home = Path(pwd.getpwnam(throwaway_user).pw_dir)
    link = home / ".ssh"
    link.symlink_to(victim.dir)
    as_user(throwaway_user, link)
    async with await connect(agent) as client:
        with pytest.raises(CommandFailed, match=r"\.ssh"):
            await client.add_ssh_key(throwaway_user, KEY)
        await client.ping()
    victim.untouched()


async def test_add_ssh_key_refuses_a_symlinked_authorized_keys(
    agent: AgentProcess, throwaway_user: str, victim: Victim
) -> None:
    """Reading through the link would copy the victim's lines into a file the user owns."""
    ssh = ssh_dir(throwaway_user)
    link = ssh / "authorized_keys"
    link.symlink_to(victim.file)
    as_user(throwaway_user, link)
    async with await connect(agent) as client:
        with pytest.raises(CommandFailed, match="authorized_keys"):
            await client.add_ssh_key(throwaway_user, KEY)
    victim.untouched()
    assert link.is_symlink()
    assert all(SECRET not in p.read_text() for p in ssh.iterdir() if not p.is_symlink())


async def test_add_ssh_key_refuses_a_hard_linked_authorized_keys(
    agent: AgentProcess, throwaway_user: str, victim: Victim
) -> None:
    ssh = ssh_dir(throwaway_user)
    os.link(victim.file, ssh / "authorized_keys")
    async with await connect(agent) as client:
        with pytest.raises(CommandFailed, match="authorized_keys"):
            await client.add_ssh_key(throwaway_user, KEY)
    (ssh / "authorized_keys").unlink()
    victim.untouched()
    assert list(ssh.iterdir()) == []


@pytest.fixture
def user_dir(tmp_path: Path, throwaway_user: str) -> Path:
    """A directory the guest user owns, on the path to where the operator writes."""
    tmp_path.chmod(0o755)
    mine = tmp_path / "user-owned"
    mine.mkdir(mode=0o755)
    as_user(throwaway_user, mine)
    return mine


async def test_put_does_not_write_through_a_users_directory_link(
    agent: AgentProcess, throwaway_user: str, user_dir: Path, victim: Victim
) -> None:
    link = user_dir / "conf"
    link.symlink_to(victim.dir)
    as_user(throwaway_user, link)
    async with await connect(agent) as client:
        with pytest.raises(CommandFailed, match="symlink"):
            await client.put_file(str(link / "app.ini"), b"owned = true\n")
    victim.untouched()


async def test_get_and_stat_do_not_read_through_a_users_link(
    agent: AgentProcess, throwaway_user: str, user_dir: Path, victim: Victim
) -> None:
    link = user_dir / "log.txt"
    link.symlink_to(victim.file)
    as_user(throwaway_user, link)
    dlink = user_dir / "logs"
    dlink.symlink_to(victim.file.parent)
    as_user(throwaway_user, dlink)
    async with await connect(agent) as client:
        with pytest.raises(CommandFailed, match="symlink"):
            await client.get_file(str(link))
        with pytest.raises(CommandFailed, match="symlink"):
            await client.get_file(str(dlink / "secret"))
        with pytest.raises(CommandFailed, match="symlink"):
            await client.call("files", "stat", path=str(dlink / "secret"))


async def test_root_owned_links_in_root_owned_directories_are_followed(
    agent: AgentProcess, tmp_path: Path
) -> None:
    """Links only root can change (``/var/run -> /run``, merged ``/usr``) keep working."""
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "alias").symlink_to("real")
    target = tmp_path / "alias" / "file.bin"
    async with await connect(agent) as client:
        await client.put_file(str(target), b"through a root link")
        assert (real / "file.bin").read_bytes() == b"through a root link"
        assert await client.get_file(str(target)) == b"through a root link"
        st = await client.call("files", "stat", path=str(target))
        assert st["size"] == len(b"through a root link")


async def test_get_on_a_fifo_is_refused_without_blocking_others(
    agent: AgentProcess, tmp_path: Path
) -> None:
    """A blocking open() of a FIFO froze the whole agent until someone wrote to it."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    try:
        async with await connect(agent) as bad, await connect(agent) as good:
            get = asyncio.create_task(bad.get_file(str(fifo), timeout=5))
            await asyncio.sleep(0.3)
            started = time.monotonic()
            await good.ping(timeout=2)
            assert time.monotonic() - started < 0.2, "another controller waited on the FIFO"
            with pytest.raises(CommandFailed, match="not a regular file"):
                await get
            with pytest.raises(CommandFailed, match="not a regular file"):
                await good.get_file("/dev/zero", max_size=1024)
    finally:
        # Release an agent stuck in open() (the bug), so the module's agent can stop.
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:
            pass
        else:
            os.close(fd)


async def test_failures_say_what_was_refused(agent: AgentProcess, tmp_path: Path) -> None:
    async with await connect(agent) as client:
        with pytest.raises(CommandFailed, match="absolute"):
            await client.get_file("relative/path")
        with pytest.raises(CommandFailed, match="No such file"):
            await client.put_file(str(tmp_path / "missing-dir" / "f"), b"x")
        with pytest.raises(AgentError):
            await client.put_file(str(tmp_path), b"x")  # a directory is not replaced
        assert tmp_path.is_dir()
