"""The coordination backend interface: leased, fenced keys with a queue of waiters.

A backend stores *leased records*: a key held by one owner until its lease ends, carrying a
fence (an integer that only grows per key, across holders, releases and server restarts) and a
little data. Those who want a held key wait in a *queue* the backend keeps, and the key goes to
them in arrival order. Locks, elections, groups, semaphores and partitioners are built from
these few primitives in the core, once; deadlines, retries, renewal, loss detection and
cancellation live there too.

Failure semantics a backend must keep:

* At most one live record per key; fences grow in the order holders are granted the key.
* A queued `Waiter` is served in arrival order. ``enqueue`` may be called again with the same
  waiter after an ambiguous failure (the request may have been applied, its reply lost): the
  backend recognises its own entry (by ``waiter.token``) instead of queueing behind it.
  ``dequeue`` removes the entry — and gives the key up if it was granted meanwhile — and is
  safe after an ambiguous ``enqueue``, so an abandoned attempt leaves no ghost.
* A ``Grant`` carries ``expires``, a *conservative* bound on `keel.coordination._clock.now`
  before which the server cannot have expired the lease: the time the request that started or
  last refreshed the lease was *sent*, plus the ttl the *server* enforces. The core treats the
  lock as lost at that bound unless renewal succeeded.
* ``renew`` and ``release`` act only if the record still has that owner and fence.
  ``release`` *sends* at once, in call order with this backend's later requests, and returns
  an awaitable that resolves once the server confirmed it (or raises `BackendUnavailable`);
  the core retries an unconfirmed release until it is confirmed.
* A fence names one grant: no two grants of a key share one, so ``update`` and ``delete``
  need no owner (the fence already says whose record it is). ``delete`` is the awaited,
  confirmed removal (a forced one when the fence is another holder's); ``release`` may be
  pipelined.
* *Persistent* records (``create``) have no lease and no owner (``owner == ""``): they live
  until deleted. They carry a fence like leased ones and are listed by ``get``/``children``.
  A record with live records under ``key + "/"`` is never deleted.
* Foreign exceptions are mapped to `keel.errors` by `map_errors`, the one place that does it:
  unreachable or not-yet-ready servers become `BackendUnavailable`, nothing else leaks.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import os
import secrets
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import AbstractAsyncContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

from keel.errors import BackendUnavailable, CoordinationError, KeelError


class Characteristic(enum.Enum):
    """What a backend guarantees, declared as data; docs and tests are generated from it."""

    DISTRIBUTED = "clients on many hosts can share it"
    REPLICATED = "can survive the loss of one server when run as a cluster"
    DURABLE_FENCES = "fences keep growing across a server restart"
    SERVER_TIMED_LEASES = "leases are timed by the server's clock, not the clients' wall clocks"
    PER_LOCK_TTL = "each lock has its own ttl (otherwise the session's ttl is the floor)"
    SESSION_EVENTS = "the server's session loss is pushed to the client at once"
    CHANGE_WATCHES = "waiters and observers are woken by the server (otherwise they poll)"
    FAIR_QUEUE = "waiters are granted a lock in arrival order"


@dataclass(frozen=True, slots=True)
class Grant:
    """A lease the backend granted: the key's new fence and the conservative expiry bound."""

    fence: int
    expires: float


@dataclass(frozen=True, slots=True)
class Record:
    """A live leased record as read back: who holds the key, under which fence, with what data."""

    key: str
    owner: str
    fence: int
    data: bytes


_attempts = itertools.count()


def _new_prefix() -> None:
    global _PREFIX  # noqa: PLW0603 - one per process, renewed in a forked child
    # A random part and the pid: a forked child gets a prefix of its own (at_fork below).
    _PREFIX = f"{secrets.token_hex(6)}{os.getpid():x}-"


_PREFIX = ""
_new_prefix()
os.register_at_fork(after_in_child=_new_prefix)


def _token() -> str:
    # Unique across processes without a system call (randomness, getpid) per attempt.
    return f"{_PREFIX}{next(_attempts)}"


@dataclass(eq=False, slots=True)
class Waiter:
    """One attempt to take a key. ``token`` names its queue entry uniquely; ``sent`` says a
    request that may have created that entry has gone out; ``state`` is the backend's own."""

    key: str
    owner: str
    ttl: float
    data: bytes
    token: str = field(default_factory=_token)
    sent: bool = False
    state: Any = None


class Changes(Protocol):
    """A subscription to changes of one key (or, for a ``/``-ended prefix, its children)."""

    async def wait(self, timeout: float) -> None:
        """Return once something changed since the subscription began or ``wait`` last
        returned, or after ``timeout`` seconds. Spurious returns are allowed."""
        ...


