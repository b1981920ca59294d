"""Directory watches through envd, with the unmodified E2B SDK and on the
wire: the SDK's polling watcher (CreateWatcher, GetWatcherEvents,
RemoveWatcher) and its streaming one (WatchDir), recursion, how each ends,
their bounds, and the tenant and sandbox boundaries they keep."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import struct
import time

import httpx
import pytest
from e2b import AsyncSandbox, FilesystemEventType, Sandbox
from e2b.sandbox.filesystem.filesystem import FileType
from e2b.exceptions import NotFoundException, SandboxException

from conftest import Env


def _headers(sb: Sandbox, token: str | None = None) -> dict[str, str]:
    return {
        "E2b-Sandbox-Id": sb.sandbox_id,
        "E2b-Sandbox-Port": "49983",
        "X-Access-Token": token if token is not None else (sb._envd_access_token or ""),
    }


def _unary(env: Env, sb: Sandbox, method: str, msg: dict, token: str | None = None) -> httpx.Response:
    return httpx.post(
        f"{env.server.url}/filesystem.Filesystem/{method}", json=msg, headers=_headers(sb, token), timeout=60
    )


def _envelope(msg: dict) -> bytes:
    body = json.dumps(msg).encode()
    return struct.pack(">BI", 0, len(body)) + body


class Frames:
    """Reads Connect envelopes off a streaming response as they come."""

    def __init__(self, resp: httpx.Response) -> None:
        self._chunks = resp.iter_bytes()
        self._buf = b""

    def next(self) -> tuple[int, dict]:
        while len(self._buf) < 5 or len(self._buf) < 5 + struct.unpack(">I", self._buf[1:5])[0]:
            self._buf += next(self._chunks)
        flags, n = struct.unpack(">BI", self._buf[:5])
        msg = json.loads(self._buf[5 : 5 + n] or b"{}")
        self._buf = self._buf[5 + n :]
        return flags, msg

    def until_end(self) -> list[tuple[int, dict]]:
        out = []
        while True:
            f = self.next()
            out.append(f)
            if f[0] & 2:
                return out


def _foreign_token(env: Env, sb: Sandbox) -> str:
    """An access token for `sb` made with tenant b's member key: it names a
    real, live key, but that key's tenant cannot see the sandbox."""
    key_hash = hashlib.sha256(env.b.key.encode()).hexdigest().encode()
    mac = hmac.new(key_hash, sb.sandbox_id.encode(), hashlib.sha256).hexdigest()
    return f"{env.b.key_id}.{mac}"


def _names(events, kind: FilesystemEventType) -> set[str]:
    return {e.name for e in events if e.type == kind}


def _watches_in_sandbox(sb: Sandbox) -> int:
    """The inotify instances open in the sandbox (the agent's watches)."""
    r = sb.commands.run("ls -l /proc/[0-9]*/fd 2>/dev/null | grep -c inotify || true", user="root")
    return int(r.stdout.strip() or 0)


def _until(check, what: str) -> None:
    for _ in range(600):
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"{what} within a minute")


def test_watch_dir_sees_what_a_command_makes_and_stop_ends_it(env: Env, sandbox: Sandbox) -> None:
    sandbox.files.make_dir("watched")
    handle = sandbox.files.watch_dir("watched")
    sandbox.commands.run("echo hi > watched/made.txt && mkdir watched/sub && chmod 600 watched/made.txt")
    # One call sees all of it: the server syncs with the agent first.
    events = handle.get_new_events()
    assert "made.txt" in _names(events, FilesystemEventType.CREATE), events
    assert "made.txt" in _names(events, FilesystemEventType.WRITE), events
    assert "made.txt" in _names(events, FilesystemEventType.CHMOD), events
    assert "sub" in _names(events, FilesystemEventType.CREATE), events
    # Taken events are not given again.
    assert handle.get_new_events() == []
    sandbox.commands.run("mv watched/made.txt watched/moved.txt && rm watched/moved.txt")
    events = handle.get_new_events()
    assert "made.txt" in _names(events, FilesystemEventType.RENAME), events
    assert "moved.txt" in _names(events, FilesystemEventType.REMOVE), events
    # Without recursion, what happens below a subdirectory is not seen.
    sandbox.commands.run("touch watched/sub/deep.txt")
    assert all("deep" not in e.name for e in handle.get_new_events())
    # A file the SDK writes is reported by its own name, never by the
    # temporary file it is written through.
    sandbox.files.write("watched/up.txt", "x")
    events = handle.get_new_events()
    assert "up.txt" in _names(events, FilesystemEventType.CREATE), events
    assert "up.txt" in _names(events, FilesystemEventType.WRITE), events
    assert all(e.name == "up.txt" for e in events), events

    watcher_id = handle._watcher_id
    handle.stop()
    with pytest.raises(SandboxException):
        handle.get_new_events()
    # Stopped in the server too: the watcher is gone, and so is the
    # agent's watch.
    for method in ("GetWatcherEvents", "RemoveWatcher"):
        r = _unary(env, sandbox, method, {"watcherId": watcher_id})
        assert r.status_code == 404 and r.json()["code"] == "not_found", r.text
    _until(lambda: _watches_in_sandbox(sandbox) == 0, "the agent's watch did not stop")


