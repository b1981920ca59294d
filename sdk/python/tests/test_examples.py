"""Runs every example under examples/python once against the test server,
the way a user would (`python examples/python/NAME.py`), so they cannot rot."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import stacyvm
from conftest import REPO_ROOT, Server

EXAMPLES = REPO_ROOT / "examples" / "python"

# What each example must print when it works.
EXPECTED = {
    "agent_loop.py": "answer: total revenue = 113.00",
    "streaming.py": "exit code 0 after",
    "parallel_async.py": "4^2 = 16",
}


def test_every_example_is_exercised() -> None:
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_runs(server: Server, name: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STACYVM_")}
    env.update(STACYVM_URL=server.url, STACYVM_API_KEY=server.admin_key)
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / name)],
        env=env,
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        timeout=300,
    )
    out, err = done.stdout.decode(), done.stderr.decode()
    assert done.returncode == 0, f"{name} exited {done.returncode}\nstdout:\n{out}\nstderr:\n{err}"
    assert EXPECTED[name] in out
    # The examples clean up: none of their sandboxes is left running.
    with stacyvm.Client(server.url, server.admin_key) as c:
        tag = name[: -len(".py")]
        assert c.list_sandboxes(state="running", labels={"example": tag}).items == []
