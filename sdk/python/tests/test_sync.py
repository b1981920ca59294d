"""The synchronous client against a real server: sandboxes, exec, streaming,
files, images, tenants, keys, quotas, audit, status and errors."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import time
import tracemalloc
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Tuple

import pytest

import stacyvm
from conftest import IMAGE, Server

MIB = 1024 * 1024


def _wait_until(predicate: Callable[[], bool], what: str, budget_s: float = 30.0) -> None:
    deadline = time.monotonic() + budget_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.1)


@pytest.fixture
def member(client: stacyvm.Client, server: Server) -> Iterator[Tuple[stacyvm.Tenant, stacyvm.Client]]:
    """A fresh tenant and a client holding a member key of it."""
    tenant = client.create_tenant(f"t-{uuid.uuid4().hex[:8]}")
    key = client.create_key(tenant.id, "member", "sdk-member")
    assert key.key is not None and key.key.startswith("svm_")
    with stacyvm.Client(server.url, key.key) as c:
        yield tenant, c


# --- sandboxes ---------------------------------------------------------------


def test_context_manager_creates_a_running_sandbox_and_destroys_it(client: stacyvm.Client) -> None:
    with client.sandbox(image=IMAGE, labels={"case": "ctx"}, env={"GREETING": "hello"}) as sb:
        assert sb.id.startswith("sbx_")
        assert sb.info.state == "running"
        assert sb.info.image == IMAGE
        assert sb.info.labels == {"case": "ctx"}
        assert sb.exec(["sh", "-c", "echo $GREETING"]).stdout == "hello\n"
    assert client.get_sandbox(sb.id).info.state == "destroyed"


def test_sandbox_is_destroyed_when_the_block_raises(client: stacyvm.Client) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with client.sandbox(image=IMAGE) as sb:
            raise RuntimeError("boom")
    assert client.get_sandbox(sb.id).info.state == "destroyed"


def test_worker_labels_no_worker_carries_raise_no_capacity(client: stacyvm.Client) -> None:
    with pytest.raises(stacyvm.errors.NoCapacity, match="gpu=h100"):
        client.create_sandbox(image=IMAGE, worker_labels={"gpu": "h100"})


def test_get_list_refresh_and_label_filter(client: stacyvm.Client, sandbox: stacyvm.Sandbox) -> None:
    tag = uuid.uuid4().hex
    other = client.create_sandbox(IMAGE, labels={"tag": tag})
    try:
        page = client.list_sandboxes(state="running", labels={"tag": tag})
        assert [s.id for s in page] == [other.id]
        assert page.next_cursor is None
        ids = {s.id for s in client.list_sandboxes(state="running", limit=1000)}
        assert {sandbox.id, other.id} <= ids
        fetched = client.get_sandbox(other.id)
        assert fetched.info.labels == {"tag": tag}
        assert fetched.refresh().state == "running"
    finally:
        client.destroy_sandbox(other.id)
    assert other.refresh().state == "destroyed"
    assert other.refresh().destroyed_at is not None
    # Destroying again is harmless.
    other.destroy()


def test_list_pages_with_a_cursor(client: stacyvm.Client) -> None:
    tag = uuid.uuid4().hex
    made = [client.create_sandbox(IMAGE, labels={"page": tag}) for _ in range(3)]
    try:
        seen: List[str] = []
        cursor: Optional[str] = None
        while True:
            page = client.list_sandboxes(labels={"page": tag}, limit=2, cursor=cursor)
            assert len(page) <= 2
            seen.extend(s.id for s in page)
            cursor = page.next_cursor
            if cursor is None:
                break
        assert sorted(seen) == sorted(s.id for s in made)
    finally:
        for sb in made:
            sb.destroy()


def test_idempotency_key_returns_the_first_sandbox(client: stacyvm.Client) -> None:
    key = uuid.uuid4().hex
    first = client.create_sandbox(IMAGE, idempotency_key=key)
    try:
        second = client.create_sandbox(IMAGE, idempotency_key=key)
        assert second.id == first.id
    finally:
        first.destroy()


def test_set_timeout_moves_expiry(sandbox: stacyvm.Sandbox) -> None:
    info = sandbox.set_timeout(3600)
    assert info.expires_at is not None and info.started_at is not None
    assert info.expires_at - info.started_at > timedelta(minutes=50)
    assert sandbox.info.expires_at == info.expires_at


def test_pause_and_resume(sandbox: stacyvm.Sandbox) -> None:
    assert sandbox.pause().state == "paused"
    with pytest.raises(stacyvm.Conflict):
        sandbox.exec(["true"])
    assert sandbox.resume().state == "running"
    assert sandbox.exec(["echo", "back"]).stdout == "back\n"


def test_logs_and_follow_logs(client: stacyvm.Client) -> None:
    sb = client.create_sandbox(IMAGE)
    lines = sb.logs()
    assert lines and lines[0].source == "lifecycle"
    assert any(line.message == "running" for line in lines)
    with sb.follow_logs() as follow:
        first = next(follow)
        assert first.message == lines[0].message
        sb.destroy()
        rest = list(follow)
    # The stream replayed the log so far, then ended by itself once the
    # sandbox was destroyed.
    assert [x.message for x in rest[: len(lines) - 1]] == [x.message for x in lines[1:]]


def test_docker_provider(client: stacyvm.Client) -> None:
    # Every host the tests run on has dockerd (scripts/lib.sh starts it).
    docker = [p for p in client.status().providers if p.name == "docker"]
    assert docker, "the test server runs no docker provider"
    assert docker[0].healthy, f"the docker provider is not healthy: {docker[0].detail}"
    with client.sandbox(image=IMAGE, provider="docker", request_timeout=120) as sb:
        assert sb.info.provider == "docker"
        r = sb.exec(["sh", "-c", "echo from docker; cat /work/x"], stdin=None)
        assert r.stdout.startswith("from docker\n")
        sb.files.write("/work/x", b"payload")
        assert sb.files.read("/work/x") == b"payload"


# --- exec --------------------------------------------------------------------


def test_exec_result_fields(sandbox: stacyvm.Sandbox) -> None:
    r = sandbox.exec(["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (r.exit_code, r.signal, r.stdout, r.stderr) == (3, None, "out\n", "err\n")
    assert not r.ok and not r.timed_out and not r.stdout_truncated
    assert r.duration_ms >= 0


def test_exec_env_cwd_stdin_and_shell_string(sandbox: stacyvm.Sandbox) -> None:
    sandbox.files.mkdir("/work/dir")
    r = sandbox.exec(["sh", "-c", "pwd; echo $A; cat"], env={"A": "b"}, cwd="/work/dir", stdin="from stdin")
    assert r.stdout == "/work/dir\nb\nfrom stdin"
    assert sandbox.exec("echo $((6 * 7))").stdout == "42\n"


def test_exec_runs_as_a_user_of_the_sandbox(sandbox: stacyvm.Sandbox) -> None:
    r = sandbox.exec(["sh", "-c", "id -u; echo $HOME"], user="nobody")
    assert r.stdout == "65534\n/nonexistent\n"
    with pytest.raises(stacyvm.InvalidRequest):
        sandbox.exec(["id"], user="ghost")


def test_exec_binary_output_is_exact(sandbox: stacyvm.Sandbox) -> None:
    r = sandbox.exec(["sh", "-c", "printf '\\377\\000\\001'"])
    assert r.stdout_bytes == b"\xff\x00\x01"


def test_exec_missing_program_and_timeout(sandbox: stacyvm.Sandbox) -> None:
    missing = sandbox.exec(["/no/such/program"])
    assert missing.exit_code == 127 and missing.stderr
    slow = sandbox.exec(["sleep", "30"], timeout_s=1)
    assert slow.timed_out and slow.exit_code is None and slow.signal == 9


def test_exec_stream_yields_before_the_command_ends(sandbox: stacyvm.Sandbox) -> None:
    # The command only finishes after the client, having seen the first
    # chunk, creates /tmp/go: a stream that held output back until the end
    # would instead run into the command's timeout.
    script = "echo first; while [ ! -e /tmp/go ]; do sleep 0.05; done; echo second >&2"
    with sandbox.exec_stream(["sh", "-c", script], timeout_s=30) as stream:
        first = next(stream)
        assert (first.stream, first.text, first.data) == ("stdout", "first\n", b"first\n")
        assert stream.exit is None
        sandbox.files.write("/tmp/go", b"")
        rest = list(stream)
    assert [(c.stream, c.text) for c in rest] == [("stderr", "second\n")]
    assert stream.exit is not None
    assert stream.exit.exit_code == 0 and not stream.exit.timed_out and stream.exit.ok


def test_exec_stream_binary_chunks_and_wait(sandbox: stacyvm.Sandbox) -> None:
    stream = sandbox.exec_stream(["sh", "-c", "printf '\\377\\376'; exit 4"])
    data = b"".join(c.data for c in stream)
    assert data == b"\xff\xfe"
    assert stream.exit is not None and stream.exit.exit_code == 4
    again = sandbox.exec_stream(["sh", "-c", "echo ignored; exit 5"])
    assert again.wait().exit_code == 5


def test_exec_stream_close_kills_the_command(sandbox: stacyvm.Sandbox) -> None:
    stream = sandbox.exec_stream(["sh", "-c", "echo $$ > /tmp/pid; echo started; exec sleep 300"])
    assert next(stream).text == "started\n"
    pid = sandbox.files.read_text("/tmp/pid").strip()
    stream.close()
    _wait_until(
        lambda: sandbox.exec(["kill", "-0", pid]).exit_code != 0,
        "the abandoned command to be killed",
    )


def test_exec_stream_on_a_destroyed_sandbox_raises_conflict(client: stacyvm.Client) -> None:
    sb = client.create_sandbox(IMAGE)
    sb.destroy()
    with pytest.raises(stacyvm.Conflict) as err:
        sb.exec_stream(["true"])
    assert err.value.status == 409 and err.value.message


# --- files -------------------------------------------------------------------


def test_file_write_read_and_forms_of_data(sandbox: stacyvm.Sandbox) -> None:
    f = sandbox.files
    entry = f.write("/work/deep/a.txt", b"bytes")
    assert (entry.path, entry.name, entry.type, entry.size, entry.mode) == ("/work/deep/a.txt", "a.txt", "file", 5, "0644")
    assert entry.is_file and not entry.is_dir and entry.mtime is not None
    assert f.read("/work/deep/a.txt") == b"bytes"
    f.write("/work/text.txt", "héllo")
    assert f.read_text("/work/text.txt") == "héllo"
    f.write("/work/fileobj.bin", io.BytesIO(b"\x00" * 10))
    assert f.stat("/work/fileobj.bin").size == 10
    f.write("/work/iter.txt", (part for part in [b"a", b"b", b"c"]))
    assert b"".join(f.iter_read("/work/iter.txt", chunk_size=1)) == b"abc"
    script = f.write("/work/run.sh", "#!/bin/sh\necho ran\n", mode=0o755)
    assert script.mode == "0755"
    assert sandbox.exec(["/work/run.sh"]).stdout == "ran\n"
    sink = io.BytesIO()
    assert f.download("/work/deep/a.txt", sink) == 5 and sink.getvalue() == b"bytes"


def test_file_stat_list_glob(sandbox: stacyvm.Sandbox) -> None:
    f = sandbox.files
    f.write("/work/g/a.py", b"")
    f.write("/work/g/sub/b.py", b"")
    f.write("/work/g/sub/c.txt", b"")
    sandbox.exec(["ln", "-s", "/work/g/a.py", "/work/g/link"])
    link = f.stat("/work/g/link")
    assert link.type == "symlink" and link.symlink_target == "/work/g/a.py"
    assert f.stat("/work/g/sub").is_dir
    assert [e.name for e in f.list("/work/g")] == ["a.py", "link", "sub"]
    assert [e.path for e in f.list("/work/g", recursive=True)] == [
        "/work/g/a.py",
        "/work/g/link",
        "/work/g/sub",
        "/work/g/sub/b.py",
        "/work/g/sub/c.txt",
    ]
    assert f.glob("/work/g/**/*.py") == ["/work/g/a.py", "/work/g/sub/b.py"]
    assert f.exists("/work/g/a.py") and not f.exists("/work/g/none")


def test_file_move_chmod_mkdir_delete(sandbox: stacyvm.Sandbox) -> None:
    f = sandbox.files
    f.write("/work/m/a", b"A")
    f.write("/work/m/b", b"B")
    with pytest.raises(stacyvm.Conflict):
        f.move("/work/m/a", "/work/m/b")
    moved = f.move("/work/m/a", "/work/m/b", overwrite=True)
    assert moved.path == "/work/m/b" and f.read("/work/m/b") == b"A"
    assert f.move("/work/m/b", "/work/m/c").path == "/work/m/c"
    assert f.chmod("/work/m/c", "0600").mode == "0600"
    assert f.chmod("/work/m/c", 0o640).mode == "0640"
    made = f.mkdir("/work/m/x/y/z")
    assert made.is_dir and made.path == "/work/m/x/y/z"
    with pytest.raises(stacyvm.NotFound):
        f.mkdir("/work/none/q", parents=False)
    with pytest.raises(stacyvm.Conflict):
        f.delete("/work/m/x")
    f.delete("/work/m/x", recursive=True)
    f.delete("/work/m/c")
    assert f.list("/work/m") == []
    with pytest.raises(stacyvm.NotFound):
        f.delete("/work/m/c")


def test_upload_from_path_and_download_to_path(sandbox: stacyvm.Sandbox, tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(bytes(range(256)) * 1000)
    assert sandbox.files.upload("/work/up.bin", src).size == 256000
    with open(src, "rb") as fh:
        sandbox.files.upload("/work/up2.bin", fh, mode="0600")
    dest = tmp_path / "dest.bin"
    assert sandbox.files.download("/work/up2.bin", dest) == 256000
    assert dest.read_bytes() == src.read_bytes()


def test_upload_dir_sends_a_tree_in_one_request(sandbox: stacyvm.Sandbox, tmp_path: Path) -> None:
    tree = tmp_path / "proj"
    (tree / "src" / "pkg").mkdir(parents=True)
    for i in range(50):
        (tree / "src" / "pkg" / f"m{i}.py").write_text(f"x = {i}\n")
    run = tree / "run.sh"
    run.write_text("#!/bin/sh\necho ran\n")
    run.chmod(0o755)
    (tree / "latest").symlink_to("src/pkg/m0.py")
    # tarfile sends a second name of a file as a hard-link entry.
    os.link(tree / "src" / "pkg" / "m1.py", tree / "also-m1.py")
    summary = sandbox.files.upload_dir(tree, "/work/proj")
    assert isinstance(summary, stacyvm.ArchiveSummary)
    assert (summary.path, summary.files, summary.dirs, summary.symlinks) == ("/work/proj", 52, 2, 1)
    assert sandbox.files.read_text("/work/proj/also-m1.py") == "x = 1\n"
    assert summary.bytes == sum(len(f"x = {i}\n") for i in range(50)) + len("#!/bin/sh\necho ran\n")
    assert sandbox.exec(["/work/proj/run.sh"]).stdout == "ran\n"
    assert sandbox.files.read_text("/work/proj/latest") == "x = 0\n"
    assert len(sandbox.files.list("/work/proj/src/pkg")) == 50
    with pytest.raises(stacyvm.InvalidRequest):
        sandbox.files.write_archive("/work/junk", b"not a tar" * 200)
    with pytest.raises(NotADirectoryError):
        sandbox.files.upload_dir(run, "/work/nope")

    # And back as one tar: links stay links (the sandbox's /etc/shadow link
    # is not read), FIFOs are left out, set-id bits are not kept.
    sandbox.exec(["sh", "-c", "ln -s /etc/shadow /work/proj/shadow && mkfifo /work/proj/pipe && chmod 4755 /work/proj/run.sh"])
    back = tmp_path / "back"
    assert sandbox.files.download_dir("/work/proj", back) == 56
    assert (back / "src" / "pkg" / "m49.py").read_text() == "x = 49\n"
    assert os.readlink(back / "shadow") == "/etc/shadow"
    assert not (back / "pipe").exists()
    assert (back / "run.sh").stat().st_mode & 0o7777 == 0o755
    names = sorted(tarfile.open(fileobj=io.BytesIO(b"".join(sandbox.files.iter_read_archive("/work/proj/src")))).getnames())
    assert names[:3] == ["pkg", "pkg/m0.py", "pkg/m1.py"] and len(names) == 51
    with pytest.raises(stacyvm.NotFound):
        sandbox.files.download_dir("/work/nope", tmp_path / "nope")


def test_50_mib_round_trip_streams_without_holding_the_file(sandbox: stacyvm.Sandbox, tmp_path: Path) -> None:
    size = 50 * MIB
    src, dest = tmp_path / "big.in", tmp_path / "big.out"
    sent = hashlib.sha256()
    with open(src, "wb") as fh:
        for i in range(size // MIB):
            block = hashlib.sha256(str(i).encode()).digest() * (MIB // 32)
            sent.update(block)
            fh.write(block)
    tracemalloc.start()
    try:
        entry = sandbox.files.upload("/work/big.bin", src)
        written = sandbox.files.download("/work/big.bin", dest)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert entry.size == size and written == size
    # A client that held the file whole would peak above 50 MiB.
    assert peak < 16 * MIB, f"peak traced memory {peak / MIB:.1f} MiB"
    got = hashlib.sha256()
    with open(dest, "rb") as fh:
        for block in iter(lambda: fh.read(MIB), b""):
            got.update(block)
    assert got.hexdigest() == sent.hexdigest()
    inside = sandbox.exec(["sha256sum", "/work/big.bin"]).stdout.split()[0]
    assert inside == sent.hexdigest()


# --- images, tenants, keys, quotas, audit, status ----------------------------


def test_images_import_list_get_delete(client: stacyvm.Client, image_tar: Path) -> None:
    name = f"sdk/img-{uuid.uuid4().hex[:6]}:1"
    with open(image_tar, "rb") as fh:
        img = client.import_image(name, fh)
    assert img.name == name and img.size == image_tar.stat().st_size and img.digest.startswith("sha256:")
    assert name in [i.name for i in client.list_images()]
    assert client.get_image(name).digest == img.digest
    from_path = client.import_image(name + "-p", image_tar)
    assert from_path.digest == img.digest
    with client.sandbox(image=name) as sb:
        assert sb.exec(["echo", "ok"]).stdout == "ok\n"
    client.delete_image(name)
    client.delete_image(name + "-p")
    with pytest.raises(stacyvm.NotFound):
        client.get_image(name)


def test_tenants_quotas_and_keys(client: stacyvm.Client, server: Server) -> None:
    tenant = client.create_tenant(f"t-{uuid.uuid4().hex[:8]}")
    # A new tenant starts with the server's default quota, without PRoot.
    assert tenant.id.startswith("tnt_") and tenant.quota == stacyvm.Quota(
        max_sandboxes=10,
        max_cpu=8.0,
        max_memory_mb=16384,
        max_timeout_s=86400,
        max_exec_per_minute=600,
        max_concurrent_execs=100,
        max_volumes=10,
        max_volume_mb=10240,
        max_templates=20,
    )
    assert tenant.id in [t.id for t in client.list_tenants(limit=1000)]
    quota = stacyvm.Quota(
        max_sandboxes=2,
        max_cpu=4.0,
        max_memory_mb=2048,
        max_timeout_s=600,
        max_exec_per_minute=100,
        allowed_providers=["docker", "proot"],
        max_concurrent_execs=5,
    )
    assert client.set_quota(tenant.id, quota) == quota
    assert client.get_quota(tenant.id) == quota
    key = client.create_key(tenant.id, "viewer", "sdk-viewer")
    assert key.role == "viewer" and key.key is not None and key.revoked_at is None
    listed = {k.id: k for k in client.list_keys(limit=1000)}
    assert key.id in listed and listed[key.id].key is None
    with stacyvm.Client(server.url, key.key) as viewer:
        assert viewer.list_sandboxes().items == []
        with pytest.raises(stacyvm.Forbidden) as err:
            viewer.create_sandbox(IMAGE)
        assert err.value.status == 403 and err.value.message
        client.revoke_key(key.id)
        with pytest.raises(stacyvm.Unauthenticated):
            viewer.list_sandboxes()


def test_quota_and_rate_limit_errors(client: stacyvm.Client, member: Tuple[stacyvm.Tenant, stacyvm.Client]) -> None:
    tenant, c = member
    client.set_quota(tenant.id, stacyvm.Quota(max_sandboxes=0))
    with pytest.raises(stacyvm.QuotaExceeded) as q:
        c.create_sandbox(IMAGE)
    assert q.value.status == 429 and q.value.code == "quota_exceeded"
    client.set_quota(tenant.id, stacyvm.Quota(max_exec_per_minute=1))
    with c.sandbox(image=IMAGE) as sb:
        sb.exec(["true"])
        with pytest.raises(stacyvm.RateLimited) as r:
            sb.exec(["true"])
    assert r.value.status == 429 and r.value.retry_after is not None and r.value.retry_after > 0


def test_other_tenants_sandbox_is_not_found(client: stacyvm.Client, member: Tuple[stacyvm.Tenant, stacyvm.Client], sandbox: stacyvm.Sandbox) -> None:
    _, c = member
    with pytest.raises(stacyvm.NotFound):
        c.get_sandbox(sandbox.id)
    with c.sandbox(image=IMAGE) as mine:
        assert [s.id for s in c.list_sandboxes()] == [mine.id]
        with pytest.raises(stacyvm.Forbidden):
            c.import_image("nope", b"")


def test_audit_records_calls_and_pages(client: stacyvm.Client, sandbox: stacyvm.Sandbox) -> None:
    sandbox.exec(["true"])
    events = client.list_audit(sandbox_id=sandbox.id, limit=1000).items
    actions = [e.action for e in events]
    assert "sandbox.create" in actions and "sandbox.exec" in actions
    ev = next(e for e in events if e.action == "sandbox.exec")
    assert ev.outcome == "ok" and ev.status == 200 and ev.request_id and ev.actor.role == "admin"
    first = client.list_audit(sandbox_id=sandbox.id, limit=1)
    assert len(first) == 1 and first.next_cursor is not None
    second = client.list_audit(sandbox_id=sandbox.id, limit=1, cursor=first.next_cursor)
    assert second.items[0].id != first.items[0].id
    since = (ev.ts - timedelta(seconds=1)).isoformat().replace("+00:00", "Z")
    assert client.list_audit(action="sandbox.exec", outcome="ok", since=since, limit=1000).items


def test_status_workers_health_metrics_openapi(client: stacyvm.Client, server: Server) -> None:
    st = client.status()
    assert st.mode == "single-node" and st.store.kind == "sqlite" and st.store.ok
    assert "proot" in [p.name for p in st.providers]
    assert "running" in st.sandboxes
    workers = client.list_workers()
    assert len(workers) == 1 and workers[0].id.startswith("wrk_") and "proot" in [p.name for p in workers[0].providers]
    assert client.health()
    assert client.ready().ready
    assert "stacyvm_http_requests_total" in client.metrics()
    assert "/v1/sandboxes" in client.openapi()["paths"]
    with stacyvm.Client(server.url, api_key=None) as anonymous:
        assert anonymous.health()


def test_drain_worker_on_a_dedicated_server(tmp_path: Path, image_tar: Path) -> None:
    from conftest import running_server

    with running_server(tmp_path, image_tar) as own:
        with stacyvm.Client(own.url, own.admin_key) as c:
            worker = c.list_workers()[0]
            drained = c.drain_worker(worker.id)
            assert drained.id == worker.id and drained.state == "draining"
            with pytest.raises((stacyvm.NoCapacity, stacyvm.ProviderUnavailable)) as err:
                c.create_sandbox(IMAGE)
            assert err.value.status == 503 and err.value.message
            with pytest.raises(stacyvm.NotFound):
                c.drain_worker("wrk_00000000000000000000000000000000")


def test_unready_server_reports_why(tmp_path: Path, image_tar: Path) -> None:
    from conftest import running_server

    # Docker is the only provider, and it points at a socket that does not exist.
    unreachable = {"DOCKER_HOST": f"unix://{tmp_path}/no-docker.sock"}
    with running_server(tmp_path, image_tar, providers="docker", extra_env=unreachable, wait_ready=False) as own:
        with stacyvm.Client(own.url, own.admin_key) as c:
            assert c.health()
            readiness = c.ready()
            assert not readiness.ready and "no healthy provider" in readiness.detail
            with pytest.raises(stacyvm.ProviderUnavailable) as err:
                c.create_sandbox(IMAGE)
            assert err.value.status == 503 and "no-docker.sock" in err.value.message
            assert [p.healthy for p in c.status().providers] == [False]


# --- errors ------------------------------------------------------------------


def test_errors_carry_the_servers_code_message_and_request_id(client: stacyvm.Client, sandbox: stacyvm.Sandbox) -> None:
    with pytest.raises(stacyvm.NotFound) as nf:
        client.get_sandbox("sbx_doesnotexist")
    assert nf.value.code == "not_found" and nf.value.status == 404
    assert nf.value.message == "sandbox sbx_doesnotexist not found"
    assert nf.value.request_id and nf.value.request_id in str(nf.value)
    with pytest.raises(stacyvm.InvalidRequest) as bad:
        sandbox.files.read("relative/path")
    assert bad.value.status == 400
    assert bad.value.message == 'path "relative/path" is not absolute'
    with pytest.raises(stacyvm.InvalidRequest) as is_dir:
        sandbox.files.read("/work")
    assert is_dir.value.message == "/work is a directory"
    with pytest.raises(stacyvm.ImageNotFound) as img:
        client.create_sandbox("no-such-image-anywhere")
    assert img.value.status == 422 and img.value.message
    with pytest.raises(stacyvm.PayloadTooLarge) as big:
        sandbox.exec(["true"], stdin="x" * (11 * MIB))
    assert big.value.status == 413
    assert isinstance(big.value, stacyvm.StacyVMError)


def test_unauthenticated_and_unreachable(server: Server) -> None:
    with stacyvm.Client(server.url, "svm_notakey") as c:
        with pytest.raises(stacyvm.Unauthenticated) as err:
            c.list_sandboxes()
    assert err.value.status == 401 and err.value.message
    with stacyvm.Client("http://127.0.0.1:9", "svm_x", timeout=5) as dead:
        with pytest.raises(stacyvm.TransportError):
            dead.status()


def test_url_and_key_come_from_the_environment(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STACYVM_URL", server.url)
    monkeypatch.setenv("STACYVM_API_KEY", server.admin_key)
    with stacyvm.Client() as c:
        assert c.url == server.url
        assert c.status().store.ok
    monkeypatch.delenv("STACYVM_URL")
    assert stacyvm.Client().url == "http://127.0.0.1:7070"
    assert os.environ.get("STACYVM_URL") is None
