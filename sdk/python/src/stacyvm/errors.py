"""Exceptions raised by the StacyVM client: one class per API error code."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Dict, Mapping, Optional, Type

if TYPE_CHECKING:
    from .models import Template


class StacyVMError(Exception):
    """Base class of every error the client raises.

    Attributes:
        code: the API error code (``not_found``, ``conflict``, …), or
            ``transport`` when the server could not be reached at all.
        message: the server's explanation of what went wrong.
        request_id: the ``x-request-id`` of the failed call, when known; the
            server log holds the details of internal errors under it.
        status: the HTTP status, or ``None`` for transport failures and
            errors reported inside an event stream.
    """

    def __init__(
        self,
        message: str,
        *,
        code: str = "error",
        request_id: Optional[str] = None,
        status: Optional[int] = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id
        self.status = status

    def __str__(self) -> str:
        suffix = f" (request id {self.request_id})" if self.request_id else ""
        return f"{self.code}: {self.message}{suffix}"

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(code={self.code!r}, message={self.message!r}, "
            f"request_id={self.request_id!r}, status={self.status!r})"
        )


class InvalidRequest(StacyVMError):
    """400: malformed JSON, a missing or out-of-range field, a relative path, a NUL byte."""


class Unauthenticated(StacyVMError):
    """401: no key, an unknown key or a revoked key."""


class Forbidden(StacyVMError):
    """403: the key's role may not do this."""


class NotFound(StacyVMError):
    """404: no such object for this tenant."""


class Conflict(StacyVMError):
    """409: the object's state does not allow the call."""


class Unsupported(StacyVMError):
    """409: the sandbox's provider cannot do this (for example pause)."""


class PayloadTooLarge(StacyVMError):
    """413: the body is over the server's configured limit."""


class ImageNotFound(StacyVMError):
    """422: the image or template cannot be resolved."""


class QuotaExceeded(StacyVMError):
    """429: the tenant's quota would be exceeded."""


class ResourceExhausted(Conflict):
    """409: the sandbox ran out of processes (its pids limit), memory or file
    descriptors; the message names which. End some of its processes, or
    destroy it."""


class RateLimited(StacyVMError):
    """429: too many requests; ``retry_after`` (seconds) says when to retry."""

    def __init__(
        self,
        message: str,
        *,
        code: str = "rate_limited",
        request_id: Optional[str] = None,
        status: Optional[int] = None,
        retry_after: Optional[float] = None,
    ) -> None:
        super().__init__(message, code=code, request_id=request_id, status=status)
        self.retry_after = retry_after


class NoCapacity(StacyVMError):
    """503: no worker can take the sandbox now."""


class ProviderUnavailable(StacyVMError):
    """503: no provider can take the sandbox now, or the runtime went away."""


class StoreUnavailable(StacyVMError):
    """503: the server's store is unavailable; retry shortly."""


class Timeout(StacyVMError):
    """504: the operation did not finish in time."""


class InternalError(StacyVMError):
    """500: a server bug; the server log has the details under ``request_id``."""


class TransportError(StacyVMError):
    """The server could not be reached, or the connection broke mid-call."""


class TemplateBuildFailed(StacyVMError):
    """A template build that was waited for failed: ``template`` is the failed
    version, and the message (its ``failure``) names the failing step and
    quotes the end of its output. Nothing of the build is left behind."""

    def __init__(self, template: "Template") -> None:
        failure = template.failure or "the build failed"
        super().__init__(f"template {template.name}:{template.version}: {failure}", code="build_failed")
        self.template = template


ERROR_CLASSES: Dict[str, Type[StacyVMError]] = {
    "invalid_request": InvalidRequest,
    "unauthenticated": Unauthenticated,
    "forbidden": Forbidden,
    "not_found": NotFound,
    "conflict": Conflict,
    "unsupported": Unsupported,
    "payload_too_large": PayloadTooLarge,
    "image_not_found": ImageNotFound,
    "quota_exceeded": QuotaExceeded,
    "sandbox_resource_exhausted": ResourceExhausted,
    "rate_limited": RateLimited,
    "no_capacity": NoCapacity,
    "provider_unavailable": ProviderUnavailable,
    "store_unavailable": StoreUnavailable,
    "timeout": Timeout,
    "internal": InternalError,
}

# When a body carries no recognisable error (a proxy in between, say), the
# status alone still picks the closest class.
_BY_STATUS: Dict[int, str] = {
    400: "invalid_request",
    401: "unauthenticated",
    403: "forbidden",
    404: "not_found",
    405: "invalid_request",
    409: "conflict",
    413: "payload_too_large",
    422: "image_not_found",
    429: "rate_limited",
    500: "internal",
    503: "provider_unavailable",
    504: "timeout",
}


def error_for(
    code: str,
    message: str,
    *,
    request_id: Optional[str] = None,
    status: Optional[int] = None,
    retry_after: Optional[float] = None,
) -> StacyVMError:
    """Builds the exception of the given API error code."""
    cls = ERROR_CLASSES.get(code, StacyVMError)
    if cls is RateLimited:
        return RateLimited(
            message, code=code, request_id=request_id, status=status, retry_after=retry_after
        )
    return cls(message, code=code, request_id=request_id, status=status)


def _retry_after(headers: Mapping[str, str]) -> Optional[float]:
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        return None


def error_from_response(status: int, headers: Mapping[str, str], body: bytes) -> StacyVMError:
    """Turns a non-2xx response into the matching exception."""
    request_id = headers.get("x-request-id")
    code: Optional[str] = None
    message: Optional[str] = None
    try:
        doc = json.loads(body.decode("utf-8")) if body else None
    except (UnicodeDecodeError, ValueError):
        doc = None
    if isinstance(doc, dict) and isinstance(doc.get("error"), dict):
        err = doc["error"]
        if isinstance(err.get("code"), str):
            code = err["code"]
        if isinstance(err.get("message"), str):
            message = err["message"]
        if isinstance(err.get("request_id"), str):
            request_id = err["request_id"]
    if code is None:
        code = _BY_STATUS.get(status, "error")
    if message is None:
        text = body.decode("utf-8", errors="replace").strip()
        message = text[:500] if text else f"HTTP {status}"
    return error_for(
        code, message, request_id=request_id, status=status, retry_after=_retry_after(headers)
    )
