"""Typed records of the StacyVM API: sandboxes, exec results, file entries,
images, tenants, keys, audit events, status."""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Dict, Generic, Iterator, List, Mapping, Optional, TypeVar

T = TypeVar("T")

_FRACTION = re.compile(r"\.(\d+)")


def parse_time(value: Optional[str]) -> Optional[datetime]:
    """Parses an RFC 3339 time as the server writes it (``Z`` suffix, up to
    nanoseconds) into an aware UTC ``datetime``; ``None`` stays ``None``."""
    if value is None:
        return None
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    # datetime.fromisoformat before 3.11 takes exactly 3 or 6 fractional digits.
    text = _FRACTION.sub(lambda m: "." + (m.group(1) + "000000")[:6], text, count=1)
    parsed = datetime.fromisoformat(text)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.astimezone(timezone.utc)


def _time(value: Any) -> datetime:
    parsed = parse_time(value)
    if parsed is None:
        raise ValueError("a required time is missing from the server's answer")
    return parsed


def _opt_str(value: Any) -> Optional[str]:
    return None if value is None else str(value)


def _opt_int(value: Any) -> Optional[int]:
    return None if value is None else int(value)


def _opt_float(value: Any) -> Optional[float]:
    return None if value is None else float(value)


def _str_map(value: Any) -> Dict[str, str]:
    if not isinstance(value, Mapping):
        return {}
    return {str(k): str(v) for k, v in value.items()}


def _b64_or_text(text: str, b64: Any) -> bytes:
    if isinstance(b64, str):
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
class Failure:
    """Why a sandbox failed."""

    code: str
    message: str


@dataclass(frozen=True)
class SandboxInfo:
    """A sandbox as the server last described it."""

    id: str
    tenant_id: str
    state: str
    provider: str
    worker_id: Optional[str]
    image: str
    template: Optional[str]
    cpu: float
    memory_mb: int
    network: str
    labels: Dict[str, str]
    timeout_s: Optional[int]
    workdir: Optional[str]
    created_at: datetime
    started_at: Optional[datetime]
    expires_at: Optional[datetime]
    destroyed_at: Optional[datetime]
    failure: Optional[Failure]

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "SandboxInfo":
        failure = d.get("failure")
        return cls(
            id=str(d["id"]),
            tenant_id=str(d["tenant_id"]),
            state=str(d["state"]),
            provider=str(d.get("provider", "")),
            worker_id=_opt_str(d.get("worker_id")),
            image=str(d.get("image", "")),
            template=_opt_str(d.get("template")),
            cpu=float(d.get("cpu", 0.0)),
            memory_mb=int(d.get("memory_mb", 0)),
            network=str(d.get("network", "none")),
            labels=_str_map(d.get("labels")),
            timeout_s=_opt_int(d.get("timeout_s")),
            workdir=_opt_str(d.get("workdir")),
            created_at=_time(d.get("created_at")),
            started_at=parse_time(d.get("started_at")),
            expires_at=parse_time(d.get("expires_at")),
            destroyed_at=parse_time(d.get("destroyed_at")),
            failure=(
                Failure(code=str(failure.get("code", "")), message=str(failure.get("message", "")))
                if isinstance(failure, Mapping)
                else None
            ),
        )


@dataclass(frozen=True)
class ExecResult:
    """The outcome of a finished command.

    ``stdout``/``stderr`` are text (invalid UTF-8 replaced); ``stdout_bytes``/
    ``stderr_bytes`` are the exact bytes. ``exit_code`` is ``None`` when the
    command was killed by a signal (``signal``), e.g. on timeout.
    """

    exit_code: Optional[int]
    signal: Optional[int]
    stdout: str
    stderr: str
    stdout_bytes: bytes
    stderr_bytes: bytes
    duration_ms: int
    timed_out: bool
    stdout_truncated: bool
    stderr_truncated: bool

    @property
    def ok(self) -> bool:
        """True when the command exited with status 0."""
        return self.exit_code == 0

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "ExecResult":
        stdout = str(d.get("stdout", ""))
        stderr = str(d.get("stderr", ""))
        return cls(
            exit_code=_opt_int(d.get("exit_code")),
            signal=_opt_int(d.get("signal")),
            stdout=stdout,
            stderr=stderr,
            stdout_bytes=_b64_or_text(stdout, d.get("stdout_b64")),
            stderr_bytes=_b64_or_text(stderr, d.get("stderr_b64")),
            duration_ms=int(d.get("duration_ms", 0)),
            timed_out=bool(d.get("timed_out", False)),
            stdout_truncated=bool(d.get("stdout_truncated", False)),
            stderr_truncated=bool(d.get("stderr_truncated", False)),
        )


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
        text = str(d.get("data", ""))
        return cls(stream=stream, data=_b64_or_text(text, d.get("data_b64")), text=text)


