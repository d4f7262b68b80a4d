"""The coordinator: one connection to a coordination backend, and the factory for locks,
elections, groups, semaphores and partitioners on it.

Failure semantics: `connect` fails with `BackendUnavailable` if the server cannot be reached;
after that, an unreachable server makes a try (``timeout=0``) and reads raise
`BackendUnavailable`, waiting acquisitions retry until their deadline, and held locks run out
at their expiry bound (see `keel.coordination._lock`). A session dropped by the server
(ZooKeeper) marks every lock held through it as lost at once. Releases the server did not
confirm and queue entries of abandoned attempts are retried in the background until the
server confirms them; ``close()`` releases what is still held and waits (a few seconds at
most) for those retries: what is still unconfirmed then frees by lease expiry.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import secrets
import socket
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import cast
from urllib.parse import unquote

from keel import urls
from keel.coordination._election import Election
from keel.coordination._group import Group
from keel.coordination._keys import key_for
from keel.coordination._lock import HeldLock, LockContext, acquire_key, try_key
from keel.coordination._renewals import Renewals
from keel.coordination._rwlock import ReadWriteLock
from keel.coordination._semaphore import Semaphore
from keel.coordination.backends.base import Backend, BackendFactory, Characteristic, Waiter
from keel.errors import (
    BackendUnavailable,
    ConfigError,
    CoordinationError,
    KeelError,
    Unsupported,
)

DEFAULT_TTL = 10.0
_FLUSH = 5.0  # how long close() waits for unconfirmed releases and abandoned queue entries
log = logging.getLogger("keel.coordination")


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
        self._pending: set[asyncio.Future[None]] = set()  # background retries, confirmations
        self._settled: object = None  # see `_confirm`
        self._renewals = Renewals()  # one timer for every held lock's next renewal
        # Read once: an enum's hash is a Python call, and this was asked on every acquire.
        self._per_lock_ttl = Characteristic.PER_LOCK_TTL in self.characteristics
        # A local backend that can take a free key without waiting (`Backend` docs).
        self._take_now = getattr(backend, "take_now", None)
        backend.on_session_lost(self._session_lost)

    def __repr__(self) -> str:
        return f"<Coordinator {self.member_id!r} on {urls.parse(self.url).redacted()}>"

    def _lease_ttl(self, ttl: float | None) -> float:
        requested = self.ttl if ttl is None else ttl
        if not (requested > 0 and math.isfinite(requested)):
            raise ConfigError(f"ttl must be a positive number of seconds, not {ttl!r}")
        enforced = self.backend.lease_ttl(requested)
        if not self._per_lock_ttl and enforced > requested + 1e-9:
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

    # --- what must reach the server even when the caller has moved on ----------------------

    async def _release(self, key: str, fence: int) -> None:
        try:
            sent = await self.backend.release(key, self.owner, fence)
        except BackendUnavailable:
            self._retry(lambda: self._release_confirmed(key, fence), f"release of {key}")
            return
        self._confirm(sent, key, fence)

    def _confirm(self, sent: Awaitable[None], key: str, fence: int) -> None:
        """Watch a sent release's confirmation; send it again until the server confirms."""
        if sent is self._settled:  # the very future last found confirmed (SQLite's one)
            return
        # Most backends hand back a future (often one already done): no wrapping needed.
        confirmation = sent if isinstance(sent, asyncio.Future) else asyncio.ensure_future(sent)
        if confirmation.done():
            if confirmation.cancelled() or confirmation.exception() is not None:
                self._retry(lambda: self._release_confirmed(key, fence), f"release of {key}")
            else:
                self._settled = confirmation  # a done future stays done, with that result
            return
        self._pending.add(confirmation)

        def confirmed(future: asyncio.Future[None]) -> None:
            self._pending.discard(future)
            if not future.cancelled() and future.exception() is not None:
                self._retry(lambda: self._release_confirmed(key, fence), f"release of {key}")

        confirmation.add_done_callback(confirmed)

    def _release_soon(self, key: str, fence: int) -> None:
        task = asyncio.get_running_loop().create_task(self._release(key, fence))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _release_confirmed(self, key: str, fence: int) -> None:
        await (await self.backend.release(key, self.owner, fence))

    def _abandon(self, waiter: Waiter) -> None:
        """Take a given-up attempt out of the queue (and give the key up if it was granted)."""
        self._retry(lambda: self.backend.dequeue(waiter), f"leaving the queue of {waiter.key}")

    def _retry(self, operation: Callable[[], Awaitable[None]], what: str) -> None:
        async def until_done() -> None:
            delay = 0.05
            while True:
                try:
                    await operation()
                except BackendUnavailable:
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 1.0)
                    continue
                except CoordinationError as exc:
                    log.warning("keel.coordination: %s failed for good: %s", what, exc)
                return

        task = asyncio.get_running_loop().create_task(until_done())
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

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
        return await try_key(self, name, key_for("lock", name), ttl=ttl)

    async def break_lock(self, name: str) -> bool:
        """End the current holder's lease of ``name`` by force; False if nobody held it.

        Safe because fences are durable: the broken holder learns at its next renewal (within
        ttl/3) or ``check()`` after that, and a fenced resource refuses its writes once the
        next holder has written. Use it to clear a holder known to be dead, not as a lock.
        """
        if Characteristic.DURABLE_FENCES not in self.characteristics:
            raise Unsupported(
                "breaking a lock is only safe where fences survive everything",
                feature=Characteristic.DURABLE_FENCES,
            )
        key = key_for("lock", name)
        record = await self.backend.get(key)
        return record is not None and await self.backend.delete(key, record.fence)

    async def heartbeat(self) -> int:
        """Renew every lease held through this coordinator now (renewal also runs by itself
        every ttl/3); the number still held. Leases found gone are marked lost."""
        held = list(self._held)
        results = await asyncio.gather(*(h.extend() for h in held), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, KeelError):
                raise result
        return sum(1 for h in held if not h.lost.is_set())

    # --- the rest is built on locks ---------------------------------------------------------

    def rwlock(self, name: str) -> ReadWriteLock:
        return ReadWriteLock(self, name)

    def election(self, name: str) -> Election:
        return Election(self, name)

    def group(self, name: str) -> Group:
        return Group(self, name)

    async def groups(self) -> list[str]:
        """The names of the created groups (see `Group.create`)."""
        records = await self.backend.children(key_for("group") + "/")
        return sorted(unquote(r.key.rpartition("/")[2]) for r in records if r.owner == "")

    def semaphore(self, name: str, permits: int) -> Semaphore:
        return Semaphore(self, name, permits)

    async def close(self) -> None:
        """Release every lock still held through this coordinator, then disconnect."""
        held = list(self._held)
        if held:
            await asyncio.gather(*(h.release() for h in held), return_exceptions=True)
        # A confirmation that fails while waited for starts a retry of its own (`_retry`): wait
        # for those too, within the same bound, then cancel what is left. (Waiting once for
        # the set as it was left a retry started meanwhile running after close, for ever: a
        # release refused at once while ZooKeeper reconnects, retried on the closed client.)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _FLUSH
        while (waiting := [f for f in self._pending if not f.done()]) and (
            left := deadline - loop.time()
        ) > 0:
            await asyncio.wait(waiting, timeout=left)
        late = [f for f in self._pending if not f.done()]
        for future in late:
            future.cancel()
        await asyncio.gather(*late, return_exceptions=True)
        self._renewals.close()
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
