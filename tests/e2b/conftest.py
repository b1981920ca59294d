"""Fixtures of the E2B SDK suite: a real `stacyvm serve` (SQLite, Docker
and the namespaces provider)
with the E2B base image (scripts/build-e2b-image.sh) in its catalog as the
default E2B template, two tenants with a member key each, and the E2B SDK
pointed at the server through its environment variables."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

import stacyvm

REPO_ROOT = Path(__file__).resolve().parents[2]
E2B_IMAGE = "e2b-base"

# The server harness of the Python SDK's suite, loaded under its own name
# (two `conftest` modules cannot share one).
_spec = importlib.util.spec_from_file_location(
    "stacyvm_sdk_fixtures", REPO_ROOT / "sdk" / "python" / "tests" / "conftest.py"
)
assert _spec is not None and _spec.loader is not None
fixtures = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = fixtures
_spec.loader.exec_module(fixtures)


@dataclass
class Tenant:
    id: str
    key_id: str
    key: str
    key_e2b: str


@dataclass
class Env:
    server: "fixtures.Server"
    data_dir: Path
    a: Tenant
    b: Tenant


def _e2b_image() -> Path:
    given = os.environ.get("STACYVM_E2B_IMAGE_TAR")
    if given:
        return Path(given)
    out = REPO_ROOT / "target" / "test-images" / "e2b-base.tar"
    script = REPO_ROOT / "scripts" / "build-e2b-image.sh"
    # Built again when the script that makes it changed.
    if not out.is_file() or out.stat().st_mtime < script.stat().st_mtime:
        subprocess.run([str(script), str(out)], cwd=REPO_ROOT, check=True)
    return out


def _tenant(admin: stacyvm.Client, name: str) -> Tenant:
    t = admin.create_tenant(name)
    k = admin.create_key(t.id, "member", f"{name}-member")
    assert k.key is not None and k.key_e2b is not None
    return Tenant(id=t.id, key_id=k.id, key=k.key, key_e2b=k.key_e2b)


@pytest.fixture(scope="session")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("e2b-server")
    with fixtures.running_server(
        tmp,
        fixtures._test_image(),
        # Docker first: E2B's creates name no provider and get the first.
        providers="docker,namespaces",
        extra_env={"STACYVM_E2B_DEFAULT_TEMPLATE": E2B_IMAGE},
    ) as server:
        with stacyvm.Client(server.url, server.admin_key) as admin:
            with open(_e2b_image(), "rb") as f:
                admin.import_image(E2B_IMAGE, f)
            a = _tenant(admin, "e2b-a")
            b = _tenant(admin, "e2b-b")
        saved = {k: os.environ.get(k) for k in ("E2B_API_KEY", "E2B_API_URL", "E2B_SANDBOX_URL", "E2B_DOMAIN")}
        os.environ["E2B_API_KEY"] = a.key_e2b
        os.environ["E2B_API_URL"] = server.url
        os.environ["E2B_SANDBOX_URL"] = server.url
        os.environ.pop("E2B_DOMAIN", None)
        try:
            yield Env(server=server, data_dir=tmp / "data", a=a, b=b)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


@pytest.fixture
def sandbox(env: Env) -> Iterator["e2b.Sandbox"]:  # noqa: F821
    from e2b import Sandbox

    sb = Sandbox.create(metadata={"suite": "e2b"})
    try:
        yield sb
    finally:
        sb.kill()
