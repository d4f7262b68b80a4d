"""Built-in plugins ``users`` (password, SSH key) and ``services`` (systemctl).

Failure semantics: each command is one system tool or one file update; a failure is a
`CommandFailed` carrying the tool's exit code and its stderr (first 2 KiB). ``add_ssh_key``
is idempotent (a key already present is not added twice) and replaces authorized_keys
atomically. Passwords never appear in audit lines or error messages.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import re
from typing import Any

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


def _add_key(user: pwd.struct_passwd, key: str) -> bool:
    ssh_dir = os.path.join(user.pw_dir, ".ssh")
    path = os.path.join(ssh_dir, "authorized_keys")
    try:
        os.makedirs(ssh_dir, mode=0o700, exist_ok=True)
        os.chown(ssh_dir, user.pw_uid, user.pw_gid)
        try:
            with open(path) as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            lines = []
        added = key not in lines
        if added:
            tmp = path + ".keel-tmp"
            with open(tmp, "w") as f:
                f.write("\n".join([*lines, key]) + "\n")
                os.fchmod(f.fileno(), 0o600)
                os.fchown(f.fileno(), user.pw_uid, user.pw_gid)
            os.replace(tmp, path)
    except OSError as exc:
        raise CommandFailed(f"cannot update {path}: {exc.strerror}") from None
    return added


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
        try:
            user = pwd.getpwnam(username)
        except KeyError:
            raise CommandFailed(f"no user {username}") from None
        added = _add_key(user, key)
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
