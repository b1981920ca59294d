"""StacyVM checks for schemathesis: every non-2xx answer carries the
documented error body, and refusals that must never be 5xx are flagged."""

from __future__ import annotations

import json

import schemathesis

# The codes of the API contract (API.md, "Errors").
ERROR_CODES = {
    "invalid_request",
    "unauthenticated",
    "forbidden",
    "not_found",
    "conflict",
    "unsupported",
    "payload_too_large",
    "image_not_found",
    "quota_exceeded",
    "sandbox_resource_exhausted",
    "rate_limited",
    "no_capacity",
    "provider_unavailable",
    "timeout",
    "internal",
}


@schemathesis.check
def stacyvm_error_shape(ctx, response, case):
    """A non-2xx body is `{"error": {"code", "message", "request_id"}}`,
    its request id matches the `x-request-id` header, and the code is one
    the contract names."""
    if response.status_code < 300:
        return None
    try:
        body = json.loads(response.content)
    except (ValueError, UnicodeDecodeError) as e:
        raise AssertionError(
            f"{response.status_code} body is not JSON ({e}): {response.content[:200]!r}"
        ) from None
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        raise AssertionError(f"{response.status_code} body has no `error` object: {body!r}")
    for field in ("code", "message", "request_id"):
        if not isinstance(error.get(field), str) or not error[field]:
            raise AssertionError(f"`error.{field}` is missing or not a non-empty string: {body!r}")
    if error["code"] not in ERROR_CODES:
        raise AssertionError(f"undocumented error code {error['code']!r}: {body!r}")
    header = response.headers.get("x-request-id")
    if isinstance(header, list):
        header = header[0] if header else None
    if header != error["request_id"]:
        raise AssertionError(
            f"error.request_id {error['request_id']!r} differs from x-request-id {header!r}"
        )
    return None


@schemathesis.serializer("application/x-tar")
def tar_body(ctx, value):
    """Image bodies: whatever bytes were generated, sent as they are (the
    server must refuse anything that is not a safe root filesystem tar)."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, list) and all(isinstance(b, int) for b in value):
        return bytes(b % 256 for b in value)
    return json.dumps(value).encode()


@schemathesis.deserializer("application/octet-stream")
def raw_bytes(ctx, response):
    """File contents: the document describes raw bodies as arrays of byte
    values (utoipa's rendering of `Vec<u8>`), so hand them over as such."""
    return list(response.content)
