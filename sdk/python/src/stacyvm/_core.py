"""What the sync and async clients share: configuration, the description of
every API call, the incremental server-sent-events decoder and the reading
of event streams."""

from __future__ import annotations

import os
import tarfile
import tempfile
from dataclasses import dataclass, field
from typing import IO, Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union
from urllib.parse import quote

import httpx

from .errors import ProviderUnavailable, TemplateBuildFailed, error_for
from .models import ExecChunk, ExecExit, LogLine, Quota, Template, TemplateState, VolumeMount

DEFAULT_URL = "http://127.0.0.1:7070"
DEFAULT_TIMEOUT = 60.0
# Uploads and downloads move in pieces of this size, so a file is never held
# whole in memory.
CHUNK_SIZE = 1024 * 1024
# The server's default exec timeout, when the caller gives none.
DEFAULT_EXEC_TIMEOUT_S = 60.0
# Extra time the HTTP call waits beyond the command's own timeout, so the
# server reports a timed-out command rather than the client giving up first.
EXEC_GRACE_S = 30.0

ParamList = List[Tuple[str, str]]

#: A local path.
PathLike = Union[str, "os.PathLike[str]"]
#: A local file to upload: its path, or a binary file object.
Source = Union[PathLike, IO[bytes]]


def resolve_url(url: Optional[str]) -> str:
    """The server's base URL: the argument, else ``STACYVM_URL``, else the default."""
    base = url or os.environ.get("STACYVM_URL") or DEFAULT_URL
    return base.rstrip("/")


def resolve_api_key(api_key: Optional[str]) -> Optional[str]:
    """The API key: the argument, else ``STACYVM_API_KEY`` (``None`` when neither is set)."""
    return api_key or os.environ.get("STACYVM_API_KEY") or None


def base_headers(api_key: Optional[str], extra: Optional[Mapping[str, str]]) -> Dict[str, str]:
    headers = {"user-agent": "stacyvm-python/0.1.0", "accept": "application/json"}
    if api_key:
        headers["authorization"] = f"Bearer {api_key}"
    if extra:
        headers.update(extra)
    return headers


def seg(value: str) -> str:
    """One path segment, escaped (an id cannot smuggle in a `/`)."""
    return quote(value, safe="")


def mode_str(mode: Union[int, str, None]) -> Optional[str]:
    """File modes go over the wire as octal strings; ``0o755`` becomes ``"0755"``."""
    if mode is None:
        return None
    if isinstance(mode, int):
        if mode < 0 or mode > 0o7777:
            raise ValueError(f"mode {mode:o} is not a permission mode (0 to 0o7777)")
        return format(mode, "04o")
    return mode


def shell_cmd(cmd: Union[str, Sequence[str]]) -> List[str]:
    """The argv of a command: a list is sent as is; a string runs under ``sh -c``."""
    if isinstance(cmd, str):
        return ["sh", "-c", cmd]
    argv = [str(a) for a in cmd]
    if not argv:
        raise ValueError("cmd must name a program")
    return argv


