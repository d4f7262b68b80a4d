"""Zaqar's error answers: ``{"title", "description"}`` JSON with Zaqar's status codes.

Every failure a client can cause answers 4xx in this shape (python-zaqarclient reads
``title`` and ``description`` into its exceptions); a store or Keystone outage is 503 with
Zaqar's "try again" wording; nothing else escapes as a traceback.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable, Mapping

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from keel import errors
from keel._log import event as log_event

log = logging.getLogger("keel.hub.zaqar")

BAD_API = "Invalid API request"
BAD_BODY = "Invalid request body"
NOT_FOUND = "Not found"
CONFLICT = "Resource conflict"
UNAVAILABLE = "Service temporarily unavailable"


class ZaqarError(Exception):
    """An answer with Zaqar's status, title and description."""

    def __init__(
        self,
        status: int,
        title: str,
        description: str = "",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(f"{status} {title}: {description}")
        self.status = status
        self.title = title
        self.description = description
        self.headers = dict(headers or {})


def bad_request(description: str, title: str = BAD_API) -> ZaqarError:
    return ZaqarError(400, title, description)


def not_found(description: str = "") -> ZaqarError:
    return ZaqarError(404, NOT_FOUND, description)


def error_response(exc: ZaqarError) -> Response:
    body = msgspec.json.encode({"title": exc.title, "description": exc.description})
    return Response(body, exc.status, headers=exc.headers, media_type="application/json")


def _from_keel(exc: errors.KeelError) -> ZaqarError:
    if isinstance(exc, errors.Unauthorized):
        return ZaqarError(401, "Unauthorized", exc.message)
    if isinstance(exc, errors.Forbidden):
        return ZaqarError(403, "Not authorized", exc.message)
    if isinstance(exc, errors.NotFound):
        return not_found(exc.message)
    if isinstance(exc, errors.QuotaExceeded):
        return ZaqarError(409, CONFLICT, exc.message)
    if isinstance(exc, errors.Conflict):
        return ZaqarError(409, CONFLICT, exc.message)
    if isinstance(exc, errors.BadRequest | errors.ConfigError):
        return bad_request(exc.message)
    if isinstance(exc, errors.TooManyRequests):
        retry = getattr(exc, "retry_after", 1)
        return ZaqarError(429, "Too many requests", exc.message, {"Retry-After": str(retry)})
    if exc.retryable:
        return ZaqarError(503, UNAVAILABLE, f"{exc.message} Please try again in a few seconds.")
    log_event(log, logging.ERROR, "zaqar.http_error", error=repr(exc))
    return ZaqarError(500, "Internal server error", exc.message)


Handler = Callable[[Request], Awaitable[Response]]


def guard(func: Handler) -> Handler:
    """Turn every Keel or Zaqar error (and any fault) into a Zaqar error answer."""

    @functools.wraps(func)
    async def run(request: Request) -> Response:
        try:
            return await func(request)
        except ZaqarError as exc:
            return error_response(exc)
        except errors.KeelError as exc:
            return error_response(_from_keel(exc))
        except Exception as exc:
            log_event(log, logging.ERROR, "zaqar.unhandled", path=request.url.path, error=repr(exc))
            return error_response(
                ZaqarError(500, "Internal server error", "internal error; the hub logged it")
            )

    return run
