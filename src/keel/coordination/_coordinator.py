"""The coordinator: one connection to a coordination backend, and the factory for locks,
elections, groups, semaphores and partitioners on it.

Failure semantics: `connect` fails with `BackendUnavailable` if the server cannot be reached;
after that, an unreachable server makes individual operations raise `BackendUnavailable` and
held locks run out at their expiry bound (see `keel.coordination._lock`). A session dropped by
the server (ZooKeeper) marks every lock held through it as lost at once. ``close()`` releases
what is still held, best effort: a lock that cannot be released frees by lease expiry.
"""

from __future__ import annotations

import asyncio
import math
import os
import secrets
import socket
from types import TracebackType
from typing import cast

from keel import urls
from keel.coordination._election import Election
from keel.coordination._group import Group
from keel.coordination._keys import key_for
from keel.coordination._lock import HeldLock, LockContext, acquire_key
from keel.coordination._semaphore import Semaphore
from keel.coordination.backends.base import Backend, BackendFactory, Characteristic
from keel.errors import ConfigError, Unsupported

DEFAULT_TTL = 10.0


def default_url() -> str:
    """``KEEL_COORDINATION_URL``, else an SQLite file under ``.keel/`` in the working directory."""
    path = os.path.abspath(os.path.join(".keel", "coordination.db"))
    return urls.from_env("coordination_url", f"sqlite://{path}")


class Coordinator:
    """A connection to a coordination backend; make it with `connect`."""

    def __init__(self, backend: Backend, *, member_id: str, ttl: float, url: str) -> None:
        self.backend = backend
        self.member_id = member_id
        self.url = url
        self.ttl = ttl
        self.characteristics: frozenset[Characteristic] = backend.characteristics
        # The owner token distinguishes two coordinators that share a member id.
        self.owner = f"{member_id}#{secrets.token_hex(4)}"
        self._held: set[HeldLock] = set()
        backend.on_session_lost(self._session_lost)

    def __repr__(self) -> str:
        return f"<Coordinator {self.member_id!r} on {urls.parse(self.url).redacted()}>"

    def _lease_ttl(self, ttl: float | None) -> float:
        requested = self.ttl if ttl is None else ttl
        if not (requested > 0 and math.isfinite(requested)):
            raise ConfigError(f"ttl must be a positive number of seconds, not {ttl!r}")
        enforced = self.backend.lease_ttl(requested)
        if Characteristic.PER_LOCK_TTL not in self.characteristics and enforced > requested + 1e-9:
            raise Unsupported(
                f"this backend times leases by its session ({enforced}s), so a lock cannot "
                f"free sooner than that; ask for ttl >= {enforced} or connect with a shorter "
                f"ttl=",
                feature=Characteristic.PER_LOCK_TTL,
            )
        return enforced

    def _session_lost(self) -> None:
        for held in list(self._held):
            held._session_lost()

    # --- locks -----------------------------------------------------------------------------

    def lock(
        self,
        name: str,
        *,
        ttl: float | None = None,
        timeout: float | None = None,
        cancel_on_loss: bool = True,
    ) -> LockContext:
        """``async with coord.lock(name) as held:`` — see `keel.coordination._lock`.

        ``timeout``: None waits forever, 0 tries once, otherwise seconds (`LockTimeout`).
        """
        key = key_for("lock", name)
        return LockContext(
            lambda: acquire_key(self, name, key, ttl=ttl, timeout=timeout),
            cancel_on_loss=cancel_on_loss,
        )

    async def acquire(
        self, name: str, *, ttl: float | None = None, timeout: float | None = None
    ) -> HeldLock:
        """Acquire a lock for manual use; call ``await held.release()`` when done."""
        return await acquire_key(self, name, key_for("lock", name), ttl=ttl, timeout=timeout)

    async def try_acquire(self, name: str, *, ttl: float | None = None) -> HeldLock | None:
        """One non-blocking attempt: the held lock, or None if someone else holds it."""
        lease = self._lease_ttl(ttl)
        key = key_for("lock", name)
        grant = await self.backend.acquire(key, self.owner, lease, b"")
        if grant is None:
            return None
        return HeldLock(self, name, key, fence=grant.fence, ttl=lease, expires=grant.expires)

    # --- the rest is built on locks ---------------------------------------------------------

    def election(self, name: str) -> Election:
        return Election(self, name)

    def group(self, name: str) -> Group:
        return Group(self, name)

    def semaphore(self, name: str, permits: int) -> Semaphore:
        return Semaphore(self, name, permits)

    async def close(self) -> None:
        """Release every lock still held through this coordinator, then disconnect."""
        held = list(self._held)
        if held:
            await asyncio.gather(*(h.release() for h in held), return_exceptions=True)
        await self.backend.close()

    async def __aenter__(self) -> Coordinator:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


async def connect(
    url: str | None = None,
    *,
    member_id: str | None = None,
    ttl: float = DEFAULT_TTL,
    **options: str,
) -> Coordinator:
    """Connect to a coordination backend by URL (default: `default_url`).

    ``member_id`` names this process in groups and elections (default: host and pid); ``ttl``
    is the default lease (on ZooKeeper also the session timeout). ``options`` override the
    URL's query options.
    """
    url = url or default_url()
    factory, parsed = urls.resolve("coordination", url)
    member = member_id or f"{socket.gethostname()}:{os.getpid()}"
    opts = {**parsed.options, **options}
    known = getattr(factory, "URL_OPTIONS", None)  # third-party backends may not say
    if known is not None:
        urls.check_options(parsed, known, options)
    backend = await cast(BackendFactory, factory).open(
        parsed, member_id=member, ttl=ttl, options=opts
    )
    return Coordinator(backend, member_id=member, ttl=ttl, url=url)
