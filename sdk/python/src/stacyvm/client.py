# Generated from aio.py by scripts/gen-python-sync.py; do not edit. Change
# aio.py (or, for what the two clients do differently, _io_async.py and
# _io_sync.py), then run: python3 scripts/gen-python-sync.py
"""The synchronous StacyVM client: `Client`, the `Sandbox` handle, its
`Files`, and streamed exec, log and template build log iterators."""

from __future__ import annotations

import json
import os
import ssl
import tempfile
from types import TracebackType
from typing import IO, Any, Iterator, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Type, Union

import httpx

from . import _core as core
from . import _io_sync as _io
from .errors import NotFound, StacyVMError, Timeout, TransportError, error_from_response
from .models import (
    ApiKey,
    ArchiveSummary,
    AuditEvent,
    ExecChunk,
    ExecExit,
    ExecResult,
    ExposedPort,
    FileEntry,
    Image,
    LogLine,
    Page,
    PortToken,
    Process,
    Quota,
    Readiness,
    SandboxInfo,
    Status,
    StdinWritten,
    Template,
    TemplateLog,
    Tenant,
    Volume,
    VolumeMount,
    WhoAmI,
    Worker,
)

PathLike = core.PathLike
Source = core.Source
WriteData = _io.WriteData
Body = Union[bytes, Iterator[bytes], None]


def _file_chunks(f: IO[bytes]) -> Iterator[bytes]:
    while True:
        chunk = _io.blocking(f.read, core.CHUNK_SIZE)
        if not chunk:
            return
        yield chunk


def _path_chunks(path: PathLike) -> Iterator[bytes]:
    f = _io.blocking(open, path, "rb")
    try:
        for chunk in _file_chunks(f):
            yield chunk
    finally:
        f.close()


def _content(data: WriteData) -> Body:
    """The request body of a write: small buffers as they are, files and
    iterables as a stream of chunks."""
    if isinstance(data, str):
        return data.encode("utf-8")
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    if hasattr(data, "read"):
        return _file_chunks(data)  # type: ignore[arg-type]
    return _io.chunks(data)


def _source(source: Union[Source, bytes]) -> Body:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    if isinstance(source, (str, os.PathLike)):
        return _path_chunks(source)
    return _file_chunks(source)


class _Transport:
    """Sends `Call`s and turns failures into `StacyVMError`s."""

    def __init__(self, http: httpx.Client) -> None:
        self.http = http

    def send(self, call: core.Call, *, content: Body = None, stream: bool = False) -> httpx.Response:
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
            response = self.http.send(request, stream=stream)
        except httpx.TimeoutException as e:
            raise Timeout(f"{call.method} {call.path}: no answer in time ({e})", code="timeout") from e
        except httpx.HTTPError as e:
            raise TransportError(f"{call.method} {call.path}: {e}", code="transport") from e
        if response.is_success:
            return response
        try:
            body = response.read()
        except httpx.HTTPError:
            body = b""
        finally:
            response.close()
        raise error_from_response(response.status_code, response.headers, body)

    def json(self, call: core.Call, *, content: Body = None) -> Any:
        response = self.send(call, content=content)
        if response.status_code == 204 or not response.content:
            return None
        return response.json()


class _EventStream:
    """A server-sent-event response read incrementally; closing it ends
    the call (and, for exec, kills the command)."""

    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self._decoder = core.SSEDecoder()
        self._chunks = response.iter_bytes()
        self._pending: List[core.SSEEvent] = []
        self.closed = False

    def next_event(self) -> Optional[core.SSEEvent]:
        """The next event, or ``None`` at the end of the stream."""
        while not self._pending:
            if self.closed:
                return None
            try:
                chunk = self._chunks.__next__()
            except StopIteration:
                self.close()
                return None
            except httpx.HTTPError as e:
                self.close()
                raise TransportError(f"the event stream broke: {e}", code="transport") from e
            self._pending.extend(self._decoder.feed(chunk))
        return self._pending.pop(0)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._response.close()


