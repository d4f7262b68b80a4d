"""Exceptions to wire Failures and back.

A remote exception crosses as its qualified type name, its message and its traceback (for
logs). keel.errors classes come back as themselves; other types only when the caller
registered them as allowed; everything else arrives as `RemoteError`.
"""

from __future__ import annotations

import traceback as tb
from typing import Any

from keel import errors
from keel.errors import KeelError, RemoteError
from keel.wire import Failure

_PLAIN = (str, int, float, bool, type(None))


def qualified(cls: type[BaseException]) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def to_failure(exc: BaseException, *, with_traceback: bool = True) -> Failure:
    fields: dict[str, Any] = {}
    if isinstance(exc, KeelError):
        fields = {k: v for k, v in vars(exc).items() if k != "message" and isinstance(v, _PLAIN)}
    return Failure(
        type=qualified(type(exc)),
        message=str(exc),
        traceback="".join(tb.format_exception(exc)) if with_traceback else "",
        keel=isinstance(exc, KeelError),
        fields=fields,
    )


def from_failure(
    failure: Failure, allowed: dict[str, type[BaseException]], where: str
) -> BaseException:
    if failure.keel:
        cls = getattr(errors, failure.type.rpartition(".")[2], None)
        if isinstance(cls, type) and issubclass(cls, KeelError):
            exc = cls(failure.message, **failure.fields)
            exc.remote_traceback = failure.traceback  # type: ignore[attr-defined]
            return exc
    allowed_cls = allowed.get(failure.type)
    if allowed_cls is not None:
        try:
            exc2 = allowed_cls(failure.message)
        except Exception:
            pass
        else:
            exc2.remote_traceback = failure.traceback  # type: ignore[attr-defined]
            return exc2
    return RemoteError(
        f"{where} raised {failure.type}: {failure.message}",
        exc_type=failure.type,
        remote_message=failure.message,
        remote_traceback=failure.traceback,
    )
