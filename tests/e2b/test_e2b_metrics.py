"""Sandbox metrics through the unmodified E2B SDK (`get_metrics`) and
StacyVM's own `GET /v1/sandboxes/{id}/stats`: real readings of a sandbox
that allocates memory and burns CPU, on Docker and on the namespaces
provider, the range and the refusals."""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone
from typing import Callable, List

import httpx
import pytest
from e2b import Sandbox
from e2b.exceptions import SandboxException

import stacyvm

from conftest import E2B_IMAGE, Env

MIB = 1024 * 1024
# bash keeps the 60 MiB string in its own memory while it sleeps (the
# `echo` after the sleep keeps bash from replacing itself with `sleep`).
HOLD_MEMORY = "x=$(head -c 62914560 /dev/zero | tr '\\0' a); sleep 600; echo ${#x}"
BURN_CPU = "while :; do :; done"


def v1_stats(env: Env, sandbox_id: str, **params: str) -> httpx.Response:
    return httpx.get(
        f"{env.server.url}/v1/sandboxes/{sandbox_id}/stats",
        params=params,
        headers={"Authorization": f"Bearer {env.a.key}"},
    )


def poll_metrics(sb: Sandbox, done: Callable[[List], bool], attempts: int = 60) -> List:
    """Reads the metrics until `done` holds of them; fails after `attempts`
    reads (no wall-clock limit is asserted: each read waits a second)."""
    seen: List = []
    for _ in range(attempts):
        seen = sb.get_metrics()
        if seen and done(seen):
            return seen
        time.sleep(1)
    pytest.fail(f"the metrics never showed it; last read: {seen[-3:]}")


def check_readings(sb: Sandbox) -> None:
    first = sb.get_metrics()
    assert len(first) >= 1
    m = first[-1]
    assert m.cpu_count >= 1
    assert 0 <= m.cpu_used_pct <= 100
    assert m.mem_total > 0 and 0 < m.mem_used < m.mem_total
    assert m.disk_total > 0 and 0 < m.disk_used <= m.disk_total
    base = m.mem_used

    sb.commands.run(HOLD_MEMORY, background=True)
    grown = poll_metrics(sb, lambda ms: ms[-1].mem_used - base >= 50 * MIB)
    # The readings form a series, oldest first.
    stamps = [x.timestamp for x in grown]
    assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)

    sb.commands.run(BURN_CPU, background=True)
    poll_metrics(sb, lambda ms: ms[-1].cpu_used_pct >= 30)


def test_metrics_measure_a_docker_sandbox(env: Env) -> None:
    sb = Sandbox.create()
    try:
        assert sb.get_info().sandbox_id == sb.sandbox_id
        check_readings(sb)
        # The range: a window before the sandbox existed holds nothing,
        # one around now holds the readings.
        now = datetime.now(timezone.utc)
        assert sb.get_metrics(start=now - timedelta(days=2), end=now - timedelta(days=1)) == []
        assert len(sb.get_metrics(start=now - timedelta(hours=1), end=now + timedelta(hours=1))) >= 2
        # The class method, by id.
        assert Sandbox.get_metrics(sb.sandbox_id)

        # StacyVM's own view of the same numbers.
        r = v1_stats(env, sb.sandbox_id)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["sandbox_id"] == sb.sandbox_id
        last = body["samples"][-1]
        assert last["mem_used"] >= 50 * MIB and last["mem_total"] > last["mem_used"]
        assert last["cpu_count"] > 0 and last["cpu_used_pct"] is not None
        assert last["disk_total"] > 0
        since = (now - timedelta(days=2)).isoformat()
        until = (now - timedelta(days=1)).isoformat()
        empty = v1_stats(env, sb.sandbox_id, since=since, until=until)
        assert empty.status_code == 200 and empty.json()["samples"] == []
    finally:
        sb.kill()
    # Gone: E2B's not-found, and /v1 says the sandbox is not running.
    with pytest.raises(SandboxException):
        Sandbox.get_metrics(sb.sandbox_id)
    r = v1_stats(env, sb.sandbox_id)
    assert r.status_code == 409 and r.json()["error"]["code"] == "conflict"


def test_metrics_measure_a_namespaces_sandbox(env: Env) -> None:
    with stacyvm.Client(env.server.url, env.a.key) as a:
        created = a.create_sandbox(image=E2B_IMAGE, provider="namespaces", memory_mb=512)
    try:
        assert created.info.provider == "namespaces"
        sb = Sandbox.connect(created.id)
        check_readings(sb)
        # The namespaces sandbox's limit is its memory total.
        assert sb.get_metrics()[-1].mem_total == 512 * MIB
    finally:
        with stacyvm.Client(env.server.url, env.a.key) as a:
            a.destroy_sandbox(created.id)


def test_metrics_refuse_bad_ranges_unknown_ids_and_other_tenants(env: Env, sandbox: Sandbox) -> None:
    url = env.server.url
    sid = sandbox.sandbox_id
    own = {"X-API-KEY": env.a.key_e2b}
    with httpx.Client(base_url=url) as c:
        for query in ["start=yesterday", "end=1.5", "start=", "start=10&end=5", "step=5"]:
            r = c.get(f"/sandboxes/{sid}/metrics?{query}", headers=own)
            assert r.status_code == 400, (query, r.text)
            assert r.json()["code"] == 400 and r.json()["message"]
        ok = c.get(f"/sandboxes/{sid}/metrics?start=0&end=4102444800", headers=own)
        assert ok.status_code == 200 and len(ok.json()) >= 1
        assert set(ok.json()[0]) == {
            "timestamp", "timestampUnix", "cpuCount", "cpuUsedPct", "memUsed", "memTotal",
            "memCache", "diskUsed", "diskTotal",
        }
        missing = c.get("/sandboxes/sbx_" + "0" * 32 + "/metrics", headers=own)
        assert missing.status_code == 404
        foreign = c.get(f"/sandboxes/{sid}/metrics", headers={"X-API-KEY": env.b.key_e2b})
        assert foreign.status_code == 404

        bearer = {"Authorization": f"Bearer {env.a.key}"}
        bad = c.get(f"/v1/sandboxes/{sid}/stats?since=yesterday", headers=bearer)
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_request"
        backwards = c.get(
            f"/v1/sandboxes/{sid}/stats",
            params={"since": "2030-01-02T00:00:00Z", "until": "2030-01-01T00:00:00Z"},
            headers=bearer,
        )
        assert backwards.status_code == 400
        assert c.get(f"/v1/sandboxes/{sid}/stats?bogus=1", headers=bearer).status_code == 400
        other = c.get(f"/v1/sandboxes/{sid}/stats", headers={"Authorization": f"Bearer {env.b.key}"})
        assert other.status_code == 404 and other.json()["error"]["code"] == "not_found"
    with pytest.raises(SandboxException):
        Sandbox.get_metrics(sid, api_key=env.b.key_e2b)
