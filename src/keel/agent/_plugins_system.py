"""Built-in plugins ``users`` (password, SSH key) and ``services`` (systemctl).

Failure semantics: each command is one system tool or one file update; a failure is a
`CommandFailed` carrying the tool's exit code and its stderr (first 2 KiB). ``add_ssh_key``
is idempotent (a key already present is not added twice) and replaces authorized_keys
atomically, by the agent's rule for privileged file operations (`keel.agent._fs`): the home
directory is walked with descriptors, ``~/.ssh`` and ``authorized_keys`` are never followed
if they are links (nor used if owned by another user, nor a file with other hard links), the
new file is created ``O_EXCL | O_NOFOLLOW`` under a random name and given to the user with
``fchown`` on its descriptor. Passwords never appear in audit lines or error messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import pwd
import re
import secrets
import stat
from typing import Any

from keel.agent import _fs
from keel.agent._plugin import CommandContext, Plugin, command
from keel.errors import CommandFailed

_UNIT = re.compile(r"^[A-Za-z0-9@._:-]{1,200}$")


async def _run(argv: list[str], stdin: bytes | None = None, timeout: float = 60) -> tuple[int, str]:
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
    except OSError as exc:
        raise CommandFailed(f"cannot run {argv[0]}: {exc.strerror}") from None
    try:
        async with asyncio.timeout(timeout):
            out, _ = await proc.communicate(stdin)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise CommandFailed(f"{argv[0]} did not finish in {timeout}s") from None
    return proc.returncode or 0, out[:2048].decode(errors="replace").strip()


_MAX_KEYS_FILE = 1024 * 1024
_SSH_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _read_keys(user: pwd.struct_passwd, ssh: int, shown: str) -> list[str]:
    """The user's authorized_keys lines; refuse a link, a non-regular file, a file with
    other hard links (it may be another file's name) or one owned by someone else."""
    try:
        fd = os.open("authorized_keys", _fs.READ_FLAGS, dir_fd=ssh)
    except FileNotFoundError:
        return []
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_uid not in (0, user.pw_uid):
            raise CommandFailed(
                f"refusing to update {shown}: not a regular file of the user's own "
                f"(mode {st.st_mode:o}, links {st.st_nlink}, uid {st.st_uid})"
            )
        if st.st_size > _MAX_KEYS_FILE:
            raise CommandFailed(f"refusing to update {shown}: over {_MAX_KEYS_FILE} bytes")
        return os.read(fd, _MAX_KEYS_FILE + 1).decode(errors="replace").splitlines()
    finally:
        os.close(fd)


def _open_ssh_dir(user: pwd.struct_passwd, home: int, shown: str) -> int:
    created = False
    try:
        os.mkdir(".ssh", 0o700, dir_fd=home)
        created = True
    except FileExistsError:
        pass
    try:
        ssh = os.open(".ssh", _SSH_DIR, dir_fd=home)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise CommandFailed(
                f"refusing to use {shown}: it is not a directory (a link?)"
            ) from None
        raise
    st = os.fstat(ssh)
    if st.st_uid not in (0, user.pw_uid):
        os.close(ssh)
        raise CommandFailed(f"refusing to use {shown}: owned by uid {st.st_uid}")
    if created:
        os.fchown(ssh, user.pw_uid, user.pw_gid)
        os.fchmod(ssh, 0o700)
    return ssh


def _add_key(username: str, key: str) -> bool:
    """Runs in a worker thread: NSS may block, and so may the user's home directory."""
    try:
        user = pwd.getpwnam(username)
    except KeyError:
        raise CommandFailed(f"no user {username}") from None
    ssh_shown = os.path.join(user.pw_dir, ".ssh")
    shown = os.path.join(ssh_shown, "authorized_keys")
    with _fs.failures("update", shown):
        parent, name = _fs.resolve(user.pw_dir, follow_last=True)
        try:
            home = os.open(name, _SSH_DIR, dir_fd=parent)
        finally:
            os.close(parent)
        try:
            ssh = _open_ssh_dir(user, home, ssh_shown)
        finally:
            os.close(home)
        try:
            lines = _read_keys(user, ssh, shown)
            if key in lines:
                return False
            tmp = f"authorized_keys.keel-{secrets.token_hex(8)}"
            fd = os.open(tmp, _fs.CREATE_FLAGS, 0o600, dir_fd=ssh)
            try:
                try:
                    data = memoryview(("\n".join([*lines, key]) + "\n").encode())
                    while data:
                        data = data[os.write(fd, data) :]
                    os.fsync(fd)
                    os.fchown(fd, user.pw_uid, user.pw_gid)
                    os.fchmod(fd, 0o600)
                finally:
                    os.close(fd)
                os.rename(tmp, "authorized_keys", src_dir_fd=ssh, dst_dir_fd=ssh)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=ssh)
                raise
        finally:
            os.close(ssh)
    return True


class UsersPlugin(Plugin):
    name = "users"
    version = "1.0"

    @command
    async def set_password(
        self, ctx: CommandContext, *, username: str, password: str, crypted: bool = False
    ) -> dict[str, Any]:
        if ":" in username or "\n" in username or "\n" in password:
            raise CommandFailed("username or password holds a forbidden character")
        argv = ["chpasswd", "-e"] if crypted else ["chpasswd"]
        code, out = await _run(argv, f"{username}:{password}\n".encode())
        if code:
            raise CommandFailed(
                f"chpasswd failed for {username}: {out}", exit_code=code, detail=out
            )
        return {"username": username}

    @command
    async def add_ssh_key(self, ctx: CommandContext, *, username: str, key: str) -> dict[str, Any]:
        key = key.strip()
        if not key or "\n" in key:
            raise CommandFailed("give exactly one public key line")
        added = await _fs.offload(_add_key, username, key)
        return {"username": username, "added": added}


class ServicesPlugin(Plugin):
    name = "services"
    version = "1.0"

    async def _systemctl(self, action: str, unit: str) -> dict[str, Any]:
        if not _UNIT.match(unit):
            raise CommandFailed(f"{unit!r} is not a unit name")
        code, out = await _run(["systemctl", action, "--no-pager", "--", unit])
        if code and action != "status":
            raise CommandFailed(f"systemctl {action} {unit}: {out}", exit_code=code, detail=out)
        if action == "status" and code not in (0, 3):  # 3: inactive, a valid answer
            raise CommandFailed(f"systemctl status {unit}: {out}", exit_code=code, detail=out)
        return {"unit": unit, "action": action, "active": code == 0, "output": out}

    @command
    async def status(self, ctx: CommandContext, *, unit: str) -> dict[str, Any]:
        return await self._systemctl("status", unit)

    @command
    async def start(self, ctx: CommandContext, *, unit: str) -> dict[str, Any]:
        return await self._systemctl("start", unit)

    @command
    async def stop(self, ctx: CommandContext, *, unit: str) -> dict[str, Any]:
        return await self._systemctl("stop", unit)

    @command
    async def restart(self, ctx: CommandContext, *, unit: str) -> dict[str, Any]:
        return await self._systemctl("restart", unit)
