"""The asyncio StacyVM client: `AsyncClient`, the `AsyncSandbox` handle, its
`AsyncFiles`, and streamed exec and log iterators. Mirrors `stacyvm.Client`."""

from __future__ import annotations

import asyncio
import os
from types import TracebackType
from typing import (
    IO,
    Any,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Dict,
    Generator,
    Iterable,
    List,
    Mapping,
    Optional,
    Sequence,
    Type,
    Union,
)

import httpx

from . import _core as core
from .client import PathLike, Source
from .errors import NotFound, StacyVMError, Timeout, TransportError, error_from_response
from .models import (
    ApiKey,
    ArchiveSummary,
    AuditEvent,
    ExecChunk,
    ExecExit,
    ExecResult,
    FileEntry,
    Image,
    LogLine,
    Page,
    Quota,
    Readiness,
    SandboxInfo,
    Status,
    Tenant,
    Worker,
)

AsyncWriteData = Union[bytes, bytearray, memoryview, str, IO[bytes], Iterable[bytes], AsyncIterable[bytes]]
Body = Union[bytes, AsyncIterator[bytes], None]


async def _file_chunks(f: IO[bytes]) -> AsyncIterator[bytes]:
    # File reads block; a thread keeps the event loop free meanwhile.
    while True:
        chunk = await asyncio.to_thread(f.read, core.CHUNK_SIZE)
        if not chunk:
            return
        yield chunk


async def _path_chunks(path: PathLike) -> AsyncIterator[bytes]:
    f = await asyncio.to_thread(open, path, "rb")
    try:
        async for chunk in _file_chunks(f):
            yield chunk
    finally:
        f.close()


async def _iter_chunks(it: Iterable[bytes]) -> AsyncIterator[bytes]:
    for chunk in it:
        yield chunk


def _content(data: AsyncWriteData) -> Union[bytes, AsyncIterator[bytes]]:
    if isinstance(data, str):
        return data.encode("utf-8")
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    if hasattr(data, "read"):
        return _file_chunks(data)  # type: ignore[arg-type]
    if isinstance(data, AsyncIterable):
        return data.__aiter__()
    return _iter_chunks(data)


def _source(source: Union[Source, bytes]) -> Union[bytes, AsyncIterator[bytes]]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    if isinstance(source, (str, os.PathLike)):
        return _path_chunks(source)
    return _file_chunks(source)


class _Transport:
    """Sends `Call`s and turns failures into `StacyVMError`s."""

    def __init__(self, http: httpx.AsyncClient) -> None:
        self.http = http

    async def send(self, call: core.Call, *, content: Body = None, stream: bool = False) -> httpx.Response:
        request = self.http.build_request(
            call.method,
            call.path,
            params=tuple(call.params),
            json=call.json,
            content=content,
            headers=call.headers or None,
            timeout=call.timeout,
        )
        try:
            response = await self.http.send(request, stream=stream)
        except httpx.TimeoutException as e:
            raise Timeout(f"{call.method} {call.path}: no answer in time ({e})", code="timeout") from e
        except httpx.HTTPError as e:
            raise TransportError(f"{call.method} {call.path}: {e}", code="transport") from e
        if response.is_success:
            return response
        try:
            body = await response.aread()
        except httpx.HTTPError:
            body = b""
        finally:
            await response.aclose()
        raise error_from_response(response.status_code, response.headers, body)

    async def json(self, call: core.Call, *, content: Body = None) -> Any:
        response = await self.send(call, content=content)
        if response.status_code == 204 or not response.content:
            return None
        return response.json()


class _EventStream:
    """A server-sent-event response read incrementally."""

    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self._decoder = core.SSEDecoder()
        self._chunks = response.aiter_bytes()
        self._pending: List[core.SSEEvent] = []
        self.closed = False

    async def next_event(self) -> Optional[core.SSEEvent]:
        while not self._pending:
            if self.closed:
                return None
            try:
                chunk = await self._chunks.__anext__()
            except StopAsyncIteration:
                await self.aclose()
                return None
            except httpx.HTTPError as e:
                await self.aclose()
                raise TransportError(f"the event stream broke: {e}", code="transport") from e
            self._pending.extend(self._decoder.feed(chunk))
        return self._pending.pop(0)

    async def aclose(self) -> None:
        if not self.closed:
            self.closed = True
            await self._response.aclose()


