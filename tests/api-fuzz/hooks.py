"""StacyVM hooks for schemathesis: every non-2xx answer carries the
documented error body, each fixed sandbox id stands for one sandbox per
provider (and, for tenant keys, for another tenant's sandbox too), and raw
bodies are sent and read as bytes."""

from __future__ import annotations

import itertools
import json
import os
import threading
from typing import Dict, Iterator, List

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


def _load_rotation() -> Dict[str, Iterator[str]]:
    raw: Dict[str, List[str]] = json.loads(os.environ.get("SVM_FUZZ_ROTATION") or "{}")
    return {first: itertools.cycle(ids) for first, ids in raw.items()}


_ROTATION = _load_rotation()
_ROTATION_LOCK = threading.Lock()


@schemathesis.hook
def before_call(ctx, case, kwargs):
    """The config pins `{id}` to the first sandbox of each purpose (see
    tests/api-fuzz/prepare.py); here each call takes the next sandbox of
    that purpose, so every operation meets a Docker and a PRoot sandbox,
    and a tenant key also meets a sandbox of another tenant (a 404)."""
    params = case.path_parameters
    if not params:
        return
    current = params.get("id")
    if isinstance(current, str) and current in _ROTATION:
        with _ROTATION_LOCK:
            params["id"] = next(_ROTATION[current])


@schemathesis.serializer("application/x-tar")
def tar_body(ctx, value):
    """Image bodies: whatever bytes were generated, sent as they are (the
    server must refuse anything that is not a safe root filesystem tar)."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8", "surrogatepass")
    if isinstance(value, list) and all(isinstance(b, int) for b in value):
        return bytes(b % 256 for b in value)
    return json.dumps(value).encode()


@schemathesis.deserializer("application/octet-stream")
def raw_bytes(ctx, response):
    """File contents: the document describes raw bodies as binary strings,
    so hand them over as a string with one character per byte (Latin-1
    maps every byte, so no content is refused or altered)."""
    return response.content.decode("latin-1")