class ExecStream:
    """The output of a running command, chunk by chunk.

    Iterate it for `ExecChunk`s; when iteration ends, ``exit`` holds the
    command's `ExecExit`. ``wait()`` skips the remaining output and
    returns it. Closing the stream early (``close()``, or the end of
    its ``with`` block) kills the command. An ``error`` event raises
    the matching `StacyVMError`.
    """

    def __init__(self, response: httpx.Response) -> None:
        self._events = _EventStream(response)
        self.exit: Optional[ExecExit] = None

    def __iter__(self) -> "ExecStream":
        return self

    def __next__(self) -> ExecChunk:
        while True:
            if self.exit is not None:
                raise StopIteration
            ev = self._events.next_event()
            if ev is None:
                raise core.stream_ended_early()
            try:
                item = core.exec_item(ev)
            except StacyVMError:
                self.close()
                raise
            if isinstance(item, ExecExit):
                self.exit = item
                self.close()
                raise StopIteration
            if item is not None:
                return item

    def wait(self) -> ExecExit:
        """Reads the rest of the output and returns how the command ended."""
        for _ in self:
            pass
        assert self.exit is not None
        return self.exit

    def close(self) -> None:
        """Ends the call; a command still running is killed."""
        self._events.close()

    def __enter__(self) -> "ExecStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class LogStream:
    """A sandbox's log lines as they are written; ends when the sandbox does."""

    def __init__(self, response: httpx.Response) -> None:
        self._events = _EventStream(response)

    def __iter__(self) -> "LogStream":
        return self

    def __next__(self) -> LogLine:
        while True:
            ev = self._events.next_event()
            if ev is None:
                raise StopIteration
            try:
                item = core.log_item(ev)
            except StacyVMError:
                self.close()
                raise
            if item is not None:
                return item

    def close(self) -> None:
        self._events.close()

    def __enter__(self) -> "LogStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class TemplateLogStream:
    """A template build's log: the text so far, then (while the build runs)
    the rest as it is written, until the build ends.

    Iterate it for text chunks (`str`); when iteration ends, ``state``
    (`TemplateState`), ``failure`` and ``version`` say how the build ended.
    ``wait()`` skips the rest of the log and returns the state.
    Closing it early leaves the build running.
    """

    def __init__(self, response: Optional[httpx.Response], ended: Optional[TemplateLog] = None) -> None:
        self._events = _EventStream(response) if response is not None else None
        self._pending: List[str] = [ended.log] if ended is not None and ended.log else []
        self.state: Optional[str] = ended.state if ended is not None else None
        self.failure: Optional[str] = ended.failure if ended is not None else None
        self.version: Optional[int] = ended.version if ended is not None else None

    def __iter__(self) -> "TemplateLogStream":
        return self

    def __next__(self) -> str:
        while True:
            if self._pending:
                return self._pending.pop(0)
            if self._events is None or self.state is not None:
                raise StopIteration
            ev = self._events.next_event()
            if ev is None:
                raise core.template_log_ended_early()
            try:
                item = core.template_log_item(ev)
            except StacyVMError:
                self.close()
                raise
            if isinstance(item, dict):
                self.state = str(item.get("state") or "unknown")
                failure = item.get("failure")
                self.failure = str(failure) if failure is not None else None
                version = item.get("version")
                self.version = version if isinstance(version, int) else self.version
                self.close()
                raise StopIteration
            if item:
                return item

    def wait(self) -> str:
        """Reads the rest of the log; returns the build's final state."""
        for _ in self:
            pass
        assert self.state is not None
        return self.state

    def close(self) -> None:
        if self._events is not None:
            self._events.close()

    def __enter__(self) -> "TemplateLogStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class Files:
    """The files of one sandbox. Paths are absolute paths inside it."""

    def __init__(self, transport: _Transport, sandbox_id: str) -> None:
        self._t = transport
        self._id = sandbox_id

    def write(self, path: str, data: WriteData, *, mode: Union[int, str, None] = None) -> FileEntry:
        """Creates or replaces the file at ``path`` (making parent
        directories). ``data`` is bytes, text (UTF-8), a binary file object
        or an iterable of byte chunks (`WriteData`); files and iterables
        are streamed."""
        call = core.file_write(self._id, path, mode)
        return FileEntry.from_json(self._t.json(call, content=_content(data)))

    def upload(self, path: str, source: Source, *, mode: Union[int, str, None] = None) -> FileEntry:
        """Streams a local file (a path or a binary file object) to ``path``."""
        call = core.file_write(self._id, path, mode)
        return FileEntry.from_json(self._t.json(call, content=_source(source)))

    def write_archive(self, path: str, data: WriteData) -> ArchiveSummary:
        """Unpacks a tar archive (bytes, a binary file object, or an iterable
        of byte chunks) into the directory ``path``, made with its parents.
        Files, directories, symlinks and hard links keep their modes; nothing
        lands outside ``path`` (absolute names, ``..``, paths through a symlink
        that leads out, devices and FIFOs are refused: ``InvalidRequest``)."""
        call = core.file_archive_put(self._id, path)
        return ArchiveSummary.from_json(self._t.json(call, content=_content(data)))

    def upload_dir(self, local_dir: PathLike, path: str) -> ArchiveSummary:
        """Uploads the local directory ``local_dir``'s contents into ``path``
        in one request, as one tar (see `write_archive`)."""
        tar = _io.blocking(core.tar_of_dir, local_dir)
        with tar:
            return self.write_archive(path, tar)

    def read(self, path: str) -> bytes:
        """The whole file; use `download` or `iter_read` for large files."""
        response = self._t.send(core.file_read(self._id, path))
        return response.content

    def read_text(self, path: str, encoding: str = "utf-8") -> str:
        data = self.read(path)
        return data.decode(encoding)

    def iter_read(self, path: str, chunk_size: int = core.CHUNK_SIZE) -> Iterator[bytes]:
        """The file's bytes in chunks, as they arrive."""
        for chunk in self._iter(core.file_read(self._id, path), path, chunk_size):
            yield chunk

    def iter_read_archive(self, path: str, chunk_size: int = core.CHUNK_SIZE) -> Iterator[bytes]:
        """``path`` (a directory, or one file) as a tar, in chunks as they
        arrive: a directory's entries named relative to it (so `write_archive`
        of it into a directory gives back the tree); files, directories and
        symlinks (stored, never followed) with their modes and times."""
        for chunk in self._iter(core.file_archive_get(self._id, path), path, chunk_size):
            yield chunk

    def download_dir(self, path: str, local_dir: PathLike) -> int:
        """Downloads the directory ``path`` into ``local_dir`` (made with its
        parents) as one tar, unpacked as untrusted input (see
        `iter_read_archive`; nothing lands outside ``local_dir``, no devices,
        FIFOs or set-id bits); returns how many entries were unpacked. The
        tar is spooled to a temporary file first, never held in memory."""
        spool = _io.blocking(tempfile.TemporaryFile)
        try:
            for chunk in self.iter_read_archive(path):
                _io.blocking(spool.write, chunk)
            _io.blocking(spool.seek, 0)
            return _io.blocking(core.untar_untrusted, spool, local_dir)
        finally:
            spool.close()

    def _iter(self, call: core.Call, path: str, chunk_size: int) -> Iterator[bytes]:
        response = self._t.send(call, stream=True)
        try:
            for chunk in response.iter_bytes(chunk_size):
                yield chunk
        except httpx.HTTPError as e:
            raise TransportError(f"the download of {path} broke: {e}", code="transport") from e
        finally:
            response.close()

    def download(self, path: str, dest: Union[PathLike, IO[bytes]]) -> int:
        """Streams the file at ``path`` into ``dest`` (a local path or a
        binary file object); returns the number of bytes written."""
        written = 0
        own = isinstance(dest, (str, os.PathLike))
        f: IO[bytes]
        if isinstance(dest, (str, os.PathLike)):
            f = _io.blocking(open, dest, "wb")
        else:
            f = dest
        try:
            for chunk in self.iter_read(path):
                _io.blocking(f.write, chunk)
                written += len(chunk)
        finally:
            if own:
                f.close()
        return written

    def stat(self, path: str) -> FileEntry:
        """The entry at ``path`` (a symlink is described, not followed)."""
        return FileEntry.from_json(self._t.json(core.file_stat(self._id, path)))

    def exists(self, path: str) -> bool:
        try:
            self.stat(path)
        except NotFound:
            return False
        return True

    def list(self, path: str, *, recursive: bool = False) -> List[FileEntry]:
        """The entries of a directory, sorted by path."""
        doc = self._t.json(core.file_list(self._id, path, recursive))
        return [FileEntry.from_json(e) for e in doc.get("entries", [])]

    def glob(self, pattern: str) -> List[str]:
        """Paths matching ``pattern``, sorted; ``**`` crosses directories."""
        doc = self._t.json(core.file_glob(self._id, pattern))
        return [str(p) for p in doc.get("paths", [])]

    def move(self, src: str, dst: str, *, overwrite: bool = False) -> FileEntry:
        """Moves ``src`` to ``dst``; an existing ``dst`` is a `Conflict` unless ``overwrite``."""
        return FileEntry.from_json(self._t.json(core.file_move(self._id, src, dst, overwrite)))

    def chmod(self, path: str, mode: Union[int, str]) -> FileEntry:
        """Sets the permission bits (``0o755`` or ``"0755"``)."""
        return FileEntry.from_json(self._t.json(core.file_chmod(self._id, path, mode)))

    def mkdir(self, path: str, *, parents: bool = True) -> FileEntry:
        return FileEntry.from_json(self._t.json(core.file_mkdir(self._id, path, parents)))

    def delete(self, path: str, *, recursive: bool = False) -> None:
        """Deletes a file or directory; a non-empty directory needs ``recursive``."""
        self._t.json(core.file_delete(self._id, path, recursive))


