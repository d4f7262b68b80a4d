"""Which etcd client errors are retryable: a fault of gRPC's own core is, etcd's own are not.

Seen in tests/topology/test_coordination_node_loss.py[etcd-cluster]: a member SIGKILLed
under load ended one in-flight call with INTERNAL "Internal error from Core", which came out
as a plain CoordinationError instead of the retryable BackendUnavailable.
"""

import aetcd.exceptions

from keel.coordination.backends.etcd import _not_ready


def test_a_grpc_core_fault_is_retryable() -> None:
    assert _not_ready(aetcd.exceptions.InternalError("Internal error from Core"))


def test_an_internal_error_from_etcd_is_not() -> None:
    assert not _not_ready(aetcd.exceptions.InternalError("etcdserver: corrupt cluster"))


# An independent attack on the mapping above (stop 23): every status etcd or gRPC uses for
# "not now" must be retryable whichever way it arrives -- as the stubs' raw AioRpcError, or
# wrapped by aetcd's own client (its watch and connect paths wrap with _handle_exception) --
# and refusals of the caller's rights must stay non-retryable.

import pytest  # noqa: E402
from grpc import StatusCode  # noqa: E402
from grpc.aio import AioRpcError, Metadata  # noqa: E402

from keel.coordination.backends.base import map_errors  # noqa: E402
from keel.errors import BackendUnavailable, CoordinationError  # noqa: E402

_RETRYABLE = [
    (StatusCode.UNAVAILABLE, "etcdserver: leader changed"),
    (StatusCode.UNAVAILABLE, "etcdserver: no leader"),
    (StatusCode.UNAVAILABLE, "etcdserver: request timed out"),
    (StatusCode.UNAVAILABLE, "failed to connect to all addresses"),
    (StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"),
    (StatusCode.RESOURCE_EXHAUSTED, "etcdserver: too many requests"),
    (StatusCode.INTERNAL, "Internal error from Core"),
    (StatusCode.UNKNOWN, "etcdserver: leader changed"),
]
_REFUSED = [
    (StatusCode.PERMISSION_DENIED, "etcdserver: permission denied"),
    (StatusCode.INVALID_ARGUMENT, "etcdserver: authentication failed, invalid user ID or password"),
    (StatusCode.FAILED_PRECONDITION, "etcdserver: user name not found"),
    (StatusCode.INTERNAL, "etcdserver: corrupt cluster"),
]


def _rpc_error(code: StatusCode, details: str) -> AioRpcError:
    return AioRpcError(code, Metadata(), Metadata(), details=details)


def _wrapped(code: StatusCode, details: str) -> BaseException:
    """The exception aetcd's client raises for the same reply."""
    try:
        aetcd.exceptions._handle_exception(_rpc_error(code, details))
    except Exception as exc:  # whatever aetcd makes of it
        return exc
    raise AssertionError("aetcd raised nothing")


def _mapped(exc: BaseException) -> BaseException:
    try:
        with map_errors(
            (aetcd.exceptions.ConnectionFailedError,),
            backend="etcd",
            url="etcd://127.0.0.1:1",
            not_ready=_not_ready,
        ):
            raise exc
    except Exception as out:
        return out
    raise AssertionError("map_errors swallowed the error")


@pytest.mark.parametrize("wrap", [_rpc_error, _wrapped], ids=["raw", "aetcd"])
@pytest.mark.parametrize(("code", "details"), _RETRYABLE)
def test_not_now_is_retryable_raw_or_wrapped(wrap, code, details) -> None:  # type: ignore[no-untyped-def]
    assert isinstance(_mapped(wrap(code, details)), BackendUnavailable)


@pytest.mark.parametrize("wrap", [_rpc_error, _wrapped], ids=["raw", "aetcd"])
@pytest.mark.parametrize(("code", "details"), _REFUSED)
def test_refusals_stay_typed_and_not_retryable(wrap, code, details) -> None:  # type: ignore[no-untyped-def]
    out = _mapped(wrap(code, details))
    assert isinstance(out, CoordinationError)
    assert not isinstance(out, BackendUnavailable)
    assert details in str(out)  # says which refusal
