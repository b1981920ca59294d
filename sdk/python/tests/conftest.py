"""Test fixtures: a real `stacyvm serve` (SQLite store, PRoot and Docker
providers) started once per session on a free loopback port, the busybox
test image imported into it, and clients and sandboxes that clean up after
themselves."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import pytest

import stacyvm

REPO_ROOT = Path(__file__).resolve().parents[3]
ADMIN_KEY = "svm_sdktest_sdktest_sdktest_sdktest_sdktest"
IMAGE = "busybox"

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_ADDR = re.compile(r"StacyVM is serving\s+addr=(\S+)")
_UP = re.compile(r"StacyVM is up at (http://\S+)")


@dataclass
class Server:
    """A running `stacyvm serve`."""

    url: str
    admin_key: str
    process: "subprocess.Popen[bytes]"
    stderr_path: Path

    def log_tail(self) -> str:
        text = self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""
        return _ANSI.sub("", text)[-4000:]


def _run_script(args: List[str]) -> str:
    """Runs a repo build script and returns its last stdout line."""
    done = subprocess.run(args, cwd=REPO_ROOT, check=True, stdout=subprocess.PIPE)
    lines = done.stdout.decode().strip().splitlines()
    if not lines:
        raise RuntimeError(f"{args[0]} printed nothing")
    return lines[-1].strip()


def _stacyvm_bin() -> Path:
    given = os.environ.get("STACYVM_BIN")
    if given:
        path = Path(given)
        if not path.is_file():
            raise RuntimeError(f"STACYVM_BIN={given} does not name a file")
        return path
    path = REPO_ROOT / "target" / "debug" / "stacyvm"
    if not path.is_file():
        if shutil.which("cargo") is None or not (REPO_ROOT / "Cargo.toml").is_file():
            raise RuntimeError(f"no stacyvm binary at {path}: build it (cargo build -p stacyvm) or set STACYVM_BIN")
        subprocess.run(["cargo", "build", "-q", "-p", "stacyvm"], cwd=REPO_ROOT, check=True)
    return path


def _agent_bin() -> Path:
    given = os.environ.get("STACYVM_AGENT_BIN")
    if given:
        return Path(given)
    built = REPO_ROOT / "target" / "x86_64-unknown-linux-gnu" / "release" / "stacyvm-agent"
    if built.is_file():
        return built
    return Path(_run_script([str(REPO_ROOT / "scripts" / "build-agent.sh")]))


def _test_image() -> Path:
    given = os.environ.get("STACYVM_TEST_IMAGE_TAR")
    if given:
        return Path(given)
    # The script's default location: reusing one tar keeps the image digest
    # stable across runs, so Docker imports it once rather than every run.
    out = REPO_ROOT / "target" / "test-images" / "busybox.tar"
    if not out.is_file():
        subprocess.run([str(REPO_ROOT / "scripts" / "build-test-image.sh"), str(out)], cwd=REPO_ROOT, check=True)
    return out


def _die_with_parent() -> None:
    # If the test run is killed outright, the server goes with it rather
    # than lingering with its sandboxes.
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def _wait_for_address(proc: "subprocess.Popen[bytes]", stderr_path: Path, stdout_path: Path) -> str:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        err = _ANSI.sub("", stderr_path.read_text(errors="replace"))
        m = _ADDR.search(err)
        if m:
            return "http://" + m.group(1)
        m = _UP.search(_ANSI.sub("", stdout_path.read_text(errors="replace")))
        if m:
            return m.group(1)
        if proc.poll() is not None:
            raise RuntimeError(f"stacyvm serve exited with {proc.returncode}:\n{err[-4000:]}")
        time.sleep(0.05)
    raise RuntimeError("stacyvm serve did not report its address within 120 s")


def destroy_all(url: str, admin_key: str) -> List[str]:
    """Destroys every live sandbox on the server; returns the failures."""
    failures: List[str] = []
    with stacyvm.Client(url, admin_key) as admin:
        cursor: Optional[str] = None
        while True:
            page = admin.list_sandboxes(limit=1000, cursor=cursor)
            for sb in page:
                if sb.state in ("destroyed", "failed", "lost"):
                    continue
                try:
                    admin.destroy_sandbox(sb.id)
                except stacyvm.StacyVMError as e:
                    failures.append(f"{sb.id}: {e}")
            cursor = page.next_cursor
            if cursor is None:
                return failures


@contextlib.contextmanager
def running_server(
    tmp: Path,
    image_tar: Path,
    *,
    providers: str = "proot,docker",
    extra_env: Optional[Dict[str, str]] = None,
    wait_ready: bool = True,
) -> Iterator[Server]:
    """Starts `stacyvm serve` in ``tmp``, waits until it is ready (unless
    told not to), imports the test image as ``busybox``, and on exit
    destroys every sandbox and stops the server."""
    data_dir = tmp / "data"
    data_dir.mkdir(parents=True)
    stdout_path, stderr_path = tmp / "server.stdout", tmp / "server.stderr"
    env = {k: v for k, v in os.environ.items() if not k.startswith("STACYVM_")}
    env.update(
        STACYVM_ADMIN_KEY=ADMIN_KEY,
        STACYVM_AGENT_BIN=str(_agent_bin()),
        NO_COLOR="1",
    )
    env.update(extra_env or {})
    cmd = [
        str(_stacyvm_bin()),
        "serve",
        "--data-dir",
        str(data_dir),
        "--listen",
        "127.0.0.1:0",
        "--providers",
        providers,
    ]
    with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, preexec_fn=_die_with_parent)
    server: Optional[Server] = None
    try:
        url = _wait_for_address(proc, stderr_path, stdout_path)
        server = Server(url=url, admin_key=ADMIN_KEY, process=proc, stderr_path=stderr_path)
        with stacyvm.Client(url, ADMIN_KEY) as admin:
            deadline = time.monotonic() + 60
            while wait_ready and not admin.ready().ready:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the server never became ready:\n{server.log_tail()}")
                time.sleep(0.1)
            with open(image_tar, "rb") as f:
                admin.import_image(IMAGE, f)
        yield server
    finally:
        failures: List[str] = []
        if server is not None and proc.poll() is None:
            try:
                failures = destroy_all(server.url, ADMIN_KEY)
            except stacyvm.StacyVMError as e:
                failures.append(str(e))
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if failures:
            print("sandboxes that could not be destroyed: " + "; ".join(failures), file=sys.stderr)
        _unmount_under(data_dir)


def _unmount_under(directory: Path) -> None:
    """Unmounts what is mounted at or below ``directory``, deepest first:
    volumes stay mounted when their server stops (they outlive it by design),
    and pytest's later removal of the temporary directory must not reach into
    one."""
    root = str(directory.resolve())
    found = subprocess.run(["findmnt", "-rn", "-o", "TARGET"], stdout=subprocess.PIPE, text=True, check=False)
    targets = [t for t in found.stdout.splitlines() if t == root or t.startswith(root + "/")]
    for target in sorted(targets, reverse=True):
        done = subprocess.run(["umount", target], stderr=subprocess.PIPE, text=True, check=False)
        if done.returncode != 0:
            print(f"could not unmount {target}: {done.stderr.strip()}", file=sys.stderr)


@pytest.fixture(scope="session")
def image_tar() -> Path:
    return _test_image()


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory, image_tar: Path) -> Iterator[Server]:
    with running_server(tmp_path_factory.mktemp("server"), image_tar) as s:
        yield s


@pytest.fixture
def client(server: Server) -> Iterator[stacyvm.Client]:
    with stacyvm.Client(server.url, server.admin_key) as c:
        yield c


@pytest.fixture
def sandbox(client: stacyvm.Client) -> Iterator[stacyvm.Sandbox]:
    with client.sandbox(image=IMAGE, labels={"suite": "sdk"}) as sb:
        yield sb
