"""envd beyond the core flows, with the unmodified E2B SDK and on the wire:
how a command's stream ends when its sandbox dies or its deadline passes,
file entries' owners, modes and symlinks, signed file URLs, PTYs and
directory watches, and the tenant and sandbox boundaries of each."""

from __future__ import annotations

import base64
import json
import struct

import httpx
import pytest
from e2b import Sandbox
from e2b.exceptions import SandboxException, SandboxNotRunningException, TimeoutException
from e2b.sandbox.commands.command_handle import CommandExitException, PtySize
from e2b.sandbox.filesystem.filesystem import FileType

from conftest import Env


def _headers(sb: Sandbox) -> dict[str, str]:
    return {
        "E2b-Sandbox-Id": sb.sandbox_id,
        "E2b-Sandbox-Port": "49983",
        "X-Access-Token": sb._envd_access_token or "",
    }


def _envelope(msg: dict) -> bytes:
    body = json.dumps(msg).encode()
    return struct.pack(">BI", 0, len(body)) + body


def _envelopes(raw: bytes) -> list[tuple[int, dict]]:
    out = []
    while raw:
        flags, n = struct.unpack(">BI", raw[:5])
        out.append((flags, json.loads(raw[5 : 5 + n] or b"{}")))
        raw = raw[5 + n :]
    return out