class ProcessOutput:
    """A background process's output, chunk by chunk: from the oldest byte
    the sandbox still keeps, then (when following) live until it exits.

    Iterate it for `ExecChunk`s; when iteration ends, ``exit`` holds the
    process's `ExecExit` if it has exited (a stream that does not follow
    ends where the kept output ends). Closing it leaves the process alone.
    """

    def __init__(self, response: httpx.Response, follow: bool) -> None:
        self._events = _EventStream(response)
        self._follow = follow
        self._done = False
        self.exit: Optional[ExecExit] = None

    def __iter__(self) -> "ProcessOutput":
        return self

    def __next__(self) -> ExecChunk:
        while True:
            if self._done:
                raise StopIteration
            ev = self._events.next_event()
            if ev is None:
                self._done = True
                if self._follow:
                    raise core.process_ended_early()
                raise StopIteration
            try:
                item = core.process_item(ev)
            except StacyVMError:
                self.close()
                raise
            if isinstance(item, ExecExit):
                self.exit = item
                self._done = True
                self.close()
                raise StopIteration
            if item is not None:
                return item

    def wait(self) -> Optional[ExecExit]:
        """Reads the rest of the output; returns how the process ended."""
        for _ in self:
            pass
        return self.exit

    def close(self) -> None:
        self._events.close()

    def __enter__(self) -> "ProcessOutput":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class Processes:
    """The background processes of one sandbox: they run on when the
    client goes away, and their output can be read again later."""

    def __init__(self, transport: _Transport, sandbox_id: str) -> None:
        self._t = transport
        self._id = sandbox_id

    def start(
        self,
        cmd: Union[str, Sequence[str]],
        *,
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
        user: Optional[str] = None,
    ) -> Process:
        """Starts ``cmd`` (an argv list; a string runs under ``sh -c``),
        as ``user`` of the sandbox when given."""
        return Process.from_json(self._t.json(core.process_start(self._id, cmd, env, cwd, user)))

    def list(self) -> List[Process]:
        """Every process the sandbox keeps, running and exited."""
        doc = self._t.json(core.process_list(self._id))
        return [Process.from_json(x) for x in doc.get("processes", [])]

    def get(self, pid: int) -> Process:
        return Process.from_json(self._t.json(core.process_get(self._id, pid)))

    def output(self, pid: int, *, follow: bool = True) -> ProcessOutput:
        """The output from the oldest byte kept, then live until the exit
        (``follow=False``: only what is kept now)."""
        response = self._t.send(core.process_output(self._id, pid, follow), stream=True)
        return ProcessOutput(response, follow)

    def write_stdin(self, pid: int, data: Union[str, bytes], *, close: bool = False) -> StdinWritten:
        """Writes ``data`` to the process's stdin; ``close=True`` closes it afterwards."""
        body = data.encode("utf-8") if isinstance(data, str) else bytes(data)
        doc = self._t.json(core.process_stdin(self._id, pid, close), content=body)
        return StdinWritten.from_json(doc)

    def signal(self, pid: int, signal: str = "TERM") -> Process:
        """Sends TERM, KILL, INT, HUP, USR1, USR2, STOP or CONT to the process's group."""
        return Process.from_json(self._t.json(core.process_signal(self._id, pid, signal)))


