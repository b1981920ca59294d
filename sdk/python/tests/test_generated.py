"""The generated parts of the SDK: the models hold every field a real server
sends and write back what they read; the generators' ``--check`` modes
(run by scripts/test.sh) catch a stale file and refuse what they cannot
translate."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Mapping, Tuple

import httpx
import pytest

import stacyvm
from conftest import REPO_ROOT, Server

PACKAGE = Path("sdk/python/src/stacyvm")
DOCUMENT = Path("crates/control-plane/tests/control_plane/snapshots/openapi.json")
SHARED = Path("scripts/generated_file.py")


def _same_keys(raw: Mapping[str, Any], record: Any, where: str) -> None:
    """Every key the server sent is a field of the record, and the record
    reads back from its own JSON unchanged."""
    written = record.to_json()
    assert set(raw) <= set(written), f"{where}: the model has no field for {sorted(set(raw) - set(written))}"
    assert type(record).from_json(written) == record, where


def test_models_hold_every_field_the_server_sends(
    server: Server, client: stacyvm.Client, sandbox: stacyvm.Sandbox
) -> None:
    sandbox.files.write("/work/model.txt", b"model")
    sandbox.exec(["true"])
    tenant = client.create_tenant("sdk-generated-models")
    client.create_key(tenant.id, "viewer", "sdk-generated-models")
    with httpx.Client(base_url=server.url, headers={"authorization": f"Bearer {server.admin_key}"}) as http:

        def get(url: str, **params: str) -> Any:
            response = http.get(url, params=params)
            response.raise_for_status()
            return response.json()

        status = get("/v1/status")
        _same_keys(status, stacyvm.Status.from_json(status), "Status")
        checks: List[Tuple[Dict[str, Any], type, str]] = [
            (status["store"], stacyvm.StoreStatus, "StoreStatus"),
            (status["providers"][0], stacyvm.ProviderStatus, "ProviderStatus"),
            (status["workers"][0], stacyvm.Worker, "Worker"),
            (get(f"/v1/sandboxes/{sandbox.id}"), stacyvm.SandboxInfo, "SandboxInfo"),
            (get(f"/v1/sandboxes/{sandbox.id}/files/stat", path="/work/model.txt"), stacyvm.FileEntry, "FileEntry"),
            (get(f"/v1/sandboxes/{sandbox.id}/logs")["lines"][0], stacyvm.LogLine, "LogLine"),
            (get("/v1/images")["images"][0], stacyvm.Image, "Image"),
            (get("/v1/keys", limit="1000")["keys"][-1], stacyvm.ApiKey, "ApiKey"),
            (get("/v1/audit", sandbox_id=sandbox.id, limit="1")["events"][0], stacyvm.AuditEvent, "AuditEvent"),
            (get(f"/v1/tenants/{tenant.id}/quota"), stacyvm.Quota, "Quota"),
        ]
        tenants = get("/v1/tenants", limit="1000")["tenants"]
        checks.append(([t for t in tenants if t["id"] == tenant.id][0], stacyvm.Tenant, "Tenant"))
        ran = http.post(f"/v1/sandboxes/{sandbox.id}/exec", json={"cmd": ["sh", "-c", "printf '\\377'"]}).json()
        checks.append((ran, stacyvm.ExecResult, "ExecResult"))
    for raw, model, where in checks:
        _same_keys(raw, model.from_json(raw), where)
    assert stacyvm.ExecResult.from_json(ran).stdout_bytes == b"\xff"


def _scratch_tree(tmp_path: Path, *files: Path) -> Path:
    """A copy of the parts of the checkout a generator reads and writes."""
    for rel in files:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(REPO_ROOT / rel, tmp_path / rel)
    return tmp_path


def _run(script: Path, *args: str) -> "subprocess.CompletedProcess[str]":
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True)


def test_sync_generator_check_catches_a_stale_client(tmp_path: Path) -> None:
    script = Path("scripts/gen-python-sync.py")
    root = _scratch_tree(tmp_path, script, SHARED, PACKAGE / "aio.py", PACKAGE / "client.py")
    assert _run(root / script, "--check").returncode == 0
    aio = root / PACKAGE / "aio.py"
    source = aio.read_text()
    drain = "\n\nasync def _drain(s: AsyncExecStream) -> None:\n    async with s:\n        await s.aclose()\n"
    aio.write_text(source + drain)
    stale = _run(root / script, "--check")
    assert stale.returncode == 1 and "gen-python-sync.py" in stale.stderr
    assert "+def _drain(s: ExecStream) -> None:" in stale.stdout and "+        s.close()" in stale.stdout
    assert _run(root / script).returncode == 0
    assert _run(root / script, "--check").returncode == 0
    # A blocking call belongs in _io_async, whose twin the generator knows.
    nap = "\n\nasync def _nap() -> None:\n    await asyncio.to_thread(print)\n"
    aio.write_text(source.replace("import os\n", "import asyncio\nimport os\n") + nap)
    refused = _run(root / script)
    assert refused.returncode == 2 and "asyncio.to_thread" in refused.stderr and "_io_async" in refused.stderr


def test_models_generator_check_catches_a_changed_document(tmp_path: Path) -> None:
    script = Path("scripts/gen-python-models.py")
    root = _scratch_tree(tmp_path, script, SHARED, DOCUMENT, PACKAGE / "_models_gen.py")
    assert _run(root / script, "--check").returncode == 0
    document = root / DOCUMENT
    doc = json.loads(document.read_text())
    doc["components"]["schemas"]["Failure"]["properties"]["hint"] = {"type": ["string", "null"]}
    document.write_text(json.dumps(doc))
    stale = _run(root / script, "--check")
    assert stale.returncode == 1 and "gen-python-models.py" in stale.stderr
    assert "+    hint: Optional[str] = None" in stale.stdout
    assert _run(root / script).returncode == 0
    assert _run(root / script, "--check").returncode == 0
    # A nested shape the generator was not told about is an error, not an untyped field.
    doc["components"]["schemas"]["Failure"]["properties"]["hint"] = {"$ref": "#/components/schemas/Health"}
    document.write_text(json.dumps(doc))
    refused = _run(root / script)
    assert refused.returncode == 2 and "Health" in refused.stderr
