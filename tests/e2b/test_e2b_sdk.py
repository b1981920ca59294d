"""The unmodified E2B SDK against StacyVM's E2B-compatible API: commands,
files, lifecycle and listing, the async client, and the tenant, token and
isolation boundaries the API must keep."""

from __future__ import annotations

import os
import time
import uuid
from datetime import datetime, timedelta, timezone

import httpx
import pytest
from e2b import AsyncSandbox, Sandbox, SandboxQuery, SandboxState
from e2b.exceptions import (
    AuthenticationException,
    NotFoundException,
    SandboxException,
)
from e2b.sandbox.commands.command_handle import CommandExitException
from e2b.sandbox.filesystem.filesystem import FileType

import stacyvm

from conftest import Env


def test_commands_stream_output_and_report_exit_codes(sandbox: Sandbox) -> None:
    out, err = [], []
    r = sandbox.commands.run("echo out; echo err >&2; pwd", on_stdout=out.append, on_stderr=err.append)
    assert r.exit_code == 0
    assert r.stdout == "out\n/home/user\n"
    assert r.stderr == "err\n"
    assert "".join(out) == "out\n/home/user\n"
    assert "".join(err) == "err\n"
    with pytest.raises(CommandExitException) as e:
        sandbox.commands.run("echo partial; exit 3")
    assert e.value.exit_code == 3
    assert e.value.stdout == "partial\n"
    r = sandbox.commands.run("echo $GREETING-$HOME", envs={"GREETING": "hi"}, cwd="/tmp")
    assert r.stdout == "hi-/home/user\n"
    # The user picks the home that relative paths and commands start in.
    assert sandbox.commands.run("pwd; echo $USER", user="root").stdout == "/root\nroot\n"
    assert sandbox.files.write("as-root.txt", "r", user="root").path == "/root/as-root.txt"
    assert sandbox.files.read("/root/as-root.txt") == "r"


def test_commands_and_files_act_as_the_user_they_name(sandbox: Sandbox) -> None:
    # E2B's default user runs commands with its own uid, as in E2B.
    assert sandbox.commands.run("id -un; id -u; id -G").stdout == "user\n1000\n1000\n"
    assert sandbox.commands.run("id -un", user="root").stdout == "root\n"
    # What is written for the user is theirs, directories made for it too,
    # so their commands can change it.
    sandbox.files.write("mine/notes.txt", "hi\n")
    sandbox.files.make_dir("made/deeper")
    r = sandbox.commands.run(
        "stat -c %U mine mine/notes.txt made made/deeper; echo more >> mine/notes.txt; touch made/deeper/t"
    )
    assert r.stdout == "user\nuser\nuser\nuser\n"
    assert sandbox.files.read("mine/notes.txt") == "hi\nmore\n"
    # The home itself is the user's in the E2B image.
    assert sandbox.commands.run("touch ~/t && stat -c %U ~").stdout == "user\n"
    # root's files stay root's: the user cannot change them.
    sandbox.files.write("/root/secret.txt", "s", user="root")
    assert sandbox.commands.run("stat -c %U /root/secret.txt", user="root").stdout == "root\n"
    with pytest.raises(CommandExitException):
        sandbox.commands.run("echo x >> /root/secret.txt")
    # A user the sandbox does not have is a clear error, not root.
    with pytest.raises(SandboxException) as e:
        sandbox.commands.run("id", user="nobody-at-all")
    assert "no user" in str(e.value)


def test_an_image_without_the_e2b_user_keeps_its_own(env: Env) -> None:
    # The busybox catalog image has root and nobody only: what names no
    # user acts as the sandbox's own (root), what names one is refused.
    sb = Sandbox.create("busybox")
    try:
        assert sb.files.write("/tmp/plain.txt", "x").path == "/tmp/plain.txt"
        assert sb.files.get_info("/tmp/plain.txt").owner == "root"
        sb.files.make_dir("/tmp/made")
        assert sb.files.get_info("/tmp/made").owner == "root"
        with pytest.raises(SandboxException) as e:
            sb.files.write("/tmp/named.txt", "x", user="user")
        assert "no user" in str(e.value)
        assert sb.files.write("/tmp/nobody.txt", "x", user="nobody").path == "/tmp/nobody.txt"
        assert sb.files.get_info("/tmp/nobody.txt").owner == "nobody"
    finally:
        sb.kill()


