"""gzip on the E2B routes: compressed uploads and downloads through the
unmodified SDK (`files.write(gzip=True)`, `files.read(gzip=True)`), gzip
request bodies and responses on the wire, Connect streams never
compressed, and refusals of what cannot be inflated."""

from __future__ import annotations

import gzip
import json
import os
import struct
import zlib

import httpx
from e2b import Sandbox

from conftest import Env


def _headers(sb: Sandbox) -> dict[str, str]:
    return {
        "E2b-Sandbox-Id": sb.sandbox_id,
        "E2b-Sandbox-Port": "49983",
        "X-Access-Token": sb._envd_access_token or "",
    }


def test_the_sdk_uploads_and_downloads_gzip(sandbox: Sandbox) -> None:
    data = os.urandom(256 * 1024) + b"a" * (2 * 1024 * 1024)
    sandbox.files.write("gz.bin", data, gzip=True)
    # Stored inflated: the sandbox sees the bytes, not the gzip stream.
    assert sandbox.commands.run("wc -c < gz.bin").stdout.strip() == str(len(data))
    assert sandbox.files.read("gz.bin", format="bytes", gzip=True) == data
    assert sandbox.files.read("gz.bin", format="bytes") == data


def test_gzip_on_the_wire(env: Env, sandbox: Sandbox) -> None:
    url = env.server.url
    h = _headers(sandbox)
    text = b"hello gzip\n" * 1000
    with httpx.Client(base_url=url, timeout=60) as c:
        up = c.post(
            "/files",
            params={"path": "/home/user/wire.txt"},
            content=gzip.compress(text),
            headers={**h, "Content-Type": "application/octet-stream", "Content-Encoding": "gzip"},
        )
        assert up.status_code == 200, up.text
        # A download asked for as gzip comes deflated; raw bytes inflate to the file.
        with c.stream(
            "GET", "/files", params={"path": "/home/user/wire.txt"}, headers={**h, "Accept-Encoding": "gzip"}
        ) as r:
            assert r.status_code == 200
            assert r.headers.get("content-encoding") == "gzip"
            raw = b"".join(r.iter_raw())
        assert gzip.decompress(raw) == text
        # Not asked: not compressed.
        with c.stream(
            "GET", "/files", params={"path": "/home/user/wire.txt"}, headers={**h, "Accept-Encoding": "identity"}
        ) as r:
            assert "content-encoding" not in r.headers
            assert b"".join(r.iter_raw()) == text

        # A unary Connect call with a gzip body, answered gzip.
        stat = c.post(
            "/filesystem.Filesystem/Stat",
            content=gzip.compress(json.dumps({"path": "/home/user/wire.txt"}).encode()),
            headers={
                **h,
                "Content-Type": "application/json",
                "Content-Encoding": "gzip",
                "Accept-Encoding": "gzip",
            },
        )
        assert stat.status_code == 200, stat.text
        assert stat.headers.get("content-encoding") == "gzip"
        assert int(stat.json()["entry"]["size"]) == len(text)

        # A Connect stream is never compressed, even when gzip is accepted.
        msg = json.dumps({"process": {"cmd": "/bin/bash", "args": ["-l", "-c", "seq 1 2000"], "envs": {}}}).encode()
        with c.stream(
            "POST",
            "/process.Process/Start",
            content=struct.pack(">BI", 0, len(msg)) + msg,
            headers={**h, "Content-Type": "application/connect+json", "Accept-Encoding": "gzip"},
        ) as r:
            assert r.status_code == 200
            assert "content-encoding" not in r.headers
            raw = b"".join(r.iter_raw())
        assert raw[0] == 0 and json.loads(raw[5 : 5 + struct.unpack(">I", raw[1:5])[0]])["event"]["start"]

        # The control API: gzip request bodies and responses.
        api = {"X-API-KEY": env.a.key_e2b}
        t = c.post(
            f"/sandboxes/{sandbox.sandbox_id}/timeout",
            content=gzip.compress(b'{"timeout": 300}'),
            headers={**api, "Content-Type": "application/json", "Content-Encoding": "gzip"},
        )
        assert t.status_code == 204, t.text
        info = c.get(f"/sandboxes/{sandbox.sandbox_id}", headers={**api, "Accept-Encoding": "gzip"})
        assert info.status_code == 200 and info.headers.get("content-encoding") == "gzip"
        assert info.json()["sandboxID"] == sandbox.sandbox_id


def test_bodies_that_cannot_be_inflated_are_refused(env: Env, sandbox: Sandbox) -> None:
    h = _headers(sandbox)
    with httpx.Client(base_url=env.server.url, timeout=60) as c:
        # Not gzip at all, and gzip cut short.
        whole = gzip.compress(os.urandom(64 * 1024))
        for body in [b"this is not gzip" * 100, whole[: len(whole) // 2]]:
            r = c.post(
                "/files",
                params={"path": "/home/user/broken.bin"},
                content=body,
                headers={**h, "Content-Type": "application/octet-stream", "Content-Encoding": "gzip"},
            )
            assert r.status_code == 400, r.text
            assert r.json()["message"]
        assert sandbox.files.exists("broken.bin") is False
        # An encoding this server does not inflate is refused by name.
        r = c.post(
            "/files",
            params={"path": "/home/user/broken.bin"},
            content=zlib.compress(b"x"),
            headers={**h, "Content-Type": "application/octet-stream", "Content-Encoding": "br"},
        )
        assert r.status_code == 400 and "br" in r.json()["message"]
        api = {"X-API-KEY": env.a.key_e2b, "Content-Type": "application/json", "Content-Encoding": "gzip"}
        t = c.post(f"/sandboxes/{sandbox.sandbox_id}/timeout", content=b"not gzip", headers=api)
        assert t.status_code == 400, t.text
        assert t.json()["code"] == 400