@dataclass(frozen=True)
class ExecExit:
    """How a streamed command ended."""

    exit_code: Optional[int]
    signal: Optional[int]
    duration_ms: int
    timed_out: bool

    @property
    def ok(self) -> bool:
        """True when the command exited with status 0."""
        return self.exit_code == 0

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "ExecExit":
        return cls(
            exit_code=_opt_int(d.get("exit_code")),
            signal=_opt_int(d.get("signal")),
            duration_ms=int(d.get("duration_ms", 0)),
            timed_out=bool(d.get("timed_out", False)),
        )


@dataclass(frozen=True)
class FileEntry:
    """A file, directory or symlink inside a sandbox."""

    path: str
    name: str
    type: str
    size: int
    mode: str
    mtime: Optional[datetime]
    symlink_target: Optional[str]

    @property
    def is_dir(self) -> bool:
        return self.type == "dir"

    @property
    def is_file(self) -> bool:
        return self.type == "file"

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "FileEntry":
        return cls(
            path=str(d["path"]),
            name=str(d.get("name", "")),
            type=str(d.get("type", "other")),
            size=int(d.get("size", 0)),
            mode=str(d.get("mode", "")),
            mtime=parse_time(d.get("mtime")),
            symlink_target=_opt_str(d.get("symlink_target")),
        )


@dataclass(frozen=True)
class ArchiveSummary:
    """What unpacking a tar archive into a sandbox wrote."""

    path: str
    files: int
    dirs: int
    symlinks: int
    bytes: int

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "ArchiveSummary":
        return cls(
            path=str(d["path"]),
            files=int(d.get("files", 0)),
            dirs=int(d.get("dirs", 0)),
            symlinks=int(d.get("symlinks", 0)),
            bytes=int(d.get("bytes", 0)),
        )


@dataclass(frozen=True)
class LogLine:
    """A line of a sandbox's log."""

    ts: datetime
    source: str
    message: str

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "LogLine":
        return cls(ts=_time(d.get("ts")), source=str(d.get("source", "")), message=str(d.get("message", "")))


@dataclass(frozen=True)
class Image:
    """A root filesystem in the server's image catalog."""

    name: str
    size: int
    digest: str
    created_at: datetime

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Image":
        return cls(
            name=str(d["name"]),
            size=int(d.get("size", 0)),
            digest=str(d.get("digest", "")),
            created_at=_time(d.get("created_at")),
        )