def test_a_sandbox_past_its_timeout_is_not_running(env: Env) -> None:
    sb = Sandbox.create(timeout=60)
    try:
        assert sb.is_running()
        sb.set_timeout(1)
        time.sleep(1.5)
        # Gone to the SDK at its deadline, whether or not the reaper has
        # removed it yet.
        assert sb.is_running() is False
    finally:
        sb.kill()


def test_routes_stacyvm_does_not_serve_answer_in_e2b_shape(env: Env, sandbox: Sandbox) -> None:
    headers = {"X-API-KEY": env.a.key_e2b}
    for method, path in [
        ("POST", f"/sandboxes/{sandbox.sandbox_id}/fork"),
        ("POST", f"/sandboxes/{sandbox.sandbox_id}/snapshots"),
        ("GET", "/snapshots"),
        ("PUT", f"/sandboxes/{sandbox.sandbox_id}/network"),
        ("GET", "/volumes"),
        ("POST", "/v3/templates"),
    ]:
        r = httpx.request(method, env.server.url + path, headers=headers, json={})
        assert r.status_code == 404, (path, r.text)
        body = r.json()
        assert body["code"] == 404 and "not supported" in body["message"], (path, body)
    # StacyVM's own routes keep their own shape.
    r = httpx.get(env.server.url + "/v1/nothing-here", headers=headers)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_file_metadata_is_kept_as_extended_attributes(sandbox: Sandbox) -> None:
    info = sandbox.files.write("meta/a.txt", "a", metadata={"Owner": "me", "run": "42"})
    assert info.metadata == {"owner": "me", "run": "42"}
    assert sandbox.files.get_info("meta/a.txt").metadata == {"owner": "me", "run": "42"}
    listed = {e.name: e.metadata for e in sandbox.files.list("meta")}
    assert listed == {"a.txt": {"owner": "me", "run": "42"}}
    # Attributes set inside the sandbox show too; other namespaces do not.
    sandbox.files.write("meta/b.txt", "b")
    assert sandbox.files.get_info("meta/b.txt").metadata is None
    moved = sandbox.files.rename("meta/a.txt", "meta/c.txt")
    assert moved.metadata == {"owner": "me", "run": "42"}
    # Several files in one upload each get the map.
    infos = sandbox.files.write_files(
        [{"path": "meta/d.txt", "data": "d"}, {"path": "meta/e.txt", "data": "e"}], metadata={"k": "v"}
    )
    assert [i.metadata for i in infos] == [{"k": "v"}, {"k": "v"}]
    assert sandbox.files.get_info("meta/e.txt").metadata == {"k": "v"}


def test_create_env_vars_reach_every_command(env: Env) -> None:
    sb = Sandbox.create(envs={"FROM_CREATE": "yes"})
    try:
        assert sb.commands.run("echo $FROM_CREATE").stdout == "yes\n"
    finally:
        sb.kill()


def test_background_commands_wait_take_stdin_and_can_be_killed(sandbox: Sandbox) -> None:
    h = sandbox.commands.run("read line; echo got:$line", background=True, stdin=True)
    sandbox.commands.send_stdin(h.pid, "hello\n")
    r = h.wait()
    assert r.stdout == "got:hello\n"

    h = sandbox.commands.run("cat", background=True, stdin=True)
    sandbox.commands.send_stdin(h.pid, "a")
    sandbox.commands.send_stdin(h.pid, "b\n")
    sandbox.commands.close_stdin(h.pid)
    assert h.wait().stdout == "ab\n"

    h = sandbox.commands.run("sleep 600", background=True)
    assert h.pid in [p.pid for p in sandbox.commands.list()]
    assert sandbox.commands.kill(h.pid) is True
    with pytest.raises(CommandExitException):
        h.wait()
    assert h.pid not in [p.pid for p in sandbox.commands.list()]
    assert sandbox.commands.kill(h.pid) is False
    # The pid names no process inside the sandbox (it is above any the
    # kernel gives), so checking it there says it is gone.
    gone = sandbox.commands.run(f"kill -0 {h.pid} 2>/dev/null && echo alive || echo gone")
    assert gone.stdout == "gone\n"


