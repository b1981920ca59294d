"""The unmodified E2B JavaScript SDK (npm `e2b`, pinned in
tests/e2b/js/package-lock.json) against the same server: node's test runner
runs tests/e2b/js/sdk.test.mjs with the E2B environment of tenant a."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import httpx

from conftest import Env

JS_DIR = Path(__file__).resolve().parent / "js"


def test_the_javascript_sdk_creates_runs_and_moves_files(env: Env) -> None:
    node = shutil.which("node")
    assert node, "node is not installed: scripts/lib.sh's ensure_node installs it"
    assert (JS_DIR / "node_modules" / "e2b").is_dir(), (
        "the E2B JavaScript SDK is not installed: run `npm ci` in tests/e2b/js (scripts/test.sh does)"
    )
    r = subprocess.run(
        [node, "--test", "--test-reporter=tap", str(JS_DIR / "sdk.test.mjs")],
        cwd=JS_DIR,
        env={**os.environ, "E2B_API_KEY": env.a.key_e2b, "E2B_API_URL": env.server.url, "E2B_SANDBOX_URL": env.server.url},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, f"node --test failed:\n{r.stdout}\n{r.stderr}"
    assert "# fail 0" in r.stdout and "# pass 5" in r.stdout, r.stdout
    # Everything the JavaScript run created is gone again.
    left = httpx.get(
        env.server.url + "/v2/sandboxes",
        params={"metadata": "suite=e2b-js"},
        headers={"X-API-KEY": env.a.key_e2b},
    )
    assert left.status_code == 200, left.text
    assert left.json() == [], left.json()