def test_a_recursive_watch_follows_new_and_old_subdirectories(sandbox: Sandbox) -> None:
    sandbox.files.make_dir("tree/old")
    handle = sandbox.files.watch_dir("tree", recursive=True)
    try:
        sandbox.files.write("tree/old/a.txt", "a")
        sandbox.files.make_dir("tree/new")
        sandbox.commands.run("mkdir -p tree/new/deeper && echo b > tree/new/deeper/b.txt")
        events = handle.get_new_events()
        created = _names(events, FilesystemEventType.CREATE)
        assert {"old/a.txt", "new", "new/deeper", "new/deeper/b.txt"} <= created, events
        assert "old/a.txt" in _names(events, FilesystemEventType.WRITE), events
    finally:
        handle.stop()


def test_watching_what_is_not_a_directory_is_refused(env: Env, sandbox: Sandbox) -> None:
    with pytest.raises(NotFoundException):
        sandbox.files.watch_dir("no-such-dir")
    sandbox.files.write("plain.txt", "x")
    with pytest.raises(SandboxException):
        sandbox.files.watch_dir("plain.txt")
    r = _unary(env, sandbox, "GetWatcherEvents", {})
    assert r.status_code == 400 and r.json()["code"] == "invalid_argument", r.text
    r = _unary(env, sandbox, "GetWatcherEvents", {"watcherId": "nope"})
    assert r.status_code == 404 and r.json()["code"] == "not_found", r.text
    # Network mounts are not refused here, so allowing them changes nothing.
    r = _unary(env, sandbox, "CreateWatcher", {"path": "/tmp", "allowNetworkMounts": True})
    assert r.status_code == 200, r.text
    assert _unary(env, sandbox, "RemoveWatcher", r.json()).status_code == 200


def test_events_carry_their_entries_when_asked(sandbox: Sandbox) -> None:
    sandbox.files.make_dir("ent")
    handle = sandbox.files.watch_dir("ent", include_entry=True, allow_network_mounts=True)
    try:
        sandbox.files.write("ent/a.txt", "abc", metadata={"tag": "x"})
        sandbox.commands.run("mkdir ent/d && echo gone > ent/g && rm ent/g")
        events = handle.get_new_events()
        made = {e.name: e.entry for e in events if e.type == FilesystemEventType.CREATE}
        assert made["a.txt"] is not None and made["a.txt"].size == 3, events
        assert made["a.txt"].metadata == {"tag": "x"}
        assert made["a.txt"].path == "/home/user/ent/a.txt"
        assert made["d"] is not None and made["d"].type == FileType.DIR, events
        # What is gone has no entry.
        assert all(e.entry is None for e in events if e.type == FilesystemEventType.REMOVE), events
        assert made.get("g") is None
    finally:
        handle.stop()
    # Without asking, events name their path alone.
    plain = sandbox.files.watch_dir("ent")
    try:
        sandbox.files.write("ent/b.txt", "b")
        assert all(e.entry is None for e in plain.get_new_events())
    finally:
        plain.stop()


async def test_the_async_sdk_streams_events_until_stopped(env: Env) -> None:
    sb = await AsyncSandbox.create()
    try:
        await sb.files.make_dir("live")
        seen: list = []
        made = asyncio.Event()
        exits: list = []

        def on_event(e) -> None:
            seen.append(e)
            if e.name == "made.txt" and e.type == FilesystemEventType.CREATE:
                made.set()

        handle = await sb.files.watch_dir(
            "live", on_event=on_event, on_exit=exits.append, timeout=0, include_entry=True
        )
        await sb.commands.run("echo hi > live/made.txt")
        await asyncio.wait_for(made.wait(), 60)
        entry = next(e.entry for e in seen if e.name == "made.txt" and e.type == FilesystemEventType.CREATE)
        assert entry is not None and entry.name == "made.txt", seen
        await handle.stop()
        assert exits == [None]
        # The stream's end reaches the agent: its watch goes.
        for _ in range(600):
            r = await sb.commands.run("ls -l /proc/[0-9]*/fd 2>/dev/null | grep -c inotify || true", user="root")
            if int(r.stdout.strip() or 0) == 0:
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the agent's watch did not stop within a minute")
    finally:
        await sb.kill()


