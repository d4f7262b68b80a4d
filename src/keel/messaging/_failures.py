"""Exceptions to wire Failures and back.

A remote exception crosses as its qualified type name, its message and its traceback (for
logs), plus its ``args`` and an oslo-style ``kwargs`` dict when those are plain values, so
an allowed class is rebuilt as it was raised. keel.errors classes come back as themselves;
other types only when the caller registered them as allowed; everything else arrives as
`RemoteError` (with ``remote_args`` and ``remote_kwargs``).
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


def _plain(value: Any) -> bool:
    return isinstance(value, _PLAIN)


def to_failure(exc: BaseException, *, with_traceback: bool = True) -> Failure:
    fields: dict[str, Any] = {}
    if isinstance(exc, KeelError):
        fields = {k: v for k, v in vars(exc).items() if k != "message" and _plain(v)}
    else:
        if exc.args and all(map(_plain, exc.args)):
            fields["args"] = list(exc.args)
        kwargs = getattr(exc, "kwargs", None)  # oslo's convention (nova's exceptions...)
        if isinstance(kwargs, dict) and all(
            isinstance(k, str) and _plain(v) for k, v in kwargs.items()
        ):
            fields["kwargs"] = dict(kwargs)
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
    args = failure.fields.get("args")
    kwargs = failure.fields.get("kwargs")
    allowed_cls = allowed.get(failure.type)
    if allowed_cls is not None:
        exc2 = _rebuild(allowed_cls, args, kwargs, failure.message)
        if exc2 is not None:
            exc2.remote_traceback = failure.traceback  # type: ignore[attr-defined]
            return exc2
    return RemoteError(
        f"{where} raised {failure.type}: {failure.message}",
        exc_type=failure.type,
        remote_message=failure.message,
        remote_traceback=failure.traceback,
        remote_args=list(args) if isinstance(args, list) else [],
        remote_kwargs=dict(kwargs) if isinstance(kwargs, dict) else {},
    )


def _rebuild(
    cls: type[BaseException], args: Any, kwargs: Any, message: str
) -> BaseException | None:
    """The allowed class as it was raised (args, kwargs), else from its message alone."""
    attempts: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
    if isinstance(args, list) or isinstance(kwargs, dict):
        attempts.append(
            (
                tuple(args) if isinstance(args, list) else (),
                kwargs if isinstance(kwargs, dict) else {},
            )
        )
    attempts.append(((message,), {}))
    for positional, named in attempts:
        try:
            return cls(*positional, **named)
        except Exception:  # a constructor that wants other arguments: try the next way
            continue
    return None