class Pty:
    """An interactive terminal in a sandbox, over a WebSocket.

    Iterate it for the bytes the terminal prints (stdout and stderr are one
    stream on a terminal); iteration ends when the command exits, with
    ``exit_code`` set (128 + N when signal N ended it). ``send`` types bytes
    (Ctrl-C is ``b"\\x03"``), ``resize`` resizes. ``close()`` (or the end of
    its ``with`` block) hangs up, which kills the command.
    """

    def __init__(self, conn: _io.Conn) -> None:
        self._conn = conn
        self._parts: List[bytes] = []
        self._done = False
        self.exit_code: Optional[int] = None

    def send(self, data: Union[str, bytes]) -> None:
        """Types ``data`` into the terminal."""
        body = data.encode("utf-8") if isinstance(data, str) else bytes(data)
        if body and not self._done:
            self._conn.write(core.ws_frame(core.WS_BINARY, body))

    def resize(self, cols: int, rows: int) -> None:
        """Resizes the terminal; the command gets SIGWINCH."""
        if not self._done:
            msg = json.dumps({"resize": {"cols": cols, "rows": rows}}).encode()
            self._conn.write(core.ws_frame(core.WS_TEXT, msg))

    def __iter__(self) -> "Pty":
        return self

    def __next__(self) -> bytes:
        while True:
            if self._done:
                raise StopIteration
            head = self._conn.read_exactly(2)
            if len(head) < 2:
                self._done = True
                raise core.pty_ended_early()
            fin, opcode, n = head[0] & 0x80, head[0] & 0x0F, head[1] & 0x7F
            if n == 126:
                n = int.from_bytes(self._conn.read_exactly(2), "big")
            elif n == 127:
                n = int.from_bytes(self._conn.read_exactly(8), "big")
            if n > core.WS_MAX_MESSAGE:
                self._fail()
            mask = self._conn.read_exactly(4) if head[1] & 0x80 else b""
            payload = self._conn.read_exactly(n)
            if len(payload) < n:
                self._done = True
                raise core.pty_ended_early()
            if mask:
                payload = bytes(b ^ mask[i & 3] for i, b in enumerate(payload))
            if opcode == core.WS_PING:
                self._conn.write(core.ws_frame(core.WS_PONG, payload))
                continue
            if opcode == core.WS_CLOSE:
                self._done = True
                try:
                    self._conn.write(core.ws_frame(core.WS_CLOSE, payload[:2]))
                except OSError:
                    pass
                self._conn.close()
                self.exit_code = core.pty_closed(payload)
                raise StopIteration
            if opcode in (core.WS_BINARY, core.WS_TEXT, core.WS_CONT):
                self._parts.append(payload)
                if fin:
                    whole = b"".join(self._parts)
                    self._parts = []
                    if whole:
                        return whole

    def _fail(self) -> None:
        self._done = True
        self._conn.close()
        raise TransportError("the terminal sent a message larger than the SDK accepts", code="transport")

    def wait(self) -> int:
        """Reads (and drops) the rest of the output; returns the exit code."""
        for _ in self:
            pass
        assert self.exit_code is not None
        return self.exit_code

    def output(self) -> Tuple[bytes, int]:
        """Everything the terminal prints until the exit, and the exit code."""
        out = b"".join([chunk for chunk in self])
        assert self.exit_code is not None
        return out, self.exit_code

    def close(self) -> None:
        """Hangs up; a command still running is killed."""
        if not self._done:
            self._done = True
            try:
                self._conn.write(core.ws_frame(core.WS_CLOSE, (1000).to_bytes(2, "big")))
            except OSError:
                pass
        self._conn.close()

    def __enter__(self) -> "Pty":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class Sandbox:
    """A handle on one sandbox. The end of its ``with`` block
    destroys the sandbox."""

    def __init__(self, transport: _Transport, info: SandboxInfo) -> None:
        self._t = transport
        self.info = info
        self.files = Files(transport, info.id)
        self.processes = Processes(transport, info.id)

    @property
    def id(self) -> str:
        return self.info.id

    def __repr__(self) -> str:
        return f"Sandbox(id={self.id!r}, state={self.info.state!r})"

    def refresh(self) -> SandboxInfo:
        """Fetches the sandbox's current description."""
        self.info = SandboxInfo.from_json(self._t.json(core.sandbox_get(self.id)))
        return self.info

    def exec(
        self,
        cmd: Union[str, Sequence[str]],
        *,
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
        stdin: Union[str, bytes, None] = None,
        timeout_s: Optional[float] = None,
        user: Optional[str] = None,
    ) -> ExecResult:
        """Runs a command to completion. ``cmd`` is an argv list (a string
        runs under ``sh -c``). A non-zero exit is a result, not an error.
        ``user`` (a name of the sandbox's ``/etc/passwd``, or a uid) runs it
        as that user."""
        call = core.exec_call(self.id, cmd, env=env, cwd=cwd, stdin=stdin, timeout_s=timeout_s, user=user)
        return ExecResult.from_json(self._t.json(call))

    def exec_stream(
        self,
        cmd: Union[str, Sequence[str]],
        *,
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
        stdin: Union[str, bytes, None] = None,
        timeout_s: Optional[float] = None,
        user: Optional[str] = None,
    ) -> ExecStream:
        """Starts a command and returns its output as it is produced."""
        call = core.exec_stream_call(self.id, cmd, env=env, cwd=cwd, stdin=stdin, timeout_s=timeout_s, user=user)
        return ExecStream(self._t.send(call, stream=True))

    def destroy(self) -> None:
        """Destroys the sandbox (repeating it is harmless)."""
        self._t.json(core.sandbox_destroy(self.id))

    def set_timeout(self, timeout_s: int) -> SandboxInfo:
        """Destroys the sandbox automatically ``timeout_s`` seconds from now."""
        self.info = SandboxInfo.from_json(self._t.json(core.sandbox_set_timeout(self.id, timeout_s)))
        return self.info

    def pause(self) -> SandboxInfo:
        """Pauses the sandbox (`Unsupported` where its provider cannot)."""
        self.info = SandboxInfo.from_json(self._t.json(core.sandbox_pause(self.id)))
        return self.info

    def resume(self) -> SandboxInfo:
        self.info = SandboxInfo.from_json(self._t.json(core.sandbox_resume(self.id)))
        return self.info

    def snapshot(self, image: str) -> Image:
        """Saves the sandbox's filesystem as a new catalog image of its tenant.

        Creates then take ``image`` like any other image. A taken name raises
        `Conflict`; a provider that cannot snapshot raises `Unsupported`.
        """
        return Image.from_json(self._t.json(core.sandbox_snapshot(self.id, image)))

    def expose(self, port: int, public: bool = False) -> ExposedPort:
        """Exposes `port` inside the sandbox through the server; the result's
        ``url`` reaches it."""
        return ExposedPort.from_json(self._t.json(core.sandbox_expose(self.id, port, public)))

    def ports(self) -> List[ExposedPort]:
        """The sandbox's exposed ports."""
        doc = self._t.json(core.sandbox_ports(self.id))
        return [ExposedPort.from_json(x) for x in doc.get("ports", [])]

    def unexpose(self, port: int) -> None:
        self._t.json(core.sandbox_unexpose(self.id, port))

    def port_token(self, port: int, ttl_seconds: int = 3600) -> PortToken:
        """A signed URL token opening a private port (``token``, ``expires_at``, ``url``)."""
        return PortToken.from_json(self._t.json(core.sandbox_port_token(self.id, port, ttl_seconds)))

    def logs(self) -> List[LogLine]:
        """The sandbox's log so far."""
        doc = self._t.json(core.sandbox_logs(self.id))
        return [LogLine.from_json(x) for x in doc.get("lines", [])]

    def follow_logs(self) -> LogStream:
        """The log so far, then new lines as they come, until the sandbox ends."""
        return LogStream(self._t.send(core.sandbox_logs(self.id, follow=True), stream=True))

    def pty(
        self,
        cmd: Union[str, Sequence[str], None] = None,
        *,
        cols: int = 80,
        rows: int = 24,
        env: Optional[Mapping[str, str]] = None,
    ) -> Pty:
        """Opens an interactive terminal running ``cmd`` (default the image's
        shell). ``env`` is applied through ``env K=V … CMD`` in the sandbox.
        ``https://`` servers are reached over ``wss://`` with the system's CA
        store (``SSL_CERT_FILE`` is honoured)."""
        http = self._t.http
        host, port, tls, target = core.pty_target(str(http.base_url), self.id, core.pty_argv(cmd, env), cols, rows)
        context = ssl.create_default_context() if tls else None
        try:
            conn = _io.connect(host, port, context, core.DEFAULT_TIMEOUT)
        except OSError as e:
            raise TransportError(f"cannot reach {host}:{port}: {e}", code="transport") from e
        request, accept = core.ws_handshake(host, port, target, dict(http.headers))
        conn.write(request)
        head = conn.read_until(b"\r\n\r\n", 65536)
        status, headers = core.http_head(head)
        if status == 101 and headers.get("sec-websocket-accept") == accept:
            return Pty(conn)
        length = int(headers.get("content-length", "0") or 0)
        body = conn.read_exactly(min(length, 65536)) if length else b""
        conn.close()
        if status == 101 or status == 0:
            raise TransportError("the server's WebSocket handshake did not match the request", code="transport")
        raise error_from_response(status, httpx.Headers(headers), body)

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        if exc is None:
            self.destroy()
            return
        # The block's own exception is the one worth seeing; a failed
        # cleanup on top of it must not replace it.
        try:
            self.destroy()
        except StacyVMError:
            pass


