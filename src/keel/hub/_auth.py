"""Who is calling: a token becomes a `Principal` (user, project, roles) through an Authenticator.

The protocol is one coroutine, so Keystone token validation (or anything else) plugs in
beside the static token file. An unknown token is `Unauthorized`; the authenticator never
guesses. `StaticTokens` reads its file once at construction: a malformed file is a
`ConfigError` naming the file and the problem, before the hub serves anything.
"""

from __future__ import annotations

import hmac
import json
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import msgspec

from keel.errors import ConfigError, Unauthorized


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
