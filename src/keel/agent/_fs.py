"""File operations for a root agent on paths that a guest's users may influence.

The rule (docs/agent-protocol.md, "Privileged file operations"): a path is walked from ``/``
one component at a time with directory descriptors opened ``O_DIRECTORY | O_NOFOLLOW``, so
nobody can swap a component for a link between a check and its use. A symbolic link is
followed only when root owns it and it sits in a directory only root can change (owned by
root and not writable by group or others, or sticky): ``/var/run -> /run`` and merged
``/usr`` work, a link a user planted does not (`CommandFailed` naming it). Files are created
``O_CREAT | O_EXCL | O_NOFOLLOW`` under a random name in the target's directory and renamed
into place through the directory descriptor; owners and modes are set with ``fchown`` and
``fchmod`` on the open descriptor, never by path. Anything opened for reading is opened
``O_NONBLOCK`` and must be a regular file (``fstat`` then ``S_ISREG``), so a FIFO or a
device cannot block the agent.

Every system call here may block (a slow disk, a hung network or FUSE mount), so the async
helpers run them in worker threads and the event loop never waits on one. A descriptor in
use by a worker when its command is cancelled is closed when that worker returns, never
under it. A worker stuck on a hung mount stays stuck; its command has already answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import secrets
import stat
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any, TypeVar

from keel.errors import CommandFailed

T = TypeVar("T")
MAX_LINKS = 40
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="keel-agent-fs")


def _parts(path: str) -> list[str]:
    return [p for p in path.split("/") if p and p != "."]


def _trusted(dir_fd: int, link: os.stat_result) -> bool:
    """A link nobody but root can create or replace."""
    where = os.fstat(dir_fd)
    locked = not where.st_mode & (stat.S_IWGRP | stat.S_IWOTH) or bool(where.st_mode & stat.S_ISVTX)
    return link.st_uid == 0 and where.st_uid == 0 and locked


def _follow(fd: int, name: str, st: os.stat_result, path: str, links: int) -> str:
    """The target of the link ``name`` in ``fd``, if it may be followed."""
    if not _trusted(fd, st):
        raise CommandFailed(
            f"{path}: refusing to follow the symlink {name!r} (owned by uid "
            f"{st.st_uid}, or in a directory others may change)",
            detail="untrusted symlink",
        )
    if links > MAX_LINKS:
        raise OSError(errno.ELOOP, os.strerror(errno.ELOOP))
    return os.readlink(name, dir_fd=fd)


def resolve(path: str, *, follow_last: bool) -> tuple[int, str]:
    """The directory holding ``path``'s last component, as an open descriptor, and that
    component's name. Intermediate links are followed only when trusted; the last one too
    when ``follow_last``. The caller closes the descriptor. Raises `CommandFailed`."""
    if not os.path.isabs(path):
        raise CommandFailed(f"path {path!r} must be absolute")
    todo = deque(_parts(path))
    fd = os.open("/", _DIR)
    links = 0
    try:
        while todo:
            name = todo.popleft()
            last = not todo
            if name == "..":
                fd = _step(fd, "..")
                continue
            if last and not follow_last:
                break
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                if last:
                    break  # the caller says what a missing file means
                raise
            if stat.S_ISLNK(st.st_mode):
                links += 1
                target = _follow(fd, name, st, path, links)
                todo.extendleft(reversed(_parts(target)))
                if target.startswith("/"):
                    os.close(fd)
                    fd = os.open("/", _DIR)
                continue
            if last:
                break
            # O_NOFOLLOW: a link swapped in since the stat fails here (ELOOP), never followed.
            fd = _step(fd, name)
        else:
            name = "."
    except BaseException:
        os.close(fd)
        raise
    return fd, name


def _step(fd: int, name: str) -> int:
    """Open the directory ``name`` in ``fd`` (never a link) and close ``fd``."""
    child = os.open(name, _DIR, dir_fd=fd)
    os.close(fd)
    return child


@contextlib.contextmanager
def failures(what: str, path: str) -> Iterator[None]:
    """OSError from a file operation as a `CommandFailed` naming the operation and path."""
    try:
        yield
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if exc.errno == errno.ELOOP:
            reason = "it is a symlink (not followed)"
        raise CommandFailed(f"cannot {what} {path}: {reason}", detail=reason) from None


def open_regular(path: str) -> int:
    """Open ``path`` for reading; refuse anything but a regular file."""
    with failures("open", path):
        dir_fd, name = resolve(path, follow_last=True)
        try:
            fd = os.open(name, READ_FLAGS, dir_fd=dir_fd)
        finally:
            os.close(dir_fd)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise CommandFailed(f"cannot open {path}: not a regular file", detail="not regular")
        return fd


def stat_path(path: str) -> os.stat_result:
    with failures("stat", path):
        dir_fd, name = resolve(path, follow_last=True)
        try:
            return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        finally:
            os.close(dir_fd)


class NewFile:
    """A file created under a random name beside ``path``; `commit` renames it over
    ``path``, `abort` removes it. Either closes what it holds."""

    def __init__(self, path: str, mode: int = 0o600) -> None:
        self.path = path
        self.fd = -1
        with failures("create a file beside", path):
            self.dir_fd, self.name = resolve(path, follow_last=False)
            if self.name in (".", ".."):
                os.close(self.dir_fd)
                raise CommandFailed(f"cannot write {path}: it names a directory")
            self.tmp = f".{self.name}.keel-{secrets.token_hex(8)}.tmp"
            try:
                self.fd = os.open(self.tmp, CREATE_FLAGS, mode, dir_fd=self.dir_fd)
            except BaseException:
                os.close(self.dir_fd)
                raise

    def write(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        with failures("write", self.path):
            while view:
                view = view[os.write(self.fd, view) :]

    def finish(self, mode: int, fsync: bool) -> None:
        """Flush, set the mode on the descriptor, close it."""
        with failures("write", self.path):
            if fsync:
                os.fsync(self.fd)
            os.fchmod(self.fd, mode & 0o7777)
            fd, self.fd = self.fd, -1
            os.close(fd)

    def commit(self) -> None:
        """Replace the target (a link there is replaced itself, never followed)."""
        with failures("write", self.path):
            os.rename(self.tmp, self.name, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd)
        self.tmp = ""
        os.close(self.dir_fd)
        self.dir_fd = -1

    def abort(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)
        if self.dir_fd >= 0:
            with contextlib.suppress(OSError):
                os.unlink(self.tmp, dir_fd=self.dir_fd)
            fd, self.dir_fd = self.dir_fd, -1
            os.close(fd)


# --- off the event loop ---------------------------------------------------------------------


class Worker:
    """Runs one file's system calls in worker threads, each after the one before it.

    If the awaiting command is cancelled, a call already running finishes in its thread;
    calls queued with `later` (closing, removing) run after it, so a descriptor is never
    closed under a call that still uses it, and its number is never reused under one."""

    def __init__(self) -> None:
        self._last: Future[Any] | None = None

    def _submit(self, fn: Callable[..., T], args: tuple[Any, ...]) -> Future[T]:
        prev = self._last

        def job() -> T:
            if prev is not None:
                wait([prev])
            return fn(*args)

        done = _pool.submit(job)
        self._last = done
        return done

    async def run(
        self, fn: Callable[..., T], *args: Any, abandon: Callable[[T], None] | None = None
    ) -> T:
        """``fn(*args)`` off the loop. If the caller is cancelled while it runs, ``abandon``
        gets what it returns (e.g. a descriptor to close)."""
        done = self._submit(fn, args)
        try:
            return await asyncio.wrap_future(done)
        except asyncio.CancelledError:
            if abandon is not None:
                done.add_done_callback(lambda f: _abandon(f, abandon))
            raise

    def later(self, fn: Callable[..., object], *args: Any) -> None:
        """``fn(*args)`` after every call before it, without waiting (clean-up on cancel)."""
        self._submit(fn, args).add_done_callback(_quiet)


def _abandon(done: Future[T], abandon: Callable[[T], None]) -> None:
    if not done.cancelled() and done.exception() is None:
        abandon(done.result())


def _quiet(done: Future[Any]) -> None:
    if not done.cancelled():
        done.exception()


async def offload(fn: Callable[..., T], *args: Any) -> T:
    """One blocking call off the event loop."""
    return await Worker().run(fn, *args)