class Client:
    """The synchronous StacyVM client.

    ``url`` and ``api_key`` default to ``STACYVM_URL`` and
    ``STACYVM_API_KEY``. ``timeout`` (seconds) bounds ordinary calls; exec
    calls wait for the command's own timeout. Leave its ``with``
    block, or call ``close()``, to release its connections.
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
        self._http = httpx.Client(
            base_url=self.url,
            headers=core.base_headers(core.resolve_api_key(api_key), headers),
            timeout=timeout,
        )
        self._t = _Transport(self._http)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # sandboxes

    def create_sandbox(
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
        worker_labels: Optional[Mapping[str, str]] = None,
        workdir: Optional[str] = None,
        network: Optional[str] = None,
        volumes: Optional[Sequence[Union[VolumeMount, Mapping[str, Any]]]] = None,
        allow: Optional[Sequence[str]] = None,
        idempotency_key: Optional[str] = None,
        request_timeout: Optional[float] = None,
    ) -> Sandbox:
        """Creates a sandbox and returns once it runs commands. ``timeout_s``
        is its lifetime; ``request_timeout`` how long to wait for it;
        ``worker_labels`` limits it to workers carrying all those labels;
        ``volumes`` mounts volumes of the caller's tenant (`VolumeMount`s, or
        mappings with ``volume``, ``path`` and ``read_only``); ``allow`` (CIDR
        networks and host names) gives it outbound access to those
        destinations only."""
        call = core.sandbox_create(
            image=image,
            template=template,
            provider=provider,
            cpu=cpu,
            memory_mb=memory_mb,
            timeout_s=timeout_s,
            env=env,
            labels=labels,
            worker_labels=worker_labels,
            workdir=workdir,
            network=network,
            volumes=volumes,
            allow=allow,
            idempotency_key=idempotency_key,
            request_timeout=request_timeout,
        )
        return Sandbox(self._t, SandboxInfo.from_json(self._t.json(call)))

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
        worker_labels: Optional[Mapping[str, str]] = None,
        workdir: Optional[str] = None,
        network: Optional[str] = None,
        volumes: Optional[Sequence[Union[VolumeMount, Mapping[str, Any]]]] = None,
        allow: Optional[Sequence[str]] = None,
        idempotency_key: Optional[str] = None,
        request_timeout: Optional[float] = None,
    ) -> _io.Pending[Sandbox]:
        """Like `create_sandbox`; meant for ``with client.sandbox(...) as
        sb:``, which destroys the sandbox on exit (``client.sandbox(...)``
        alone just creates it)."""
        return _io.pending(
            self.create_sandbox(
                image,
                template=template,
                provider=provider,
                cpu=cpu,
                memory_mb=memory_mb,
                timeout_s=timeout_s,
                env=env,
                labels=labels,
                worker_labels=worker_labels,
                workdir=workdir,
                network=network,
                volumes=volumes,
                allow=allow,
                idempotency_key=idempotency_key,
                request_timeout=request_timeout,
            )
        )

    def get_sandbox(self, sandbox_id: str) -> Sandbox:
        """A handle on an existing sandbox."""
        return Sandbox(self._t, SandboxInfo.from_json(self._t.json(core.sandbox_get(sandbox_id))))

    def list_sandboxes(
        self,
        *,
        state: Optional[str] = None,
        labels: Optional[Mapping[str, str]] = None,
        limit: Optional[int] = None,
        cursor: Optional[str] = None,
    ) -> Page[SandboxInfo]:
        """One page of the caller's sandboxes, optionally by state and labels."""
        doc = self._t.json(core.sandbox_list(state=state, labels=labels, limit=limit, cursor=cursor))
        return Page([SandboxInfo.from_json(s) for s in doc.get("sandboxes", [])], doc.get("next_cursor"))

    def destroy_sandbox(self, sandbox_id: str) -> None:
        self._t.json(core.sandbox_destroy(sandbox_id))

    # images

    def import_image(self, name: str, source: Union[Source, bytes]) -> Image:
        """Imports a root filesystem tar (a path, a binary file object or
        bytes) into the catalog as ``name``, streamed. Admin only."""
        return Image.from_json(self._t.json(core.image_import(name), content=_source(source)))

    def list_images(self) -> List[Image]:
        doc = self._t.json(core.image_list())
        return [Image.from_json(i) for i in doc.get("images", [])]

    def get_image(self, name: str) -> Image:
        return Image.from_json(self._t.json(core.image_get(name)))

    def delete_image(self, name: str) -> None:
        self._t.json(core.image_delete(name))

    # templates

    def build_template(
        self,
        name: str,
        base: str,
        steps: Sequence[Mapping[str, Any]] = (),
        *,
        cpu: Optional[float] = None,
        memory_mb: Optional[int] = None,
        network: Optional[str] = None,
        env: Optional[Mapping[str, str]] = None,
        workdir: Optional[str] = None,
        start: Union[str, Sequence[str], None] = None,
        ready: Union[str, Sequence[str], None] = None,
        provider: Optional[str] = None,
        timeout_s: Optional[int] = None,
        wait: bool = False,
        on_log: Optional[Callable[[str], Any]] = None,
    ) -> Template:
        """Builds a new version of the template ``name`` of the caller's
        tenant from ``base`` (a catalog image, or a visible template ``name``
        or ``name:version``) by running ``steps`` (see `Step`) in a sandbox.

        ``cpu``, ``memory_mb``, ``env``, ``workdir``, ``start`` (run in the
        background in every sandbox of the template) and ``ready`` (a create
        returns once it exits 0) are the template's create defaults;
        ``network`` and ``provider`` apply to the build only. Returns the
        new version, ``building``; with ``wait``, follows the build to its
        end (handing each piece of its log to ``on_log``) and returns the
        ready version, or raises `TemplateBuildFailed`."""
        call = core.template_build(
            name=name,
            base=base,
            steps=steps,
            cpu=cpu,
            memory_mb=memory_mb,
            network=network,
            env=env,
            workdir=workdir,
            start=start,
            ready=ready,
            provider=provider,
            timeout_s=timeout_s,
        )
        template = Template.from_json(self._t.json(call))
        if not wait:
            return template
        return self.wait_template(name, version=template.version, on_log=on_log)

    def wait_template(
        self,
        name: str,
        *,
        version: Optional[int] = None,
        on_log: Optional[Callable[[str], Any]] = None,
    ) -> Template:
        """Follows the build of ``version`` (default the newest) to its end,
        handing each piece of its log to ``on_log``; returns the ready
        version, or raises `TemplateBuildFailed` with the failing step's
        output."""
        log = self.template_logs(name, version=version)
        with log:
            for chunk in log:
                if on_log is not None:
                    on_log(chunk)
        ended = log.version if log.version is not None else version
        return core.template_outcome(self.get_template(name, version=ended))

    def template_logs(self, name: str, *, version: Optional[int] = None) -> TemplateLogStream:
        """The build log of ``version`` (default the newest): followed while
        the build runs, whole once it has ended."""
        response = self._t.send(core.template_logs(name, version), stream=True)
        if core.is_event_stream(response):
            return TemplateLogStream(response)
        try:
            body = response.read()
        except httpx.HTTPError as e:
            raise TransportError(f"the build log of {name} broke: {e}", code="transport") from e
        finally:
            response.close()
        return TemplateLogStream(None, TemplateLog.from_json(json.loads(body)))

    def list_templates(self) -> List[Template]:
        """The newest version of every template the caller sees: its tenant's
        and the operator's (the public catalog)."""
        doc = self._t.json(core.template_list())
        return [Template.from_json(t) for t in doc.get("templates", [])]

    def get_template(self, name: str, *, version: Optional[int] = None) -> Template:
        """The newest version of ``name`` (whatever its state), or ``version``."""
        return Template.from_json(self._t.json(core.template_get(name, version)))

    def list_template_versions(self, name: str) -> List[Template]:
        """Every version of ``name``, oldest first."""
        doc = self._t.json(core.template_versions(name))
        return [Template.from_json(t) for t in doc.get("templates", [])]

    def delete_template(self, name: str) -> None:
        """Deletes every version of the caller's tenant's template ``name``;
        sandboxes running from it keep running. The operator's templates
        are `Forbidden` to other tenants."""
        self._t.json(core.template_delete(name))

    # volumes

    def create_volume(self, name: str, size_mb: int) -> Volume:
        """Creates a volume of the caller's tenant: a filesystem of ``size_mb``
        MiB (at least 8) that outlives the sandboxes it is mounted into
        (``client.sandbox(image, volumes=[VolumeMount(name, "/data")])``)."""
        return Volume.from_json(self._t.json(core.volume_create(name, size_mb)))

    def list_volumes(self) -> List[Volume]:
        doc = self._t.json(core.volume_list())
        return [Volume.from_json(v) for v in doc.get("volumes", [])]

    def get_volume(self, name: str) -> Volume:
        return Volume.from_json(self._t.json(core.volume_get(name)))

    def delete_volume(self, name: str) -> None:
        """Deletes a volume and its data; `Conflict` while a live sandbox mounts it."""
        self._t.json(core.volume_delete(name))

    # tenants, quotas, keys

    def create_tenant(self, name: str) -> Tenant:
        return Tenant.from_json(self._t.json(core.tenant_create(name)))

    def list_tenants(self, *, limit: Optional[int] = None, cursor: Optional[str] = None) -> Page[Tenant]:
        doc = self._t.json(core.tenant_list(limit, cursor))
        return Page([Tenant.from_json(t) for t in doc.get("tenants", [])], doc.get("next_cursor"))

    def get_quota(self, tenant_id: str) -> Quota:
        return Quota.from_json(self._t.json(core.quota_get(tenant_id)))

    def set_quota(self, tenant_id: str, quota: Quota) -> Quota:
        """Replaces the tenant's quota (``None`` fields are unlimited); returns the quota in force."""
        return Quota.from_json(self._t.json(core.quota_set(tenant_id, quota)))

    def create_key(self, tenant_id: str, role: str, name: str) -> ApiKey:
        """Issues a key (role ``admin`` on the operator's tenant only,
        ``owner``, ``member`` or ``viewer``); its secret is in ``.key`` of the
        answer, and only there."""
        return ApiKey.from_json(self._t.json(core.key_create(tenant_id, role, name)))

    def list_keys(self, *, limit: Optional[int] = None, cursor: Optional[str] = None) -> Page[ApiKey]:
        doc = self._t.json(core.key_list(limit, cursor))
        return Page([ApiKey.from_json(k) for k in doc.get("keys", [])], doc.get("next_cursor"))

    def revoke_key(self, key_id: str) -> None:
        self._t.json(core.key_revoke(key_id))

    # audit, status, workers

    def list_audit(
        self,
        *,
        sandbox_id: Optional[str] = None,
        action: Optional[str] = None,
        outcome: Optional[str] = None,
        since: Optional[str] = None,
        limit: Optional[int] = None,
        cursor: Optional[str] = None,
    ) -> Page[AuditEvent]:
        """One page of audit events; ``since`` is an RFC 3339 time."""
        call = core.audit_list(
            sandbox_id=sandbox_id, action=action, outcome=outcome, since=since, limit=limit, cursor=cursor
        )
        doc = self._t.json(call)
        return Page([AuditEvent.from_json(e) for e in doc.get("events", [])], doc.get("next_cursor"))

    def whoami(self) -> WhoAmI:
        """The key this client calls with: its id, tenant and role."""
        return WhoAmI.from_json(self._t.json(core.whoami()))

    def status(self) -> Status:
        return Status.from_json(self._t.json(core.status()))

    def list_workers(self) -> List[Worker]:
        doc = self._t.json(core.worker_list())
        return [Worker.from_json(w) for w in doc.get("workers", [])]

    def drain_worker(self, worker_id: str) -> Worker:
        """Stops new sandboxes going to the worker; it keeps the ones it has."""
        return Worker.from_json(self._t.json(core.worker_drain(worker_id)))

    def health(self) -> bool:
        """True while the server serves (`/healthz`)."""
        doc = self._t.json(core.healthz())
        return isinstance(doc, dict) and doc.get("status") == "ok"

    def ready(self) -> Readiness:
        """Whether the store and at least one provider are usable (`/readyz`)."""
        try:
            doc = self._t.json(core.readyz())
        except StacyVMError as e:
            if e.status == 503:
                return Readiness(ready=False, detail=e.message)
            raise
        return Readiness(ready=True, detail=str(doc.get("status", "ready")) if isinstance(doc, dict) else "ready")

    def metrics(self) -> str:
        """The Prometheus metrics text."""
        response = self._t.send(core.metrics())
        return response.text

    def openapi(self) -> Dict[str, Any]:
        """The server's OpenAPI document."""
        doc = self._t.json(core.openapi())
        return dict(doc) if isinstance(doc, dict) else {}
