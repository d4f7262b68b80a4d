"""Typed errors to HTTP statuses and codes, one table for the HTTP API and the WebSocket."""

from __future__ import annotations

from typing import Any

from keel import errors

_STATUS: list[tuple[type[errors.KeelError], int, str]] = [
    (errors.Unauthorized, 401, "unauthorized"),
    (errors.Forbidden, 403, "forbidden"),
    (errors.NotFound, 404, "not_found"),
    (errors.ClaimExpired, 409, "claim_expired"),
    (errors.QuotaExceeded, 409, "quota_exceeded"),
    (errors.TooManyRequests, 429, "too_many_requests"),
    (errors.Conflict, 409, "conflict"),
    (errors.PayloadTooLarge, 413, "too_large"),
    (errors.BadRequest, 400, "bad_request"),
    (errors.ConfigError, 400, "bad_request"),
    (errors.BackendUnavailable, 503, "unavailable"),  # the store is down: retry later
]


def keel_error(exc: errors.KeelError) -> tuple[int, str]:
    """The HTTP status and code of a typed error (500 ``internal`` for an unexpected one)."""
    for cls, status, code in _STATUS:
        if isinstance(exc, cls):
            return status, code
    return (503 if exc.retryable else 500), "internal"


def error_fields(exc: errors.KeelError) -> dict[str, Any]:
    """The structured fields a client can act on: which field, what limit, when to retry."""
    return {
        k: v
        for k in ("field", "limit", "retry_after")
        if isinstance(v := getattr(exc, k, None), str | int)
    }