def test_stdin_streams_in_order(sandbox: Sandbox) -> None:
    h = sandbox.commands.run("cat", background=True, stdin=True)
    sandbox.commands.stream_input(h.pid, (f"line{i}\n" for i in range(50)))
    sandbox.commands.close_stdin(h.pid)
    assert h.wait().stdout == "".join(f"line{i}\n" for i in range(50))
    with pytest.raises(NotFoundException):
        sandbox.commands.send_stdin(h.pid, "gone")
    # A command started without stdin reads end-of-file, and takes no input.
    assert sandbox.commands.run("cat").stdout == ""
    h = sandbox.commands.run("sleep 600", background=True)
    try:
        with pytest.raises(SandboxException):
            sandbox.commands.send_stdin(h.pid, "x")
    finally:
        sandbox.commands.kill(h.pid)


def test_connect_follows_a_running_command(sandbox: Sandbox) -> None:
    h = sandbox.commands.run("read x; echo after:$x", background=True, stdin=True)
    follower = sandbox.commands.connect(h.pid)
    sandbox.commands.send_stdin(h.pid, "1\n")
    assert follower.wait().stdout == "after:1\n"
    assert h.wait().stdout == "after:1\n"


def test_files_round_trip_list_and_manage(sandbox: Sandbox) -> None:
    info = sandbox.files.write("notes/a.txt", "hello")
    assert info.path == "/home/user/notes/a.txt"
    assert sandbox.files.read("notes/a.txt") == "hello"
    assert sandbox.commands.run("cat /home/user/notes/a.txt").stdout == "hello"
    assert sandbox.files.exists("notes/a.txt") is True
    assert sandbox.files.exists("notes/missing") is False
    assert sandbox.files.make_dir("notes/sub") is True
    assert sandbox.files.make_dir("notes/sub") is False
    entries = {e.name: e for e in sandbox.files.list("notes")}
    assert set(entries) == {"a.txt", "sub"}
    assert entries["a.txt"].type == FileType.FILE
    assert entries["sub"].type == FileType.DIR
    st = sandbox.files.get_info("notes/a.txt")
    assert st.size == 5 and st.path == "/home/user/notes/a.txt"
    moved = sandbox.files.rename("notes/a.txt", "notes/sub/b.txt")
    assert moved.path == "/home/user/notes/sub/b.txt"
    assert sandbox.files.exists("notes/a.txt") is False
    deep = [e.path for e in sandbox.files.list("notes", depth=2)]
    assert "/home/user/notes/sub/b.txt" in deep
    sandbox.files.remove("notes")
    assert sandbox.files.exists("notes") is False
    with pytest.raises(NotFoundException):
        sandbox.files.read("notes/sub/b.txt")


def test_binary_files_of_several_mib_round_trip(sandbox: Sandbox) -> None:
    data = os.urandom(5 * 1024 * 1024 + 123)
    sandbox.files.write("/tmp/blob.bin", data)
    assert sandbox.files.read("/tmp/blob.bin", format="bytes") == bytes(data)
    # A file object goes up as raw bytes (octet-stream) rather than multipart.
    import io

    sandbox.files.write("/tmp/blob2.bin", io.BytesIO(data))
    assert bytes(sandbox.files.read("/tmp/blob2.bin", format="bytes")) == data
    size = sandbox.commands.run("wc -c < /tmp/blob2.bin").stdout.strip()
    assert int(size) == len(data)


