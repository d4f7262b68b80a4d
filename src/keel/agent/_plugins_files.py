"""Built-in plugin ``files``: put and get in chunks, checked with sha256.

Failure semantics: ``put`` writes to a temporary file in the target's directory, checks the
size and sha256 the controller declared, fsyncs, sets the mode and renames over the target:
readers see the old file or the whole new one, never a part. Any failure (a checksum
mismatch, a full disk, a cancel or a deadline) removes the temporary file and leaves the
target untouched. ``get`` streams the file with flow control and returns its size and sha256
so the controller can check what it received.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from typing import Any

from keel.agent._plugin import CommandContext, Plugin, command
from keel.errors import CommandFailed, IntegrityError


def _check(path: str, size: int | None, written: int, sha256: str | None, actual: str) -> None:
    if size is not None and size != written:
        raise IntegrityError(
            f"{path}: received {written} bytes, expected {size}",
            expected=str(size),
            actual=str(written),
        )
    if sha256 is not None and sha256.lower() != actual:
        raise IntegrityError(f"{path}: sha256 mismatch", expected=sha256.lower(), actual=actual)


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
        if not os.path.isabs(path):
            raise CommandFailed(f"path {path!r} must be absolute")
        directory, base = os.path.split(path)
        tmp = os.path.join(directory, f".{base}.keel-{os.getpid()}-{id(ctx):x}.tmp")
        digest = hashlib.sha256()
        written = 0
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise CommandFailed(f"cannot create {tmp}: {exc.strerror}") from None
        try:
            try:
                async for chunk in ctx.receive():
                    digest.update(chunk)
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view) :]
                    written += len(chunk)
                if fsync:
                    os.fsync(fd)
                os.fchmod(fd, mode & 0o7777)
            finally:
                os.close(fd)
            actual = digest.hexdigest()
            _check(path, size, written, sha256, actual)
            os.replace(tmp, path)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if isinstance(exc, OSError):
                raise CommandFailed(f"cannot write {path}: {exc.strerror}") from None
            raise
        return {"path": path, "size": written, "sha256": actual}

    @command
    async def get(
        self, ctx: CommandContext, *, path: str, offset: int = 0, length: int | None = None
    ) -> dict[str, Any]:
        digest = hashlib.sha256()
        sent = 0
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise CommandFailed(f"cannot open {path}: {exc.strerror}") from None
        try:
            size = os.fstat(fd).st_size
            remaining = max(size - offset, 0) if length is None else length
            # One buffer for the whole file: a fresh 1 MiB bytes per read costs an mmap,
            # page faults and a munmap each time.
            buf = bytearray(ctx.chunk_size)
            view = memoryview(buf)
            while remaining > 0:
                n = os.preadv(fd, [view[: min(len(buf), remaining)]], offset + sent)
                if not n:
                    break
                digest.update(view[:n])
                await ctx.send(view[:n])
                sent += n
                remaining -= n
        except OSError as exc:
            raise CommandFailed(f"cannot read {path}: {exc.strerror}") from None
        finally:
            os.close(fd)
        return {"path": path, "size": sent, "sha256": digest.hexdigest()}

    @command
    async def stat(self, ctx: CommandContext, *, path: str) -> dict[str, Any]:
        try:
            st = os.stat(path)
        except OSError as exc:
            raise CommandFailed(f"cannot stat {path}: {exc.strerror}") from None
        return {"size": st.st_size, "mode": st.st_mode & 0o7777, "mtime": st.st_mtime}
