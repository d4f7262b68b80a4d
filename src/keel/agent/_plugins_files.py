"""Built-in plugin ``files``: put and get in chunks, checked with sha256.

Failure semantics: ``put`` writes to a new file (random name, ``O_EXCL | O_NOFOLLOW``) in
the target's directory, checks the size and sha256 the controller declared, fsyncs, sets the
mode on the descriptor and renames it over the target: readers see the old file or the whole
new one, never a part. Any failure (a checksum mismatch, a full disk, a cancel or a deadline)
removes the new file and leaves the target untouched. ``get`` streams a regular file with
flow control and returns its size and sha256 so the controller can check what it received;
a FIFO, device or socket is refused. Paths follow the agent's rule for privileged file
operations (`keel.agent._fs`): no link a user could have planted is followed, and no system
call on a file runs on the event loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from typing import Any

from keel.agent import _fs
from keel.agent._plugin import CommandContext, Plugin, command
from keel.errors import IntegrityError


def _check(path: str, size: int | None, written: int, sha256: str | None, actual: str) -> None:
    if size is not None and size != written:
        raise IntegrityError(
            f"{path}: received {written} bytes, expected {size}",
            expected=str(size),
            actual=str(written),
        )
    if sha256 is not None and sha256.lower() != actual:
        raise IntegrityError(f"{path}: sha256 mismatch", expected=sha256.lower(), actual=actual)


def _pread(fd: int, view: memoryview, offset: int) -> int:
    return os.preadv(fd, [view], offset)


class FilesPlugin(Plugin):
    name = "files"
    version = "1.0"

    @command
    async def put(
        self,
        ctx: CommandContext,
        *,
        path: str,
        mode: int = 0o644,
        sha256: str | None = None,
        size: int | None = None,
        fsync: bool = True,
    ) -> dict[str, Any]:
        io = _fs.Worker()
        new = await io.run(_fs.NewFile, path, abandon=_fs.NewFile.abort)
        digest = hashlib.sha256()
        written = 0
        try:
            async for chunk in ctx.receive():
                digest.update(chunk)
                await io.run(new.write, chunk)
                written += len(chunk)
            await io.run(new.finish, mode, fsync)
            actual = digest.hexdigest()
            _check(path, size, written, sha256, actual)
            await io.run(new.commit)
        except asyncio.CancelledError:
            io.later(new.abort)  # after the write still running, if any
            raise
        except BaseException:
            await io.run(new.abort)
            raise
        return {"path": path, "size": written, "sha256": actual}

    @command
    async def get(
        self, ctx: CommandContext, *, path: str, offset: int = 0, length: int | None = None
    ) -> dict[str, Any]:
        io = _fs.Worker()
        fd = await io.run(_fs.open_regular, path, abandon=os.close)
        digest = hashlib.sha256()
        sent = 0
        try:
            with _fs.failures("read", path):
                size = (await io.run(os.fstat, fd)).st_size
                remaining = max(size - offset, 0) if length is None else length
                # One buffer for the whole file: a fresh 1 MiB bytes per read costs an mmap,
                # page faults and a munmap each time. ``send`` copies it into the frame.
                buf = bytearray(ctx.chunk_size)
                view = memoryview(buf)
                while remaining > 0:
                    n = await io.run(_pread, fd, view[: min(len(buf), remaining)], offset + sent)
                    if not n:
                        break
                    digest.update(view[:n])
                    await ctx.send(view[:n])
                    sent += n
                    remaining -= n
        finally:
            io.later(os.close, fd)  # after a read still running, if cancelled mid-read
        return {"path": path, "size": sent, "sha256": digest.hexdigest()}

    @command
    async def stat(self, ctx: CommandContext, *, path: str) -> dict[str, Any]:
        st = await _fs.offload(_fs.stat_path, path)
        return {"size": st.st_size, "mode": st.st_mode & 0o7777, "mtime": st.st_mtime}
