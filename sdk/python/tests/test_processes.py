"""Background processes through both clients against a real server (Docker
sandboxes): start with env and cwd, list, output from the start and then
live, stdin, signals, and the errors of unknown pids and signals."""

from __future__ import annotations

import time

import pytest

import stacyvm
from conftest import IMAGE, Server


def _until(pred, what: str, patience: float = 60.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + patience
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {patience} s")
        time.sleep(0.1)


def test_sync_background_processes(client: stacyvm.Client) -> None:
    with client.sandbox(image=IMAGE, provider="docker") as sb:
        p = sb.processes.start(
            'echo "one $A $(pwd)"; echo err >&2; read line; echo "got-$line"; exec sleep 600',
            env={"A": "b"},
            cwd="/tmp",
        )
        assert p.state == "running" and p.cmd[:2] == ["sh", "-c"]
        assert any(q.pid == p.pid for q in sb.processes.list())

        def first_line() -> str:
            with sb.processes.output(p.pid, follow=False) as out:
                text = "".join(c.text for c in out if c.stream == "stdout")
            return text if "one b /tmp" in text else ""

        _until(first_line, "first line")
        w = sb.processes.write_stdin(p.pid, "hi\n")
        assert w.written == 3 and not w.closed
        out = sb.processes.output(p.pid)
        stdout, stderr = "", ""
        for chunk in out:
            if chunk.stream == "stdout":
                stdout += chunk.text
            else:
                stderr += chunk.text
            if "got-hi" in stdout:
                break
        assert stdout.startswith("one b /tmp\n") and stderr == "err\n"
        assert sb.processes.signal(p.pid, "SIGTERM").pid == p.pid
        ended = out.wait()
        assert ended is not None and ended.signal == 15
        got = sb.processes.get(p.pid)
        assert got.state == "exited" and got.signal == 15 and got.ended_at is not None
        with pytest.raises(stacyvm.Conflict):
            sb.processes.signal(p.pid, "KILL")
        with pytest.raises(stacyvm.InvalidRequest):
            sb.processes.signal(p.pid, "NOPE")
        with pytest.raises(stacyvm.NotFound):
            sb.processes.get(999999)

        # A process that prints nothing still gives its reader a stream.
        quiet = sb.processes.start(["sh", "-c", 'read x; echo "late-$x"'])
        with sb.processes.output(quiet.pid) as out:
            sb.processes.write_stdin(quiet.pid, b"ok\n", close=True)
            assert "".join(c.text for c in out) == "late-ok\n"
            assert out.exit is not None and out.exit.exit_code == 0


async def test_async_background_processes(server: Server) -> None:
    async with stacyvm.AsyncClient(server.url, server.admin_key) as c:
        async with c.sandbox(image=IMAGE, provider="docker") as sb:
            cat = await sb.processes.start(["cat"])
            closed = await sb.processes.write_stdin(cat.pid, b"last\n", close=True)
            assert closed.closed and closed.written == 5
            async with await sb.processes.output(cat.pid) as out:
                text = b"".join([chunk.data async for chunk in out])
            assert text == b"last\n"
            assert out.exit is not None and out.exit.exit_code == 0
            listed = await sb.processes.list()
            assert [q.state for q in listed if q.pid == cat.pid] == ["exited"]
            ticker = await sb.processes.start("while true; do echo tick; sleep 1; done")
            killed = await sb.processes.signal(ticker.pid, "KILL")
            assert killed.pid == ticker.pid
            async with await sb.processes.output(ticker.pid) as out:
                ended = await out.wait()
            assert ended is not None and ended.signal == 9
