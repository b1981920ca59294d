"""The asyncio client against a real server: every method of `AsyncClient`,
`AsyncSandbox` and `AsyncFiles` at least once."""

from __future__ import annotations

import asyncio
import hashlib
import io
import time
import tracemalloc
import uuid
from datetime import timedelta
from pathlib import Path
from typing import AsyncIterator

import pytest

import stacyvm
from conftest import IMAGE, Server

MIB = 1024 * 1024


async def test_async_sandbox_lifecycle(server: Server) -> None:
    async with stacyvm.AsyncClient(server.url, server.admin_key) as c:
        tag = uuid.uuid4().hex
        # PRoot writes "paused" into the sandbox's provider log, which is checked below.
        async with c.sandbox(image=IMAGE, provider="proot", labels={"tag": tag}, env={"X": "1"}) as sb:
            assert sb.info.state == "running"
            assert (await sb.exec("echo $X")).stdout == "1\n"
            page = await c.list_sandboxes(state="running", labels={"tag": tag})
            assert [s.id for s in page] == [sb.id]
            assert (await c.get_sandbox(sb.id)).info.labels == {"tag": tag}
            assert (await sb.refresh()).state == "running"
            info = await sb.set_timeout(3600)
            assert info.expires_at is not None and info.started_at is not None
            assert info.expires_at - info.started_at > timedelta(minutes=50)
            assert (await sb.pause()).state == "paused"
            assert (await sb.resume()).state == "running"
            lines = await sb.logs()
            assert any(line.message == "paused" for line in lines)
        assert (await sb.refresh()).state == "destroyed"
        plain = await c.sandbox(IMAGE)
        again = await c.create_sandbox(IMAGE, idempotency_key=uuid.uuid4().hex)
        await c.destroy_sandbox(plain.id)
        await again.destroy()
        assert (await plain.refresh()).state == "destroyed"


async def test_async_follow_logs_ends_with_the_sandbox(server: Server) -> None:
    async with stacyvm.AsyncClient(server.url, server.admin_key) as c:
        sb = await c.create_sandbox(IMAGE)
        follow = await sb.follow_logs()
        async with follow:
            first = await follow.__anext__()
            assert first.source == "lifecycle"
            await sb.destroy()
            rest = [line async for line in follow]
        assert rest


async def test_async_exec_and_stream(server: Server) -> None:
    async with stacyvm.AsyncClient(server.url, server.admin_key) as c:
        async with c.sandbox(image=IMAGE) as sb:
            r = await sb.exec(["sh", "-c", "cat; exit 2"], stdin="in", cwd="/tmp", env={"A": "a"}, timeout_s=10)
            assert (r.exit_code, r.stdout) == (2, "in")
            script = "echo first; while [ ! -e /tmp/go ]; do sleep 0.05; done; echo second"
            stream = await sb.exec_stream(["sh", "-c", script], timeout_s=30)
            async with stream:
                first = await stream.__anext__()
                assert first.text == "first\n" and stream.exit is None
                await sb.files.write("/tmp/go", b"")
                rest = [chunk.text async for chunk in stream]
            assert rest == ["second\n"]
            assert stream.exit is not None and stream.exit.ok and not stream.exit.timed_out
            other = await sb.exec_stream("printf '\\377'; exit 6")
            assert (await other.wait()).exit_code == 6
            stuck = await sb.exec_stream(["sh", "-c", "echo $$ > /tmp/pid; echo up; exec sleep 300"])
            assert (await stuck.__anext__()).text == "up\n"
            pid = (await sb.files.read_text("/tmp/pid")).strip()
            await stuck.aclose()
            deadline = time.monotonic() + 30
            while (await sb.exec(["kill", "-0", pid])).exit_code == 0:
                assert time.monotonic() < deadline, "the abandoned command was never killed"
                await asyncio.sleep(0.1)