def test_watch_dir_on_the_wire_starts_streams_and_ends(env: Env, sandbox: Sandbox) -> None:
    sandbox.files.make_dir("/tmp/wire")
    url = env.server.url + "/filesystem.Filesystem/WatchDir"
    headers = {**_headers(sandbox), "Content-Type": "application/connect+json"}
    with httpx.Client(timeout=120) as client:
        with client.stream("POST", url, content=_envelope({"path": "/tmp/wire"}), headers=headers) as resp:
            assert resp.status_code == 200
            assert resp.headers["content-type"] == "application/connect+json"
            frames = Frames(resp)
            assert frames.next() == (0, {"start": {}})
            sandbox.commands.run("touch /tmp/wire/f")
            flags, msg = frames.next()
            assert flags == 0 and msg == {"filesystem": {"name": "f", "type": "EVENT_TYPE_CREATE"}}, msg
            # The directory goes: the stream ends cleanly.
            sandbox.commands.run("rm -rf /tmp/wire")
            rest = frames.until_end()
            assert rest[-1] == (2, {}), rest
        # At its deadline: deadline_exceeded, as envd's deadline.
        sandbox.files.make_dir("/tmp/wire")
        timed = {**headers, "connect-timeout-ms": "1500"}
        with client.stream("POST", url, content=_envelope({"path": "/tmp/wire"}), headers=timed) as resp:
            end = Frames(resp).until_end()
            assert end[0] == (0, {"start": {}})
            assert end[-1][1]["error"]["code"] == "deadline_exceeded", end
        # Quiet long enough, it carries keepalives.
        ka = {**headers, "keepalive-ping-interval": "1", "connect-timeout-ms": "60000"}
        with client.stream("POST", url, content=_envelope({"path": "/tmp/wire"}), headers=ka) as resp:
            frames = Frames(resp)
            assert frames.next() == (0, {"start": {}})
            assert frames.next() == (0, {"keepalive": {}})
        # Refusals come in the end of the stream.
        with client.stream("POST", url, content=_envelope({"path": "/nope"}), headers=headers) as resp:
            end = Frames(resp).until_end()
            assert end == [(2, {"error": {"code": "not_found", "message": end[0][1]["error"]["message"]}})]


def test_a_killed_sandbox_ends_its_watches(env: Env) -> None:
    sb = Sandbox.create()
    try:
        handle = sb.files.watch_dir("/tmp")
        url = env.server.url + "/filesystem.Filesystem/WatchDir"
        headers = {**_headers(sb), "Content-Type": "application/connect+json"}
        with httpx.Client(timeout=120) as client:
            with client.stream("POST", url, content=_envelope({"path": "/tmp"}), headers=headers) as resp:
                frames = Frames(resp)
                assert frames.next() == (0, {"start": {}})
                assert Sandbox.kill(sb.sandbox_id) is True
                end = frames.until_end()
                assert end[-1][1]["error"]["code"] == "unavailable", end
        with pytest.raises(SandboxException):
            handle.get_new_events()
    finally:
        Sandbox.kill(sb.sandbox_id)


def test_a_sandbox_whose_watch_already_ended_is_killed_and_the_server_goes_on(env: Env) -> None:
    sb = Sandbox.create()
    try:
        sb.files.make_dir("/tmp/going")
        handle = sb.files.watch_dir("/tmp/going")
        # The watched directory goes: the watch ends in the agent, and the
        # watcher's task in the server ends with it; the watcher stays
        # until it is removed or its sandbox goes.
        sb.commands.run("rm -r /tmp/going", user="root")
        handle.get_new_events()
        _until(lambda: _watches_in_sandbox(sb) == 0, "the agent's watch did not end")
        time.sleep(0.5)
        # Killing the sandbox forgets that watcher, and the server answers
        # this and what comes after.
        r = httpx.delete(
            f"{env.server.url}/sandboxes/{sb.sandbox_id}", headers={"X-API-KEY": env.a.key_e2b}, timeout=30
        )
        assert r.status_code == 204, r.text
        other = Sandbox.create()
        other.kill()
    finally:
        Sandbox.kill(sb.sandbox_id)