class Backend(Protocol):
    """The primitives a coordination backend provides. Keys are ``/``-separated paths."""

    characteristics: frozenset[Characteristic]

    def lease_ttl(self, ttl: float) -> float:
        """The ttl the server will enforce for a requested one (rounded, session-bound)."""
        ...

    async def enqueue(self, waiter: Waiter, *, queue: bool) -> Grant | None:
        """Take the key if it is free and nobody is queued ahead of this waiter; otherwise
        join the queue (``queue=True``) or leave nothing behind (``queue=False``)."""
        ...

    async def wait_turn(self, waiter: Waiter, timeout: float) -> Grant | None:
        """Wait up to ``timeout`` for a queued waiter's turn, keeping its place alive; the grant
        when it comes. Returns ``None`` on timeout (the waiter stays queued)."""
        ...

    async def dequeue(self, waiter: Waiter) -> None:
        """Leave the queue, giving the key up if it was granted to this waiter (idempotent)."""
        ...

    async def renew(self, key: str, owner: str, fence: int, ttl: float) -> float | None:
        """Extend the lease to ``ttl``; the new expiry bound, or ``None`` if it is not ours."""
        ...

    async def release(self, key: str, owner: str, fence: int) -> Awaitable[None]:
        """Send the release now; the awaitable resolves when the server confirmed it."""
        ...

    async def create(self, key: str, data: bytes) -> int | None:
        """Create a persistent record (no lease, owner ``""``) if no live record exists under
        the key; its fence, or ``None`` if the key is taken."""
        ...

    async def update(self, key: str, fence: int, data: bytes) -> bool:
        """Replace the data of the live record granted with ``fence`` (its lease, owner and
        fence unchanged); ``False`` if that record is gone."""
        ...

    async def delete(self, key: str, fence: int) -> bool:
        """Delete the live record granted with ``fence``, whoever holds it, and wait for the
        server's answer. ``False`` if that record is gone or has live records under
        ``key + "/"`` (it is then left in place)."""
        ...

    async def get(self, key: str) -> Record | None:
        """The live record under a key (its current holder)."""
        ...

    async def children(self, prefix: str) -> list[Record]:
        """The holders of the keys directly under ``prefix`` (which ends with ``/``)."""
        ...

    def changes(self, key: str) -> AbstractAsyncContextManager[Changes]:
        """Subscribe to changes of ``key`` (or of the children of a ``/``-ended prefix),
        including a holder's lease running out. Subscribe, then read, then wait: nothing that
        happens after the subscription is missed."""
        ...

    def on_session_lost(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (in the event loop) whenever the server drops this client's
        session; backends without sessions never call it."""
        ...

    async def close(self) -> None:
        """Release the connection; leases end with it where the server supports that."""
        ...


# What `take_now` returns when it cannot tell now (the file is busy): ask `enqueue`.
TAKE_LATER: Any = object()


class TakesNow(Protocol):
    """An optional fast path, for a backend that answers from local state or a local file
    without waiting (SQLite): the core calls ``take_now`` first, with no `Waiter`, and falls
    back to `Backend.enqueue` unless it got a grant."""

    def take_now(self, key: str, owner: str, ttl: float, data: bytes) -> Any:
        """Take the key if it is free and nobody waits for it, as ``enqueue`` would on its
        first try: ``(fence, expires)`` (as in `Grant`); None if it is not free (held, or
        waited for), which a try can take as its answer; `TAKE_LATER` if it cannot tell
        now. Must not leave anything behind unless it granted."""
        ...


class BackendFactory(Protocol):
    """What `keel.urls` resolves a coordination URL to."""

    async def open(
        self, url: Any, *, member_id: str, ttl: float, options: Mapping[str, str]
    ) -> Backend: ...


def _never(exc: BaseException) -> bool:
    return False


def _read(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def mark_observed(future: asyncio.Future[Any]) -> asyncio.Future[Any]:
    """Read ``future``'s exception once it is done. For an answer its caller may never
    await (pipelined behind one whose failure is told instead, or tidying nobody waits
    for): asyncio would otherwise log the failure as never retrieved."""
    future.add_done_callback(_read)
    return future


@contextmanager
def map_errors(
    unavailable: tuple[type[BaseException], ...],
    *,
    backend: str,
    url: str,
    not_ready: Callable[[BaseException], bool] = _never,
    passthrough: tuple[type[BaseException], ...] = (),
) -> Iterator[None]:
    """The one place foreign errors become Keel's. A client library's connection failures,
    and any reply for which ``not_ready`` is true (a server still loading, electing a leader,
    or not serving yet), become the retryable `BackendUnavailable` naming the server; any
    other foreign exception becomes `CoordinationError`. Keel errors, cancellation and the
    ``passthrough`` exceptions (answers the backend handles itself, such as "node exists")
    pass through."""
    keep: tuple[type[BaseException], ...] = (KeelError, *passthrough)
    down: tuple[type[BaseException], ...] = (*unavailable, TimeoutError, ConnectionError)
    try:
        yield
    except keep:
        raise
    except down as exc:
        raise BackendUnavailable(
            f"{backend} at {url} is unreachable ({type(exc).__name__}: {exc}); retry later",
            backend=backend,
        ) from exc
    except Exception as exc:
        if not_ready(exc):
            raise BackendUnavailable(
                f"{backend} at {url} is not ready ({type(exc).__name__}: {exc}); retry later",
                backend=backend,
            ) from exc
        raise CoordinationError(
            f"{backend} at {url} failed: {type(exc).__name__}: {exc}", backend=backend
        ) from exc
