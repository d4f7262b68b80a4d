"""The coordination backend interface: leased, fenced keys and nothing more.

A backend stores *leased records*: a key held by one owner until its lease ends, carrying a
fence (an integer that only grows per key, across holders, releases and server restarts) and a
little data. Locks, elections, groups, semaphores and partitioners are built from these few
primitives in the core, once; timeouts, renewal, loss detection and cancellation live there too.

Failure semantics a backend must keep:

* ``acquire`` is atomic: at most one live record per key. It returns ``None`` when the key is
  held, never blocks waiting for it.
* A ``Grant`` carries ``expires``, a *conservative* local bound (``time.monotonic()``) before
  which the server cannot have expired the lease: the time the request that started or last
  refreshed the lease was *sent*, plus the ttl. The core treats the lock as lost at that bound
  if renewal has not succeeded, so a partitioned holder gives up no later than the server does.
* ``renew`` and ``release`` act only if the record still has that owner and fence.
* A fence names one grant: no two grants of a key share one, so ``update`` and ``delete``
  need no owner (the fence already says whose record it is). ``delete`` is the awaited,
  confirmed removal (a forced one when the fence is another holder's); ``release`` may be
  pipelined.
* *Persistent* records (``create``) have no lease and no owner (``owner == ""``): they live
  until deleted. They carry a fence like leased ones and are listed by ``get``/``children``.
  A record with live records under ``key + "/"`` is never deleted.
* Foreign exceptions are mapped to `keel.errors` by `map_errors` at the boundary: unreachable
  servers become `BackendUnavailable`, nothing else leaks.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
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
    CHANGE_WATCHES = "waiters are woken by the server on release (otherwise they poll)"


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


class Backend(Protocol):
    """The primitives a coordination backend provides. Keys are ``/``-separated paths."""

    characteristics: frozenset[Characteristic]

    def lease_ttl(self, ttl: float) -> float:
        """The ttl the server will enforce for a requested one (rounded up, session floor)."""
        ...

    async def acquire(self, key: str, owner: str, ttl: float, data: bytes) -> Grant | None:
        """Create the record if no live one exists; ``None`` if the key is held."""
        ...

    async def renew(self, key: str, owner: str, fence: int, ttl: float) -> float | None:
        """Extend the lease; the new expiry bound, or ``None`` if it is no longer ours."""
        ...

    async def release(self, key: str, owner: str, fence: int) -> None:
        """Delete the record if it is still ours (idempotent)."""
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
        """The live record under a key."""
        ...

    async def children(self, prefix: str) -> list[Record]:
        """Live records directly under ``prefix`` (which ends with ``/``)."""
        ...

    async def wait(self, key: str, timeout: float) -> None:
        """Return when the key (or, for a ``/``-ended prefix, its children) may have changed,
        or after ``timeout`` seconds, whichever is first. Spurious returns are allowed."""
        ...

    def on_session_lost(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (in the event loop) whenever the server drops this client's
        session; backends without sessions never call it."""
        ...

    async def close(self) -> None:
        """Release the connection; leases end with it where the server supports that."""
        ...


class BackendFactory(Protocol):
    """What `keel.urls` resolves a coordination URL to."""

    async def open(
        self, url: Any, *, member_id: str, ttl: float, options: Mapping[str, str]
    ) -> Backend: ...


@contextmanager
def map_errors(
    unavailable: tuple[type[BaseException], ...],
    *,
    backend: str,
    url: str,
    passthrough: tuple[type[BaseException], ...] = (),
) -> Iterator[None]:
    """Turn a client library's connection failures into `BackendUnavailable` (naming the
    server), and any other foreign exception into `CoordinationError`. Keel errors,
    cancellation and the ``passthrough`` exceptions (answers the backend handles itself, such
    as "node exists") pass through."""
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
        raise CoordinationError(
            f"{backend} at {url} failed: {type(exc).__name__}: {exc}", backend=backend
        ) from exc
