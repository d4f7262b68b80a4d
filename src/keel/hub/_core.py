"""The hub's core: tenancy, filters, quotas, group-commit ingest and wake-ups, over one Store.

Ingest: `ingest` returns only after the event is committed to every matching subscription's
queue (or raises, and then nothing of it is committed). Concurrent ingests are committed
together in one store transaction (group commit); each caller still waits for its own.
Routing uses the subscriptions known when the event is ingested, just before it joins a
batch: a subscription created after that sees only later events.

Tenancy: a principal sees only its own project's subscriptions; anything else is `NotFound`,
worded exactly as a subscription that does not exist. A subscription receives only events of
its project, unless an admin created it with ``all_projects`` (then every event, including
those with no tenant).

Tees: a subscription with a ``parent`` gets a copy of every message committed to its parent's
queue (by routing or by `commit`), one level deep; a subscription past its ``expires_at`` gets
nothing and the retention sweep deletes it. Faces (the Zaqar API) add subscriptions they built
themselves with `add_subscription` and commit to named queues with `commit`, through the same
group commit as ingest.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import ssl
import time
from collections import deque
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Any, Literal

import msgspec

from keel._log import event as log_event
from keel.errors import (
    BadRequest,
    Conflict,
    Forbidden,
    InvalidFilter,
    KeelError,
    NotFound,
    TooManyRequests,
    Unauthorized,
)
from keel.hub._auth import Authenticator, Principal
from keel.hub._events import CloudEvent, encode_event
from keel.hub._fanout import Fanout
from keel.hub._filters import Predicate, compile_filter, index_key
from keel.hub._input import MAX_DEPTH, check_depth
from keel.hub._webhooks import (
    DEFAULT_BACKOFF,
    Dispatcher,
    Resolver,
    check_url,
    new_secret,
    system_resolver,
)
from keel.hub.stores.base import (
    Appended,
    Claim,
    Gap,
    Message,
    Retention,
    Routed,
    Store,
    Subscription,
    Webhook,
)
from keel.wire import new_id

log = logging.getLogger("keel.hub")

MAX_LIMIT = 1000
RESYNC_ATTEMPTS = 8


class WebhookSpec(msgspec.Struct, forbid_unknown_fields=True):
    url: str
    mode: Literal["structured", "binary"] = "structured"


class SubscriptionSpec(msgspec.Struct, forbid_unknown_fields=True):
    """The body of ``POST /v1/subscriptions``."""

    types: list[str] | None = None
    source: str | None = None
    subject: str | None = None
    priority: list[str] | str | None = None
    filters: list[Any] | None = None
    all_projects: bool = False
    retention: Retention = Retention()
    max_deliveries: int = 5
    webhook: WebhookSpec | None = None


_FILTER_FIELDS = ("types", "source", "subject", "priority", "filters")


def _integral(value: Any) -> Any:
    """``3.0`` as ``3``: JSON Schema (and so the OpenAPI document) counts it an integer."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def parse_spec(raw: Any) -> SubscriptionSpec:
    if isinstance(raw, dict):
        raw = dict(raw)
        if "max_deliveries" in raw:
            raw["max_deliveries"] = _integral(raw["max_deliveries"])
        retention = raw.get("retention")
        if isinstance(retention, dict) and "max_messages" in retention:
            raw["retention"] = {**retention, "max_messages": _integral(retention["max_messages"])}
    try:
        spec = msgspec.convert(raw, SubscriptionSpec)
    except msgspec.ValidationError as exc:
        raise BadRequest(f"bad subscription: {exc}") from None
    if not 1 <= spec.max_deliveries <= 100:
        raise BadRequest("max_deliveries must be 1..100", field="max_deliveries")
    r = spec.retention
    if r.max_messages is not None and not 1 <= r.max_messages <= 1_000_000:
        raise BadRequest("retention.max_messages must be 1..1000000", field="retention")
    if r.max_age_s is not None and not 1 <= r.max_age_s <= 30 * 86400:
        raise BadRequest("retention.max_age_s must be 1..2592000", field="retention")
    compile_filter(filter_fields(spec))  # raises InvalidFilter
    return spec


def filter_fields(spec: SubscriptionSpec) -> dict[str, Any]:
    return {k: getattr(spec, k) for k in _FILTER_FIELDS if getattr(spec, k) is not None}


def check_limit(limit: int | None, default: int = 100) -> int:
    if limit is None:
        return default
    if not 1 <= limit <= MAX_LIMIT:
        raise BadRequest(f"limit must be 1..{MAX_LIMIT}", field="limit")
    return limit


class _Route:
    __slots__ = (
        "all_projects",
        "expires_at",
        "id",
        "key",
        "parent",
        "predicate",
        "project",
        "sub",
    )

    def __init__(self, sub: Subscription) -> None:
        self.id = sub.id
        self.sub = sub
        self.project = sub.project
        self.all_projects = sub.all_projects
        self.parent = sub.parent
        self.expires_at = sub.expires_at
        self.key: tuple[str, str] | None = None
        try:
            self.predicate: Predicate = compile_filter(sub.spec)
            self.key = index_key(sub.spec)
        except InvalidFilter as exc:
            # Stored before the current limits: it gets nothing rather than stop the hub.
            log_event(log, logging.WARNING, "hub.filter_refused", sub=sub.id, error=exc.message)
            self.predicate = lambda a: False


# Each waiter learns the messages its event became (see `Hub.commit`); the tenant whose fair
# share the event counts in (see `_FairShare`).
_Pending = tuple[Routed, "asyncio.Future[list[Appended]]", str | None]

RETRY_AFTER_S = 1  # what a refused caller is told to wait (HTTP Retry-After)


