"""What the asyncio client does that the synchronous one does not: blocking
calls run in a thread, async iterables are upload bodies, and
``AsyncClient.sandbox()`` returns something both awaitable and usable with
``async with``. `_io_sync` is this module's synchronous twin, with the same
names; scripts/gen-python-sync.py swaps one for the other when it writes
client.py from aio.py."""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import (
    IO,
    TYPE_CHECKING,
    Any,
    AsyncContextManager,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Generator,
    Generic,
    Iterable,
    Optional,
    Type,
    TypeVar,
    Union,
)

if TYPE_CHECKING:
    from typing_extensions import ParamSpec

    P = ParamSpec("P")

T = TypeVar("T")
C = TypeVar("C", bound=AsyncContextManager[Any])

#: What ``AsyncFiles.write`` takes: bytes, text, a binary file object, or a
#: sync or async iterable of byte chunks.
WriteData = Union[bytes, bytearray, memoryview, str, IO[bytes], Iterable[bytes], AsyncIterable[bytes]]


async def blocking(fn: "Callable[P, T]", *args: "P.args", **kwargs: "P.kwargs") -> T:
    """Runs a blocking call (a file read or write, packing a tar) in a
    thread, so the event loop serves other tasks meanwhile."""
    return await asyncio.to_thread(fn, *args, **kwargs)


def chunks(data: Union[Iterable[bytes], AsyncIterable[bytes]]) -> AsyncIterator[bytes]:
    """An upload body from a sync or async iterable of byte chunks."""
    if isinstance(data, AsyncIterable):
        return data.__aiter__()
    return _from_iterable(data)


async def _from_iterable(it: Iterable[bytes]) -> AsyncIterator[bytes]:
    for chunk in it:
        yield chunk


class Pending(Generic[C]):
    """A value still being made: ``await`` it for the value, or use it with
    ``async with`` to get the value and have its own ``__aexit__`` run when
    the block ends."""

    def __init__(self, create: Awaitable[C]) -> None:
        self._create = create
        self._value: Optional[C] = None

    def __await__(self) -> Generator[Any, None, C]:
        return self._create.__await__()

    async def __aenter__(self) -> C:
        self._value = await self._create
        return self._value

    async def __aexit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        if self._value is not None:
            await self._value.__aexit__(exc_type, exc, tb)


def pending(create: Awaitable[C]) -> Pending[C]:
    """Wraps a coroutine that makes an async context manager in a `Pending`."""
    return Pending(create)


class Conn:
    """A byte connection (TCP, or TLS over it) for the terminal's WebSocket."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._r = reader
        self._w = writer

    async def read_exactly(self, n: int) -> bytes:
        """``n`` bytes, or fewer when the connection ends first."""
        try:
            return await self._r.readexactly(n)
        except asyncio.IncompleteReadError as e:
            return e.partial

    async def read_until(self, sep: bytes, limit: int) -> bytes:
        """Up to and including ``sep`` (at most ``limit`` bytes); what came when it ends first."""
        data = b""
        while not data.endswith(sep):
            b = await self._r.read(1)
            if not b or len(data) >= limit:
                return data
            data += b
        return data

    async def write(self, data: bytes) -> None:
        self._w.write(data)
        await self._w.drain()

    async def close(self) -> None:
        self._w.close()
        try:
            await self._w.wait_closed()
        except (OSError, asyncio.CancelledError):
            pass


async def connect(host: str, port: int, tls: Any, timeout: float) -> Conn:
    """Opens a connection; ``tls`` is an `ssl.SSLContext` for TLS, or None."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(host, port, ssl=tls, server_hostname=host if tls else None), timeout
    )
    return Conn(reader, writer)
