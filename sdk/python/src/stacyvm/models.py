"""Typed records of the StacyVM API: sandboxes, exec results, file entries,
images, tenants, keys, audit events, status.

The API's own shapes are generated from the server's OpenAPI document into
`_models_gen` and re-exported here; this module adds what the API does not
define: pages, the exact bytes of exec output, stream chunks, readiness, and
small conveniences on the generated records."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Generic, Iterator, List, Mapping, Optional, TypeVar

from . import _models_gen as gen
from ._models_gen import (
    Actor,
    ApiKey,
    ArchiveSummary,
    AuditEvent,
    ExecResponse,
    ExitStatus,
    ExposedPort,
    Failure,
    FileType,
    Image,
    LogLine,
    Network,
    PoolStatus,
    PortToken,
    Process,
    ProviderStatus,
    Quota,
    Role,
    SandboxInfo,
    SandboxState,
    Status,
    StdinWritten,
    StoreStatus,
    StreamChunk,
    Tenant,
    Volume,
    VolumeMount,
    WhoAmI,
    Worker,
)
from ._wire import parse_time

__all__ = [
    "Actor",
    "ApiKey",
    "ArchiveSummary",
    "AuditEvent",
    "ExecChunk",
    "ExecExit",
    "ExecResponse",
    "ExecResult",
    "ExitStatus",
    "ExposedPort",
    "Failure",
    "FileEntry",
    "FileType",
    "Image",
    "LogLine",
    "Network",
    "Page",
    "PoolStatus",
    "PortToken",
    "Process",
    "ProviderStatus",
    "Quota",
    "Readiness",
    "Role",
    "SandboxInfo",
    "SandboxState",
    "Status",
    "StdinWritten",
    "StoreStatus",
    "StreamChunk",
    "Tenant",
    "Volume",
    "VolumeMount",
    "WhoAmI",
    "Worker",
    "parse_time",
]

T = TypeVar("T")


def _b64_or_text(text: str, b64: Optional[str]) -> bytes:
    # The server sends base64 only where the bytes are not valid UTF-8.
    if b64 is not None:
        return base64.b64decode(b64)
    return text.encode("utf-8")


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of a list; pass ``next_cursor`` as ``cursor`` for the next
    page (``None`` means this was the last)."""

    items: List[T]
    next_cursor: Optional[str] = None

    def __iter__(self) -> Iterator[T]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


@dataclass(frozen=True)
class ExecResult(ExecResponse):
    """The outcome of a finished command.

    ``stdout``/``stderr`` are text (invalid UTF-8 replaced); ``stdout_bytes``/
    ``stderr_bytes`` are the exact bytes. ``exit_code`` is ``None`` when the
    command was killed by a signal (``signal``), e.g. on timeout.
    """

    @property
    def ok(self) -> bool:
        """True when the command exited with status 0."""
        return self.exit_code == 0

    @cached_property
    def stdout_bytes(self) -> bytes:
        return _b64_or_text(self.stdout, self.stdout_b64)

    @cached_property
    def stderr_bytes(self) -> bytes:
        return _b64_or_text(self.stderr, self.stderr_b64)


@dataclass(frozen=True)
class ExecChunk:
    """A piece of a streamed command's output.

    ``stream`` is ``"stdout"`` or ``"stderr"``; ``data`` holds the exact
    bytes and ``text`` their UTF-8 reading (invalid bytes replaced).
    """

    stream: str
    data: bytes
    text: str

    @classmethod
    def from_event(cls, stream: str, d: Mapping[str, Any]) -> "ExecChunk":
        chunk = StreamChunk.from_json(d)
        return cls(stream=stream, data=_b64_or_text(chunk.data, chunk.data_b64), text=chunk.data)


@dataclass(frozen=True)
class ExecExit(ExitStatus):
    """How a streamed command ended."""

    @property
    def ok(self) -> bool:
        """True when the command exited with status 0."""
        return self.exit_code == 0


@dataclass(frozen=True)
class FileEntry(gen.FileEntry):
    """A file, directory or symlink inside a sandbox."""

    @property
    def is_dir(self) -> bool:
        return self.type == FileType.DIR

    @property
    def is_file(self) -> bool:
        return self.type == FileType.FILE


@dataclass(frozen=True)
class Readiness:
    """What ``GET /readyz`` says: ready, or the reason it is not."""

    ready: bool
    detail: str
