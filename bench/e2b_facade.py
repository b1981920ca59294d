#!/usr/bin/env python3
"""What the E2B-compatible API costs over StacyVM's own API, measured in one run.

Starts a `stacyvm serve` (Docker provider, the E2B base image as `base`),
creates one sandbox through the unmodified E2B SDK and times, interleaved in
the same loop on that one sandbox:

- `Sandbox.commands.run("true")` through the E2B SDK: envd's Connect
  `process.Process/Start` stream, which StacyVM serves with a streaming exec;
- the same command line (`/bin/bash -l -c true`, what the E2B SDK asks for)
  through StacyVM's Python SDK, `Sandbox.exec`;
- `true` alone through StacyVM's Python SDK, for scale.

Prints a Markdown table (n, p50, p95, p99 in ms, and the ratio to the native
call) and the facade's cost at p50, and writes every sample to
`bench/results/e2b-<UTC timestamp>.json`. Run from the repository root with
the test environment (`scripts/lib.sh`'s `prepare_test_env`) and the Python
venv the test suite uses:

    .venv/bin/python bench/e2b_facade.py [--iters 300] [--stacyvm-bin PATH]

It asserts nothing about times; it removes its sandbox and stops its server on
every exit.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Dict, List

REPO_ROOT = Path(__file__).resolve().parents[1]


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def percentile(samples: List[float], p: float) -> float:
    """Nearest-rank percentile, as the Rust bench reports them."""
    ordered = sorted(samples)
    rank = max(1, -(-len(ordered) * p // 100))
    return ordered[int(rank) - 1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iters", type=int, default=300, help="timed calls per side (default 300)")
    ap.add_argument("--warmup", type=int, default=10, help="untimed calls per side first (default 10)")
    ap.add_argument("--stacyvm-bin", help="the stacyvm binary (default: STACYVM_BIN, else target/release/stacyvm)")
    args = ap.parse_args()
    if args.iters < 1:
        ap.error("--iters must be at least 1")

    binary = args.stacyvm_bin or os.environ.get("STACYVM_BIN") or str(REPO_ROOT / "target" / "release" / "stacyvm")
    if not Path(binary).is_file():
        subprocess.run(["cargo", "build", "--release", "-p", "stacyvm"], cwd=REPO_ROOT, check=True)
    os.environ["STACYVM_BIN"] = binary

    import stacyvm
    from e2b import Sandbox

    fixtures = _load("stacyvm_sdk_fixtures", REPO_ROOT / "sdk" / "python" / "tests" / "conftest.py")
    e2b_tar = REPO_ROOT / "target" / "test-images" / "e2b-base.tar"
    if not e2b_tar.is_file():
        subprocess.run([str(REPO_ROOT / "scripts" / "build-e2b-image.sh"), str(e2b_tar)], cwd=REPO_ROOT, check=True)

    samples: Dict[str, List[float]] = {"e2b": [], "native_bash": [], "native_true": []}
    with tempfile.TemporaryDirectory(prefix="stacyvm-bench-e2b-") as tmp:
        with fixtures.running_server(
            Path(tmp),
            fixtures._test_image(),
            providers="docker",
            extra_env={"STACYVM_E2B_DEFAULT_TEMPLATE": "e2b-base"},
        ) as server:
            with stacyvm.Client(server.url, server.admin_key) as admin:
                with open(e2b_tar, "rb") as f:
                    admin.import_image("e2b-base", f)
                tenant = admin.create_tenant("bench-e2b")
                # Every side's calls are execs; the default 600 a minute
                # would throttle a run of a few hundred per side.
                quota = admin.get_quota(tenant.id)
                admin.set_quota(tenant.id, dataclasses.replace(quota, max_exec_per_minute=None))
                key = admin.create_key(tenant.id, "member", "bench")
            assert key.key is not None and key.key_e2b is not None
            os.environ.update(E2B_API_KEY=key.key_e2b, E2B_API_URL=server.url, E2B_SANDBOX_URL=server.url)
            sb = Sandbox.create()
            try:
                with stacyvm.Client(server.url, key.key) as client:
                    native = client.get_sandbox(sb.sandbox_id)

                    def e2b_run() -> None:
                        r = sb.commands.run("true")
                        assert r.exit_code == 0

                    def native_bash() -> None:
                        r = native.exec(["/bin/bash", "-l", "-c", "true"])
                        assert r.exit_code == 0

                    def native_true() -> None:
                        r = native.exec(["true"])
                        assert r.exit_code == 0

                    sides: Dict[str, Callable[[], None]] = {
                        "e2b": e2b_run,
                        "native_bash": native_bash,
                        "native_true": native_true,
                    }
                    for _ in range(args.warmup):
                        for call in sides.values():
                            call()
                    for _ in range(args.iters):
                        for name, call in sides.items():
                            t0 = time.perf_counter()
                            call()
                            samples[name].append((time.perf_counter() - t0) * 1000)
            finally:
                sb.kill()

    rows = [
        ("E2B SDK: commands.run(\"true\") (bash -l -c true)", "e2b"),
        ("StacyVM Python SDK: exec bash -l -c true", "native_bash"),
        ("StacyVM Python SDK: exec true", "native_true"),
    ]
    base = percentile(samples["native_bash"], 50)
    print("| call | n | p50 | p95 | p99 | unit | vs native (same command) |")
    print("|---|---:|---:|---:|---:|---|---:|")
    for label, key_ in rows:
        s = samples[key_]
        p50 = percentile(s, 50)
        ratio = f"{base / p50:.3g}×" if key_ != "native_true" else ""
        print(f"| {label} | {len(s)} | {p50:.3g} | {percentile(s, 95):.3g} | {percentile(s, 99):.3g} | ms | {ratio} |")
    cost = percentile(samples["e2b"], 50) - base
    print(f"\nThe E2B facade adds {cost:.3g} ms at p50 over StacyVM's own API (target < 1 ms).")

    out_dir = REPO_ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()
    result = {
        "suite": "e2b",
        "date": stamp,
        "commit": commit,
        "iters": args.iters,
        "loadavg": os.getloadavg(),
        "facade_cost_p50_ms": round(cost, 4),
        "samples_ms": {k: [round(x, 4) for x in v] for k, v in samples.items()},
    }
    path = out_dir / f"e2b-{stamp}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {path.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