class _FairShare:
    """Admission: how many events each tenant has waiting for their commit (in flight).

    A tenant alone may have any number in flight: the batches it fills are the hub's
    throughput. While another tenant is active (has events in flight, or had one admitted in
    the last ``window`` seconds), each tenant may have at most ``share`` in flight. Past it a
    caller that can wait (the bus path) waits in line for its tenant's next commit, and one
    that cannot (HTTP) is refused with `TooManyRequests` before its event is routed. So a
    flooding tenant puts at most ``share`` events into any commit another tenant's event
    joins or waits behind, and spends the hub's CPU on routing only what it was admitted;
    an admitted event is never dropped (its slot is released only once it is committed, or
    its commit failed and its caller was told)."""

    def __init__(self, share: int, window: float) -> None:
        if share < 1:
            raise ValueError("fair_share must be >= 1")
        self.share = share
        self.window = window
        self._inflight: dict[str | None, int] = {}
        self._seen: dict[str | None, float] = {}  # tenant -> its last admission (monotonic)
        self._waiters: dict[str | None, deque[asyncio.Future[None]]] = {}
        # tenant -> when it was last refused (a caller that cannot wait); one that waits is
        # held back while its line lasts (`pressed`)
        self._pressed: dict[str | None, float] = {}
        # tenant -> how many of its events in flight were let out of its line (at most its
        # in flight): a flood whose line empties at each commit end is still one (`held`)
        self._let_out: dict[str | None, int] = {}
        self._pruned = 0.0
        # What `light_active` found last, so that it is not a walk over every tenant seen
        # on each batch: a tenant that was light (checked first), or, when none was, the
        # oldest press among the tenants seen (none is light until it expires, unless one
        # enters unpressed: `_enter` forgets it then; -inf is "walk again").
        self._light: list[str | None] = []  # empty, or the one tenant
        self._oldest_press = -math.inf

    def inflight(self, tenant: str | None) -> int:
        return self._inflight.get(tenant, 0)

    def others_active(self, tenant: str | None, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        if now - self._pruned > self.window / 4:
            self._pruned = now
            for t, last in list(self._seen.items()):
                if now - last > self.window and t not in self._inflight:
                    del self._seen[t]
            for t, last in list(self._pressed.items()):
                if now - last > self.window:
                    del self._pressed[t]
        return len(self._seen) > (1 if tenant in self._seen else 0)

    def pressed(self, tenant: str | None, now: float) -> bool:
        """Whether ``tenant`` is held back at admission: it has callers waiting in line, or
        was refused in the last ``window`` seconds.

        A line counts only while it lasts: a light tenant whose events queued behind one
        slow commit (its share in flight) used to count as held back for the whole window,
        and with both tenants held back the flood beside it was rationed no more (bench
        hub, PostgreSQL: the hostile tenant's first second, 40 ms commits, the measured
        tenant's events 30-55 ms from publish to commit, its share full the whole time). A
        flood that waits keeps its line; one refused cannot queue, so its refusals count."""
        return tenant in self._waiters or now - self._pressed.get(tenant, -math.inf) <= self.window

    def held(self, tenant: str | None, now: float) -> bool:
        """`pressed`, or with events in flight that were let out of its line: a commit of
        such events is a flood's. A flood with one caller more than its share has its line
        empty each time a commit ends (the one let out is routed and queued before the
        caller whose event was committed comes back to wait), and counted as light then its
        commits of its own went unrationed, back to back, beside a quiet tenant."""
        return self._let_out.get(tenant, 0) > 0 or self.pressed(tenant, now)

    def light_active(self, now: float, besides: Collection[str | None] = ()) -> bool:
        """Whether some tenant active in the last ``window`` seconds was not held back in
        it: one whose events a flood would make wait. ``besides``: tenants not to count
        (a batch's, `held` by events let out of their line, though light)."""
        self.others_active(None, now)  # prunes
        light = self._light
        if (
            light
            and light[0] in self._seen
            and light[0] not in besides
            and not self.pressed(light[0], now)
        ):
            return True
        # The same comparison as `pressed`: every press seen is at least this one.
        if now - self._oldest_press <= self.window:
            return False
        # Asked on every committer wake-up while only held-back tenants wait: a walk over
        # 10,000 of them took 2 ms each time. A tenant becomes light only by entering
        # unpressed, by its press growing older than the window or by its line ending, so
        # one walk answers until the oldest press seen expires or a line ends.
        oldest = math.inf
        skipped = False
        for t in self._seen:
            if t in self._waiters:  # held back while its line lasts; its end walks again
                continue
            at = self._pressed.get(t, -math.inf)
            if now - at > self.window:
                if t in besides:  # light all the same: the next call walks again
                    skipped = True
                    continue
                self._light = [t]
                return True
            oldest = min(oldest, at)
        if not skipped:
            self._light = []
            self._oldest_press = oldest
        return False

    def _enter(self, tenant: str | None, now: float) -> None:
        self._inflight[tenant] = self._inflight.get(tenant, 0) + 1
        self._seen[tenant] = now
        # Its press may be older than those `light_active` saw (it left and came back).
        self._oldest_press = min(self._oldest_press, self._pressed.get(tenant, -math.inf))

    def try_admit(self, tenant: str | None) -> bool:
        now = time.monotonic()
        if self._inflight.get(tenant, 0) >= self.share or tenant in self._waiters:
            if self.others_active(tenant, now):
                return False
            if tenant in self._waiters:  # the others went quiet: everyone in line goes
                self._wake(tenant, now)
        self._enter(tenant, now)
        return True

    async def admit(self, tenant: str | None, *, wait: bool) -> None:
        if self.try_admit(tenant):
            return
        if not wait:
            self._pressed[tenant] = time.monotonic()
            raise TooManyRequests(
                f"project {tenant!r} has {self.share} events waiting for their commit while "
                f"other projects wait: nothing was accepted; retry in {RETRY_AFTER_S} s",
                retry_after=RETRY_AFTER_S,
                limit=self.share,
            )
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        line = self._waiters.setdefault(tenant, deque())
        line.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                # Admitted just as it was cancelled; failed by `close` it never was (its
                # release would uncount an event in flight of the same tenant).
                if fut.exception() is None:
                    self.release(tenant)
            else:
                with contextlib.suppress(ValueError):
                    line.remove(fut)
                if not line and self._waiters.get(tenant) is line:
                    self._line_ended(tenant)
            raise

    def release(self, tenant: str | None) -> None:
        n = self._inflight.get(tenant, 0) - 1
        if n > 0:
            self._inflight[tenant] = n
        else:
            self._inflight.pop(tenant, None)
        if self._let_out.get(tenant, 0) > max(n, 0):
            # Which event this was is not known: the ones let out are the last admitted,
            # so they are counted as committed last.
            if n > 0:
                self._let_out[tenant] = n
            else:
                del self._let_out[tenant]
        if tenant in self._waiters:
            self._wake(tenant, time.monotonic())

    def close(self, exc: BaseException) -> None:
        """Fail every caller waiting in line: nothing will commit its event."""
        lines, self._waiters = self._waiters, {}
        # Every line ended: `light_active`'s walk skipped these tenants (its cache could say
        # "nobody light" for good, with `inf` when every tenant seen was in line).
        self._oldest_press = -math.inf
        for line in lines.values():
            for fut in line:
                if not fut.done():
                    fut.set_exception(exc)

    def _wake(self, tenant: str | None, now: float) -> None:
        line = self._waiters[tenant]
        while line and (
            self._inflight.get(tenant, 0) < self.share or not self.others_active(tenant, now)
        ):
            fut = line.popleft()
            if not fut.done():
                self._enter(tenant, now)
                self._let_out[tenant] = self._let_out.get(tenant, 0) + 1
                fut.set_result(None)
        if not line:
            self._line_ended(tenant)

    def _line_ended(self, tenant: str | None) -> None:
        del self._waiters[tenant]
        # `light_active`'s walk skipped this tenant while it waited: walk again.
        self._oldest_press = -math.inf


class _Refusals:
    """How fast a tenant may be refused: a refusal that comes before the ``Retry-After`` of
    the tenant's last one of the same kind (admission, or subscription writes) has passed is
    answered only after ``delay`` seconds (a tarpit). A client that retries a refused
    request at once, in a loop, otherwise spends the hub's loop on refusals: bench hub,
    SQLite, one in-process caller retrying refused subscription creates made 14,000
    refusals a second, kept the loop 64% busy and raised the quiet tenant's SSE p50 to 7.5
    ms (5.0 ms with the same retries 1 ms apart). A client that waits the
    ``Retry-After`` it was given is never held, whatever ``fair_window`` is (counted in
    fair_window instead, one that waited its 1 s in a 30 s window was held); nor is anyone
    else while a tenant is. The kinds are apart because their callers are: only
    admins post events (for any project), while a project's members change its
    subscriptions, and one's retry loop must not hold the other's first refusal."""

    def __init__(self, delay: float) -> None:
        if not 0 <= delay < math.inf:  # NaN fails too
            raise ValueError("refusal_delay must be a finite number >= 0")
        self.delay = delay
        # (kind, tenant) -> until when a refusal repeats the last (monotonic): the moment
        # the last was answered, plus the Retry-After it gave
        self._until: dict[tuple[str, str | None], float] = {}
        self._prune_above = 1024

    def hold_for(self, kind: str, tenant: str | None, retry_after: float) -> float:
        """Seconds to hold the refusal being made now, which tells its client to wait
        ``retry_after`` seconds."""
        now = time.monotonic()
        if len(self._until) > self._prune_above:
            self._until = {k: until for k, until in self._until.items() if now < until}
            self._prune_above = max(1024, 2 * len(self._until))
        key = (kind, tenant)
        delay = self.delay if now < self._until.get(key, -math.inf) else 0.0
        self._until[key] = now + delay + retry_after
        return delay

    async def hold(self, kind: str, tenant: str | None, refused: TooManyRequests) -> None:
        delay = self.hold_for(kind, tenant, getattr(refused, "retry_after", RETRY_AFTER_S))
        if delay:
            await asyncio.sleep(delay)


class _WriteRate:
    """Subscription creates and updates per tenant (a delete is never held back), as a
    token bucket of ``burst`` refilled at ``rate`` per second, counted only while another
    tenant is active (see `_FairShare.others_active`). Each write is a store transaction and
    a rebuild of the routing index: a tenant churning subscriptions as fast as it can
    spends the hub's CPU and the store's locks under every other tenant's events (bench
    hub, PostgreSQL, 200-270 create+delete/s: the quiet tenant's ingest p99 3.5 ms beside
    a flood with churn, 2.7 ms without). A tenant alone is never limited."""

    def __init__(self, rate: float, burst: int) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("subscription_rate must be > 0 and subscription_burst >= 1")
        self.rate = rate
        self.burst = burst
        self._buckets: dict[str | None, tuple[float, float]] = {}  # tenant -> (tokens, at)
        self._prune_above = 1024

    def take(self, tenant: str | None, others_active: bool, n: int = 1) -> None:
        """Spend ``n`` tokens, all or none: a request that makes several writes is refused
        before its first one, never half way."""
        now = time.monotonic()
        if len(self._buckets) > self._prune_above:
            # A full bucket is the same as none. Pruning again only once the dict has
            # doubled keeps a hub with many busy projects from rebuilding it on every take.
            self._buckets = {
                t: (k, at)
                for t, (k, at) in self._buckets.items()
                if k + (now - at) * self.rate < self.burst
            }
            self._prune_above = max(1024, 2 * len(self._buckets))
        tokens, at = self._buckets.get(tenant, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.rate)
        if not others_active:
            self._buckets[tenant] = (tokens, now)
            return
        n = min(n, self.burst)  # a burst smaller than one request's writes must still pass it
        if tokens < n:
            retry = max(1, math.ceil((n - tokens) / self.rate))
            self._buckets[tenant] = (tokens, now)
            raise TooManyRequests(
                f"project {tenant!r} changes subscriptions faster than {self.rate:g}/s while "
                f"other projects are active: nothing was changed; retry in {retry} s",
                retry_after=retry,
                limit=self.rate,
            )
        self._buckets[tenant] = (tokens - n, now)


class _FairQueue:
    """Events waiting for a commit, one queue per tenant, taken round-robin.

    A tenant whose events flood ingest fills only its own queue: every batch takes the
    next event of each tenant in turn, so another tenant's event joins the very next commit
    however long the flood's backlog is. A batch is bounded in events and in queue rows
    (an event matching many subscriptions is many rows) and bytes, so no commit grows long
    enough to hold everyone's events up."""

    def __init__(self) -> None:
        self._queues: dict[str | None, deque[_Pending]] = {}
        self._ready = asyncio.Event()

    def put(self, tenant: str | None, item: _Pending) -> None:
        queue = self._queues.get(tenant)
        if queue is None:
            queue = self._queues[tenant] = deque()
        queue.append(item)
        self._ready.set()

    def __bool__(self) -> bool:
        return bool(self._queues)

    def poke(self) -> None:
        """Wake `changed`: something other than a new event may let a batch start."""
        self._ready.set()

    async def changed(self) -> None:
        """Return once an event was queued or `poke` was called since the last return."""
        await self._ready.wait()
        self._ready.clear()

    def tenants(self) -> Iterable[str | None]:
        return self._queues.keys()

    def take(
        self,
        max_events: int,
        max_rows: int,
        max_bytes: int,
        only: Collection[str | None] | None = None,
    ) -> list[_Pending]:
        """The next batch, round-robin over the tenants waiting (or over those in ``only``)."""
        batch: list[_Pending] = []
        rows = size = 0
        full = False
        tenants = [t for t in self._queues if only is None or t in only]
        while tenants and not full:
            for tenant in list(tenants):
                queue = self._queues[tenant]
                item = queue.popleft()
                batch.append(item)
                rows += len(item[0].subscriptions)
                size += len(item[0].body)
                if not queue:
                    del self._queues[tenant]
                    tenants.remove(tenant)
                full = len(batch) >= max_events or rows >= max_rows or size >= max_bytes
                if full:
                    break
        # The tenants served last go to the back: the next batch starts with the others.
        if self._queues and only is None:
            order = list(self._queues.items())
            self._queues = dict(order[1:] + order[:1])
        return batch

    def drain(self) -> list[_Pending]:
        items = [item for queue in self._queues.values() for item in queue]
        self._queues.clear()
        return items


class _TenantRoutes:
    """One tenant's routes: keyed by the attribute value their filter requires, or not."""

    __slots__ = ("keyed", "names", "rest")

    def __init__(self) -> None:
        self.keyed: dict[tuple[str, str], list[_Route]] = {}
        self.names: set[str] = set()
        self.rest: list[_Route] = []

    def add(self, route: _Route) -> None:
        if route.key is None:
            self.rest.append(route)
        else:
            self.keyed.setdefault(route.key, []).append(route)
            self.names.add(route.key[0])

    def match(self, attrs: dict[str, str], out: list[str]) -> None:
        out += [r.id for r in self.rest if r.predicate(attrs)]
        for name in self.names:
            value = attrs.get(name)
            if value is not None:
                for r in self.keyed.get((name, value), ()):
                    if r.predicate(attrs):
                        out.append(r.id)


class Hub:
    def __init__(
        self,
        store: Store,
        auth: Authenticator,
        *,
        quota_subscriptions: int = 100,
        batch_max: int = 512,
        batch_rows: int = 2048,
        batch_bytes: int = 128 * 1024,
        fair_share: int = 4,
        fair_window: float = 1.0,
        express_commits: bool = True,
        subscription_rate: float = 20.0,
        subscription_burst: int = 20,
        refusal_delay: float = 0.1,
        flood_gap: float = 0.005,
        retention_interval: float = 30.0,
        clock: Callable[[], float] = time.time,
        allow_private_webhooks: bool = False,
        webhook_backoff: Sequence[float] = DEFAULT_BACKOFF,
        webhook_timeout: float = 10.0,
        webhook_idle_check: float = 0.5,
        webhook_resolver: Resolver = system_resolver,
        webhook_verify: ssl.SSLContext | bool = True,
    ) -> None:
        self.store = store
        self.auth = auth
        self.quota_subscriptions = quota_subscriptions
        self.batch_max = batch_max
        self.batch_rows = batch_rows
        self.batch_bytes = batch_bytes
        self.retention_interval = retention_interval
        self.clock = clock
        self.fanout = Fanout()
        self.allow_private_webhooks = allow_private_webhooks
        self.webhooks = Dispatcher(
            store,
            backoff=webhook_backoff,
            timeout=webhook_timeout,
            allow_private=allow_private_webhooks,
            idle_check=webhook_idle_check,
            resolver=webhook_resolver,
            verify=webhook_verify,
        )
        self._routes: dict[str, _Route] = {}
        self._by_tenant: dict[str | None, _TenantRoutes] | None = None  # rebuilt on change
        self._tees: dict[str, list[_Route]] = {}  # parent id -> children, rebuilt with it
        self._pending = _FairQueue()
        self.admission = _FairShare(fair_share, fair_window)
        self.subscription_writes = _WriteRate(subscription_rate, subscription_burst)
        self.refusals = _Refusals(refusal_delay)
        if not 0 <= flood_gap < math.inf:  # NaN fails too
            raise ValueError("flood_gap must be a finite number >= 0")
        self.flood_gap = flood_gap
        self._flood_after = 0.0  # loop time: when a flood's next commit of its own may start
        self._floods_in_flight = 0
        self._flood_wake: asyncio.TimerHandle | None = None
        self.commits_in_flight = store.append_concurrency
        # Only where commits proceed in parallel: with one writer (SQLite) the extra
        # commit would wait behind the one in flight all the same.
        self.express_commits = express_commits and store.append_concurrency > 1
        self._committing: dict[str | None, int] = {}  # tenant -> commits in flight with it
        self._busy_slots = 0  # normal (not express) commits in flight
        self._stopped = False
        self._tasks: list[asyncio.Task[None]] = []
        # A reload reads the store, then sets the route: a change made here (or a newer
        # reload) between the two would be undone. Each reload and each change takes a
        # number; while reloads are in flight the number of each route's last applied change
        # is kept (only those newer than the oldest reload in flight: no older one can
        # overtake anything), and a reload applies only what no later change has overtaken.
        # A reload that fails applies nothing and so overtakes nothing.
        self._reloads: dict[asyncio.Task[None], int] = {}  # -> the number it started with
        self._changes = itertools.count(1)
        self._changed_at: dict[str, int] = {}
        self.ingested = 0

    async def _all_subscriptions(self) -> list[Subscription]:
        subs: list[Subscription] = []
        marker: str | None = None
        while True:
            page = await self.store.list_subscriptions(None, limit=MAX_LIMIT, marker=marker)
            subs += page
            if len(page) < MAX_LIMIT:
                return subs
            marker = page[-1].id

    async def start(self) -> None:
        self._stopped = False
        for sub in await self._all_subscriptions():
            self._routes[sub.id] = _Route(sub)
            self.webhooks.add(sub)
        self._by_tenant = None
        await self.store.watch(self._on_store_change)
        self._tasks = [
            asyncio.create_task(self._batcher(), name="keel-hub-ingest"),
            asyncio.create_task(self._retention(), name="keel-hub-retention"),
        ]

    async def stop(self) -> None:
        await self.store.unwatch(self._on_store_change)
        for task in list(self._reloads):
            task.cancel()
        self.fanout.close_all()
        await self.webhooks.stop()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        self._stopped = True
        if self._flood_wake is not None:
            self._flood_wake.cancel()
            self._flood_wake = None
        # Those in line first: a slot released below would admit one, whose event would
        # then wait for committers that are gone.
        self.admission.close(ConnectionError("hub stopped before the event was admitted"))
        for _, fut, tenant in self._pending.drain():
            self.admission.release(tenant)
            if not fut.done():
                fut.set_exception(ConnectionError("hub stopped before the event was committed"))

    def _on_store_change(self, kind: str, sub_id: str) -> None:
        """Another hub process changed the shared store."""
        if kind == "append":
            self.fanout.nudge(sub_id)
            self.webhooks.wake(sub_id)
        elif kind in ("subscription", "resync"):
            n = next(self._changes)
            job = self._reload(sub_id, n) if kind == "subscription" else self._resync()
            task = asyncio.get_running_loop().create_task(job)
            self._reloads[task] = n
            task.add_done_callback(self._reload_done)

    def _reload_done(self, task: asyncio.Task[None]) -> None:
        self._reloads.pop(task, None)
        if not self._reloads:
            self._changed_at.clear()
            return
        oldest = min(self._reloads.values())
        for sub_id in [k for k, v in self._changed_at.items() if v < oldest]:
            del self._changed_at[sub_id]

    def _changed(self, sub_id: str) -> None:
        """Number a change of ``sub_id``'s route made here (see ``_changed_at``)."""
        n = next(self._changes)
        if self._reloads:
            self._changed_at[sub_id] = n

    def _overtaken(self, sub_id: str, n: int) -> bool:
        return self._changed_at.get(sub_id, 0) > n

    async def _resync(self) -> None:
        """Changes of other processes may have gone unreported: reload every route, and wake
        every stream and webhook to catch up from the store. Retried while the store is
        still coming back (the notification channel can return before the pool does)."""
        for attempt in range(RESYNC_ATTEMPTS):
            started = next(self._changes)  # the listing that succeeds decides
            try:
                subs = {sub.id: sub for sub in await self._all_subscriptions()}
                break
            except KeelError as exc:
                log_event(log, logging.WARNING, "hub.resync_failed", error=repr(exc))
                await asyncio.sleep(min(0.2 * 2**attempt, 5.0))
        else:
            log_event(log, logging.ERROR, "hub.resync_gave_up", attempts=RESYNC_ATTEMPTS)
            return
        for gone in set(self._routes) - set(subs):
            if self._overtaken(gone, started):  # made here after the listing
                continue
            self._changed_at[gone] = started  # a reload that read before the listing is older
            self._routes.pop(gone, None)
            self.webhooks.remove(gone)
            self.fanout.close_subscription(gone)
        for sub in subs.values():
            if self._overtaken(sub.id, started):  # changed or deleted here after the listing
                continue
            self._changed_at[sub.id] = started
            self._routes[sub.id] = _Route(sub)
            self.webhooks.add(sub)
            self.fanout.nudge(sub.id)
            self.webhooks.wake(sub.id)
        self._by_tenant = None
        log_event(log, logging.INFO, "hub.resynced", subscriptions=len(subs))

    async def _reload(self, sub_id: str, mine: int) -> None:
        try:
            sub = await self.store.get_subscription(sub_id)
        except NotFound:
            if self._overtaken(sub_id, mine):
                return
            self._changed_at[sub_id] = mine
            self._routes.pop(sub_id, None)
            self.webhooks.remove(sub_id)
            self.fanout.close_subscription(sub_id)
        except KeelError as exc:  # store unreachable: the resync after the outage fixes it
            log_event(log, logging.WARNING, "hub.reload_failed", sub=sub_id, error=repr(exc))
            return
        else:
            if self._overtaken(sub_id, mine):
                return
            self._changed_at[sub_id] = mine
            self._routes[sub_id] = _Route(sub)
            self.webhooks.remove(sub_id)  # its delivery task holds the old version
            self.webhooks.add(sub)
        self._by_tenant = None

    async def authenticate(self, token: str | None) -> Principal:
        if not token:
            raise Unauthorized("missing X-Auth-Token header")
        return await self.auth.authenticate(token)

    # --- ingest ---------------------------------------------------------------------------

    async def ingest(self, event: CloudEvent, *, wait: bool = True) -> None:
        """Return once ``event`` is committed to every matching queue.

        Within its tenant's fair share (`_FairShare`): past it, wait in line, or with
        ``wait=False`` raise `TooManyRequests` having accepted nothing."""
        tenant = event.tenant
        if self._stopped:
            raise ConnectionError("hub stopped: the event was not accepted")
        try:
            await self.admission.admit(tenant, wait=wait)
        except TooManyRequests as refused:
            await self.refusals.hold("events", tenant, refused)
            raise
        try:
            body = encode_body(event)
            # Routed and encoded here, by the caller, so that the batcher has only the store
            # to wait for and this work overlaps the commit in flight.
            routed = Routed(event.id, body, self.route(event))
        except BaseException:
            self.admission.release(tenant)
            raise
        fut: asyncio.Future[list[Appended]] = asyncio.get_running_loop().create_future()
        self._pending.put(tenant, (routed, fut, tenant))
        await fut

    async def commit(self, items: Sequence[Routed]) -> list[list[Appended]]:
        """Return, once every item is committed to the queues it names and to their tees (in
        the same group commit as ingest, each in the fair share of its first queue's project;
        each item is atomic, the list is not), the messages each item became (none for an
        event id seen before)."""
        if self._stopped:
            raise ConnectionError("hub stopped: nothing was accepted")
        loop = asyncio.get_running_loop()
        futs: list[asyncio.Future[list[Appended]]] = []
        for item in items:
            first = self._routes.get(item.subscriptions[0]) if item.subscriptions else None
            tenant = first.project if first is not None else None
            await self.admission.admit(tenant, wait=True)  # in line past the fair share
            fut: asyncio.Future[list[Appended]] = loop.create_future()
            tees = self._with_tees(item.subscriptions)
            routed = item
            if len(tees) != len(item.subscriptions):
                routed = Routed(item.event_id, item.body, tees, ttl=item.ttl, delay=item.delay)
            self._pending.put(tenant, (routed, fut, tenant))
            futs.append(fut)
        return list(await asyncio.gather(*futs))

    def _index(self) -> dict[str | None, _TenantRoutes]:
        if self._by_tenant is None:
            index: dict[str | None, _TenantRoutes] = {}
            tees: dict[str, list[_Route]] = {}
            for r in self._routes.values():
                if r.parent is not None:
                    tees.setdefault(r.parent, []).append(r)
                else:
                    tenant = None if r.all_projects else r.project
                    index.setdefault(tenant, _TenantRoutes()).add(r)
            self._by_tenant, self._tees = index, tees
        return self._by_tenant

    def _with_tees(self, ids: Sequence[str]) -> tuple[str, ...]:
        self._index()
        now = self.clock()
        out = list(ids)
        for sub_id in ids:
            out.extend(
                child.id
                for child in self._tees.get(sub_id, ())
                if child.expires_at is None or child.expires_at > now
            )
        return tuple(out)

    def route(self, event: CloudEvent) -> tuple[str, ...]:
        """The subscriptions that get ``event``: its tenant's and the cross-project ones (and
        their tees).

        Only the subscriptions that can want it are matched: those whose filter requires an
        attribute value the event has (`index_key`), and those without such a key."""
        by_tenant = self._index()
        attrs = event.attributes()
        out: list[str] = []
        everyone = by_tenant.get(None)
        if everyone is not None:
            everyone.match(attrs, out)
        if event.tenant is not None:
            own = by_tenant.get(event.tenant)
            if own is not None:
                own.match(attrs, out)
        if self._tees:
            return self._with_tees(out)
        return tuple(out)

    async def _batcher(self) -> None:
        # One committer task per commit slot, plus the express one (see `_committer`); each
        # takes its next batch the moment its commit ends, in the same loop turn. A task
        # per batch, started by a batcher woken when the last one ended, kept the store
        # idle for three more loop iterations between commits, and on a busy loop each one
        # is every stream's and every tenant's callbacks.
        workers = [
            asyncio.create_task(self._committer(express=False), name="keel-hub-commit")
            for _ in range(self.commits_in_flight)
        ]
        if self.express_commits:
            workers.append(
                asyncio.create_task(self._committer(express=True), name="keel-hub-express")
            )
        try:
            await asyncio.gather(*workers)
        finally:
            for task in workers:
                task.cancel()
            await asyncio.wait(workers)

    async def _committer(self, *, express: bool) -> None:
        # A slot first, then the batch: events that arrive while every slot is busy all
        # join the next commit rather than wait behind a batch formed too early. While every
        # slot is busy, the express committer may start one more commit for the tenants that
        # have nothing in a commit in flight: a flooding tenant keeps the slots busy with its
        # fair share, and another tenant's event would otherwise wait for one of those
        # commits to end, then share its own with the flood's rows.
        pending = self._pending
        committing = self._committing
        while True:
            batch, flood = self._next_batch(express=express)
            if not batch:
                await pending.changed()
                continue
            tenants = {tenant for _, _, tenant in batch}
            for tenant in tenants:
                committing[tenant] = committing.get(tenant, 0) + 1
            if not express:
                self._busy_slots += 1
                if pending and self._busy_slots >= self.commits_in_flight:
                    # The last slot taken with events left (a full batch): the express
                    # committer looks for an idle tenant's now, not at the next event.
                    pending.poke()
            try:
                await self._commit(batch)
            except Exception as exc:
                # Past the store's append (a fan-out that raised, say): this task is the
                # slot, so it must not end; the events still waiting are told.
                self._commit_failed(batch, exc)
            finally:
                for tenant in tenants:
                    if committing[tenant] == 1:
                        del committing[tenant]
                    else:
                        committing[tenant] -= 1
                if not express:
                    self._busy_slots -= 1
                if flood:
                    self._floods_in_flight -= 1
                # Any commit, riders or not: a flood's own commit waits ``flood_gap`` after
                # the last one ended (see `_flood_waits`).
                self._flood_after = asyncio.get_running_loop().time() + self.flood_gap
                pending.poke()  # a slot, or a tenant for the express commit, came free

    def _commit_failed(self, batch: list[_Pending], exc: Exception) -> None:
        log_event(log, logging.ERROR, "hub.commit_failed", error=repr(exc))
        for _, fut, tenant in batch:
            if not fut.done():
                self.admission.release(tenant)
                fut.set_exception(exc)

    def _next_batch(self, *, express: bool) -> tuple[list[_Pending], bool]:
        """The next batch, and whether it holds only held-back tenants' events (a flood's
        commit of its own, rationed: see `_flood_waits`)."""
        pending = self._pending
        if not pending:
            return [], False
        only = None
        if express:
            if self._busy_slots < self.commits_in_flight:
                return [], False  # a normal slot is free: the event goes there
            only = [t for t in pending.tenants() if t not in self._committing]
            if not only:
                return [], False
        flood = self._flood_waits(only if only is not None else pending.tenants())
        if flood is None:
            return [], False
        return pending.take(self.batch_max, self.batch_rows, self.batch_bytes, only), flood

    def _flood_waits(self, tenants: Iterable[str | None]) -> bool | None:
        """None when a commit of only these tenants' events must wait, else whether it is
        such a commit (one more flood commit of its own: the next waits ``flood_gap``).

        While a tenant that was not held back at admission is active (see
        `_FairShare.light_active`), the events of tenants that were ride in that tenant's
        commits, and commit on their own only ``flood_gap`` after the last commit ended,
        one such commit at a time. A flood that kept the single writer (SQLite) or the log
        busy all the time made every other tenant's event wait for the commit in flight,
        then for its own (bench hub, SQLite: the quiet tenant's wait for its commit to
        start, p50 0.8 ms; riding, 0.04 ms). Riding, the flood still commits its fair share
        with every other tenant's commit, and between them once per ``flood_gap``; tenants
        that are all held back (two floods) are never rationed."""
        if not self.flood_gap:
            return False
        admission = self.admission
        now = time.monotonic()
        tenants = set(tenants)
        if not all(admission.held(t, now) for t in tenants):
            return False
        if not admission.light_active(now, tenants):
            return False
        if self._floods_in_flight:
            return None  # its end pokes the committers
        loop = asyncio.get_running_loop()
        after = self._flood_after
        if loop.time() < after:
            if self._flood_wake is None or self._flood_wake.when() > after:
                if self._flood_wake is not None:
                    self._flood_wake.cancel()
                self._flood_wake = loop.call_at(after, self._flood_due)
            return None
        self._floods_in_flight += 1
        return True

    def _flood_due(self) -> None:
        self._flood_wake = None
        self._pending.poke()

    async def _commit(self, batch: list[_Pending]) -> None:
        try:
            appended = await self.store.append([r for r, _, _ in batch], now=self.clock())
        except asyncio.CancelledError:
            for _, fut, tenant in batch:
                self.admission.release(tenant)
                if not fut.done():
                    fut.set_exception(ConnectionError("hub stopped during the commit"))
            raise
        except Exception as exc:
            log_event(log, logging.ERROR, "hub.ingest_failed", error=repr(exc))
            for _, fut, tenant in batch:
                self.admission.release(tenant)
                if not fut.done():
                    fut.set_exception(exc)
            return
        self.ingested += len(batch)
        made: dict[str, list[Appended]] = {}
        for a in appended:
            made.setdefault(a.event_id, []).append(a)
        for routed, fut, _ in batch:
            if not fut.done():
                fut.set_result(made.pop(routed.event_id, []))
        # Fanned out before the slots are released: the waiters admitted next route and
        # encode on this loop, after the streams got this batch.
        try:
            self.fanout.publish(appended)
        finally:
            for _, _, tenant in batch:
                self.admission.release(tenant)
        for sub_id in {a.subscription for a in appended}:
            self.webhooks.wake(sub_id)

    async def _retention(self) -> None:
        while True:
            await asyncio.sleep(self.retention_interval)
            try:
                await self.store.enforce_retention(now=self.clock())
                await self._drop_expired()
            except Exception as exc:
                log_event(log, logging.ERROR, "hub.retention_failed", error=repr(exc))

    async def _drop_expired(self) -> None:
        now = self.clock()
        for r in [r for r in self._routes.values() if r.expires_at and r.expires_at <= now]:
            self._forget(r.id)
            with contextlib.suppress(NotFound):  # another hub process got there first
                await self.store.delete_subscription(r.id)

    def _forget(self, sub_id: str) -> None:
        self._unroute(sub_id)
        self.fanout.close_subscription(sub_id)

    def _unroute(self, sub_id: str) -> None:
        self._changed(sub_id)
        self._routes.pop(sub_id, None)
        self._by_tenant = None
        self.webhooks.remove(sub_id)

    # --- subscriptions --------------------------------------------------------------------

    async def create_subscription(self, who: Principal, raw: Any) -> Subscription:
        await self.count_writes(who.project)  # before the work a refused request would waste
        spec = parse_spec(raw)
        if spec.all_projects and not who.is_admin:
            raise Forbidden("only admins may create all_projects subscriptions")
        webhook = None
        if spec.webhook is not None:
            # Syntax only: the addresses are checked on every connection (see _webhooks).
            check_url(spec.webhook.url)
            webhook = Webhook(spec.webhook.url, new_secret(), spec.webhook.mode)
        sub = Subscription(
            id="sub-" + new_id(),
            webhook=webhook,
            project=who.project,
            user=who.user,
            spec=filter_fields(spec),
            all_projects=spec.all_projects,
            retention=spec.retention,
            max_deliveries=spec.max_deliveries,
            created_at=self.clock(),
        )
        await self._add(sub)
        return sub

    async def add_subscription(self, sub: Subscription, *, counted: bool = False) -> None:
        """Create ``sub`` as built by a face (its id, filter, tee and webhook already checked),
        within the project's quota; `Conflict` if its id exists. ``counted``: the face has
        already spent this write with `count_writes`."""
        if not counted:
            await self.count_writes(sub.project)
        await self._add(sub)

    async def _add(self, sub: Subscription) -> None:
        await self.store.create_subscription(sub, quota=self.quota_subscriptions)
        self._changed(sub.id)
        self._routes[sub.id] = _Route(sub)
        self._by_tenant = None
        self.webhooks.add(sub)

    async def update_subscription(self, sub: Subscription, *, counted: bool = False) -> None:
        """Store a face's new version of ``sub`` (the same id and project) and route by it."""
        if not counted:
            await self.count_writes(sub.project)
        await self.store.update_subscription(sub)
        self._changed(sub.id)
        self._routes[sub.id] = _Route(sub)
        self._by_tenant = None
        self.webhooks.remove(sub.id)
        self.webhooks.add(sub)

    async def count_writes(self, tenant: str | None, n: int = 1) -> None:
        """Spend ``n`` of the tenant's subscription writes, or raise `TooManyRequests` having
        spent none (held first when the tenant was refused moments ago, see `_Refusals`). A
        face whose request makes several writes counts them all here first and passes
        ``counted=True`` to each, so a refusal changes nothing."""
        try:
            self.subscription_writes.take(tenant, self.admission.others_active(tenant), n)
        except TooManyRequests as refused:
            await self.refusals.hold("writes", tenant, refused)
            raise

    def known(self, sub_id: str) -> Subscription | None:
        """The subscription as this process routes by it (kept current across processes by
        the store's change notifications), or None: a read that needs no store round trip."""
        r = self._routes.get(sub_id)
        return r.sub if r is not None else None

    async def subscription(self, who: Principal, sub_id: str) -> Subscription:
        try:
            sub = await self.store.get_subscription(sub_id)
        except NotFound:
            sub = None
        if sub is None or sub.project != who.project:
            raise _not_yours(sub_id)
        return sub

    async def list_subscriptions(
        self, who: Principal, *, limit: int | None, marker: str | None
    ) -> tuple[list[Subscription], str | None]:
        n = check_limit(limit)
        page = await self.store.list_subscriptions(who.project, limit=n, marker=marker)
        return page, (page[-1].id if len(page) == n else None)

    async def delete_subscription(self, who: Principal, sub_id: str) -> None:
        known = self.known(sub_id)
        if known is None:  # made by another process moments ago, or no one's: ask the store
            await self.subscription(who, sub_id)
        elif known.project != who.project:  # a subscription's project never changes
            raise _not_yours(sub_id)
        self._unroute(sub_id)
        await self.store.delete_subscription(sub_id)
        # A reload or resync begun while the delete was on its way read the row still there.
        self._forget(sub_id)

    # --- queues ---------------------------------------------------------------------------

    async def read(
        self, who: Principal, sub_id: str, *, after: int, limit: int | None
    ) -> tuple[Gap | None, list[Message]]:
        await self.subscription(who, sub_id)
        if after < 0:
            raise BadRequest("after must be >= 0", field="after")
        return await self.store.read(sub_id, after=after, limit=check_limit(limit))

    async def claim(self, who: Principal, sub_id: str, *, limit: int, ttl: float) -> Claim | None:
        sub = await self.subscription(who, sub_id)
        if sub.webhook is not None:
            raise Conflict("this subscription is delivered by its webhook; it cannot be claimed")
        if not 1 <= limit <= 100:
            raise BadRequest("limit must be 1..100", field="limit")
        _check_ttl(ttl)
        return await self.store.claim(
            sub_id, limit=limit, ttl=ttl, now=self.clock(), max_deliveries=sub.max_deliveries
        )

    async def ack(
        self, who: Principal, sub_id: str, claim_id: str, seqs: Sequence[int] | None
    ) -> int:
        await self.subscription(who, sub_id)
        return await self.store.ack(sub_id, claim_id, seqs, now=self.clock())

    async def release(self, who: Principal, sub_id: str, claim_id: str) -> int:
        await self.subscription(who, sub_id)
        return await self.store.release(sub_id, claim_id, now=self.clock())

    async def extend(self, who: Principal, sub_id: str, claim_id: str, ttl: float) -> float:
        await self.subscription(who, sub_id)
        _check_ttl(ttl)
        return await self.store.extend(sub_id, claim_id, ttl=ttl, now=self.clock())

    async def ack_upto(self, who: Principal, sub_id: str, seq: int, *, above: int = -1) -> int:
        """Ack up to ``seq``; nothing is written when, clamped to the queue's end, it is not
        past ``above`` (what this caller already acked): a flood of acks costs no writes."""
        sub = await self.subscription(who, sub_id)
        if seq < 0:
            raise BadRequest("seq must be >= 0", field="seq")
        if min(seq, sub.last_seq) <= above:
            return 0
        return await self.store.ack_upto(sub_id, seq)

    async def dead_letters(
        self, who: Principal, sub_id: str, *, after: int, limit: int | None
    ) -> list[Message]:
        await self.subscription(who, sub_id)
        return await self.store.dead_letters(sub_id, after=after, limit=check_limit(limit))

    async def redrive(self, who: Principal, sub_id: str, seqs: Sequence[int] | None) -> int:
        await self.subscription(who, sub_id)
        return await self.store.redrive(sub_id, seqs)

    async def ingest_as(self, who: Principal, event: CloudEvent) -> None:
        if not who.is_admin:
            raise Forbidden("only admins may post events")
        await self.ingest(event, wait=False)


def _not_yours(sub_id: str) -> NotFound:
    return NotFound(f"no subscription {sub_id!r} in your project", subscription=sub_id)


def encode_body(event: CloudEvent) -> bytes:
    """The event's JSON, refused (`BadRequest`) past `MAX_DEPTH` levels: an oslo payload is
    as deep as its sender made it, and every client would have to decode it."""
    try:
        body = encode_event(event)
    except RecursionError:
        raise BadRequest(
            f"the event's data nests deeper than {MAX_DEPTH} levels", field="data", limit=MAX_DEPTH
        ) from None
    check_depth(body, "data")
    return body


def _check_ttl(ttl: float) -> None:
    if not 1 <= ttl <= 43200:
        raise BadRequest("ttl must be 1..43200 seconds", field="ttl")
