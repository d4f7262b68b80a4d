"""What every Zaqar request goes through: who is asking (a token or a signed URL), the
``Client-ID`` and ``X-Project-Id`` headers, the queue name, the query and the body.

Order, as Zaqar's hooks run: credentials (401 without; a signed URL that does not verify is
404, as in Zaqar), then ``Client-ID`` (400 when missing or not a UUID), then the project,
then the queue name (400). A token's project is the project: an ``X-Project-Id`` naming
another one is refused (403) rather than silently ignored, as keystonemiddleware would.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from datetime import UTC
from typing import Any, TypeVar

import msgspec
from starlette.requests import Request

from keel.hub._auth import Principal
from keel.hub._core import Hub
from keel.hub._input import MAX_DEPTH, depth
from keel.hub.zaqar import _signed
from keel.hub.zaqar._config import ZaqarConfig
from keel.hub.zaqar._errors import BAD_BODY, ZaqarError, bad_request, not_found

T = TypeVar("T")

QUEUE_NAME = re.compile(r"[a-zA-Z0-9_.\-]{1,64}")
_INT = re.compile(r"-?[0-9]{1,18}")
_TRUE = {"true", "True", "t", "yes", "y", "1", "on"}
_FALSE = {"false", "False", "f", "no", "n", "0", "off"}
SIGNED_USER = "signed-url"


class Caller(msgspec.Struct, frozen=True):
    principal: Principal
    client_id: str | None
    signed: bool
    # A signed URL's expiry (seconds since the epoch): what it opened ends then.
    expires_at: float | None = None

    @property
    def project(self) -> str:
        return self.principal.project


async def caller(
    request: Request, hub: Hub, config: ZaqarConfig, *, client_id: bool = True
) -> Caller:
    headers = request.headers
    query = request.query_params
    signature = headers.get("url-signature")
    signed_in_query = signature is None and "signature" in query and not client_id
    expires_at: float | None = None
    if signature is not None or signed_in_query:
        principal, expires_at = _signed_principal(request, config, from_query=signed_in_query)
    else:
        principal = await hub.authenticate(headers.get("x-auth-token"))
        wanted = headers.get("x-project-id")
        if wanted is not None and wanted != principal.project:
            raise ZaqarError(
                403,
                "Not authorized",
                f"X-Project-Id names project {wanted[:64]!r} but the token is scoped to "
                "another project; send the token's project or none",
            )
    cid = headers.get("client-id")
    if client_id:
        if cid is None:
            raise ZaqarError(400, "Missing header value", "The Client-ID header is required.")
        try:
            # The UUID, not the text (as Zaqar keeps it): uuid.UUID() also takes braces,
            # "urn:uuid:" and Unicode whitespace such as U+0085, which would reach every
            # posted event's zaqarclientid attribute, and one client would be two.
            cid = str(uuid.UUID(cid))
        except ValueError:
            raise ZaqarError(400, "Wrong UUID value", "Malformed hexadecimal UUID.") from None
    return Caller(principal, cid, signature is not None or signed_in_query, expires_at)


def _signed_principal(
    request: Request, config: ZaqarConfig, *, from_query: bool
) -> tuple[Principal, float]:
    """The principal a signed URL grants, and when it expires."""
    if from_query:  # an EventSource cannot send headers: Heat's query_str names
        q = request.query_params
        fields = (q.get("signature"), q.get("expires"), q.get("methods"), q.get("paths"))
        project = q.get("project_id")
    else:
        h = request.headers
        fields = (
            h.get("url-signature"),
            h.get("url-expires"),
            h.get("url-methods"),
            h.get("url-paths"),
        )
        project = h.get("x-project-id")
    signature, expires, methods, paths = fields
    if not project:
        raise ZaqarError(400, "Project-Id Missing", "The header X-PROJECT-ID was missing")
    ok = _signed.allows(
        config.secret_key,
        signature=signature or "",
        paths=(paths or "").split(","),
        methods=(methods or "").split(","),
        project=project,
        expires=expires or "",
        method="GET" if request.method == "HEAD" else request.method,
        path=request.url.path,
    )
    if not ok:
        raise not_found("the signed URL does not grant this request (or it expired)")
    when = _signed.parse_expires(expires or "").replace(tzinfo=UTC).timestamp()
    return Principal(SIGNED_USER, project, ()), when


def queue_name(request: Request) -> str:
    name: str = request.path_params["queue_name"]
    if not QUEUE_NAME.fullmatch(name):
        raise ZaqarError(
            400,
            "Invalid queue identification",
            "The format of the submitted queue name or project id is not valid.",
        )
    return name


def single(request: Request, name: str) -> str | None:
    """The one value of a single-valued parameter; given twice, which would count is a
    guess, so it is refused."""
    values = request.query_params.getlist(name)
    if len(values) > 1:
        raise bad_request(
            f"The {name!r} parameter is given more than once.", title="Invalid parameter"
        )
    return values[0] if values else None


def int_param(request: Request, name: str, default: int | None = None) -> int | None:
    raw = single(request, name)
    if raw is None or raw == "":
        return default
    if not _INT.fullmatch(raw):
        raise bad_request(f"The {name!r} parameter must be an integer.", title="Invalid parameter")
    return int(raw)


def limit_param(request: Request, maximum: int, default: int = 10) -> int:
    """A page or claim size, 1..``maximum`` (Zaqar's wording when it is not)."""
    limit = int_param(request, "limit", default)
    assert limit is not None
    if not 0 < limit <= maximum:
        raise bad_request(f"Limit must be at least 1 and may not be greater than {maximum}.")
    return limit


def bool_param(request: Request, name: str, default: bool = False) -> bool:
    raw = single(request, name)
    if raw is None or raw == "":
        return default
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise bad_request(f"The {name!r} parameter must be a boolean.", title="Invalid parameter")


def list_param(request: Request, name: str) -> list[str] | None:
    """Comma-separated and repeated values (Zaqar parses ``ids=a,b`` and ``ids=a&ids=b``)."""
    values = request.query_params.getlist(name)
    if not values:
        return None
    return [v for raw in values for v in raw.split(",") if v]


async def body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise bad_request(f"Request body is too large. Max size: {limit}")
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "application/x-www-form-urlencoded":
        raise ZaqarError(
            400,
            "Invalid Content-Type",
            "Endpoint does not accept `application/x-www-form-urlencoded` content; currently "
            "supported media type is `application/json`.",
        )
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise bad_request(f"Request body is too large. Max size: {limit}")
        chunks.append(chunk)
    return b"".join(chunks)


class _Duplicate(ValueError):
    pass


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object's fields, refused if one is given twice (which value counts is a guess
    the client and the hub may make differently)."""
    doc = dict(pairs)
    if len(doc) != len(pairs):
        seen: set[str] = set()
        for name, _ in pairs:
            if name in seen:
                raise _Duplicate(f'The field "{name}" is given more than once.')
            seen.add(name)
    return doc


def decode(raw: bytes, kind: type[T]) -> T:
    # The native API's bound: whatever is stored here is handed to every reader, who would
    # have to decode it (msgspec alone stops only far deeper, at its recursion limit).
    if depth(raw) is not None:
        raise bad_request(
            f"Request body nests deeper than {MAX_DEPTH} levels of arrays and objects.",
            BAD_BODY,
        )
    try:
        json.loads(raw, object_pairs_hook=_unique)
    except ValueError as exc:  # JSONDecodeError too: msgspec words it below
        if isinstance(exc, _Duplicate):
            raise bad_request(str(exc), BAD_BODY) from None
    except RecursionError:
        raise bad_request("Request body could not be parsed.", BAD_BODY) from None
    try:
        return msgspec.json.decode(raw, type=kind)
    except msgspec.ValidationError as exc:
        raise bad_request(
            f"The request body is not what this operation takes: {exc}", BAD_BODY
        ) from None
    except (msgspec.DecodeError, RecursionError):
        raise bad_request("Request body could not be parsed.", BAD_BODY) from None


def json_object(raw: bytes) -> dict[str, Any]:
    doc: Any = decode(raw, object) if raw.strip() else {}
    if not isinstance(doc, dict):
        raise bad_request("Document type not supported.", BAD_BODY)
    return doc


def checked_int(doc: dict[str, Any], name: str, default: int, low: int, high: int) -> int:
    value = doc.get(name)
    if value is None:  # absent or null (python-zaqarclient sends null for an unset one)
        value = default
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f'The value of the "{name}" field must be a int.', BAD_BODY)
    if not low <= value <= high:
        raise bad_request(
            f"The {name} may not exceed {high} seconds, and must be at least {low} seconds long."
        )
    return value


def strings(value: Any, name: str) -> Sequence[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise bad_request(f"`{name}` should be a list of strings")
    return value
