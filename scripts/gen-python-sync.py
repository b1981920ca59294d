#!/usr/bin/env python3
"""Writes the Python SDK's synchronous client (sdk/python/src/stacyvm/client.py)
from the asyncio one (aio.py), so the two cannot drift apart.

    python3 scripts/gen-python-sync.py            # rewrite client.py
    python3 scripts/gen-python-sync.py --check    # exit 1 with a diff if it is stale

It works on tokens, as the `unasync` project does: `async def/with/for`
lose their `async`, `await x` becomes `x`, and the names of the asyncio
world become their synchronous twins (NAMES). Docstrings and comments get
the same renaming (and PROSE), so one text serves both clients. What the
two clients truly do differently is not rewritten here: aio.py calls it in
`_io_async`, which becomes `_io_sync`, a hand-written twin with the same
names. Anything of the async world left after the rewrite is an error.
Standard library only.
"""

from __future__ import annotations

import io
import re
import sys
import tokenize
from typing import Dict, List, Tuple

from generated_file import ROOT, Refused, run

PACKAGE = "sdk/python/src/stacyvm"
SOURCE = f"{PACKAGE}/aio.py"
OUTPUT = f"{PACKAGE}/client.py"

# Names (whole tokens) and their synchronous twins.
NAMES: Dict[str, str] = {
    # the SDK's own
    "AsyncClient": "Client",  # also httpx.AsyncClient
    "AsyncSandbox": "Sandbox",
    "AsyncFiles": "Files",
    "AsyncExecStream": "ExecStream",
    "AsyncLogStream": "LogStream",
    "AsyncWriteData": "WriteData",
    "AsyncProcesses": "Processes",
    "AsyncProcessOutput": "ProcessOutput",
    "AsyncPty": "Pty",
    "AsyncTemplateLogStream": "TemplateLogStream",
    "_io_async": "_io_sync",
    # typing
    "AsyncIterator": "Iterator",
    "AsyncIterable": "Iterable",
    "AsyncGenerator": "Generator",
    "AsyncContextManager": "ContextManager",
    # the protocols
    "__aenter__": "__enter__",
    "__aexit__": "__exit__",
    "__aiter__": "__iter__",
    "__anext__": "__next__",
    "anext": "next",
    "StopAsyncIteration": "StopIteration",
    # httpx
    "aclose": "close",
    "aread": "read",
    "aiter_bytes": "iter_bytes",
    "aiter_text": "iter_text",
    "aiter_lines": "iter_lines",
    "aiter_raw": "iter_raw",
}

# `asyncio.X` that has a synchronous twin elsewhere; any other use of
# asyncio belongs in _io_async.py.
ASYNCIO = {"sleep": "time"}

# Docstrings and comments: phrases first, then NAMES as whole words.
PROSE: List[Tuple[str, str]] = [
    (r"\basync (with|for)\b", r"\1"),
    (r"\bawait\s+", ""),
    (r"\basyncio\b", "synchronous"),
]

# What must not be left in the synchronous client.
LEFTOVER = re.compile(
    r"\b(async|await|asyncio|Async\w*|__a(enter|exit|iter|next)__|a(close|read|iter_\w+))\b|event loop"
)

HEADER = f"""\
# Generated from aio.py by scripts/gen-python-sync.py; do not edit. Change
# aio.py (or, for what the two clients do differently, _io_async.py and
# _io_sync.py), then run: python3 scripts/gen-python-sync.py
"""


class Leftover(Refused):
    """Something of the async world the rewrite has no twin for."""


def prose(text: str) -> str:
    for pattern, repl in PROSE:
        text = re.sub(pattern, repl, text)
    return re.sub(r"\b(" + "|".join(map(re.escape, NAMES)) + r")\b", lambda m: NAMES[m.group(1)], text)


def rewrite(source: str) -> str:
    lines = source.splitlines(keepends=True)
    starts = [0]
    for line in lines:
        starts.append(starts[-1] + len(line))

    def offset(pos: Tuple[int, int]) -> int:
        return starts[pos[0] - 1] + pos[1]

    tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    fstring_start = getattr(tokenize, "FSTRING_START", None)
    fstring_end = getattr(tokenize, "FSTRING_END", None)
    edits: List[Tuple[int, int, str]] = []
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        start, end = offset(tok.start), offset(tok.end)
        if tok.type == fstring_start:
            # Python 3.12 splits f-strings into pieces; rewrite the whole.
            depth = 1
            while depth:
                i += 1
                depth += {fstring_start: 1, fstring_end: -1}.get(tokens[i].type, 0)
            end = offset(tokens[i].end)
            edits.append((start, end, prose(source[start:end])))
        elif tok.type in (tokenize.STRING, tokenize.COMMENT):
            edits.append((start, end, prose(tok.string)))
        elif tok.type == tokenize.NAME:
            nxt = tokens[i + 1]
            if tok.string == "async" and nxt.string in ("def", "with", "for"):
                edits.append((start, offset(nxt.start), ""))
            elif tok.string == "await":
                edits.append((start, offset(nxt.start), ""))
            elif tok.string in NAMES:
                edits.append((start, end, NAMES[tok.string]))
            elif tok.string == "asyncio":
                attr = tokens[i + 2].string if nxt.string == "." else ""
                if attr in ASYNCIO:
                    edits.append((start, end, ASYNCIO[attr]))
                elif not (tokens[i - 1].string == "import" and nxt.type in (tokenize.NEWLINE, tokenize.COMMENT)):
                    raise Leftover(f"{SOURCE}:{tok.start[0]}: asyncio.{attr} has no synchronous twin: use _io_async")
                else:
                    edits.append((start, end, "time"))
        i += 1

    out = []
    last = 0
    for start, end, text in edits:
        out.append(source[last:start])
        out.append(text)
        last = end
    out.append(source[last:])
    return "".join(out)


def generate(source: str) -> str:
    # aio.py's opening comment speaks of aio.py itself; client.py gets the
    # generator's instead.
    body = re.sub(r"\A(#[^\n]*\n)+", "", source)
    text = HEADER + rewrite(body)
    for number, line in enumerate(text.splitlines(), 1):
        found = LEFTOVER.search(line)
        if found:
            raise Leftover(f"{OUTPUT}:{number}: {found.group(0)!r} is left of the async world: {line.strip()}")
    compile(text, OUTPUT, "exec")
    return text


def main() -> int:
    return run("gen-python-sync.py", __doc__, OUTPUT, lambda: generate((ROOT / SOURCE).read_text(encoding="utf-8")))


if __name__ == "__main__":
    sys.exit(main())