class AsyncExecStream:
    """The output of a running command, chunk by chunk (``async for``).
    ``exit`` holds the `ExecExit` once iteration ends; closing early kills
    the command."""

    def __init__(self, response: httpx.Response) -> None:
        self._events = _EventStream(response)
        self.exit: Optional[ExecExit] = None

    def __aiter__(self) -> "AsyncExecStream":
        return self

    async def __anext__(self) -> ExecChunk:
        while True:
            if self.exit is not None:
                raise StopAsyncIteration
            ev = await self._events.next_event()
            if ev is None:
                raise core.stream_ended_early()
            try:
                item = core.exec_item(ev)
            except StacyVMError:
                await self.aclose()
                raise
            if isinstance(item, ExecExit):
                self.exit = item
                await self.aclose()
                raise StopAsyncIteration
            if item is not None:
                return item

    async def wait(self) -> ExecExit:
        """Reads the rest of the output and returns how the command ended."""
        async for _ in self:
            pass
        assert self.exit is not None
        return self.exit

    async def aclose(self) -> None:
        """Ends the call; a command still running is killed."""
        await self._events.aclose()

    async def __aenter__(self) -> "AsyncExecStream":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()


class AsyncLogStream:
    """A sandbox's log lines as they are written; ends when the sandbox does."""

    def __init__(self, response: httpx.Response) -> None:
        self._events = _EventStream(response)

    def __aiter__(self) -> "AsyncLogStream":
        return self

    async def __anext__(self) -> LogLine:
        while True:
            ev = await self._events.next_event()
            if ev is None:
                raise StopAsyncIteration
            try:
                item = core.log_item(ev)
            except StacyVMError:
                await self.aclose()
                raise
            if item is not None:
                return item

    async def aclose(self) -> None:
        await self._events.aclose()

    async def __aenter__(self) -> "AsyncLogStream":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()


class AsyncFiles:
    """The files of one sandbox. Paths are absolute paths inside it."""

    def __init__(self, transport: _Transport, sandbox_id: str) -> None:
        self._t = transport
        self._id = sandbox_id

    async def write(self, path: str, data: AsyncWriteData, *, mode: Union[int, str, None] = None) -> FileEntry:
        """Creates or replaces the file at ``path``. ``data`` is bytes, text,
        a binary file object, or a (sync or async) iterable of byte chunks."""
        call = core.file_write(self._id, path, mode)
        return FileEntry.from_json(await self._t.json(call, content=_content(data)))

    async def upload(self, path: str, source: Source, *, mode: Union[int, str, None] = None) -> FileEntry:
        """Streams a local file (a path or a binary file object) to ``path``."""
        call = core.file_write(self._id, path, mode)
        return FileEntry.from_json(await self._t.json(call, content=_source(source)))

    async def write_archive(self, path: str, data: AsyncWriteData) -> ArchiveSummary:
        """Unpacks a tar archive (bytes, a binary file object, or an iterable
        of byte chunks) into the directory ``path``, made with its parents.
        Files, directories, symlinks and hard links keep their modes; nothing
        lands outside ``path`` (absolute names, ``..``, paths through a symlink
        that leads out, devices and FIFOs are refused: ``InvalidRequest``)."""
        call = core.file_archive_put(self._id, path)
        return ArchiveSummary.from_json(await self._t.json(call, content=_content(data)))

    async def upload_dir(self, local_dir: PathLike, path: str) -> ArchiveSummary:
        """Uploads the local directory ``local_dir``'s contents into ``path``
        in one request, as one tar (see `write_archive`)."""
        # Packing reads the whole tree: off the event loop.
        tar = await asyncio.to_thread(core.tar_of_dir, local_dir)
        with tar:
            return await self.write_archive(path, tar)

    async def read(self, path: str) -> bytes:
        """The whole file; use `download` or `iter_read` for large files."""
        response = await self._t.send(core.file_read(self._id, path))
        return response.content

    async def read_text(self, path: str, encoding: str = "utf-8") -> str:
        return (await self.read(path)).decode(encoding)

    async def iter_read(self, path: str, chunk_size: int = core.CHUNK_SIZE) -> AsyncIterator[bytes]:
        """The file's bytes in chunks, as they arrive (``async for``)."""
        response = await self._t.send(core.file_read(self._id, path), stream=True)
        try:
            async for chunk in response.aiter_bytes(chunk_size):
                yield chunk
        except httpx.HTTPError as e:
            raise TransportError(f"the download of {path} broke: {e}", code="transport") from e
        finally:
            await response.aclose()

    async def download(self, path: str, dest: Union[PathLike, IO[bytes]]) -> int:
        """Streams the file at ``path`` into ``dest`` (a local path or a
        binary file object); returns the number of bytes written."""
        written = 0
        own = isinstance(dest, (str, os.PathLike))
        f: IO[bytes]
        if isinstance(dest, (str, os.PathLike)):
            f = await asyncio.to_thread(open, dest, "wb")
        else:
            f = dest
        try:
            async for chunk in self.iter_read(path):
                await asyncio.to_thread(f.write, chunk)
                written += len(chunk)
        finally:
            if own:
                f.close()
        return written

    async def stat(self, path: str) -> FileEntry:
        return FileEntry.from_json(await self._t.json(core.file_stat(self._id, path)))

    async def exists(self, path: str) -> bool:
        try:
            await self.stat(path)
        except NotFound:
            return False
        return True

    async def list(self, path: str, *, recursive: bool = False) -> List[FileEntry]:
        doc = await self._t.json(core.file_list(self._id, path, recursive))
        return [FileEntry.from_json(e) for e in doc.get("entries", [])]

    async def glob(self, pattern: str) -> List[str]:
        doc = await self._t.json(core.file_glob(self._id, pattern))
        return [str(p) for p in doc.get("paths", [])]

    async def move(self, src: str, dst: str, *, overwrite: bool = False) -> FileEntry:
        return FileEntry.from_json(await self._t.json(core.file_move(self._id, src, dst, overwrite)))

    async def chmod(self, path: str, mode: Union[int, str]) -> FileEntry:
        return FileEntry.from_json(await self._t.json(core.file_chmod(self._id, path, mode)))

    async def mkdir(self, path: str, *, parents: bool = True) -> FileEntry:
        return FileEntry.from_json(await self._t.json(core.file_mkdir(self._id, path, parents)))

    async def delete(self, path: str, *, recursive: bool = False) -> None:
        await self._t.json(core.file_delete(self._id, path, recursive))


