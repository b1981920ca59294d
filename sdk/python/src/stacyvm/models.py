"""Typed records of the StacyVM API: sandboxes, exec results, file entries,
images, templates, tenants, keys, audit events, status.

The API's own shapes are generated from the server's OpenAPI document into
`_models_gen` and re-exported here; this module adds what the API does not
define: pages, the exact bytes of exec output, stream chunks, readiness, and
small conveniences on the generated records."""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Dict, Generic, Iterator, List, Mapping, Optional, Sequence, TypeVar, Union

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
    Template,
    TemplateLog,
    TemplateState,
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
    "Step",
    "StreamChunk",
    "Template",
    "TemplateLog",
    "TemplateState",
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


class Step:
    """The build steps of a template (`build_template`'s ``steps``), run in
    order in the build's sandbox. Each returns the step's JSON."""

    @staticmethod
    def run(cmd: Union[str, Sequence[str]]) -> Dict[str, Any]:
        """Runs a command: an argv, or a string run under ``sh -c``. A
        non-zero exit fails the build with the command's output."""
        argv = ["sh", "-c", cmd] if isinstance(cmd, str) else [str(a) for a in cmd]
        if not argv:
            raise ValueError("a run step must name a program")
        return {"run": argv}

    @staticmethod
    def write(path: str, content: str, mode: Union[int, str, None] = None) -> Dict[str, Any]:
        """Writes a text file (making its parent directories); ``mode`` as
        ``0o755`` or ``"0755"`` (default ``0644``)."""
        step: Dict[str, Any] = {"path": path, "content": content}
        if mode is not None:
            step["mode"] = format(mode, "04o") if isinstance(mode, int) else mode
        return {"write": step}

    @staticmethod
    def upload(path: str, local_dir: Union[str, "os.PathLike[str]"]) -> Dict[str, Any]:
        """Unpacks the local directory ``local_dir``'s contents into ``path``.
        The archive travels inside the build request, which stays under the
        server's JSON body limit (10 MiB by default)."""
        from ._core import tar_of_dir

        with tar_of_dir(local_dir) as tar:
            data = tar.read()
        return {"upload": {"path": path, "tar": base64.b64encode(data).decode("ascii")}}

    @staticmethod
    def env(values: Optional[Mapping[str, str]] = None, **more: str) -> Dict[str, Any]:
        """Sets variables for the later steps and every sandbox of the template."""
        merged = dict(values or {})
        merged.update(more)
        return {"env": merged}

    @staticmethod
    def workdir(path: str) -> Dict[str, Any]:
        """Sets (and makes) the working directory of the later steps and the
        template's sandboxes."""
        return {"workdir": path}