async def test_async_files(server: Server, tmp_path: Path) -> None:
    async def agen() -> AsyncIterator[bytes]:
        for part in (b"x", b"y"):
            yield part

    async with stacyvm.AsyncClient(server.url, server.admin_key) as c:
        async with c.sandbox(image=IMAGE) as sb:
            f = sb.files
            assert (await f.write("/work/a/b.txt", "text")).size == 4
            assert await f.read("/work/a/b.txt") == b"text"
            await f.write("/work/a/fo.bin", io.BytesIO(b"12345"))
            await f.write("/work/a/it.bin", [b"1", b"2"])
            await f.write("/work/a/ag.bin", agen(), mode=0o600)
            assert (await f.stat("/work/a/ag.bin")).mode == "0600"
            tree = tmp_path / "tree"
            (tree / "d").mkdir(parents=True)
            (tree / "d" / "f.txt").write_text("in a tar")
            summary = await f.upload_dir(tree, "/srv/tree")
            assert (summary.files, summary.dirs, summary.bytes) == (1, 1, 8)
            assert await f.read("/srv/tree/d/f.txt") == b"in a tar"
            assert b"".join([c async for c in f.iter_read("/work/a/ag.bin", chunk_size=1)]) == b"xy"
            assert [e.name for e in await f.list("/work/a")] == ["ag.bin", "b.txt", "fo.bin", "it.bin"]
            assert len(await f.list("/work", recursive=True)) == 5
            assert await f.glob("/work/**/*.bin") == ["/work/a/ag.bin", "/work/a/fo.bin", "/work/a/it.bin"]
            assert (await f.move("/work/a/it.bin", "/work/a/moved.bin")).name == "moved.bin"
            with pytest.raises(stacyvm.Conflict):
                await f.move("/work/a/fo.bin", "/work/a/moved.bin")
            assert (await f.chmod("/work/a/moved.bin", "0755")).mode == "0755"
            assert (await f.mkdir("/work/d/e")).is_dir
            await f.delete("/work/d", recursive=True)
            assert not await f.exists("/work/d") and await f.exists("/work/a")
            src = tmp_path / "src.bin"
            src.write_bytes(b"abc" * 1000)
            await f.upload("/work/up.bin", src)
            with open(src, "rb") as fh:
                await f.upload("/work/up2.bin", fh)
            sink = io.BytesIO()
            assert await f.download("/work/up2.bin", sink) == 3000 and sink.getvalue() == src.read_bytes()
            dest = tmp_path / "dest.bin"
            assert await f.download("/work/up.bin", dest) == 3000 and dest.read_bytes() == src.read_bytes()
            with pytest.raises(stacyvm.NotFound):
                await f.read("/work/none")