def test_lifecycle_timeout_info_list_connect_and_kill(env: Env) -> None:
    tag = uuid.uuid4().hex
    sb = Sandbox.create(metadata={"run": tag, "role": "one"}, timeout=120)
    other = Sandbox.create(metadata={"run": tag, "role": "two"})
    try:
        info = sb.get_info()
        assert info.sandbox_id == sb.sandbox_id
        assert info.template_id == "base"
        assert info.metadata == {"run": tag, "role": "one"}
        before = info.end_at
        sb.set_timeout(600)
        assert sb.get_info().end_at > before

        found = Sandbox.list(query=SandboxQuery(metadata={"run": tag, "role": "one"})).next_items()
        assert Sandbox.list(query=SandboxQuery(metadata={"run": tag}, template="other")).next_items() == []
        later = datetime.now(timezone.utc) + timedelta(hours=1)
        assert Sandbox.list(query=SandboxQuery(metadata={"run": tag}, started_after=later)).next_items() == []
        assert [s.sandbox_id for s in found] == [sb.sandbox_id]
        # Newest first, as E2B lists.
        both = Sandbox.list(query=SandboxQuery(metadata={"run": tag})).next_items()
        assert [s.sandbox_id for s in both] == [other.sandbox_id, sb.sandbox_id]
        # One per page, through x-next-token, in the same order.
        pages = Sandbox.list(query=SandboxQuery(metadata={"run": tag}), limit=1)
        paged = []
        while pages.has_next:
            paged.extend(s.sandbox_id for s in pages.next_items())
        assert paged == [other.sandbox_id, sb.sandbox_id]
        # order=asc pages oldest first; another order is refused.
        own = {"X-API-KEY": env.a.key_e2b}
        asc, token = [], None
        while True:
            params = {"metadata": f"run={tag}", "order": "asc", "limit": "1"}
            if token:
                params["nextToken"] = token
            r = httpx.get(f"{env.server.url}/v2/sandboxes", params=params, headers=own)
            assert r.status_code == 200, r.text
            asc.extend(x["sandboxID"] for x in r.json())
            token = r.headers.get("x-next-token")
            if not token:
                break
        assert asc == [sb.sandbox_id, other.sandbox_id]
        bad = httpx.get(f"{env.server.url}/v2/sandboxes", params={"order": "sideways"}, headers=own)
        assert bad.status_code == 400 and "order" in bad.json()["message"]
        # startedAfter is "at or after".
        at = Sandbox.list(query=SandboxQuery(metadata={"run": tag, "role": "one"}, started_after=info.started_at))
        assert [s.sandbox_id for s in at.next_items()] == [sb.sandbox_id]
        # A filter the store cannot apply still fills the page: the first
        # page of one holds the later sandbox, not an empty list.
        second = other.get_info().started_at
        assert second >= info.started_at
        later_only = Sandbox.list(query=SandboxQuery(metadata={"run": tag}, started_after=second), limit=1)
        assert [s.sandbox_id for s in later_only.next_items()] == [other.sandbox_id]

        again = Sandbox.connect(sb.sandbox_id)
        assert again.commands.run("echo connected").stdout == "connected\n"
        assert again.is_running()
    finally:
        assert sb.kill() is True
        other.kill()
    assert Sandbox.kill(sb.sandbox_id) is False
    with pytest.raises(SandboxException):
        Sandbox.get_info(sb.sandbox_id)
    assert Sandbox.kill("sbx_" + "0" * 32) is False
    gone = Sandbox.list(query=SandboxQuery(metadata={"run": tag})).next_items()
    assert gone == []


def test_pause_and_connect_resumes(env: Env) -> None:
    sb = Sandbox.create()
    try:
        sb.files.write("kept.txt", "still here")
        assert sb.pause() is True
        assert Sandbox.get_info(sb.sandbox_id).state == "paused"
        assert sb.pause() is False
        listed = Sandbox.list(query=SandboxQuery(state=[SandboxState.PAUSED], template="base")).next_items()
        assert sb.sandbox_id in [s.sandbox_id for s in listed]
        # envd's health says a paused sandbox is not running.
        assert sb.is_running() is False
        resumed = Sandbox.connect(sb.sandbox_id)
        assert resumed.is_running() is True
        assert Sandbox.get_info(sb.sandbox_id).state == "running"
        assert resumed.files.read("kept.txt") == "still here"
    finally:
        sb.kill()


async def test_async_sandbox_core_flow(env: Env) -> None:
    sb = await AsyncSandbox.create(metadata={"suite": "async"})
    try:
        out = []
        r = await sb.commands.run("echo async", on_stdout=out.append)
        assert r.stdout == "async\n" and "".join(out) == "async\n"
        await sb.files.write("a.txt", b"\x00\x01bytes")
        assert await sb.files.read("a.txt", format="bytes") == b"\x00\x01bytes"
        h = await sb.commands.run("sleep 600", background=True)
        assert await sb.commands.kill(h.pid) is True
        info = await sb.get_info()
        assert info.sandbox_id == sb.sandbox_id
    finally:
        assert await sb.kill() is True