class AsyncSandbox:
    """A handle on one sandbox. ``async with`` destroys it on exit."""

    def __init__(self, transport: _Transport, info: SandboxInfo) -> None:
        self._t = transport
        self.info = info
        self.files = AsyncFiles(transport, info.id)

    @property
    def id(self) -> str:
        return self.info.id

    def __repr__(self) -> str:
        return f"AsyncSandbox(id={self.id!r}, state={self.info.state!r})"

    async def refresh(self) -> SandboxInfo:
        self.info = SandboxInfo.from_json(await self._t.json(core.sandbox_get(self.id)))
        return self.info

    async def exec(
        self,
        cmd: Union[str, Sequence[str]],
        *,
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
        stdin: Union[str, bytes, None] = None,
        timeout_s: Optional[float] = None,
    ) -> ExecResult:
        """Runs a command to completion (a string runs under ``sh -c``)."""
        call = core.exec_call(self.id, cmd, env=env, cwd=cwd, stdin=stdin, timeout_s=timeout_s)
        return ExecResult.from_json(await self._t.json(call))

    async def exec_stream(
        self,
        cmd: Union[str, Sequence[str]],
        *,
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
        stdin: Union[str, bytes, None] = None,
        timeout_s: Optional[float] = None,
    ) -> AsyncExecStream:
        """Starts a command and returns its output as it is produced."""
        call = core.exec_stream_call(self.id, cmd, env=env, cwd=cwd, stdin=stdin, timeout_s=timeout_s)
        return AsyncExecStream(await self._t.send(call, stream=True))

    async def destroy(self) -> None:
        await self._t.json(core.sandbox_destroy(self.id))

    async def set_timeout(self, timeout_s: int) -> SandboxInfo:
        self.info = SandboxInfo.from_json(await self._t.json(core.sandbox_set_timeout(self.id, timeout_s)))
        return self.info

    async def pause(self) -> SandboxInfo:
        self.info = SandboxInfo.from_json(await self._t.json(core.sandbox_pause(self.id)))
        return self.info

    async def resume(self) -> SandboxInfo:
        self.info = SandboxInfo.from_json(await self._t.json(core.sandbox_resume(self.id)))
        return self.info

    async def logs(self) -> List[LogLine]:
        doc = await self._t.json(core.sandbox_logs(self.id))
        return [LogLine.from_json(x) for x in doc.get("lines", [])]

    async def follow_logs(self) -> AsyncLogStream:
        return AsyncLogStream(await self._t.send(core.sandbox_logs(self.id, follow=True), stream=True))

    async def __aenter__(self) -> "AsyncSandbox":
        return self

    async def __aexit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        if exc is None:
            await self.destroy()
            return
        # The block's own exception is the one worth seeing; a failed
        # cleanup on top of it must not replace it.
        try:
            await self.destroy()
        except StacyVMError:
            pass


