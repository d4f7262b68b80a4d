"""Keel's errors as oslo.messaging callers expect them, in one place.

* `CallTimeout` (deadline or call-monitor window) -> ``MessagingTimeout``.
* `TransportError` once the ``retry`` budget is spent -> ``MessageDeliveryFailure``.
* An exception raised by the remote method (an oslo or a Keel server) -> what oslo's own
  drivers give: oslo's ``deserialize_remote_exception`` with the caller's
  ``allowed_remote_exmods``, so an allowed class comes back as itself (a ``*_Remote``
  subclass) and anything else as ``oslo_messaging.RemoteError``. keel.errors classes count
  as module ``keel.errors``.
* Anything else Keel raised locally (``MessageTooLarge``, ``SerializationError``,
  ``ConfigError``...) is raised as it is: each is a ``ValueError`` or ``TypeError``, as
  oslo's JSON encoding would have raised.
"""

from __future__ import annotations

from typing import Any

from oslo_messaging import exceptions as oslo_exceptions
from oslo_messaging._drivers import common as oslo_common
from oslo_serialization import jsonutils

from keel.errors import CallTimeout, KeelError, RemoteError

_REMOTE = oslo_common._REMOTE_POSTFIX  # "_Remote"


def _strip(name: str) -> str:
    return name[: -len(_REMOTE)] if name.endswith(_REMOTE) else name


def remote_to_oslo(exc: BaseException, allowed_remote_exmods: list[str]) -> BaseException | None:
    """The exception an oslo caller sees for a remote failure; None if ``exc`` is local."""
    if isinstance(exc, RemoteError):
        module, _, name = str(getattr(exc, "exc_type", "")).rpartition(".")
        data: dict[str, Any] = {
            "class": _strip(name),
            "module": _strip(module),
            "message": getattr(exc, "remote_message", str(exc)),
            "tb": [getattr(exc, "remote_traceback", "")],
            "args": getattr(exc, "remote_args", []),
            "kwargs": getattr(exc, "remote_kwargs", {}),
        }
    elif isinstance(exc, KeelError) and hasattr(exc, "remote_traceback"):
        # A keel.errors class raised on the server (UnknownMethod, InvalidArguments, ...).
        data = {
            "class": type(exc).__name__,
            "module": "keel.errors",
            "message": str(exc),
            "tb": [exc.remote_traceback],
            "args": [str(exc)],
            "kwargs": {},
        }
    else:
        return None
    found: BaseException = oslo_common.deserialize_remote_exception(
        jsonutils.dumps(data), allowed_remote_exmods
    )
    return found


def local_to_oslo(exc: BaseException) -> BaseException:
    if isinstance(exc, CallTimeout):
        timeout: BaseException = oslo_exceptions.MessagingTimeout(str(exc))
        return timeout
    return exc


def delivery_failure(exc: BaseException, attempts: int) -> BaseException:
    failure: BaseException = oslo_exceptions.MessageDeliveryFailure(
        f"gave up after {attempts} attempt(s): {exc}"
    )
    return failure
