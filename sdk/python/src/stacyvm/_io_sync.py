"""The synchronous twin of `_io_async`, with the same names: what the
asyncio client does differently is done here the plain way. client.py,
generated from aio.py by scripts/gen-python-sync.py, imports this module
where aio.py imports `_io_async`."""

from __future__ import annotations

import socket
from typing import IO, TYPE_CHECKING, Annotated, Any, Callable, Iterable, Iterator, TypeVar, Union

if TYPE_CHECKING:
    from typing_extensions import ParamSpec

    P = ParamSpec("P")

T = TypeVar("T")

#: What ``Files.write`` takes: bytes, text, a binary file object, or an
#: iterable of byte chunks.
WriteData = Union[bytes, bytearray, memoryview, str, IO[bytes], Iterable[bytes]]

#: A synchronous call has nothing to defer: what ``Client.sandbox()``
#: returns is the sandbox itself, already made.
Pending = Annotated[T, "made at once"]


def blocking(fn: "Callable[P, T]", *args: "P.args", **kwargs: "P.kwargs") -> T:
    """Makes a blocking call; the synchronous client has no loop to keep free."""
    return fn(*args, **kwargs)


def chunks(data: Iterable[bytes]) -> Iterator[bytes]:
    """An upload body from an iterable of byte chunks."""
    return iter(data)


def pending(value: T) -> T:
    """The value itself (see `Pending`)."""
    return value


class Conn:
    """A byte connection (TCP, or TLS over it) for the terminal's WebSocket."""

    def __init__(self, sock: "socket.socket") -> None:
        self._s = sock
        self._buf = b""

    def _fill(self) -> bool:
        b = self._s.recv(65536)
        self._buf += b
        return bool(b)

    def read_exactly(self, n: int) -> bytes:
        """``n`` bytes, or fewer when the connection ends first."""
        while len(self._buf) < n and self._fill():
            pass
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def read_until(self, sep: bytes, limit: int) -> bytes:
        """Up to and including ``sep`` (at most ``limit`` bytes); what came when it ends first."""
        while sep not in self._buf and len(self._buf) < limit and self._fill():
            pass
        at = self._buf.find(sep)
        end = at + len(sep) if at >= 0 else len(self._buf)
        out, self._buf = self._buf[:end], self._buf[end:]
        return out

    def write(self, data: bytes) -> None:
        self._s.sendall(data)

    def close(self) -> None:
        try:
            self._s.close()
        except OSError:
            pass


def connect(host: str, port: int, tls: Any, timeout: float) -> Conn:
    """Opens a connection; ``tls`` is an `ssl.SSLContext` for TLS, or None."""
    sock = socket.create_connection((host, port), timeout=timeout)
    # The terminal waits as long as its command runs.
    sock.settimeout(None)
    if tls is not None:
        sock = tls.wrap_socket(sock, server_hostname=host)
    return Conn(sock)
