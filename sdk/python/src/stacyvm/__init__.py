"""StacyVM's Python client: create sandboxes, run commands in them, move files
in and out, and administer the server.

    import stacyvm

    client = stacyvm.Client()  # STACYVM_URL, STACYVM_API_KEY
    with client.sandbox(image="busybox") as sb:
        print(sb.exec(["sh", "-c", "echo hi"]).stdout)
"""

from .aio import AsyncClient, AsyncExecStream, AsyncFiles, AsyncLogStream, AsyncSandbox
from .client import Client, ExecStream, Files, LogStream, Sandbox
from .errors import (
    Conflict,
    Forbidden,
    ImageNotFound,
    InternalError,
    InvalidRequest,
    NoCapacity,
    NotFound,
    PayloadTooLarge,
    ProviderUnavailable,
    QuotaExceeded,
    ResourceExhausted,
    RateLimited,
    StacyVMError,
    StoreUnavailable,
    Timeout,
    TransportError,
    Unauthenticated,
    Unsupported,
)
from .models import (
    Actor,
    ApiKey,
    ArchiveSummary,
    AuditEvent,
    ExecChunk,
    ExecExit,
    ExecResult,
    Failure,
    FileEntry,
    Image,
    LogLine,
    Page,
    ProviderStatus,
    Quota,
    Readiness,
    SandboxInfo,
    Status,
    StoreStatus,
    Tenant,
    Worker,
)

__version__ = "0.1.0"

__all__ = [
    "Actor",
    "ApiKey",
    "ArchiveSummary",
    "AsyncClient",
    "AsyncExecStream",
    "AsyncFiles",
    "AsyncLogStream",
    "AsyncSandbox",
    "AuditEvent",
    "Client",
    "Conflict",
    "ExecChunk",
    "ExecExit",
    "ExecResult",
    "ExecStream",
    "Failure",
    "FileEntry",
    "Files",
    "Forbidden",
    "Image",
    "ImageNotFound",
    "InternalError",
    "InvalidRequest",
    "LogLine",
    "LogStream",
    "NoCapacity",
    "NotFound",
    "Page",
    "PayloadTooLarge",
    "ProviderStatus",
    "ProviderUnavailable",
    "Quota",
    "QuotaExceeded",
    "ResourceExhausted",
    "RateLimited",
    "Readiness",
    "Sandbox",
    "SandboxInfo",
    "StacyVMError",
    "Status",
    "StoreStatus",
    "StoreUnavailable",
    "Tenant",
    "Timeout",
    "TransportError",
    "Unauthenticated",
    "Unsupported",
    "Worker",
    "__version__",
]
