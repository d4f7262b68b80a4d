"""Built-in plugin ``exec``: run a program, stream its stdout and stderr, return its status.

Failure semantics: the program runs in its own session (process group). Its output is
streamed with flow control, so a slow controller slows the program (its pipe fills) rather
than growing the agent's memory. On ``timeout`` the group is killed with SIGKILL and the
result says ``timed_out``; on the controller's cancel or the request's deadline the group is
killed too, and no zombie is left. A program that cannot start is a `CommandFailed`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from typing import Any

from keel.agent._plugin import CommandContext, Plugin, command
from keel.errors import CommandFailed

_READ = 256 * 1024


def _kill(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)


class ExecPlugin(Plugin):
    name = "exec"
    version = "1.0"

    @command
    async def run(
        self,
        ctx: CommandContext,
        *,
        argv: list[str],
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        stdin: bytes | None = None,
        timeout: float | None = None,
        inherit_env: bool = True,
    ) -> dict[str, Any]:
        if not argv:
            raise CommandFailed("argv is empty")
        full_env = {**os.environ, **(env or {})} if inherit_env else dict(env or {})
        started = time.monotonic()
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=full_env,
                cwd=cwd,
                start_new_session=True,
            )
        except OSError as exc:
            raise CommandFailed(
                f"cannot run {argv[0]}: {exc.strerror or exc}", detail=str(exc)
            ) from None
        timed_out = False
        try:
            try:
                async with asyncio.timeout(timeout):
                    await asyncio.gather(
                        self._feed(proc, stdin),
                        self._pump(ctx, proc.stdout, 0),
                        self._pump(ctx, proc.stderr, 1),
                    )
                    code = await proc.wait()
            except TimeoutError:
                timed_out = True
                _kill(proc)
                code = await proc.wait()
        finally:
            _kill(proc)
            if proc.returncode is None:
                # Cancelled: reap in the background so no zombie is left.
                asyncio.get_running_loop().create_task(proc.wait())
        return {
            "exit_code": code if code >= 0 else None,
            "signal": -code if code < 0 else None,
            "timed_out": timed_out,
            "duration": time.monotonic() - started,
        }

    @staticmethod
    async def _feed(proc: asyncio.subprocess.Process, data: bytes | None) -> None:
        if data is None or proc.stdin is None:
            return
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            proc.stdin.write(data)
            await proc.stdin.drain()
        proc.stdin.close()

    @staticmethod
    async def _pump(ctx: CommandContext, pipe: asyncio.StreamReader | None, stream: int) -> None:
        if pipe is None:
            return
        while chunk := await pipe.read(_READ):
            await ctx.send(chunk, stream)