def test_another_tenants_key_finds_nothing(env: Env, sandbox: Sandbox) -> None:
    foreign = {"api_key": env.b.key_e2b}
    with pytest.raises(SandboxException) as e:
        Sandbox.get_info(sandbox.sandbox_id, **foreign)
    assert "not found" in str(e.value)
    assert Sandbox.kill(sandbox.sandbox_id, **foreign) is False
    with pytest.raises(SandboxException):
        Sandbox.connect(sandbox.sandbox_id, **foreign)
    assert Sandbox.list(query=SandboxQuery(metadata={"suite": "e2b"}), **foreign).next_items() == []
    # Still there for its own tenant.
    assert sandbox.commands.run("true").exit_code == 0


def test_a_viewer_key_reads_but_changes_nothing(env: Env, sandbox: Sandbox) -> None:
    sandbox.files.write("/tmp/seen.txt", "visible")
    with stacyvm.Client(env.server.url, env.server.admin_key) as admin:
        k = admin.create_key(env.a.id, "viewer", "e2b-viewer")
    assert k.key_e2b is not None
    viewer = {"api_key": k.key_e2b}
    with pytest.raises(SandboxException):
        Sandbox.create(**viewer)
    seen = Sandbox.connect(sandbox.sandbox_id, **viewer)
    assert seen.files.read("/tmp/seen.txt") == "visible"
    with pytest.raises(SandboxException) as e:
        seen.files.write("/tmp/seen.txt", "changed")
    assert "read-only" in str(e.value)
    with pytest.raises(SandboxException) as e:
        seen.commands.run("true")
    assert "read-only" in str(e.value)
    with pytest.raises(SandboxException):
        seen.set_timeout(3600)
    with pytest.raises(SandboxException):
        Sandbox.kill(sandbox.sandbox_id, **viewer)
    assert Sandbox.get_info(sandbox.sandbox_id, **viewer).sandbox_id == sandbox.sandbox_id
    info = httpx.get(env.server.url + f"/sandboxes/{sandbox.sandbox_id}", headers={"X-API-KEY": k.key_e2b})
    token = info.json()["envdAccessToken"]
    headers = {"E2b-Sandbox-Id": sandbox.sandbox_id, "X-Access-Token": token}
    read = httpx.get(env.server.url + "/files", params={"path": "/tmp/seen.txt"}, headers=headers)
    assert read.status_code == 200 and read.content == b"visible"
    write = httpx.post(env.server.url + "/files", params={"path": "/tmp/seen.txt"}, content=b"changed",
                       headers={**headers, "Content-Type": "application/octet-stream"})
    assert write.status_code == 403, write.text
    moved = httpx.post(env.server.url + "/filesystem.Filesystem/Remove", json={"path": "/tmp/seen.txt"},
                       headers=headers)
    assert moved.status_code == 403 and moved.json()["code"] == "permission_denied"
    assert sandbox.is_running()
    assert sandbox.files.read("/tmp/seen.txt") == "visible"


def test_the_tenants_quota_holds_for_e2b_creates(env: Env) -> None:
    with stacyvm.Client(env.server.url, env.server.admin_key) as admin:
        t = admin.create_tenant("e2b-quota")
        admin.set_quota(t.id, stacyvm.Quota(max_sandboxes=1, max_timeout_s=600))
        k = admin.create_key(t.id, "member", "quota")
    assert k.key_e2b is not None
    opts = {"api_key": k.key_e2b}
    first = Sandbox.create(timeout=60, **opts)
    try:
        with pytest.raises(SandboxException) as e:
            Sandbox.create(timeout=60, **opts)
        assert "max_sandboxes" in str(e.value)
        with pytest.raises(SandboxException) as e:
            first.set_timeout(3600)
        assert "max_timeout_s" in str(e.value)
    finally:
        first.kill()
    Sandbox.create(timeout=60, **opts).kill()


def _envd(env: Env, sandbox_id: str, token: str, **headers: str) -> httpx.Response:
    return httpx.post(
        env.server.url + "/filesystem.Filesystem/Stat",
        json={"path": "/"},
        headers={"E2b-Sandbox-Id": sandbox_id, "E2b-Sandbox-Port": "49983", "X-Access-Token": token, **headers},
    )


