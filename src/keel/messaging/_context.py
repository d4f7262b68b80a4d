"""The request being handled on this task or thread, for endpoints and nested calls."""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any

from keel.wire import RequestContext

# (server, context, method) of the request this task is handling, if any.
current: ContextVar[tuple[Any, RequestContext, str] | None] = ContextVar(
    "keel_current_request", default=None
)


def current_method() -> str | None:
    """The method being handled here (for the traffic tap), or None outside a handler."""
    found = current.get()
    return found[2] if found else None


def current_context() -> RequestContext | None:
    """The context of the request being handled here, or None outside a handler."""
    found = current.get()
    return found[1] if found else None
