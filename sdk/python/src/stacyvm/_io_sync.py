"""The synchronous twin of `_io_async`, with the same names: what the
asyncio client does differently is done here the plain way. client.py,
generated from aio.py by scripts/gen-python-sync.py, imports this module
where aio.py imports `_io_async`."""

from __future__ import annotations

from typing import IO, TYPE_CHECKING, Annotated, Callable, Iterable, Iterator, TypeVar, Union

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