def test_envd_calls_need_the_sandboxs_own_access_token(env: Env, sandbox: Sandbox) -> None:
    token = sandbox._envd_access_token
    assert token
    ok = _envd(env, sandbox.sandbox_id, token)
    assert ok.status_code == 200, ok.text
    assert ok.json()["entry"]["type"] == "FILE_TYPE_DIRECTORY"
    for bad in ["", "nonsense", token[:-2] + "00", token.split(".")[0] + "." + "ab" * 32]:
        r = _envd(env, sandbox.sandbox_id, bad)
        assert r.status_code == 401, (bad, r.text)
        assert r.json()["code"] == "unauthenticated"
    # A token for another sandbox (of another tenant) opens only that one.
    theirs = Sandbox.create(api_key=env.b.key_e2b)
    try:
        r = _envd(env, sandbox.sandbox_id, theirs._envd_access_token)
        assert r.status_code == 401
        r = _envd(env, theirs.sandbox_id, theirs._envd_access_token)
        assert r.status_code == 200
    finally:
        theirs.kill()


def test_envd_is_also_routed_by_host_name(env: Env, sandbox: Sandbox) -> None:
    r = httpx.post(
        env.server.url + "/filesystem.Filesystem/Stat",
        json={"path": "/home/user"},
        headers={"Host": f"49983-{sandbox.sandbox_id}.e2b.test", "X-Access-Token": sandbox._envd_access_token},
    )
    assert r.status_code == 200, r.text
    assert r.json()["entry"]["path"] == "/home/user"
    host = f"49983-{sandbox.sandbox_id}.e2b.test"
    health = httpx.get(
        env.server.url + "/health", headers={"Host": host, "X-Access-Token": sandbox._envd_access_token}
    )
    assert health.status_code == 204
    # A sandbox's health is its own business: without its token, 401.
    assert httpx.get(env.server.url + "/health", headers={"Host": host}).status_code == 401


def test_revoked_keys_and_their_e2b_spelling_are_refused(env: Env) -> None:
    with stacyvm.Client(env.server.url, env.server.admin_key) as admin:
        k = admin.create_key(env.a.id, "member", "short-lived")
        assert k.key_e2b is not None
        sb = Sandbox.create(api_key=k.key_e2b)
        token = sb._envd_access_token
        admin.revoke_key(k.id)
    try:
        with pytest.raises(AuthenticationException):
            Sandbox.create(api_key=k.key_e2b)
        assert _envd(env, sb.sandbox_id, token).status_code == 401
    finally:
        Sandbox.kill(sb.sandbox_id)


def test_a_member_sandbox_cannot_reach_the_servers_data_or_secrets(env: Env, sandbox: Sandbox) -> None:
    admin_key = env.server.admin_key
    data_dir = str(env.data_dir)
    assert (env.data_dir / "stacyvm.db").exists()
    r = sandbox.commands.run(f"ls {data_dir}/stacyvm.db; cat /proc/1/environ; env", envs={})
    assert admin_key not in r.stdout and admin_key not in r.stderr
    assert sandbox.files.exists(f"{data_dir}/stacyvm.db") is False
    with pytest.raises(NotFoundException):
        sandbox.files.read(f"{data_dir}/stacyvm.db")
    found = sandbox.commands.run(
        "find / \\( -path /proc -o -path /sys \\) -prune -o -name stacyvm.db -print 2>/dev/null; true",
        timeout=120,
    ).stdout
    assert found.strip() == ""
    mounts = sandbox.commands.run("cat /proc/mounts").stdout
    assert data_dir not in mounts


def test_calls_are_audited_under_the_members_key(env: Env, sandbox: Sandbox) -> None:
    sandbox.files.write("/tmp/audited.txt", "x")
    sandbox.commands.run("true")
    with stacyvm.Client(env.server.url, env.server.admin_key) as admin:
        events = list(admin.list_audit(sandbox_id=sandbox.sandbox_id, limit=1000))
    actions = {e.action: e for e in events}
    assert actions["sandbox.create"].actor.key_id == env.a.key_id
    assert actions["file.write"].actor.key_id == env.a.key_id
    assert "e2b.process.start" in actions


