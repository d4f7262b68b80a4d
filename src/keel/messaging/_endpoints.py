"""Endpoints: plain objects whose public methods are callable remotely.

A method is public when its name does not start with ``_``; it receives the request context
first, then keyword arguments: ``async def resize(self, ctx, instance_id: str, flavor: str)``.
Sync methods run in the server's bounded thread pool. ``@remote(since=..., idempotent=...)``
adds what the dispatcher and the retry logic need to know about a method.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from keel.errors import ConfigError, UnknownMethod, UnsupportedVersion
from keel.messaging._target import Target, parse_version

F = TypeVar("F", bound=Callable[..., Any])

_META = "__keel_remote__"
_CACHE_LIMIT = 4096


@dataclass(frozen=True, slots=True)
class RemoteOptions:
    since: tuple[int, int] | None = None
    idempotent: bool = False


def remote(*, since: str | None = None, idempotent: bool = False) -> Callable[[F], F]:
    """Declare a method's metadata: the interface version it appeared in, and whether it is
    idempotent (safe to run twice), which lets Keel retry a call to it that a stopping server
    may have started."""
    options = RemoteOptions(parse_version(since) if since else None, idempotent)

    def mark(func: F) -> F:
        setattr(func, _META, options)
        return func

    return mark


@dataclass(frozen=True, slots=True)
class Method:
    name: str
    func: Callable[..., Any]
    is_async: bool
    signature: inspect.Signature
    options: RemoteOptions
    endpoint_version: tuple[int, int]


@dataclass(slots=True)
class _Endpoint:
    namespace: str | None
    version: tuple[int, int]
    methods: dict[str, Method]


def _endpoint_target(endpoint: object) -> Target:
    target = getattr(endpoint, "target", None)
    if target is None:
        return Target()
    if not isinstance(target, Target):
        raise ConfigError(f"{type(endpoint).__name__}.target must be a keel.messaging.Target")
    return target


def _methods(endpoint: object, version: tuple[int, int]) -> dict[str, Method]:
    found: dict[str, Method] = {}
    for name, func in inspect.getmembers(endpoint, callable):
        if name.startswith("_") or name == "target" or isinstance(func, type):
            continue
        signature = inspect.signature(func)
        params = list(signature.parameters.values())
        if not params or params[0].kind not in (
            inspect.Parameter.POSITIONAL_ONLY,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
        ):
            raise ConfigError(
                f"{type(endpoint).__name__}.{name} must take the request context as its first "
                "argument: def {name}(self, ctx, ...)"
            )
        found[name] = Method(
            name=name,
            func=func,
            is_async=inspect.iscoroutinefunction(func),
            signature=signature,
            options=getattr(func, _META, RemoteOptions()),
            endpoint_version=version,
        )
    return found


class Dispatcher:
    """Finds the method for (namespace, name, version) across a server's endpoints."""

    def __init__(self, endpoints: Sequence[object]) -> None:
        self._by_namespace: dict[str | None, list[_Endpoint]] = {}
        for endpoint in endpoints:
            target = _endpoint_target(endpoint)
            entry = _Endpoint(
                target.namespace, target.version_tuple, _methods(endpoint, target.version_tuple)
            )
            self._by_namespace.setdefault(target.namespace, []).append(entry)
        self._cache: dict[tuple[str | None, str, str], Method] = {}

    def namespaces(self) -> dict[str | None, tuple[int, int]]:
        """Each namespace and the highest interface version served in it."""
        return {ns: max(e.version for e in eps) for ns, eps in self._by_namespace.items()}

    def method_names(self) -> list[str]:
        return sorted({m for eps in self._by_namespace.values() for e in eps for m in e.methods})

    def lookup(self, namespace: str | None, name: str, version: str) -> Method:
        key = (namespace, name, version)
        method = self._cache.get(key)
        if method is None:
            method = self._lookup(namespace, name, version)
            if len(self._cache) < _CACHE_LIMIT:  # spellings of a version are the sender's
                self._cache[key] = method
        return method

    def _lookup(self, namespace: str | None, name: str, version: str) -> Method:
        endpoints = self._by_namespace.get(namespace)
        if not endpoints:
            raise UnknownMethod(
                f"no endpoint serves namespace {namespace!r} here "
                f"(served: {sorted(map(str, self._by_namespace))})",
                namespace=namespace,
                method=name,
            )
        wanted = parse_version(version)
        offered: list[tuple[int, int]] = []
        for endpoint in endpoints:
            method = endpoint.methods.get(name)
            if method is None:
                continue
            offered.append(endpoint.version)
            if endpoint.version[0] == wanted[0] and endpoint.version[1] >= wanted[1]:
                since = method.options.since
                if since is not None and wanted < since:
                    raise UnsupportedVersion(
                        f"{name!r} appeared in version {since[0]}.{since[1]} but the request "
                        f"says {version}: the caller must send at least that version (its "
                        "version cap may still be held down by older servers)",
                        requested=version,
                        served=f"{since[0]}.{since[1]}",
                        method=name,
                    )
                return method
        if not offered:
            raise UnknownMethod(
                f"no method {name!r} in namespace {namespace!r}",
                namespace=namespace,
                method=name,
            )
        have = ", ".join(f"{major}.{minor}" for major, minor in sorted(offered))
        raise UnsupportedVersion(
            f"{name!r} was asked for at version {version}; this server serves {have} "
            "(same major and a minor at least as high is needed)",
            requested=version,
            served=have,
            method=name,
        )
