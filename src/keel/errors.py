"""One exception hierarchy for all of Keel.

Every error a caller of Keel can see derives from `KeelError`; no aio-pika, redis, kazoo or
socket exception leaks through a public API (backends map them at their boundary). Each class
is one thing a caller can act on, mixes in the builtin whose meaning matches (so
``except TimeoutError`` still catches a `CallTimeout`), and carries structured fields.
`retryable` says whether repeating the same operation later may succeed.
"""

from __future__ import annotations

from typing import Any, ClassVar


class KeelError(Exception):
    """Root of every error Keel raises."""

    retryable: ClassVar[bool] = False

    def __init__(self, message: str, **fields: Any) -> None:
        super().__init__(message)
        self.message = message
        for key, value in fields.items():
            setattr(self, key, value)

    def __str__(self) -> str:
        return self.message


# --- configuration -------------------------------------------------------------------------


class ConfigError(KeelError, ValueError):
    """A URL, option or environment variable is wrong; the message names it and the fix."""


class UnknownScheme(ConfigError):
    """A backend URL uses a scheme no installed backend handles."""


class MissingExtra(ConfigError, ImportError):
    """A backend's client library is not installed; the message names the extra to install."""


class TLSError(ConfigError):
    """A TLS handshake with a backend failed in a way retrying will not mend. Fields:
    ``reason`` (``unknown-ca``: the server's certificate is not signed by our ``ca``;
    ``expired``: the server's certificate has expired; ``hostname``: it names another host;
    ``client-cert-expired``, ``client-cert-rejected``, ``client-cert-required``: the server
    refused our ``cert``; ``not-tls``: the port does not speak TLS), ``backend``, ``server``."""


class CredentialsRejected(ConfigError):
    """The backend refused the user name or password (or token, nkey, ACL user). Fields
    ``backend``, ``server``, ``user``. The message never holds the secret."""


# --- messaging -----------------------------------------------------------------------------


class MessagingError(KeelError):
    """Root of keel.messaging errors."""


class TransportError(MessagingError, ConnectionError):
    """The broker could not be reached or dropped the connection. Retry later."""

    retryable = True


class CallTimeout(MessagingError, TimeoutError):
    """No reply came before the call's deadline. Says which topic, server and method."""

    retryable = True


class RemoteError(MessagingError):
    """The remote endpoint raised an exception the caller did not register as allowed.

    Fields: ``exc_type`` (``module.Class`` of the remote exception), ``remote_message``,
    ``remote_traceback`` (for logs; never shown to end users), ``remote_args`` and
    ``remote_kwargs`` (the exception's plain arguments, ``[]``/``{}`` when none crossed).
    """


class UnknownMethod(MessagingError, AttributeError):
    """The server has no endpoint method of that name in that namespace."""


class InvalidArguments(MessagingError, TypeError):
    """The arguments do not match the remote method's signature."""


class UnsupportedVersion(MessagingError):
    """The server cannot serve the requested interface version (names both versions)."""


class SerializationError(MessagingError, TypeError):
    """A value cannot cross the wire; the message names the offending type."""


class MessageTooLarge(MessagingError, ValueError):
    """An encoded message exceeds the size limit (fields ``size`` and ``limit``)."""


class ServerDraining(MessagingError):
    """The server is draining and did not run the request. Retry on another server."""

    retryable = True


class AntiPatternError(MessagingError):
    """Keel refused a use it knows to break services (field ``pattern`` names it)."""


class MalformedMessage(MessagingError, ValueError):
    """Bytes on a Keel queue are not a Keel envelope of a version this side reads.

    Field ``problem`` says which check failed (``oversize``, ``depth``, ``range``,
    ``syntax``, ``version``, ``shape``; ``internal`` when Keel read the message but failing
    code of its own could not handle it); ``size`` is the body's length in bytes.
    """


# --- coordination --------------------------------------------------------------------------


class CoordinationError(KeelError):
    """Root of keel.coordination errors."""


class LockLost(CoordinationError):
    """The lease behind a held lock expired or its session was lost; stop using the resource."""


class LockTimeout(CoordinationError, TimeoutError):
    """A timed acquire did not get the lock in time."""

    retryable = True


class StaleFence(CoordinationError):
    """A fenced resource refused a write whose fence is not above the last one it accepted."""