def test_control_api_answers_health_templates_and_refuses_what_it_cannot_honour(env: Env) -> None:
    url = env.server.url
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    t = httpx.get(url + "/templates/base", headers={"X-API-KEY": env.a.key_e2b})
    assert t.status_code == 200 and t.json()["status"] == "ready"
    missing = httpx.get(url + "/templates/no-such-template", headers={"X-API-KEY": env.a.key_e2b})
    assert missing.status_code == 404 and "not found" in missing.json()["message"]
    unnamable = httpx.get(url + "/templates/Not%20A%20Name", headers={"X-API-KEY": env.a.key_e2b})
    assert unnamable.status_code == 404 and "not found" in unnamable.json()["message"]
    with pytest.raises(SandboxException) as e:
        Sandbox.create("no-such-template")
    assert "not found" in str(e.value)
    r = httpx.post(
        url + "/v2/sandboxes",
        json={"templateID": "base", "autoPause": True},
        headers={"Authorization": "Bearer " + env.a.key},
    )
    assert r.status_code == 400 and "autoPause" in r.json()["message"], r.text
    r = httpx.post(url + "/v2/sandboxes", json={"templateID": "base", "volumeMounts": [{"name": "v"}]},
                   headers={"X-API-KEY": env.a.key_e2b})
    assert r.status_code == 400 and "volumeMounts" in r.json()["message"]
    r = httpx.get(url + "/v2/sandboxes", headers={"X-API-KEY": "e2b_00"})
    assert r.status_code == 401 and isinstance(r.json()["code"], int)


def test_network_allow_out_with_all_traffic_denied_is_an_allow_list(env: Env) -> None:
    from e2b import ALL_TRAFFIC

    sb = Sandbox.create(network={"allow_out": ["198.18.7.1", "PyPI.org"], "deny_out": [ALL_TRAFFIC]})
    try:
        # The sandbox runs with StacyVM's allow list, which the provider
        # enforces in its network namespace.
        with stacyvm.Client(env.server.url, env.a.key) as member:
            view = member.get_sandbox(sb.sandbox_id).info
        assert view.network == "egress" and view.network_allow == ["198.18.7.1/32", "pypi.org"], view
        info = httpx.get(f"{env.server.url}/sandboxes/{sb.sandbox_id}", headers={"X-API-KEY": env.a.key_e2b}).json()
        assert info["network"] == {"allowOut": ["198.18.7.1/32", "pypi.org"], "denyOut": [ALL_TRAFFIC]}, info
        assert info["allowInternetAccess"] is False
    finally:
        sb.kill()
    # All traffic denied and nothing allowed: no network at all.
    sb = Sandbox.create(network={"deny_out": [ALL_TRAFFIC]})
    try:
        with stacyvm.Client(env.server.url, env.a.key) as member:
            assert member.get_sandbox(sb.sandbox_id).info.network == "none"
    finally:
        sb.kill()
    # A deny list short of everything cannot be enforced: refused by name.
    for network, named in [
        ({"denyOut": ["1.1.1.1"]}, "denyOut"),
        ({"allowOut": ["*.example.com"], "denyOut": [ALL_TRAFFIC]}, "allowOut"),
        ({"rules": {"api.example.com": []}}, "rules"),
    ]:
        r = httpx.post(
            env.server.url + "/v2/sandboxes",
            json={"templateID": "base", "network": network},
            headers={"X-API-KEY": env.a.key_e2b},
        )
        assert r.status_code == 400 and named in r.json()["message"], r.text


def test_unsupported_envd_calls_are_refused_by_name(env: Env, sandbox: Sandbox) -> None:
    headers = {"E2b-Sandbox-Id": sandbox.sandbox_id, "X-Access-Token": sandbox._envd_access_token}
    r = httpx.post(env.server.url + "/files?path=/tmp/m", content=b"x",
                   headers={**headers, "Content-Type": "application/octet-stream", "X-Metadata-Owner": "caf\u00e9".encode()})
    assert r.status_code == 400 and "metadata" in r.json()["message"]
    r = httpx.post(env.server.url + "/files?path=/tmp/z", content=b"x",
                   headers={**headers, "Content-Type": "application/octet-stream", "Content-Encoding": "br"})
    assert r.status_code == 400 and "Content-Encoding" in r.json()["message"]
    r = httpx.post(env.server.url + "/process.Process/SendSignal",
                   json={"process": {"pid": 1}, "signal": "SIGNAL_UNSPECIFIED"}, headers=headers)
    assert r.status_code == 400 and r.json()["code"] == "invalid_argument"