@dataclass(frozen=True)
class Quota:
    """Per-tenant limits; ``None`` is unlimited."""

    max_sandboxes: Optional[int] = None
    max_cpu: Optional[float] = None
    max_memory_mb: Optional[int] = None
    max_timeout_s: Optional[int] = None
    max_exec_per_minute: Optional[int] = None
    #: Providers the tenant may use; ``None`` is the server's default (every
    #: configured provider that is a security boundary, never ``proot``).
    allowed_providers: Optional[List[str]] = None
    max_concurrent_execs: Optional[int] = None

    def to_json(self) -> Dict[str, Any]:
        return {
            "max_sandboxes": self.max_sandboxes,
            "max_cpu": self.max_cpu,
            "max_memory_mb": self.max_memory_mb,
            "max_timeout_s": self.max_timeout_s,
            "max_exec_per_minute": self.max_exec_per_minute,
            "allowed_providers": (
                None if self.allowed_providers is None else list(self.allowed_providers)
            ),
            "max_concurrent_execs": self.max_concurrent_execs,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Quota":
        return cls(
            max_sandboxes=_opt_int(d.get("max_sandboxes")),
            max_cpu=_opt_float(d.get("max_cpu")),
            max_memory_mb=_opt_int(d.get("max_memory_mb")),
            max_timeout_s=_opt_int(d.get("max_timeout_s")),
            max_exec_per_minute=_opt_int(d.get("max_exec_per_minute")),
            allowed_providers=(
                None
                if d.get("allowed_providers") is None
                else [str(p) for p in d["allowed_providers"]]
            ),
            max_concurrent_execs=_opt_int(d.get("max_concurrent_execs")),
        )


@dataclass(frozen=True)
class Tenant:
    """A tenant and the quota in force for it."""

    id: str
    name: str
    quota: Quota
    created_at: Optional[datetime]

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Tenant":
        quota = d.get("quota")
        return cls(
            id=str(d["id"]),
            name=str(d.get("name", "")),
            quota=Quota.from_json(quota) if isinstance(quota, Mapping) else Quota(),
            created_at=parse_time(d.get("created_at")),
        )


@dataclass(frozen=True)
class ApiKey:
    """An API key. ``key`` (the secret) is only set in the answer to
    ``create_key``: the server shows it that once."""

    id: str
    tenant_id: str
    role: str
    name: str
    created_at: datetime
    revoked_at: Optional[datetime]
    key: Optional[str] = field(default=None, repr=False)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "ApiKey":
        return cls(
            id=str(d["id"]),
            tenant_id=str(d.get("tenant_id", "")),
            role=str(d.get("role", "")),
            name=str(d.get("name", "")),
            created_at=_time(d.get("created_at")),
            revoked_at=parse_time(d.get("revoked_at")),
            key=_opt_str(d.get("key")),
        )


@dataclass(frozen=True)
class Actor:
    """Who made an audited call (both ``None`` when no valid key was given)."""

    key_id: Optional[str]
    role: Optional[str]


@dataclass(frozen=True)
class AuditEvent:
    """One append-only audit record."""

    id: str
    ts: datetime
    tenant_id: Optional[str]
    actor: Actor
    action: str
    target: Optional[str]
    sandbox_id: Optional[str]
    outcome: str
    status: int
    request_id: str
    source_ip: Optional[str]
    detail: Dict[str, Any]

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "AuditEvent":
        actor = d.get("actor") if isinstance(d.get("actor"), Mapping) else {}
        assert isinstance(actor, Mapping)
        detail = d.get("detail")
        return cls(
            id=str(d["id"]),
            ts=_time(d.get("ts")),
            tenant_id=_opt_str(d.get("tenant_id")),
            actor=Actor(key_id=_opt_str(actor.get("key_id")), role=_opt_str(actor.get("role"))),
            action=str(d.get("action", "")),
            target=_opt_str(d.get("target")),
            sandbox_id=_opt_str(d.get("sandbox_id")),
            outcome=str(d.get("outcome", "")),
            status=int(d.get("status", 0)),
            request_id=str(d.get("request_id", "")),
            source_ip=_opt_str(d.get("source_ip")),
            detail=dict(detail) if isinstance(detail, Mapping) else {},
        )


@dataclass(frozen=True)
class Worker:
    """A worker that runs sandboxes."""

    id: str
    state: str
    address: Optional[str]
    providers: List[str]
    labels: Dict[str, str]
    sandboxes: int
    capacity: int
    last_heartbeat: Optional[datetime]

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Worker":
        providers = d.get("providers")
        return cls(
            id=str(d["id"]),
            state=str(d.get("state", "")),
            address=_opt_str(d.get("address")),
            providers=[str(p) for p in providers] if isinstance(providers, list) else [],
            labels=_str_map(d.get("labels")),
            sandboxes=int(d.get("sandboxes", 0)),
            capacity=int(d.get("capacity", 0)),
            last_heartbeat=parse_time(d.get("last_heartbeat")),
        )


@dataclass(frozen=True)
class ProviderStatus:
    """Health of one provider."""

    name: str
    healthy: bool
    detail: str


@dataclass(frozen=True)
class StoreStatus:
    """Health of the server's store."""

    kind: str
    ok: bool
    detail: Optional[str] = None


@dataclass(frozen=True)
class Status:
    """What ``GET /v1/status`` reports. ``sandboxes`` counts sandboxes by state."""

    version: str
    mode: str
    uptime_s: int
    store: StoreStatus
    providers: List[ProviderStatus]
    workers: List[Worker]
    sandboxes: Dict[str, int]

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Status":
        store = d.get("store") if isinstance(d.get("store"), Mapping) else {}
        assert isinstance(store, Mapping)
        providers = d.get("providers") if isinstance(d.get("providers"), list) else []
        workers = d.get("workers") if isinstance(d.get("workers"), list) else []
        counts = d.get("sandboxes") if isinstance(d.get("sandboxes"), Mapping) else {}
        assert isinstance(providers, list) and isinstance(workers, list) and isinstance(counts, Mapping)
        return cls(
            version=str(d.get("version", "")),
            mode=str(d.get("mode", "")),
            uptime_s=int(d.get("uptime_s", 0)),
            store=StoreStatus(
                kind=str(store.get("kind", "")), ok=bool(store.get("ok", False)), detail=_opt_str(store.get("detail"))
            ),
            providers=[
                ProviderStatus(name=str(p.get("name", "")), healthy=bool(p.get("healthy")), detail=str(p.get("detail", "")))
                for p in providers
                if isinstance(p, Mapping)
            ],
            workers=[Worker.from_json(w) for w in workers if isinstance(w, Mapping)],
            sandboxes={str(k): int(v) for k, v in counts.items()},
        )


@dataclass(frozen=True)
class Readiness:
    """What ``GET /readyz`` says: ready, or the reason it is not."""

    ready: bool
    detail: str