async def test_async_50_mib_round_trip(server: Server, tmp_path: Path) -> None:
    size = 50 * MIB
    src, dest = tmp_path / "big.in", tmp_path / "big.out"
    digest = hashlib.sha256()
    with open(src, "wb") as fh:
        for i in range(size // MIB):
            block = hashlib.sha256(b"async%d" % i).digest() * (MIB // 32)
            digest.update(block)
            fh.write(block)
    async with stacyvm.AsyncClient(server.url, server.admin_key) as c:
        async with c.sandbox(image=IMAGE) as sb:
            tracemalloc.start()
            try:
                assert (await sb.files.upload("/work/big", src)).size == size
                assert await sb.files.download("/work/big", dest) == size
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            assert peak < 16 * MIB, f"peak traced memory {peak / MIB:.1f} MiB"
            assert (await sb.exec(["sha256sum", "/work/big"])).stdout.split()[0] == digest.hexdigest()
    got = hashlib.sha256()
    with open(dest, "rb") as fh:
        for block in iter(lambda: fh.read(MIB), b""):
            got.update(block)
    assert got.hexdigest() == digest.hexdigest()


async def test_async_admin_calls(server: Server, image_tar: Path) -> None:
    async with stacyvm.AsyncClient(server.url, server.admin_key) as c:
        name = f"async-{uuid.uuid4().hex[:6]}"
        img = await c.import_image(name, image_tar)
        assert img.name == name
        with open(image_tar, "rb") as fh:
            assert (await c.import_image(name + "-f", fh)).digest == img.digest
        await c.delete_image(name + "-f")
        assert name in [i.name for i in await c.list_images()]
        assert (await c.get_image(name)).digest == img.digest
        await c.delete_image(name)
        with pytest.raises(stacyvm.NotFound):
            await c.get_image(name)

        tenant = await c.create_tenant(f"at-{uuid.uuid4().hex[:8]}")
        assert tenant.id in [t.id for t in await c.list_tenants(limit=1000)]
        q = stacyvm.Quota(max_sandboxes=0)
        assert await c.set_quota(tenant.id, q) == q
        assert await c.get_quota(tenant.id) == q
        key = await c.create_key(tenant.id, "member", "async-member")
        assert key.key is not None
        assert key.id in [k.id for k in await c.list_keys(limit=1000)]
        async with stacyvm.AsyncClient(server.url, key.key) as m:
            with pytest.raises(stacyvm.QuotaExceeded) as err:
                await m.create_sandbox(IMAGE)
            assert err.value.status == 429 and err.value.message
            with pytest.raises(stacyvm.Forbidden):
                await m.list_workers()
            await c.revoke_key(key.id)
            with pytest.raises(stacyvm.Unauthenticated):
                await m.list_sandboxes()

        events = await c.list_audit(action="key.revoke", limit=1000)
        assert key.id in [e.target for e in events]
        denied = await c.list_audit(outcome="denied", limit=1000)
        assert any(e.status == 401 for e in denied)

        st = await c.status()
        assert st.store.ok and st.workers
        workers = await c.list_workers()
        assert workers[0].id == st.workers[0].id
        assert await c.health()
        assert (await c.ready()).ready
        assert "stacyvm_http_requests_total" in await c.metrics()
        assert "openapi" in await c.openapi()


async def test_async_drain_on_a_dedicated_server(tmp_path: Path, image_tar: Path) -> None:
    from conftest import running_server

    # The server is started and stopped in a thread: its fixture blocks.
    ctx = running_server(tmp_path, image_tar)
    own = await asyncio.to_thread(ctx.__enter__)
    try:
        async with stacyvm.AsyncClient(own.url, own.admin_key) as c:
            worker = (await c.list_workers())[0]
            assert (await c.drain_worker(worker.id)).state == "draining"
            with pytest.raises((stacyvm.NoCapacity, stacyvm.ProviderUnavailable)) as err:
                await c.create_sandbox(IMAGE)
            assert err.value.status == 503
    finally:
        await asyncio.to_thread(ctx.__exit__, None, None, None)


async def test_async_unready_server(tmp_path: Path, image_tar: Path) -> None:
    from conftest import running_server

    ctx = running_server(
        tmp_path,
        image_tar,
        providers="docker",
        extra_env={"DOCKER_HOST": f"unix://{tmp_path}/no-docker.sock"},
        wait_ready=False,
    )
    own = await asyncio.to_thread(ctx.__enter__)
    try:
        async with stacyvm.AsyncClient(own.url, own.admin_key) as c:
            assert await c.health()
            readiness = await c.ready()
            assert not readiness.ready and "no healthy provider" in readiness.detail
    finally:
        await asyncio.to_thread(ctx.__exit__, None, None, None)


async def test_async_errors(server: Server) -> None:
    async with stacyvm.AsyncClient(server.url, server.admin_key) as c:
        with pytest.raises(stacyvm.NotFound) as nf:
            await c.get_sandbox("sbx_nothere")
        assert nf.value.message == "sandbox sbx_nothere not found" and nf.value.request_id
        with pytest.raises(stacyvm.ImageNotFound):
            await c.create_sandbox("no-such-image-anywhere")
        sb = await c.create_sandbox(IMAGE)
        await sb.destroy()
        with pytest.raises(stacyvm.Conflict):
            await sb.exec(["true"])
        with pytest.raises(stacyvm.Conflict):
            await sb.exec_stream(["true"])
    async with stacyvm.AsyncClient("http://127.0.0.1:9", "svm_x", timeout=5) as dead:
        with pytest.raises(stacyvm.TransportError):
            await dead.health()