def test_refusals_are_audited_and_no_secret_reaches_the_log(env: Env, sandbox: Sandbox) -> None:
    url = env.server.url
    rid = "e2b-" + uuid.uuid4().hex
    r = httpx.get(url + "/v2/sandboxes", headers={"X-API-KEY": "e2b_" + "ab" * 32, "x-request-id": rid})
    assert r.status_code == 401
    foreign = "e2b-" + uuid.uuid4().hex
    r = httpx.get(
        url + f"/sandboxes/{sandbox.sandbox_id}", headers={"X-API-KEY": env.b.key_e2b, "x-request-id": foreign}
    )
    assert r.status_code == 404 and "not found" in r.json()["message"]
    envd = "e2b-" + uuid.uuid4().hex
    r = _envd(env, sandbox.sandbox_id, "key_x.00", **{"x-request-id": envd})
    assert r.status_code == 401
    with stacyvm.Client(url, env.server.admin_key) as admin:
        denied = {e.request_id: e for e in admin.list_audit(outcome="denied", limit=1000)}
    assert denied[rid].status == 401 and denied[rid].tenant_id is None
    assert denied[foreign].status == 404 and denied[foreign].tenant_id == env.b.id
    assert denied[foreign].sandbox_id == sandbox.sandbox_id
    assert denied[envd].status == 401 and denied[envd].sandbox_id == sandbox.sandbox_id
    log = env.server.stderr_path.read_text(errors="replace")
    for secret in [env.a.key, env.a.key_e2b, env.b.key, env.b.key_e2b, sandbox._envd_access_token]:
        assert secret not in log


def test_default_listing_finds_live_sandboxes_past_many_gone(env: Env) -> None:
    # Sandboxes that are gone must not fill the page the default listing
    # (running and paused) reads.
    for _ in range(3):
        Sandbox.create(metadata={"suite": "e2b-gone"}).kill()
    sb = Sandbox.create(metadata={"suite": "e2b-live"})
    try:
        ids = []
        pages = Sandbox.list(limit=1)
        while pages.has_next:
            ids.extend(s.sandbox_id for s in pages.next_items())
        assert sb.sandbox_id in ids
        both = Sandbox.list(query=SandboxQuery(state=[SandboxState.RUNNING, SandboxState.PAUSED]), limit=1)
        assert [s.sandbox_id for s in both.next_items()] != []
    finally:
        sb.kill()
    assert sb.is_running() is False


def test_removing_a_missing_path_succeeds(sandbox: Sandbox) -> None:
    sandbox.files.remove("/home/user/never-there.txt")
    sandbox.files.write("/home/user/gone.txt", "x")
    sandbox.files.remove("/home/user/gone.txt")
    sandbox.files.remove("/home/user/gone.txt")
    assert sandbox.files.exists("/home/user/gone.txt") is False


def test_a_template_id_names_a_stacyvm_template_of_the_callers_tenant(env: Env) -> None:
    import time

    url = env.server.url
    name = f"e2b-tpl-{uuid.uuid4().hex[:8]}"
    own = {"Authorization": f"Bearer {env.a.key}"}
    r = httpx.post(
        url + "/v1/templates",
        headers=own,
        json={
            "name": name,
            "from": "e2b-base",
            "steps": [{"write": {"path": "/etc/greeting", "content": "from the template\n"}}],
            "env": {"GREETING": "hi"},
        },
        timeout=60,
    )
    assert r.status_code == 202, r.text
    deadline = time.monotonic() + 300
    while True:
        t = httpx.get(url + f"/v1/templates/{name}", headers=own).json()
        if t["state"] != "building" or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert t["state"] == "ready", t
    try:
        info = httpx.get(url + f"/templates/{name}", headers={"X-API-KEY": env.a.key_e2b})
        assert info.status_code == 200 and info.json()["templateID"] == name, info.text
        sb = Sandbox.create(name)
        try:
            assert sb.files.read("/etc/greeting") == "from the template\n"
            assert sb.commands.run("echo $GREETING").stdout == "hi\n"
            # The sandbox names the version it runs on.
            assert sb.get_info().template_id == f"{name}:1"
            listed = Sandbox.list(query=SandboxQuery(template=name)).next_items()
            assert sb.sandbox_id in [s.sandbox_id for s in listed]
        finally:
            sb.kill()
        # Another tenant's template does not exist for tenant b.
        other = httpx.get(url + f"/templates/{name}", headers={"X-API-KEY": env.b.key_e2b})
        assert other.status_code == 404, other.text
        with pytest.raises(SandboxException) as e:
            Sandbox.create(name, api_key=env.b.key_e2b)
        assert "not found" in str(e.value)
    finally:
        httpx.delete(url + f"/v1/templates/{name}", headers=own)
