"""Terminals through both clients against a real server (Docker sandboxes),
over the SDK's own WebSocket: a real tty of the size asked for, resize,
Ctrl-C reaching the foreground job, the exit code, env, and refusals."""

from __future__ import annotations

import random
import time

import pytest

import stacyvm
from conftest import IMAGE, Server


def _expect(it: "stacyvm.Pty", seen: list, needle: str) -> str:
    text = seen[0]
    while needle not in text:
        text += next(it).decode("utf-8", "replace")
    at = text.index(needle) + len(needle)
    seen[0] = text[at:]
    return text[:at]


def _sleeps(sb: stacyvm.Sandbox, n: int) -> int:
    script = f"for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline 2>/dev/null; echo; done | grep -c '^sleep {n} ' || true"
    return int(sb.exec(script).stdout.strip())


def test_sync_terminal(client: stacyvm.Client) -> None:
    with client.sandbox(image=IMAGE, provider="docker") as sb:
        with sb.pty(["sh"], cols=100, rows=30) as pty:
            seen = [""]
            # The markers are computed by the shell, so the echoed line never matches.
            pty.send("tty; stty size; echo T$((40+2))T\r")
            out = _expect(pty, seen, "T42T")
            assert "/dev/pts/" in out and "30 100" in out
            pty.resize(120, 40)
            pty.send(b"stty size; echo R$((1+1))R\r")
            assert "40 120" in _expect(pty, seen, "R2R")
            n = random.randrange(100_000, 160_000)
            pty.send(f"sleep {n}\r")
            deadline = time.monotonic() + 60
            while _sleeps(sb, n) != 1:
                assert time.monotonic() < deadline, "the sleep never started"
                time.sleep(0.2)
            pty.send(b"\x03")
            pty.send("echo C$((2+2))C:$?\r")
            _expect(pty, seen, "C4C:130")
            assert _sleeps(sb, n) == 0
            pty.send("exit 7\r")
            assert pty.wait() == 7
        with pytest.raises(stacyvm.InvalidRequest):
            sb.pty(cols=0)
    with pytest.raises((stacyvm.NotFound, stacyvm.Conflict)):
        sb.pty()


async def test_async_terminal(server: Server) -> None:
    async with stacyvm.AsyncClient(server.url, server.admin_key) as c:
        async with c.sandbox(image=IMAGE, provider="docker") as sb:
            pty = await sb.pty(["sh", "-c", 'echo "v=$GREETING"; exit 3'], env={"GREETING": "hello there"})
            out, code = await pty.output()
            assert code == 3 and b"v=hello there" in out