def drop_none(d: Mapping[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


def params_of(**kwargs: Any) -> ParamList:
    """Query parameters, leaving out the ones not given; booleans as `true`/`false`."""
    out: ParamList = []
    for k, v in kwargs.items():
        if v is None:
            continue
        out.append((k, ("true" if v else "false") if isinstance(v, bool) else str(v)))
    return out


@dataclass
class Call:
    """One API call, described without sending it."""

    method: str
    path: str
    params: ParamList = field(default_factory=list)
    json: Any = None
    headers: Dict[str, str] = field(default_factory=dict)
    timeout: Any = httpx.USE_CLIENT_DEFAULT


def exec_timeout(timeout_s: Optional[float]) -> httpx.Timeout:
    """The HTTP timeout of an exec call: the command's own timeout plus a grace."""
    budget = (timeout_s if timeout_s is not None else DEFAULT_EXEC_TIMEOUT_S) + EXEC_GRACE_S
    return httpx.Timeout(DEFAULT_TIMEOUT, read=budget)


# --- sandboxes -------------------------------------------------------------


def sandbox_create(
    *,
    image: Optional[str],
    template: Optional[str],
    provider: Optional[str],
    cpu: Optional[float],
    memory_mb: Optional[int],
    timeout_s: Optional[int],
    env: Optional[Mapping[str, str]],
    labels: Optional[Mapping[str, str]],
    workdir: Optional[str],
    network: Optional[str],
    idempotency_key: Optional[str],
    worker_labels: Optional[Mapping[str, str]] = None,
    volumes: Optional[Sequence[Union[VolumeMount, Mapping[str, Any]]]] = None,
    allow: Optional[Sequence[str]] = None,
    request_timeout: Optional[float],
) -> Call:
    if image is None and template is None:
        raise ValueError("give an image or a template")
    mounts = [m.to_json() if isinstance(m, VolumeMount) else dict(m) for m in volumes] if volumes else None
    net: Any = network
    if allow is not None:
        if network not in (None, "egress", "full"):
            raise ValueError("an allow list needs network egress (or none given)")
        net = {"allow": list(allow)}
    body = drop_none(
        {
            "image": image,
            "template": template,
            "provider": provider,
            "cpu": cpu,
            "memory_mb": memory_mb,
            "timeout_s": timeout_s,
            "env": dict(env) if env else None,
            "labels": dict(labels) if labels else None,
            "worker_labels": dict(worker_labels) if worker_labels else None,
            "volumes": mounts,
            "workdir": workdir,
            "network": net,
        }
    )
    headers = {"idempotency-key": idempotency_key} if idempotency_key else {}
    timeout: Any = httpx.USE_CLIENT_DEFAULT
    if request_timeout is not None:
        timeout = httpx.Timeout(DEFAULT_TIMEOUT, read=request_timeout)
    return Call("POST", "/v1/sandboxes", json=body, headers=headers, timeout=timeout)


def sandbox_list(
    *,
    state: Optional[str],
    labels: Optional[Mapping[str, str]],
    limit: Optional[int],
    cursor: Optional[str],
) -> Call:
    params = params_of(state=state, limit=limit, cursor=cursor)
    for k, v in (labels or {}).items():
        params.append(("label", f"{k}={v}"))
    return Call("GET", "/v1/sandboxes", params=params)


def sandbox_get(sandbox_id: str) -> Call:
    return Call("GET", f"/v1/sandboxes/{seg(sandbox_id)}")


def sandbox_destroy(sandbox_id: str) -> Call:
    return Call("DELETE", f"/v1/sandboxes/{seg(sandbox_id)}")


def sandbox_set_timeout(sandbox_id: str, timeout_s: int) -> Call:
    return Call("POST", f"/v1/sandboxes/{seg(sandbox_id)}/timeout", json={"timeout_s": timeout_s})


def sandbox_pause(sandbox_id: str) -> Call:
    return Call("POST", f"/v1/sandboxes/{seg(sandbox_id)}/pause")


def sandbox_resume(sandbox_id: str) -> Call:
    return Call("POST", f"/v1/sandboxes/{seg(sandbox_id)}/resume")


def sandbox_expose(sandbox_id: str, port: int, public: bool = False) -> Call:
    return Call("POST", f"/v1/sandboxes/{seg(sandbox_id)}/ports", json={"port": port, "public": public})


def sandbox_ports(sandbox_id: str) -> Call:
    return Call("GET", f"/v1/sandboxes/{seg(sandbox_id)}/ports")


def sandbox_unexpose(sandbox_id: str, port: int) -> Call:
    return Call("DELETE", f"/v1/sandboxes/{seg(sandbox_id)}/ports/{int(port)}")


def sandbox_port_token(sandbox_id: str, port: int, ttl_seconds: int = 3600) -> Call:
    return Call("POST", f"/v1/sandboxes/{seg(sandbox_id)}/ports/{int(port)}/token", json={"ttl_seconds": ttl_seconds})


def volume_create(name: str, size_mb: int) -> Call:
    return Call("POST", "/v1/volumes", json={"name": name, "size_mb": size_mb})


def volume_list() -> Call:
    return Call("GET", "/v1/volumes")


def volume_get(name: str) -> Call:
    return Call("GET", f"/v1/volumes/{seg(name)}")


def volume_delete(name: str) -> Call:
    return Call("DELETE", f"/v1/volumes/{seg(name)}")


def whoami() -> Call:
    return Call("GET", "/v1/whoami")


def sandbox_logs(sandbox_id: str, follow: bool = False) -> Call:
    call = Call("GET", f"/v1/sandboxes/{seg(sandbox_id)}/logs", params=params_of(follow=follow or None))
    if follow:
        call.headers["accept"] = "text/event-stream"
        # The server sends a keep-alive at least every 15 s, so a minute of
        # silence means the connection is gone.
        call.timeout = httpx.Timeout(DEFAULT_TIMEOUT, read=60.0)
    return call


def _exec_body(
    cmd: Union[str, Sequence[str]],
    env: Optional[Mapping[str, str]],
    cwd: Optional[str],
    stdin: Union[str, bytes, None],
    timeout_s: Optional[float],
    user: Optional[str] = None,
) -> Dict[str, Any]:
    if isinstance(stdin, (bytes, bytearray)):
        stdin = bytes(stdin).decode("utf-8")
    return drop_none(
        {
            "cmd": shell_cmd(cmd),
            "env": dict(env) if env else None,
            "cwd": cwd,
            "stdin": stdin,
            "timeout_s": timeout_s,
            "user": user,
        }
    )


def exec_call(
    sandbox_id: str,
    cmd: Union[str, Sequence[str]],
    *,
    env: Optional[Mapping[str, str]],
    cwd: Optional[str],
    stdin: Union[str, bytes, None],
    timeout_s: Optional[float],
    user: Optional[str] = None,
) -> Call:
    return Call(
        "POST",
        f"/v1/sandboxes/{seg(sandbox_id)}/exec",
        json=_exec_body(cmd, env, cwd, stdin, timeout_s, user),
        timeout=exec_timeout(timeout_s),
    )


def exec_stream_call(
    sandbox_id: str,
    cmd: Union[str, Sequence[str]],
    *,
    env: Optional[Mapping[str, str]],
    cwd: Optional[str],
    stdin: Union[str, bytes, None],
    timeout_s: Optional[float],
    user: Optional[str] = None,
) -> Call:
    # Keep-alives arrive every 15 s at most, but a silent command may run
    # for its whole timeout: the read timeout covers that.
    return Call(
        "POST",
        f"/v1/sandboxes/{seg(sandbox_id)}/exec/stream",
        json=_exec_body(cmd, env, cwd, stdin, timeout_s, user),
        headers={"accept": "text/event-stream"},
        timeout=exec_timeout(timeout_s),
    )


# --- files -----------------------------------------------------------------


def _files(sandbox_id: str, suffix: str = "") -> str:
    return f"/v1/sandboxes/{seg(sandbox_id)}/files{suffix}"


def file_write(sandbox_id: str, path: str, mode: Union[int, str, None]) -> Call:
    return Call(
        "PUT",
        _files(sandbox_id),
        params=params_of(path=path, mode=mode_str(mode)),
        headers={"content-type": "application/octet-stream"},
    )


def file_archive_put(sandbox_id: str, path: str) -> Call:
    return Call(
        "PUT",
        _files(sandbox_id) + "/archive",
        params=params_of(path=path),
        headers={"content-type": "application/x-tar"},
    )


def tar_of_dir(local_dir: PathLike) -> IO[bytes]:
    """A tar of ``local_dir``'s contents (names relative to it, symlinks kept
    as links), in an anonymous temporary file rewound to its start: a tree
    of any size is sent as a stream, never held in memory."""
    root = os.fspath(local_dir)
    if not os.path.isdir(root):
        raise NotADirectoryError(f"{root} is not a directory")
    out = tempfile.TemporaryFile()
    try:
        with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for name in sorted(os.listdir(root)):
                tar.add(os.path.join(root, name), arcname=name, recursive=True)
        out.seek(0)
    except BaseException:
        out.close()
        raise
    return out


def file_archive_get(sandbox_id: str, path: str) -> Call:
    return Call("GET", _files(sandbox_id) + "/archive", params=params_of(path=path), headers={"accept": "application/x-tar"})


def untar_untrusted(archive: IO[bytes], dest: PathLike) -> int:
    """Unpacks a tar that came from a sandbox into ``dest`` (made with its
    parents) as untrusted input, with tarfile's ``data`` filter: nothing
    lands outside ``dest`` (no absolute names, no ``..``, no path through a
    link that leads out), no devices or FIFOs, no set-id bits, and the files
    belong to whoever unpacks them. Symlinks are kept as the sandbox had
    them, pointing wherever they pointed there (as ``docker cp`` keeps
    them): the ``tar`` filter checks their own names, and nothing is ever
    written through them. Returns how many entries were unpacked."""
    data_filter = getattr(tarfile, "data_filter", None)
    tar_filter = getattr(tarfile, "tar_filter", None)
    if data_filter is None or tar_filter is None:
        raise RuntimeError(
            "unpacking a sandbox's archive safely needs tarfile's extraction filters "
            "(Python 3.9.17, 3.10.12, 3.11.4, 3.12 or newer)"
        )
    os.makedirs(dest, exist_ok=True)
    count = 0

    def counted(member: tarfile.TarInfo, path: str) -> Optional[tarfile.TarInfo]:
        nonlocal count
        kept = tar_filter(member, path) if member.issym() else data_filter(member, path)
        if kept is not None:
            count += 1
        return kept

    with tarfile.open(fileobj=archive, mode="r|") as tar:
        tar.extractall(os.fspath(dest), filter=counted)
    return count


def file_read(sandbox_id: str, path: str) -> Call:
    return Call("GET", _files(sandbox_id), params=params_of(path=path), headers={"accept": "application/octet-stream"})


def file_stat(sandbox_id: str, path: str) -> Call:
    return Call("GET", _files(sandbox_id, "/stat"), params=params_of(path=path))


def file_list(sandbox_id: str, path: str, recursive: bool) -> Call:
    return Call("GET", _files(sandbox_id, "/list"), params=params_of(path=path, recursive=recursive))


def file_glob(sandbox_id: str, pattern: str) -> Call:
    return Call("GET", _files(sandbox_id, "/glob"), params=params_of(pattern=pattern))


def file_move(sandbox_id: str, src: str, dst: str, overwrite: bool) -> Call:
    return Call("POST", _files(sandbox_id, "/move"), json={"from": src, "to": dst, "overwrite": overwrite})


def file_chmod(sandbox_id: str, path: str, mode: Union[int, str]) -> Call:
    return Call("POST", _files(sandbox_id, "/chmod"), json={"path": path, "mode": mode_str(mode)})


def file_mkdir(sandbox_id: str, path: str, parents: bool) -> Call:
    return Call("POST", _files(sandbox_id, "/mkdir"), json={"path": path, "parents": parents})


def file_delete(sandbox_id: str, path: str, recursive: bool) -> Call:
    return Call("DELETE", _files(sandbox_id), params=params_of(path=path, recursive=recursive))


# --- images, tenants, keys, audit, status ----------------------------------


def image_path(name: str) -> str:
    # Image names may hold `/` (`org/app:tag`): the route takes the rest of the path.
    return "/v1/images/" + quote(name, safe="/:@")


def image_import(name: str) -> Call:
    return Call("POST", "/v1/images", params=params_of(name=name), headers={"content-type": "application/x-tar"})


def image_list() -> Call:
    return Call("GET", "/v1/images")


def image_get(name: str) -> Call:
    return Call("GET", image_path(name))


def image_delete(name: str) -> Call:
    return Call("DELETE", image_path(name))


def tenant_create(name: str) -> Call:
    return Call("POST", "/v1/tenants", json={"name": name})


def tenant_list(limit: Optional[int], cursor: Optional[str]) -> Call:
    return Call("GET", "/v1/tenants", params=params_of(limit=limit, cursor=cursor))


def quota_get(tenant_id: str) -> Call:
    return Call("GET", f"/v1/tenants/{seg(tenant_id)}/quota")


def quota_set(tenant_id: str, quota: Quota) -> Call:
    return Call("PUT", f"/v1/tenants/{seg(tenant_id)}/quota", json=quota.to_json())


def key_create(tenant_id: str, role: str, name: str) -> Call:
    return Call("POST", "/v1/keys", json={"tenant_id": tenant_id, "role": role, "name": name})


def key_list(limit: Optional[int], cursor: Optional[str]) -> Call:
    return Call("GET", "/v1/keys", params=params_of(limit=limit, cursor=cursor))


def key_revoke(key_id: str) -> Call:
    return Call("DELETE", f"/v1/keys/{seg(key_id)}")


def audit_list(
    *,
    sandbox_id: Optional[str],
    action: Optional[str],
    outcome: Optional[str],
    since: Optional[str],
    limit: Optional[int],
    cursor: Optional[str],
) -> Call:
    return Call(
        "GET",
        "/v1/audit",
        params=params_of(
            sandbox_id=sandbox_id, action=action, outcome=outcome, since=since, limit=limit, cursor=cursor
        ),
    )


def status() -> Call:
    return Call("GET", "/v1/status")


def worker_list() -> Call:
    return Call("GET", "/v1/workers")


def worker_drain(worker_id: str) -> Call:
    return Call("POST", f"/v1/workers/{seg(worker_id)}/drain")


def healthz() -> Call:
    return Call("GET", "/healthz")


def readyz() -> Call:
    return Call("GET", "/readyz")


def metrics() -> Call:
    return Call("GET", "/metrics", headers={"accept": "text/plain"})


def openapi() -> Call:
    return Call("GET", "/openapi.json")


# --- server-sent events ----------------------------------------------------


@dataclass(frozen=True)
class SSEEvent:
    """One dispatched server-sent event."""

    event: str
    data: str


class SSEDecoder:
    """Incremental `text/event-stream` decoder: feed it bytes as they arrive
    and it returns the events completed so far (WHATWG rules: `\\n`, `\\r\\n`
    or `\\r` end a line, a blank line dispatches, `:` lines are comments)."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._event = ""
        self._data: List[str] = []
        self._has_data = False
        # A `\r` ends its line at once; if the next byte (perhaps in the next
        # chunk) is `\n`, it belongs to the same line end and is skipped.
        self._after_cr = False

    def feed(self, chunk: bytes) -> List[SSEEvent]:
        out: List[SSEEvent] = []
        if self._after_cr and chunk[:1] == b"\n":
            chunk = chunk[1:]
        if chunk:
            self._after_cr = False
        self._buf.extend(chunk)
        buf = self._buf
        start = 0
        i = 0
        n = len(buf)
        while i < n:
            b = buf[i]
            if b != 0x0A and b != 0x0D:
                i += 1
                continue
            line = bytes(buf[start:i]).decode("utf-8", errors="replace")
            ev = self._line(line)
            if ev is not None:
                out.append(ev)
            i += 1
            if b == 0x0D:
                if i < n and buf[i] == 0x0A:
                    i += 1
                elif i == n:
                    self._after_cr = True
            start = i
        del self._buf[:start]
        return out

    def _line(self, line: str) -> Optional[SSEEvent]:
        if line == "":
            if not self._has_data:
                self._event = ""
                return None
            ev = SSEEvent(event=self._event or "message", data="\n".join(self._data))
            self._event, self._data, self._has_data = "", [], False
            return ev
        if line.startswith(":"):
            return None
        name, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
            self._has_data = True
        return None


def _json_data(ev: SSEEvent) -> Dict[str, Any]:
    import json

    try:
        doc = json.loads(ev.data) if ev.data else {}
    except ValueError:
        doc = {"message": ev.data}
    return doc if isinstance(doc, dict) else {}


def exec_item(ev: SSEEvent) -> Union[ExecChunk, ExecExit, None]:
    """What an exec-stream event means: output, the final status, nothing
    (unknown events are skipped), or — for ``error`` — the raised error."""
    if ev.event in ("stdout", "stderr"):
        return ExecChunk.from_event(ev.event, _json_data(ev))
    if ev.event == "exit":
        return ExecExit.from_json(_json_data(ev))
    if ev.event == "error":
        d = _json_data(ev)
        raise error_for(
            str(d.get("code") or "internal"),
            str(d.get("message") or "the command's stream failed"),
        )
    return None


def log_item(ev: SSEEvent) -> Optional[LogLine]:
    """What a log-stream event means: a line, or nothing."""
    if ev.event == "log":
        return LogLine.from_json(_json_data(ev))
    if ev.event == "error":
        d = _json_data(ev)
        raise error_for(str(d.get("code") or "internal"), str(d.get("message") or "the log stream failed"))
    return None


def stream_ended_early() -> ProviderUnavailable:
    return ProviderUnavailable(
        "the command's stream ended before it reported an exit status", code="provider_unavailable"
    )


# --- background processes ----------------------------------------------------


def _procs(sandbox_id: str, suffix: str = "") -> str:
    return f"/v1/sandboxes/{seg(sandbox_id)}/processes{suffix}"


def process_start(
    sandbox_id: str,
    cmd: Union[str, Sequence[str]],
    env: Optional[Mapping[str, str]],
    cwd: Optional[str],
    user: Optional[str] = None,
) -> Call:
    body = drop_none({"cmd": shell_cmd(cmd), "env": dict(env) if env else None, "cwd": cwd, "user": user})
    return Call("POST", _procs(sandbox_id), json=body)


def process_list(sandbox_id: str) -> Call:
    return Call("GET", _procs(sandbox_id))


def process_get(sandbox_id: str, pid: int) -> Call:
    return Call("GET", _procs(sandbox_id, f"/{int(pid)}"))


def process_output(sandbox_id: str, pid: int, follow: bool) -> Call:
    call = Call(
        "GET",
        _procs(sandbox_id, f"/{int(pid)}/output"),
        params=params_of(follow="true" if follow else "false"),
        headers={"accept": "text/event-stream"},
    )
    # The server sends a keep-alive at least every 15 s, so a minute of
    # silence means the connection is gone, however quiet the process.
    call.timeout = httpx.Timeout(DEFAULT_TIMEOUT, read=60.0)
    return call


def process_stdin(sandbox_id: str, pid: int, close: bool) -> Call:
    return Call(
        "POST",
        _procs(sandbox_id, f"/{int(pid)}/stdin"),
        params=params_of(close="true" if close else None),
        headers={"content-type": "application/octet-stream"},
    )


def process_signal(sandbox_id: str, pid: int, signal: str) -> Call:
    name = signal.strip().upper()
    if name.startswith("SIG"):
        name = name[3:]
    return Call("POST", _procs(sandbox_id, f"/{int(pid)}/signal"), json={"signal": name})


def process_item(ev: SSEEvent) -> Union[ExecChunk, ExecExit, None]:
    """What a process-output event means; the same events as exec's."""
    return exec_item(ev)


def process_ended_early() -> ProviderUnavailable:
    return ProviderUnavailable(
        "the process's output stream ended before its exit", code="provider_unavailable"
    )


# --- terminals (a WebSocket of the SDK's own: httpx has none) ----------------

WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
WS_BINARY, WS_TEXT, WS_CLOSE, WS_PING, WS_PONG, WS_CONT = 0x2, 0x1, 0x8, 0x9, 0xA, 0x0
#: The largest message taken from the server; terminal output comes in small frames.
WS_MAX_MESSAGE = 16 * 1024 * 1024


def pty_argv(cmd: Union[str, Sequence[str], None], env: Optional[Mapping[str, str]]) -> List[str]:
    """The argv the server runs: the command, behind `env` when variables are set."""
    argv = [] if cmd is None else shell_cmd(cmd)
    if not env:
        return argv
    return ["env", *[f"{k}={v}" for k, v in env.items()], *(argv or ["/bin/sh"])]


def pty_target(base_url: str, sandbox_id: str, argv: Sequence[str], cols: int, rows: int) -> Tuple[str, int, bool, str]:
    """``(host, port, tls, request target)`` of a terminal's upgrade request."""
    from urllib.parse import urlencode, urlsplit

    u = urlsplit(base_url)
    tls = u.scheme == "https"
    host = u.hostname or "127.0.0.1"
    port = u.port or (443 if tls else 80)
    query = urlencode([("cmd", a) for a in argv] + [("cols", str(cols)), ("rows", str(rows))])
    path = u.path.rstrip("/") + f"/v1/sandboxes/{seg(sandbox_id)}/pty?{query}"
    return host, port, tls, path


def ws_handshake(host: str, port: int, target: str, headers: Mapping[str, str]) -> Tuple[bytes, str]:
    """The upgrade request and the ``Sec-WebSocket-Accept`` its answer must carry."""
    import base64
    import hashlib

    key = base64.b64encode(os.urandom(16)).decode()
    accept = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
    lines = [f"GET {target} HTTP/1.1", f"Host: {host}:{port}"]
    skip = {"host", "connection", "upgrade", "content-length", "accept-encoding"}
    lines += [f"{k}: {v}" for k, v in headers.items() if k.lower() not in skip]
    lines += [
        "Connection: Upgrade",
        "Upgrade: websocket",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode(), accept


def http_head(raw: bytes) -> Tuple[int, Dict[str, str]]:
    """The status and (lower-cased) headers of an HTTP answer's head."""
    lines = raw.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    headers: Dict[str, str] = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    return status, headers


def ws_frame(opcode: int, payload: bytes) -> bytes:
    """One masked client frame."""
    n = len(payload)
    head = bytes([0x80 | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head += bytes([0x80 | 127]) + n.to_bytes(8, "big")
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[i & 3] for i, b in enumerate(payload))


def pty_closed(payload: bytes) -> int:
    """The exit code a close frame carries; a failure it reports is raised."""
    code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
    reason = payload[2:].decode("utf-8", "replace")
    if code == 1000 and reason.startswith("exit:"):
        try:
            return int(reason[5:])
        except ValueError:
            pass
    message = reason[7:] if reason.startswith("error: ") else (reason or f"the terminal closed with code {code}")
    raise error_for("invalid_request" if code == 1008 else "internal", message)


def pty_ended_early() -> ProviderUnavailable:
    return ProviderUnavailable(
        "the terminal's connection ended before the command's exit", code="provider_unavailable"
    )


def sandbox_snapshot(sandbox_id: str, image: str) -> Call:
    # The whole filesystem is copied before the answer: no read deadline.
    return Call(
        "POST",
        f"/v1/sandboxes/{seg(sandbox_id)}/snapshot",
        json={"image": image},
        timeout=httpx.Timeout(30.0, read=None),
    )


# --- templates ---------------------------------------------------------------


def _template(name: str, suffix: str = "") -> str:
    return f"/v1/templates/{seg(name)}{suffix}"


def template_build(
    *,
    name: str,
    base: str,
    steps: Sequence[Mapping[str, Any]],
    cpu: Optional[float],
    memory_mb: Optional[int],
    network: Optional[str],
    env: Optional[Mapping[str, str]],
    workdir: Optional[str],
    start: Union[str, Sequence[str], None],
    ready: Union[str, Sequence[str], None],
    provider: Optional[str],
    timeout_s: Optional[int],
) -> Call:
    body = drop_none(
        {
            "name": name,
            "from": base,
            "steps": [dict(s) for s in steps],
            "cpu": cpu,
            "memory_mb": memory_mb,
            "network": network,
            "env": dict(env) if env else None,
            "workdir": workdir,
            "start": shell_cmd(start) if start is not None else None,
            "ready": shell_cmd(ready) if ready is not None else None,
            "provider": provider,
            "timeout_s": timeout_s,
        }
    )
    return Call("POST", "/v1/templates", json=body)


def template_list() -> Call:
    return Call("GET", "/v1/templates")


def template_get(name: str, version: Optional[int]) -> Call:
    return Call("GET", _template(name), params=params_of(version=version))


def template_versions(name: str) -> Call:
    return Call("GET", _template(name, "/versions"))


def template_delete(name: str) -> Call:
    return Call("DELETE", _template(name))


def template_logs(name: str, version: Optional[int]) -> Call:
    # A running build's log is followed until the build ends: no read deadline.
    return Call(
        "GET",
        _template(name, "/logs"),
        params=params_of(version=version),
        headers={"accept": "text/event-stream, application/json"},
        timeout=httpx.Timeout(DEFAULT_TIMEOUT, read=None),
    )


def is_event_stream(response: httpx.Response) -> bool:
    return str(response.headers.get("content-type", "")).startswith("text/event-stream")


def template_log_item(ev: SSEEvent) -> Union[str, Dict[str, Any], None]:
    """What a build-log event means: more text (``str``), how the build
    ended (the ``end`` event's fields), or nothing."""
    if ev.event == "log":
        return str(_json_data(ev).get("data", ""))
    if ev.event == "end":
        return _json_data(ev)
    if ev.event == "error":
        d = _json_data(ev)
        raise error_for(str(d.get("code") or "internal"), str(d.get("message") or "the build log stream failed"))
    return None


def template_log_ended_early() -> ProviderUnavailable:
    return ProviderUnavailable(
        "the build log stream ended before the build did", code="provider_unavailable"
    )


def template_outcome(template: Template) -> Template:
    """The version as it is once its build has ended; a failed build raises
    `TemplateBuildFailed` with the failing step's output."""
    if template.state == TemplateState.FAILED:
        raise TemplateBuildFailed(template)
    return template