class _PendingSandbox:
    """What ``AsyncClient.sandbox()`` returns: await it for the sandbox, or
    ``async with`` it to have the sandbox destroyed on exit."""

    def __init__(self, create: Awaitable[AsyncSandbox]) -> None:
        self._create = create
        self._sandbox: Optional[AsyncSandbox] = None

    def __await__(self) -> Generator[Any, None, AsyncSandbox]:
        return self._create.__await__()

    async def __aenter__(self) -> AsyncSandbox:
        self._sandbox = await self._create
        return self._sandbox

    async def __aexit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        if self._sandbox is not None:
            await self._sandbox.__aexit__(exc_type, exc, tb)


class AsyncClient:
    """An asyncio StacyVM client; the same calls as `stacyvm.Client`, awaited.

    ``url`` and ``api_key`` default to ``STACYVM_URL`` and ``STACYVM_API_KEY``.
    Use ``async with`` or ``await client.aclose()`` to release connections.
    """

    def __init__(
        self,
        url: Optional[str] = None,
        api_key: Optional[str] = None,
        *,
        timeout: float = core.DEFAULT_TIMEOUT,
        headers: Optional[Mapping[str, str]] = None,
    ) -> None:
        self.url = core.resolve_url(url)
        self._http = httpx.AsyncClient(
            base_url=self.url,
            headers=core.base_headers(core.resolve_api_key(api_key), headers),
            timeout=timeout,
        )
        self._t = _Transport(self._http)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    # sandboxes

    async def create_sandbox(
        self,
        image: Optional[str] = None,
        *,
        template: Optional[str] = None,
        provider: Optional[str] = None,
        cpu: Optional[float] = None,
        memory_mb: Optional[int] = None,
        timeout_s: Optional[int] = None,
        env: Optional[Mapping[str, str]] = None,
        labels: Optional[Mapping[str, str]] = None,
        workdir: Optional[str] = None,
        network: Optional[str] = None,
        idempotency_key: Optional[str] = None,
        request_timeout: Optional[float] = None,
    ) -> AsyncSandbox:
        """Creates a sandbox and returns once it runs commands."""
        call = core.sandbox_create(
            image=image,
            template=template,
            provider=provider,
            cpu=cpu,
            memory_mb=memory_mb,
            timeout_s=timeout_s,
            env=env,
            labels=labels,
            workdir=workdir,
            network=network,
            idempotency_key=idempotency_key,
            request_timeout=request_timeout,
        )
        return AsyncSandbox(self._t, SandboxInfo.from_json(await self._t.json(call)))

    def sandbox(
        self,
        image: Optional[str] = None,
        *,
        template: Optional[str] = None,
        provider: Optional[str] = None,
        cpu: Optional[float] = None,
        memory_mb: Optional[int] = None,
        timeout_s: Optional[int] = None,
        env: Optional[Mapping[str, str]] = None,
        labels: Optional[Mapping[str, str]] = None,
        workdir: Optional[str] = None,
        network: Optional[str] = None,
        idempotency_key: Optional[str] = None,
        request_timeout: Optional[float] = None,
    ) -> _PendingSandbox:
        """``async with client.sandbox(image=...) as sb:`` creates a sandbox
        and destroys it on exit; ``await client.sandbox(...)`` just creates it."""
        return _PendingSandbox(
            self.create_sandbox(
                image,
                template=template,
                provider=provider,
                cpu=cpu,
                memory_mb=memory_mb,
                timeout_s=timeout_s,
                env=env,
                labels=labels,
                workdir=workdir,
                network=network,
                idempotency_key=idempotency_key,
                request_timeout=request_timeout,
            )
        )

    async def get_sandbox(self, sandbox_id: str) -> AsyncSandbox:
        return AsyncSandbox(self._t, SandboxInfo.from_json(await self._t.json(core.sandbox_get(sandbox_id))))

    async def list_sandboxes(
        self,
        *,
        state: Optional[str] = None,
        labels: Optional[Mapping[str, str]] = None,
        limit: Optional[int] = None,
        cursor: Optional[str] = None,
    ) -> Page[SandboxInfo]:
        doc = await self._t.json(core.sandbox_list(state=state, labels=labels, limit=limit, cursor=cursor))
        return Page([SandboxInfo.from_json(s) for s in doc.get("sandboxes", [])], doc.get("next_cursor"))

    async def destroy_sandbox(self, sandbox_id: str) -> None:
        await self._t.json(core.sandbox_destroy(sandbox_id))

    # images

    async def import_image(self, name: str, source: Union[Source, bytes]) -> Image:
        """Imports a root filesystem tar (path, binary file object or bytes), streamed. Admin only."""
        return Image.from_json(await self._t.json(core.image_import(name), content=_source(source)))

    async def list_images(self) -> List[Image]:
        doc = await self._t.json(core.image_list())
        return [Image.from_json(i) for i in doc.get("images", [])]

    async def get_image(self, name: str) -> Image:
        return Image.from_json(await self._t.json(core.image_get(name)))

    async def delete_image(self, name: str) -> None:
        await self._t.json(core.image_delete(name))

    # tenants, quotas, keys

    async def create_tenant(self, name: str) -> Tenant:
        return Tenant.from_json(await self._t.json(core.tenant_create(name)))

    async def list_tenants(self, *, limit: Optional[int] = None, cursor: Optional[str] = None) -> Page[Tenant]:
        doc = await self._t.json(core.tenant_list(limit, cursor))
        return Page([Tenant.from_json(t) for t in doc.get("tenants", [])], doc.get("next_cursor"))

    async def get_quota(self, tenant_id: str) -> Quota:
        return Quota.from_json(await self._t.json(core.quota_get(tenant_id)))

    async def set_quota(self, tenant_id: str, quota: Quota) -> Quota:
        return Quota.from_json(await self._t.json(core.quota_set(tenant_id, quota)))

    async def create_key(self, tenant_id: str, role: str, name: str) -> ApiKey:
        """Issues a key (role ``admin`` on the operator's tenant only,
        ``owner``, ``member`` or ``viewer``); its secret is in ``.key`` of the
        answer, and only there."""
        return ApiKey.from_json(await self._t.json(core.key_create(tenant_id, role, name)))

    async def list_keys(self, *, limit: Optional[int] = None, cursor: Optional[str] = None) -> Page[ApiKey]:
        doc = await self._t.json(core.key_list(limit, cursor))
        return Page([ApiKey.from_json(k) for k in doc.get("keys", [])], doc.get("next_cursor"))

    async def revoke_key(self, key_id: str) -> None:
        await self._t.json(core.key_revoke(key_id))

    # audit, status, workers

    async def list_audit(
        self,
        *,
        sandbox_id: Optional[str] = None,
        action: Optional[str] = None,
        outcome: Optional[str] = None,
        since: Optional[str] = None,
        limit: Optional[int] = None,
        cursor: Optional[str] = None,
    ) -> Page[AuditEvent]:
        call = core.audit_list(
            sandbox_id=sandbox_id, action=action, outcome=outcome, since=since, limit=limit, cursor=cursor
        )
        doc = await self._t.json(call)
        return Page([AuditEvent.from_json(e) for e in doc.get("events", [])], doc.get("next_cursor"))

    async def status(self) -> Status:
        return Status.from_json(await self._t.json(core.status()))

    async def list_workers(self) -> List[Worker]:
        doc = await self._t.json(core.worker_list())
        return [Worker.from_json(w) for w in doc.get("workers", [])]

    async def drain_worker(self, worker_id: str) -> Worker:
        return Worker.from_json(await self._t.json(core.worker_drain(worker_id)))

    async def health(self) -> bool:
        doc = await self._t.json(core.healthz())
        return isinstance(doc, dict) and doc.get("status") == "ok"

    async def ready(self) -> Readiness:
        try:
            doc = await self._t.json(core.readyz())
        except StacyVMError as e:
            if e.status == 503:
                return Readiness(ready=False, detail=e.message)
            raise
        return Readiness(ready=True, detail=str(doc.get("status", "ready")) if isinstance(doc, dict) else "ready")

    async def metrics(self) -> str:
        return (await self._t.send(core.metrics())).text

    async def openapi(self) -> Dict[str, Any]:
        doc = await self._t.json(core.openapi())
        return dict(doc) if isinstance(doc, dict) else {}