def test_another_tenants_key_cannot_watch_or_read_a_watcher(env: Env, sandbox: Sandbox) -> None:
    handle = sandbox.files.watch_dir("/tmp")
    theirs = Sandbox.create(api_key=env.b.key_e2b)
    try:
        foreign = _foreign_token(env, sandbox)
        # A token of a live key of another tenant: the sandbox is not theirs.
        for method, msg in [
            ("CreateWatcher", {"path": "/tmp"}),
            ("GetWatcherEvents", {"watcherId": handle._watcher_id}),
            ("RemoveWatcher", {"watcherId": handle._watcher_id}),
        ]:
            r = _unary(env, sandbox, method, msg, token=foreign)
            assert r.status_code == 502 and "not found" in r.json()["message"], (method, r.text)
        r = httpx.post(
            env.server.url + "/filesystem.Filesystem/WatchDir",
            content=_envelope({"path": "/tmp"}),
            headers={**_headers(sandbox, foreign), "Content-Type": "application/connect+json"},
            timeout=60,
        )
        assert r.status_code == 502, r.text
        # Their own sandbox and token do not reach this sandbox's watcher.
        for method in ("GetWatcherEvents", "RemoveWatcher"):
            r = _unary(env, theirs, method, {"watcherId": handle._watcher_id})
            assert r.status_code == 404, (method, r.text)
        # It still works for its own tenant.
        sandbox.commands.run("touch /tmp/still.txt")
        assert "still.txt" in _names(handle.get_new_events(), FilesystemEventType.CREATE)
    finally:
        handle.stop()
        theirs.kill()


def test_a_sandbox_holds_a_bounded_number_of_watches(env: Env, sandbox: Sandbox) -> None:
    ids = []
    try:
        while True:
            r = _unary(env, sandbox, "CreateWatcher", {"path": "/tmp"})
            if r.status_code != 200:
                break
            ids.append(r.json()["watcherId"])
            assert len(ids) <= 32, "more than 32 watches were accepted"
        assert r.status_code == 429 and r.json()["code"] == "resource_exhausted", r.text
        assert len(ids) == 32
        # Removing one gives its place back.
        assert _unary(env, sandbox, "RemoveWatcher", {"watcherId": ids.pop()}).status_code == 200

        def created() -> bool:
            r = _unary(env, sandbox, "CreateWatcher", {"path": "/tmp"})
            if r.status_code == 200:
                ids.append(r.json()["watcherId"])
            return r.status_code == 200

        _until(created, "a removed watcher's place did not come back")
    finally:
        for i in ids:
            _unary(env, sandbox, "RemoveWatcher", {"watcherId": i})


def test_one_poll_after_a_large_change_sees_all_of_it(sandbox: Sandbox) -> None:
    sandbox.files.make_dir("many")
    handle = sandbox.files.watch_dir("many")
    try:
        for round in range(3):
            sandbox.commands.run(f"cd many && for i in $(seq 1 2000); do : > r{round}-$i; done")
            created = _names(handle.get_new_events(), FilesystemEventType.CREATE)
            missing = {f"r{round}-{i}" for i in range(1, 2001)} - created
            assert not missing, f"round {round}: {len(missing)} creations not reported"
    finally:
        handle.stop()


def test_a_watcher_nobody_reads_fails_instead_of_dropping_events(env: Env, sandbox: Sandbox) -> None:
    sandbox.files.make_dir("/tmp/flood")
    r = _unary(env, sandbox, "CreateWatcher", {"path": "/tmp/flood"})
    assert r.status_code == 200, r.text
    watcher = r.json()
    sandbox.commands.run("cd /tmp/flood && for i in $(seq 1 6000); do : > a$i; : > b$i; done")
    # Twice: a retried poll reads the same refusal.
    for _ in range(2):
        r = _unary(env, sandbox, "GetWatcherEvents", watcher)
        assert r.status_code == 429 and r.json()["code"] == "resource_exhausted", r.text[:300]
        assert "10000 events" in r.json()["message"]
    assert _unary(env, sandbox, "RemoveWatcher", watcher).status_code == 200
    assert _unary(env, sandbox, "GetWatcherEvents", watcher).status_code == 404