def _stream(env: Env, sb: Sandbox, method: str, msg: dict, **headers: str) -> list[tuple[int, dict]]:
    r = httpx.post(
        env.server.url + "/" + method,
        content=_envelope(msg),
        headers={**_headers(sb), "Content-Type": "application/connect+json", **headers},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    return _envelopes(r.content)


def _start(cmd: str) -> dict:
    return {"process": {"cmd": "/bin/bash", "args": ["-l", "-c", cmd], "envs": {}}}


def test_a_command_whose_sandbox_is_killed_ends_with_the_sandbox_gone(env: Env) -> None:
    sb = Sandbox.create()
    try:
        h = sb.commands.run("sleep 600", background=True)
        with httpx.Client(timeout=120) as client, client.stream(
            "POST",
            env.server.url + "/process.Process/Connect",
            content=_envelope({"process": {"pid": h.pid}}),
            headers={**_headers(sb), "Content-Type": "application/connect+json"},
        ) as follower:
            assert follower.status_code == 200
            chunks = follower.iter_bytes()
            raw = b""
            while len(raw) < 5 or len(raw) < 5 + struct.unpack(">I", raw[1:5])[0]:
                raw += next(chunks)
            # The follower is attached (it was told the pid); now the
            # sandbox goes away under both streams.
            assert Sandbox.kill(sb.sandbox_id) is True
            # Not an ordinary failed command (CommandExitException): the
            # SDK's sandbox-gone error, from envd's `unavailable`.
            with pytest.raises(SandboxNotRunningException):
                h.wait()
            for chunk in chunks:
                raw += chunk
        frames = _envelopes(raw)
        assert frames[0][1]["event"]["start"]["pid"] == h.pid
        flags, last = frames[-1]
        assert flags == 2 and last["error"]["code"] == "unavailable", frames
        assert not any("end" in m.get("event", {}) for _, m in frames)
    finally:
        Sandbox.kill(sb.sandbox_id)


def test_a_command_past_its_deadline_ends_deadline_exceeded(env: Env, sandbox: Sandbox) -> None:
    frames = _stream(env, sandbox, "process.Process/Start", _start("sleep 60"), **{"connect-timeout-ms": "1500"})
    assert "start" in frames[0][1]["event"]
    flags, last = frames[-1]
    assert flags == 2 and last["error"]["code"] == "deadline_exceeded", frames
    assert not any("end" in m.get("event", {}) for _, m in frames)
    # The SDK reads it as its timeout.
    with pytest.raises(TimeoutException):
        sandbox.commands.run("sleep 60", timeout=2)
    # A command that ends in time still ends with its exit status.
    frames = _stream(env, sandbox, "process.Process/Start", _start("exit 4"), **{"connect-timeout-ms": "60000"})
    assert frames[-2][1]["event"]["end"]["exitCode"] == 4
    assert frames[-1] == (2, {})


def test_a_refused_upload_gets_its_refusal_not_a_broken_connection(env: Env, sandbox: Sandbox) -> None:
    # Large enough that the server must read it for the client to finish
    # sending and read the answer.
    body = b"x" * (16 << 20)
    for token, status in [("key_x.00", 401), (sandbox._envd_access_token, 400)]:
        headers = {**_headers(sandbox), "X-Access-Token": token or "", "Content-Type": "application/octet-stream"}
        if status == 400:
            headers["Content-Encoding"] = "gzip"
        r = httpx.post(env.server.url + "/files?path=/tmp/refused.bin", content=body, headers=headers, timeout=60)
        assert r.status_code == status, r.text
        assert isinstance(r.json()["code"], int)
    assert sandbox.files.exists("/tmp/refused.bin") is False


def test_entries_name_their_owner_group_and_permissions_as_envd_does(sandbox: Sandbox) -> None:
    sandbox.files.write("/tmp/own/mine.txt", "x")
    sandbox.files.write("/tmp/own/numeric.txt", "y")
    sandbox.commands.run(
        "cd /tmp/own && chown 1000:1000 mine.txt && chmod 640 mine.txt"
        " && chown 4242:4343 numeric.txt && chmod 4755 numeric.txt && mkdir sticky && chmod 1777 sticky",
        user="root",
    )
    st = sandbox.files.get_info("/tmp/own/mine.txt")
    # Names from the sandbox's own /etc/passwd and /etc/group.
    assert (st.owner, st.group) == ("user", "user")
    assert st.mode == 0o640 and st.permissions == "-rw-r-----"
    listed = {e.name: e for e in sandbox.files.list("/tmp/own")}
    # Ids without a name show as numbers; special bits as Go spells them.
    n = listed["numeric.txt"]
    assert (n.owner, n.group) == ("4242", "4343")
    assert n.mode == 0o755 and n.permissions == "urwxr-xr-x"
    assert listed["sticky"].permissions == "dtrwxrwxrwx" and listed["sticky"].mode == 0o777
    root = sandbox.files.get_info("/etc")
    assert (root.owner, root.group) == ("root", "root")


def test_a_symlink_is_described_by_what_it_points_to(sandbox: Sandbox) -> None:
    sandbox.files.write("/tmp/links/real.txt", "hello")
    sandbox.commands.run(
        "cd /tmp/links && chmod 600 real.txt && ln -s real.txt file-link && ln -s file-link chain"
        " && mkdir dir && ln -s dir dir-link && ln -s missing broken",
    )
    link = sandbox.files.get_info("/tmp/links/file-link")
    assert link.type == FileType.FILE and link.symlink_target == "/tmp/links/real.txt"
    assert link.mode == 0o600 and link.permissions.startswith("L")
    assert link.name == "file-link" and link.path == "/tmp/links/file-link"
    assert sandbox.files.get_info("/tmp/links/chain").symlink_target == "/tmp/links/real.txt"
    listed = {e.name: e for e in sandbox.files.list("/tmp/links")}
    assert listed["dir-link"].type == FileType.DIR and listed["dir-link"].symlink_target == "/tmp/links/dir"
    assert listed["real.txt"].symlink_target is None and listed["real.txt"].type == FileType.FILE
    # A broken link has no type (the SDK leaves such entries out of lists).
    assert "broken" not in listed
    broken = sandbox.files.get_info("/tmp/links/broken")
    assert broken.type is None and broken.symlink_target == "/tmp/links/broken"
    # A link out of the sandbox's paths still resolves inside the sandbox.
    sandbox.commands.run("ln -s ../../../../etc/hostname /tmp/links/up")
    assert sandbox.files.get_info("/tmp/links/up").symlink_target == "/etc/hostname"


def _plain(url: str, sb: Sandbox) -> tuple[str, dict[str, str]]:
    """A signed URL as a browser would send it to `sb` (by its host name,
    as with `--e2b-domain` and wildcard DNS): no token, no sandbox header."""
    parsed = httpx.URL(url)
    return str(parsed), {"Host": f"49983-{sb.sandbox_id}.e2b.test"}


def test_signed_urls_download_and_upload_without_the_token(env: Env, sandbox: Sandbox) -> None:
    sandbox.files.write("/tmp/signed.txt", "signed bytes")
    url, headers = _plain(sandbox.download_url("/tmp/signed.txt"), sandbox)
    assert "signature=v1_" in url and "X-Access-Token" not in headers
    r = httpx.get(url, headers=headers)
    assert r.status_code == 200, r.text
    assert r.content == b"signed bytes"
    url, headers = _plain(sandbox.upload_url("/tmp/up.txt", use_signature_expiration=120), sandbox)
    assert "signature_expiration=" in url
    r = httpx.post(url, headers=headers, files={"file": ("/tmp/up.txt", b"uploaded")})
    assert r.status_code == 200, r.text
    assert sandbox.files.read("/tmp/up.txt") == "uploaded"


def test_signed_urls_are_bound_to_their_path_operation_expiry_and_sandbox(env: Env, sandbox: Sandbox) -> None:
    sandbox.files.write("/tmp/a.txt", "a")
    sandbox.files.write("/tmp/b.txt", "b")
    read_a, headers = _plain(sandbox.download_url("/tmp/a.txt"), sandbox)

    def refused(r: httpx.Response) -> None:
        assert r.status_code == 401, r.text
        body = r.json()
        assert body["code"] == 401 and isinstance(body["message"], str)

    # Another path, another operation, a changed signature.
    refused(httpx.get(read_a.replace("%2Ftmp%2Fa.txt", "%2Ftmp%2Fb.txt"), headers=headers))
    refused(httpx.post(read_a, headers=headers, files={"file": ("/tmp/a.txt", b"x")}))
    refused(httpx.get(read_a.replace("signature=v1_", "signature=v1_A"), headers=headers))
    assert sandbox.files.read("/tmp/a.txt") == "a"
    # Past its expiration.
    expired, _ = _plain(sandbox.download_url("/tmp/a.txt", use_signature_expiration=-60), sandbox)
    r = httpx.get(expired, headers=headers)
    refused(r)
    assert "expired" in r.json()["message"]
    # An expiration moved later breaks the signature.
    later, _ = _plain(sandbox.download_url("/tmp/a.txt", use_signature_expiration=60), sandbox)
    exp = httpx.URL(later).params["signature_expiration"]
    refused(httpx.get(later.replace(exp, str(int(exp) + 3600)), headers=headers))
    # A URL of this sandbox opens no other: the same tenant's, or another
    # tenant's, with the same path there.
    for other in [Sandbox.create(), Sandbox.create(api_key=env.b.key_e2b)]:
        try:
            other.files.write("/tmp/a.txt", "other")
            refused(httpx.get(read_a, headers={"Host": f"49983-{other.sandbox_id}.e2b.test"}))
            refused(httpx.get(read_a, headers={"E2b-Sandbox-Id": other.sandbox_id}))
        finally:
            other.kill()
    # A wrong token sent beside a good signature is still refused, as in envd.
    refused(httpx.get(read_a, headers={**headers, "X-Access-Token": "key_x.00"}))
    r = httpx.get(read_a.replace("signature=", "signature_expiration=soon&signature="), headers=headers)
    assert r.status_code == 400, r.text


def test_a_pty_runs_a_shell_takes_keystrokes_and_resizes(env: Env, sandbox: Sandbox) -> None:
    out = bytearray()
    h = sandbox.pty.create(PtySize(rows=24, cols=80), cwd="/tmp")
    assert h.pid in [p.pid for p in sandbox.commands.list()]
    sandbox.pty.send_stdin(h.pid, b"stty size; tty; echo $TERM; exit 7\n")
    with pytest.raises(CommandExitException) as e:
        h.wait(on_pty=out.extend)
    assert e.value.exit_code == 7
    text = out.decode(errors="replace")
    # A real terminal: its size, a tty device, and the keystrokes echoed.
    assert "24 80" in text and "/dev/pts/" in text and "xterm-256color" in text, text
    assert "stty size; tty" in text

    out.clear()
    h = sandbox.pty.create(PtySize(rows=24, cols=80))
    sandbox.pty.resize(h.pid, PtySize(rows=50, cols=132))
    sandbox.pty.send_stdin(h.pid, b"stty size; exit\n")
    assert h.wait(on_pty=out.extend).exit_code == 0
    assert "50 132" in out.decode(errors="replace")

    # A follower sees the terminal's output as pty data too.
    h = sandbox.pty.create(PtySize(rows=10, cols=40))
    frames: list = []
    with httpx.Client(timeout=60) as client, client.stream(
        "POST",
        env.server.url + "/process.Process/Connect",
        content=_envelope({"process": {"pid": h.pid}}),
        headers={**_headers(sandbox), "Content-Type": "application/connect+json"},
    ) as follower:
        chunks = follower.iter_bytes()
        raw = b""
        while len(raw) < 5 or len(raw) < 5 + struct.unpack(">I", raw[1:5])[0]:
            raw += next(chunks)
        sandbox.pty.send_stdin(h.pid, b"echo fol''lowed; exit\n")
        for chunk in chunks:
            raw += chunk
        frames = _envelopes(raw)
    data = b"".join(
        base64.b64decode(m["event"]["data"]["pty"])
        for _, m in frames
        if "data" in m.get("event", {})
    )
    assert b"followed" in data
    assert all("stdout" not in m.get("event", {}).get("data", {}) for _, m in frames)


def test_pty_calls_are_refused_for_plain_processes_and_bad_sizes(env: Env, sandbox: Sandbox) -> None:
    h = sandbox.commands.run("sleep 60", background=True, stdin=True)
    try:
        with pytest.raises(SandboxException):
            sandbox.pty.resize(h.pid, PtySize(rows=10, cols=10))
        with pytest.raises(SandboxException):
            sandbox.pty.send_stdin(h.pid, b"x")
    finally:
        sandbox.commands.kill(h.pid)
    frames = _stream(
        env, sandbox, "process.Process/Start", {**_start("true"), "pty": {"size": {"cols": 0, "rows": 10}}}
    )
    assert frames[-1][1]["error"]["code"] == "invalid_argument"
