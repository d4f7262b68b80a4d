"""Who is calling: a token becomes a `Principal` (user, project, roles) through an Authenticator.

The protocol is one coroutine. An unknown token is `Unauthorized`; the authenticator never
guesses. `StaticTokens` reads its file once at construction: a malformed file is a
`ConfigError` naming the file and the problem, before the hub serves anything.

`KeystoneTokens` validates tokens against Keystone v3 (``GET /v3/auth/tokens``, the hub's
own service token in ``X-Auth-Token``, the user's in ``X-Subject-Token``): the principal is
the token's user id, project id and role names (implied roles included). Validated tokens
are cached (LRU, ``cache_size`` entries) until the token's ``expires_at`` or ``cache_ttl``
seconds, whichever comes first, so a revoked token stays accepted for at most ``cache_ttl``
(as keystonemiddleware's token cache). The service token comes from password auth, is
renewed ``refresh_margin`` seconds before it expires, and once more if Keystone refuses it.
Keystone unreachable or failing is `BackendUnavailable` (HTTP 503), never a 401.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import secrets
import ssl
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import httpx
import msgspec

from keel.errors import BackendUnavailable, ConfigError, Unauthorized


class Principal(msgspec.Struct, frozen=True):
    user: str
    project: str
    roles: tuple[str, ...] = ()

    @property
    def is_admin(self) -> bool:
        return "admin" in self.roles


class Authenticator(Protocol):
    async def authenticate(self, token: str) -> Principal:
        """The principal behind ``token``; `Unauthorized` if there is none."""
        ...


class StaticTokens:
    """Tokens from a mapping or a JSON file ``{"TOKEN": {"user", "project", "roles"}}``."""

    def __init__(self, tokens: Mapping[str, Principal]) -> None:
        self._tokens = dict(tokens)

    @classmethod
    def from_file(cls, path: str | Path) -> StaticTokens:
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"token file {path}: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"token file {path}: expected an object of token -> principal")
        tokens: dict[str, Principal] = {}
        for token, entry in raw.items():
            tokens[token] = _principal(entry, f"token file {path}: entry {token[:4]}…")
        return cls(tokens)

    def write(self, path: str | Path) -> None:
        data = {t: msgspec.to_builtins(p) for t, p in self._tokens.items()}
        Path(path).write_text(json.dumps(data, indent=2))

    async def authenticate(self, token: str) -> Principal:
        for known, principal in self._tokens.items():
            # Constant-time comparison: the token is a secret; the loop visits every entry.
            if hmac.compare_digest(known.encode(), token.encode()):
                return principal
        raise Unauthorized("unknown or expired token; send a valid X-Auth-Token")


def new_token() -> str:
    return secrets.token_urlsafe(24)


def _principal(entry: Any, where: str) -> Principal:
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: expected an object with user, project, roles")
    user, project, roles = entry.get("user"), entry.get("project"), entry.get("roles", [])
    if not isinstance(user, str) or not isinstance(project, str) or not user or not project:
        raise ConfigError(f"{where}: user and project must be non-empty strings")
    if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
        raise ConfigError(f"{where}: roles must be a list of strings")
    return Principal(user, project, tuple(roles))


class KeystoneTokens:
    """Keystone v3 token validation; ``url`` is the Identity v3 endpoint (``.../v3``)."""

    def __init__(
        self,
        url: str,
        *,
        username: str,
        password: str,
        project: str,
        user_domain: str = "default",
        project_domain: str = "default",
        cache_size: int = 10_000,
        cache_ttl: float = 300.0,
        refresh_margin: float = 60.0,
        timeout: float = 10.0,
        verify: ssl.SSLContext | bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if cache_size < 1 or cache_ttl < 0:
            raise ConfigError("cache_size must be >= 1 and cache_ttl >= 0")
        self.url = url.rstrip("/")
        self._login = {
            "auth": {
                "identity": {
                    "methods": ["password"],
                    "password": {
                        "user": {
                            "name": username,
                            "domain": {"id": user_domain},
                            "password": password,
                        }
                    },
                },
                "scope": {"project": {"name": project, "domain": {"id": project_domain}}},
            }
        }
        self.cache_size = cache_size
        self.cache_ttl = cache_ttl
        self.refresh_margin = refresh_margin
        self.clock = clock
        self._http = httpx.AsyncClient(timeout=timeout, verify=verify, trust_env=False)
        # sha256 of the token -> (principal, valid until): no raw user token kept in memory.
        self._cache: OrderedDict[bytes, tuple[Principal, float]] = OrderedDict()
        self._service: tuple[str, float] | None = None
        self._service_lock = asyncio.Lock()
        self.validations = 0  # requests to Keystone (tests and metrics)
        self.service_logins = 0

    async def close(self) -> None:
        await self._http.aclose()

    async def authenticate(self, token: str) -> Principal:
        key = hashlib.sha256(token.encode()).digest()
        now = self.clock()
        hit = self._cache.get(key)
        if hit is not None:
            if hit[1] > now:
                self._cache.move_to_end(key)
                return hit[0]
            del self._cache[key]
        principal, expires = await self._validate(token)
        until = min(expires, now + self.cache_ttl)
        if until > now:
            self._cache[key] = (principal, until)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return principal

    async def _validate(self, token: str) -> tuple[Principal, float]:
        refused: str | None = None
        for _ in range(2):
            service = await self._service_token(refused)
            refused = service
            self.validations += 1
            r = await self._request(
                "GET",
                "/auth/tokens?nocatalog",
                headers={"X-Auth-Token": service, "X-Subject-Token": token},
            )
            if r.status_code != 401:
                break
            # Keystone refused our own token (revoked, or its keys rotated): log in again once.
        if r.status_code in (401, 403):
            raise BackendUnavailable(
                f"Keystone refuses the hub's service credentials ({r.status_code}); "
                "check the service user's password and its role"
            )
        if r.status_code == 404:
            raise Unauthorized("unknown or expired token; send a valid X-Auth-Token")
        body = self._json(r, 200)
        try:
            data = body["token"]
            user = data["user"]["id"]
            roles = tuple(role["name"] for role in data.get("roles", ()))
            expires = _timestamp(data["expires_at"])
            project = data.get("project")
        except (KeyError, TypeError, ValueError) as exc:
            raise BackendUnavailable(f"Keystone answered a token without {exc}") from None
        if not isinstance(project, dict) or not project.get("id"):
            raise Unauthorized("the token is not scoped to a project; ask for a project token")
        return Principal(str(user), str(project["id"]), roles), expires

    async def _service_token(self, refused: str | None) -> str:
        """The current service token, renewed if near expiry or if it is ``refused`` (only
        once however many requests saw it refused at the same time)."""
        async with self._service_lock:
            current = self._service
            if (
                current is not None
                and current[0] != refused
                and current[1] - self.refresh_margin > self.clock()
            ):
                return current[0]
            r = await self._request("POST", "/auth/tokens?nocatalog", json=self._login)
            if r.status_code == 401:
                raise BackendUnavailable(
                    "Keystone refuses the hub's service user (401); check its name, "
                    "domain, password and project"
                )
            body = self._json(r, 201)
            try:
                token = r.headers["x-subject-token"]
                expires = _timestamp(body["token"]["expires_at"])
            except (KeyError, TypeError, ValueError) as exc:
                raise BackendUnavailable(f"Keystone issued a token without {exc}") from None
            self.service_logins += 1
            self._service = (token, expires)
            return token

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return await self._http.request(method, self.url + path, **kwargs)
        except httpx.HTTPError as exc:
            raise BackendUnavailable(f"Keystone at {self.url} is unreachable: {exc!r}") from None

    def _json(self, r: httpx.Response, status: int) -> Any:
        if r.status_code != status:
            raise BackendUnavailable(
                f"Keystone answered {r.status_code} to {r.request.method} "
                f"{r.request.url.path}: {r.text[:200]}"
            )
        try:
            return r.json()
        except ValueError:
            raise BackendUnavailable("Keystone answered something that is not JSON") from None


def _timestamp(text: str) -> float:
    """Keystone's ``2026-11-29T23:50:06.000000Z``."""
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
