"""`stacyvm mcp` (stdio) and the `/mcp` endpoint, driven by the `mcp`
Python client against a real server with Docker and the busybox test
image: the handshake and the stateless revision, every tool, errors,
truncation, session-end cleanup, and tenant and host isolation."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any, Dict, Iterator, Tuple

import pytest

import stacyvm
from conftest import IMAGE, Server, _stacyvm_bin

mcp = pytest.importorskip("mcp", reason="the mcp package is not installed (scripts/test.sh installs it)")
from mcp import Client, MCPError, StdioServerParameters  # noqa: E402
from mcp.client.streamable_http import streamable_http_client  # noqa: E402
from mcp.shared._httpx_utils import create_mcp_http_client  # noqa: E402

HOST_TOOLS = {"upload_file", "download_file"}
TOOLS = {
    "create_sandbox",
    "run_command",
    "run_code",
    "write_file",
    "read_file",
    "list_files",
    "destroy_sandbox",
    "list_sandboxes",
}


@pytest.fixture
def member(server: Server, client: stacyvm.Client) -> Iterator[Tuple[str, str]]:
    """A fresh tenant and a member key of it: (tenant id, key)."""
    tenant = client.create_tenant(f"mcp-{uuid.uuid4().hex[:8]}")
    key = client.create_key(tenant.id, "member", "mcp-member")
    assert key.key is not None
    yield tenant.id, key.key
    for sb in client.list_sandboxes(limit=1000):
        if sb.tenant_id == tenant.id and sb.state not in ("destroyed", "failed", "lost"):
            client.destroy_sandbox(sb.id)


def stdio(server: Server, key: str, *args: str) -> StdioServerParameters:
    return StdioServerParameters(
        command=str(_stacyvm_bin()),
        args=["mcp", *args],
        env={"STACYVM_URL": server.url, "STACYVM_API_KEY": key, "PATH": os.environ.get("PATH", "")},
    )


def state_of(client: stacyvm.Client, sandbox_id: str) -> str:
    return client.get_sandbox(sandbox_id).info.state


async def call(c: Client, name: str, args: Dict[str, Any]) -> Any:
    return await c.call_tool(name, args)


def ok(result: Any) -> Dict[str, Any]:
    assert not result.is_error, result.content[0].text
    assert isinstance(result.structured_content, dict)
    return result.structured_content


def err(result: Any) -> Dict[str, Any]:
    assert result.is_error, result
    assert "error" in result.content[0].text
    return result.structured_content["error"]


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_stdio_tools(server: Server, client: stacyvm.Client, member: Tuple[str, str], tmp_path: Path, mode: str) -> None:
    _, key = member
    host_in = tmp_path / "in.txt"
    host_in.write_bytes(b"from the host\n")
    async with Client(stdio(server, key, "--host-root", str(tmp_path)), mode=mode) as c:
        # "legacy" is the initialize handshake; "auto" probes server/discover
        # and takes the stateless revision.
        want = "2025-11-25" if mode == "legacy" else "2026-07-28"
        assert c.session.protocol_version == want
        tools = {t.name: t for t in (await c.list_tools()).tools}
        assert set(tools) == TOOLS | HOST_TOOLS
        assert all(len(t.description or "") > 60 for t in tools.values())

        made = ok(await call(c, "create_sandbox", {"image": IMAGE, "provider": "docker", "labels": {"t": "mcp"}}))
        sid = made["id"]
        assert made["state"] == "running" and made["labels"]["t"] == "mcp"
        assert made["labels"]["mcp-session"].startswith("mcp_")
        kept = ok(await call(c, "create_sandbox", {"image": IMAGE, "provider": "docker", "keep": True}))["id"]
        doomed = ok(await call(c, "create_sandbox", {"image": IMAGE, "provider": "docker"}))["id"]

        r = ok(await call(c, "run_command", {"sandbox_id": sid, "command": "echo out; echo err >&2; exit 3"}))
        assert (r["exit_code"], r["stdout"], r["stderr"]) == (3, "out\n", "err\n")
        assert not r["stdout_truncated"]
        r = ok(await call(c, "run_command", {"sandbox_id": sid, "argv": ["cat"], "stdin": "piped"}))
        assert r["stdout"] == "piped"

        r = ok(await call(c, "run_code", {"sandbox_id": sid, "language": "shell", "code": "echo $((6*7))"}))
        assert r["stdout"] == "42\n" and r["file"].startswith("/tmp/")
        e = err(await call(c, "run_code", {"sandbox_id": sid, "language": "python", "code": "print(1)"}))
        assert e["code"] == "interpreter_not_found" and "python3" in e["message"]

        w = ok(await call(c, "write_file", {"sandbox_id": sid, "path": "/work/a/b.txt", "content": "héllo"}))
        assert w["size"] == len("héllo".encode())
        ok(await call(c, "write_file", {"sandbox_id": sid, "path": "/work/bin.dat", "content": "AAEC/w==", "encoding": "base64"}))
        r = ok(await call(c, "read_file", {"sandbox_id": sid, "path": "/work/a/b.txt"}))
        assert (r["content"], r["encoding"], r["more"]) == ("héllo", "utf-8", False)
        r = ok(await call(c, "read_file", {"sandbox_id": sid, "path": "/work/bin.dat"}))
        assert (r["content"], r["encoding"]) == ("AAEC/w==", "base64")
        r = ok(await call(c, "list_files", {"sandbox_id": sid, "path": "/work", "recursive": True}))
        assert {e["path"] for e in r["entries"]} == {"/work/a", "/work/a/b.txt", "/work/bin.dat"}

        up = ok(await call(c, "upload_file", {"sandbox_id": sid, "host_path": str(host_in), "path": "/work/up.txt"}))
        assert up["size"] == len(b"from the host\n")
        r = ok(await call(c, "run_command", {"sandbox_id": sid, "command": "cat /work/up.txt"}))
        assert r["stdout"] == "from the host\n"
        host_out = tmp_path / "out" / "b.txt"
        host_out.parent.mkdir()
        d = ok(await call(c, "download_file", {"sandbox_id": sid, "path": "/work/a/b.txt", "host_path": str(host_out)}))
        assert d["bytes"] == len("héllo".encode()) and host_out.read_text() == "héllo"
        # Outside --host-root, in either direction.
        e = err(await call(c, "upload_file", {"sandbox_id": sid, "host_path": "/etc/passwd", "path": "/work/p"}))
        assert e["code"] == "forbidden"
        e = err(await call(c, "download_file", {"sandbox_id": sid, "path": "/work/a/b.txt", "host_path": str(tmp_path / ".." / "escape.txt")}))
        assert e["code"] == "forbidden"
        assert not (tmp_path.parent / "escape.txt").exists()

        listed = ok(await call(c, "list_sandboxes", {"session_only": True}))
        assert {s["id"] for s in listed["sandboxes"]} == {sid, kept, doomed}
        assert all(s["this_session"] for s in listed["sandboxes"])

        # Truncation: 200 KB of output is cut at 64 KiB and says so.
        r = ok(await call(c, "run_command", {"sandbox_id": sid, "command": "yes abcdefgh | head -c 200000"}))
        assert r["stdout_truncated"] and r["stdout_bytes"] == 200000 and len(r["stdout"]) == 65536
        result = await call(c, "run_command", {"sandbox_id": sid, "command": "yes abcdefgh | head -c 200000"})
        assert "stdout was truncated: 65536 of 200000 bytes shown" in result.content[0].text
        r = ok(await call(c, "read_file", {"sandbox_id": sid, "path": "/work/a/b.txt", "max_bytes": 2}))
        assert (r["content"], r["more"], r["next_offset"]) == ("h", True, 1)

        # Errors: a sandbox that does not exist, bad arguments, an unknown tool.
        e = err(await call(c, "run_command", {"sandbox_id": "sbx_doesnotexist", "command": "true"}))
        assert e["code"] == "not_found"
        e = err(await call(c, "read_file", {"sandbox_id": sid, "path": "relative/path"}))
        assert e["code"] == "invalid_request"
        e = err(await call(c, "run_command", {"sandbox_id": sid, "command": "true", "shell": "bash"}))
        assert e["code"] == "invalid_request" and "shell" in e["message"]
        e = err(await call(c, "create_sandbox", {"image": "no-such-image-xyz", "provider": "docker"}))
        assert e["code"] == "image_not_found"
        with pytest.raises(MCPError) as bad:
            await call(c, "format_disk", {})
        assert bad.value.error.code == -32602

        ok(await call(c, "destroy_sandbox", {"sandbox_id": doomed}))
        assert state_of(client, doomed) == "destroyed"
        assert state_of(client, sid) == "running"
    # The session ended with stdin: what it made is gone, except the kept one.
    assert state_of(client, sid) == "destroyed"
    assert state_of(client, kept) == "running"
    client.destroy_sandbox(kept)


async def test_stdio_member_cannot_reach_another_tenant(server: Server, client: stacyvm.Client, member: Tuple[str, str]) -> None:
    _, key = member
    other_tenant = client.create_tenant(f"mcp-other-{uuid.uuid4().hex[:8]}")
    other_key = client.create_key(other_tenant.id, "member", "other").key
    assert other_key is not None
    with stacyvm.Client(server.url, other_key) as other:
        with other.sandbox(image=IMAGE, provider="docker") as theirs:
            theirs.files.write("/secret.txt", b"theirs")
            async with Client(stdio(server, key, "--no-host-files"), mode="legacy") as c:
                tools = {t.name for t in (await c.list_tools()).tools}
                assert tools == TOOLS, "--no-host-files offers no host tools"
                for name, args in [
                    ("run_command", {"sandbox_id": theirs.id, "command": "cat /secret.txt"}),
                    ("read_file", {"sandbox_id": theirs.id, "path": "/secret.txt"}),
                    ("write_file", {"sandbox_id": theirs.id, "path": "/x", "content": "x"}),
                    ("list_files", {"sandbox_id": theirs.id}),
                    ("destroy_sandbox", {"sandbox_id": theirs.id}),
                ]:
                    assert err(await call(c, name, args))["code"] == "not_found", name
                listed = ok(await call(c, "list_sandboxes", {"state": "all"}))
                assert theirs.id not in {s["id"] for s in listed["sandboxes"]}
                with pytest.raises(MCPError):
                    await call(c, "upload_file", {"sandbox_id": theirs.id, "host_path": "/etc/passwd", "path": "/p"})
            assert theirs.refresh().state == "running"
            assert theirs.files.read("/secret.txt") == b"theirs"


def rpc(proc: "subprocess.Popen[bytes]", msg: Dict[str, Any]) -> Dict[str, Any]:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write((json.dumps(msg) + "\n").encode())
    proc.stdin.flush()
    line = proc.stdout.readline()
    assert line, "stacyvm mcp closed its output"
    return json.loads(line)


def test_stdio_sigterm_destroys_the_sessions_sandboxes(server: Server, client: stacyvm.Client, member: Tuple[str, str]) -> None:
    _, key = member
    params = stdio(server, key)
    proc = subprocess.Popen(
        [params.command, *params.args], env=params.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        init = rpc(proc, {"jsonrpc": "2.0", "id": 1, "method": "initialize",
                          "params": {"protocolVersion": "2024-11-05", "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}}})
        assert init["result"]["protocolVersion"] == "2024-11-05"
        # Protocol errors are JSON-RPC errors.
        proc.stdin.write(b"{not json\n")  # type: ignore[union-attr]
        proc.stdin.flush()  # type: ignore[union-attr]
        assert json.loads(proc.stdout.readline())["error"]["code"] == -32700  # type: ignore[union-attr]
        assert rpc(proc, {"jsonrpc": "2.0", "id": 2, "method": "nope"})["error"]["code"] == -32601
        made = rpc(proc, {"jsonrpc": "2.0", "id": 3, "method": "tools/call",
                          "params": {"name": "create_sandbox", "arguments": {"image": IMAGE, "provider": "docker"}}})
        result = made["result"]
        assert result["isError"] is False and "structuredContent" not in result, "2024-11-05 has no structured content"
        sid = result["content"][0]["text"].split()[2]
        assert sid.startswith("sbx_") and state_of(client, sid) == "running"
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr.decode()
        assert b"destroyed 1 sandbox" in stderr, stderr.decode()
        assert state_of(client, sid) == "destroyed"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def http_client(server: Server, key: str) -> Any:
    return streamable_http_client(server.url + "/mcp", http_client=create_mcp_http_client(headers={"Authorization": f"Bearer {key}"}))


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_http_endpoint(server: Server, client: stacyvm.Client, member: Tuple[str, str], mode: str) -> None:
    tenant_id, key = member
    async with Client(http_client(server, key), mode=mode) as c:
        tools = {t.name for t in (await c.list_tools()).tools}
        assert tools == TOOLS, "no host file tools over HTTP"
        with pytest.raises(MCPError):
            await call(c, "download_file", {"sandbox_id": "sbx_x", "path": "/etc/passwd", "host_path": "/tmp/x"})
        made = ok(await call(c, "create_sandbox", {"image": IMAGE, "provider": "docker"}))
        sid = made["id"]
        r = ok(await call(c, "run_command", {"sandbox_id": sid, "command": "echo via-http"}))
        assert r["stdout"] == "via-http\n"
        ok(await call(c, "write_file", {"sandbox_id": sid, "path": "/w.txt", "content": "w"}))
        assert ok(await call(c, "read_file", {"sandbox_id": sid, "path": "/w.txt"}))["content"] == "w"
        # The rest of the tools answer over HTTP as over stdio.
        assert "/w.txt" in {e["path"] for e in ok(await call(c, "list_files", {"sandbox_id": sid}))["entries"]}
        assert ok(await call(c, "run_code", {"sandbox_id": sid, "language": "shell", "code": "echo $((6*7))"}))["stdout"] == "42\n"
        listed = ok(await call(c, "list_sandboxes", {}))
        assert {s["id"] for s in listed["sandboxes"]} == {sid}, "only the member's tenant's sandboxes"
        if mode == "legacy":
            assert made["labels"]["mcp-session"].startswith("mcp_"), made["labels"]
        other = ok(await call(c, "create_sandbox", {"image": IMAGE, "provider": "docker"}))["id"]
        ok(await call(c, "destroy_sandbox", {"sandbox_id": other}))
        assert state_of(client, other) == "destroyed"
        assert err(await call(c, "run_command", {"sandbox_id": "sbx_nope", "command": "true"}))["code"] == "not_found"
        # Another tenant's sandbox (the admin's own) is not there for this key.
        with client.sandbox(image=IMAGE, provider="docker") as theirs:
            e = err(await call(c, "run_command", {"sandbox_id": theirs.id, "command": "true"}))
            assert e["code"] == "not_found"
            assert err(await call(c, "destroy_sandbox", {"sandbox_id": theirs.id}))["code"] == "not_found"
            assert theirs.refresh().state == "running"
            refused = [e for e in client.list_audit(sandbox_id=theirs.id, outcome="denied", limit=1000)]
            assert {e.action for e in refused} == {"sandbox.exec", "sandbox.destroy"}, refused
            assert all(e.tenant_id == tenant_id and (e.detail or {}).get("via") == "mcp" for e in refused)
    # Audited as the /v1 calls, marked as MCP's, under the member's tenant.
    events = [e for e in client.list_audit(sandbox_id=sid, limit=1000)]
    actions = {e.action for e in events if (e.detail or {}).get("via") == "mcp"}
    assert {"sandbox.create", "sandbox.exec", "file.write"} <= actions, actions
    assert all(e.tenant_id == tenant_id for e in events)
    if mode == "legacy":
        # The handshake's session ends with DELETE /mcp, destroying its sandbox.
        assert state_of(client, sid) == "destroyed"
    else:
        # The stateless revision has no session: the sandbox lives until
        # destroyed or expired.
        assert state_of(client, sid) == "running"
        client.destroy_sandbox(sid)


def test_http_endpoint_refusals(server: Server, client: stacyvm.Client) -> None:
    import httpx

    init = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
            "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}}}
    with httpx.Client(base_url=server.url, timeout=60) as h:
        r = h.post("/mcp", json=init)
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthenticated"
        auth = {"Authorization": f"Bearer {server.admin_key}"}
        r = h.post("/mcp", json=init, headers=auth)
        assert r.status_code == 200 and r.json()["result"]["protocolVersion"] == "2025-06-18"
        session = r.headers["mcp-session-id"]
        r = h.post("/mcp", json={"jsonrpc": "2.0", "id": 2, "method": "tools/list"}, headers=auth)
        assert r.status_code == 400, "a session id is required after initialize"
        r = h.post("/mcp", json={"jsonrpc": "2.0", "id": 2, "method": "tools/list"},
                   headers={**auth, "mcp-session-id": session, "mcp-protocol-version": "1999-01-01"})
        assert r.status_code == 400
        r = h.post("/mcp", json={"jsonrpc": "2.0", "method": "notifications/initialized"},
                   headers={**auth, "mcp-session-id": session})
        assert r.status_code == 202
        r = h.post("/mcp", content=b"{oops", headers={**auth, "content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["code"] == -32700
        r = h.post("/mcp", json=init, headers={**auth, "origin": "http://evil.example"})
        assert r.status_code == 403
        assert h.get("/mcp", headers=auth).status_code == 405
        assert h.delete("/mcp", headers={**auth, "mcp-session-id": session}).status_code == 204
    denied = [e for e in client.list_audit(action="mcp.call", outcome="denied", limit=1000)]
    assert denied, "a refused /mcp call is audited"