class BackendUnavailable(CoordinationError, ConnectionError):
    """The coordination backend cannot be reached. Retry later."""

    retryable = True


class Unsupported(CoordinationError, NotImplementedError):
    """The backend cannot keep this promise (field ``feature``); its characteristics say which."""


class HistoryViolation(CoordinationError, AssertionError):
    """A recorded coordination history breaks the contract (field ``violations`` lists how)."""


class GroupNotFound(CoordinationError, LookupError):
    """The group was never created or has been deleted (field ``group``). Create it first."""


class GroupExists(CoordinationError):
    """The group is already created (field ``group``)."""


class GroupNotEmpty(CoordinationError):
    """The group still has live members (field ``group``); they must leave before it is deleted."""


class NotMember(CoordinationError, LookupError):
    """This member has not joined the group, or its membership ended (fields ``group``,
    ``member``). Join again."""


# --- hub, agent and HTTP-facing errors ------------------------------------------------------


class NotFound(KeelError, LookupError):
    """No such object visible to the caller (also the answer for another tenant's object)."""


class Forbidden(KeelError, PermissionError):
    """The caller is known but may not do this."""


class Unauthorized(KeelError, PermissionError):
    """No valid credentials."""


class Conflict(KeelError):
    """The request conflicts with the object's current state."""


class QuotaExceeded(KeelError):
    """A per-project quota is used up."""


class TooManyRequests(KeelError):
    """The tenant holds its fair share of the hub's work while other tenants wait (field
    ``retry_after``, whole seconds). Nothing of the request was accepted: send it again then."""

    retryable = True


# hub (keel.hub) ----------------------------------------------------------------------


class HubError(KeelError):
    """Root of keel.hub errors that have no more general class above."""


class BadRequest(HubError, ValueError):
    """Input to the hub is invalid; ``field`` names the offending part when there is one."""


class InvalidFilter(BadRequest):
    """A subscription filter is malformed; the message names the part and the fix."""


class PayloadTooLarge(BadRequest):
    """A request body exceeds the limit (fields ``size`` and ``limit``)."""


class ClaimExpired(Conflict):
    """A claim's visibility timeout ran out; its messages are visible again. Claim anew."""


class UnsafeWebhookTarget(BadRequest):
    """A webhook URL points at a loopback, link-local or private address the operator forbids."""


class AgentError(KeelError):
    """Root of keel.agent errors."""


class ProtocolError(AgentError, ValueError):
    """The peer broke the agent protocol (garbage, unknown id, bad handshake)."""


class FrameTooLarge(ProtocolError):
    """A frame exceeds the negotiated maximum (fields ``size`` and ``limit``)."""


class AgentTimeout(AgentError, TimeoutError):
    """An agent request passed its deadline (or the peer stalled mid-frame). Fields
    ``command`` and ``timeout``. The request was cancelled on the agent side when possible."""

    retryable = True


class AgentUnavailable(AgentError, ConnectionError):
    """The channel to the agent could not be opened or was closed. Reconnect and retry."""

    retryable = True


class ChannelUnsupported(AgentError, OSError):
    """This machine's kernel lacks the channel (e.g. AF_VSOCK); field ``channel``."""


class AgentIdentityMismatch(AgentError, PermissionError):
    """The agent's TLS certificate names another instance than the one asked for
    (fields ``expected`` and ``presented``). Never talk to that peer."""


class AgentBusy(AgentError):
    """The agent already runs as many commands for this connection as it allows (field
    ``limit``); the command did not run. Retry when some have finished."""

    retryable = True


class CommandDenied(AgentError, PermissionError):
    """The agent's allow/deny list refuses the command (field ``command``)."""


class UnknownCommand(AgentError, LookupError):
    """The agent has no such plugin or command (field ``command``)."""


class CommandFailed(AgentError):
    """The command ran on the agent and failed (fields ``command``, ``code``, ``detail``)."""


class StreamLimitExceeded(ProtocolError):
    """A streamed result went past its size limit or its flow-control window (field ``limit``)."""


class IntegrityError(AgentError, ValueError):
    """A transferred file's sha256 does not match (fields ``expected`` and ``actual``)."""


class BadArguments(AgentError, TypeError):
    """A command's arguments do not match its declared types (field ``command``)."""
