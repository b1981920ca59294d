"""Templates through both clients against a real server (Docker builds):
a build from the busybox image with run, write, env, workdir and start
steps, its streamed log, creates from it with its file, env and running
start process, pinned versions, a failing step's output, another tenant
that cannot see it, and the operator's templates that every tenant can."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Iterator, List, Tuple

import pytest

import stacyvm
from conftest import IMAGE, Server
from stacyvm import Step

START = "echo started > /tmp/started; exec sleep 1000000"


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _member_key(admin: stacyvm.Client, prefix: str) -> Tuple[stacyvm.Tenant, str]:
    """A fresh tenant and the secret of a member key of it."""
    tenant = admin.create_tenant(_name(prefix))
    key = admin.create_key(tenant.id, "member", f"{prefix}-member")
    assert key.key is not None
    return tenant, key.key


def _member(admin: stacyvm.Client, server: Server, prefix: str) -> Tuple[stacyvm.Tenant, stacyvm.Client]:
    tenant, key = _member_key(admin, prefix)
    return tenant, stacyvm.Client(server.url, key)


@pytest.fixture
def member(client: stacyvm.Client, server: Server) -> Iterator[Tuple[stacyvm.Tenant, stacyvm.Client]]:
    tenant, c = _member(client, server, "tpl")
    with c:
        yield tenant, c


@pytest.fixture
def stranger(client: stacyvm.Client, server: Server) -> Iterator[stacyvm.Client]:
    _, c = _member(client, server, "tpl-other")
    with c:
        yield c


def _steps() -> List[dict]:
    return [
        Step.run("mkdir -p /app && echo built > /app/built"),
        Step.write("/app/config", "debug = false\n", mode=0o640),
        Step.env(GREETING="hello"),
        Step.workdir("/app"),
    ]


def test_build_then_create_from_the_template(member: Tuple[stacyvm.Tenant, stacyvm.Client], stranger: stacyvm.Client) -> None:
    tenant, c = member
    name = _name("app")
    log: List[str] = []
    try:
        t = c.build_template(
            name,
            IMAGE,
            _steps(),
            provider="docker",
            env={"MODE": "production"},
            start=START,
            ready=["test", "-e", "/tmp/started"],
            wait=True,
            on_log=log.append,
        )
        assert (t.name, t.version, t.state, t.tenant_id, t.from_) == (name, 1, stacyvm.TemplateState.READY, tenant.id, IMAGE)
        assert t.image is not None and t.image.startswith(f"template/{tenant.id}/{name}:")
        assert t.env == {"GREETING": "hello", "MODE": "production"} and t.workdir == "/app"
        assert t.start == ["sh", "-c", START]
        # The build's log streamed to the caller names the steps it ran.
        assert "mkdir -p /app" in "".join(log), log

        with c.sandbox(template=name, provider="docker") as sb:
            assert sb.info.template == f"{name}:1"
            r = sb.exec("cat /app/built; cat /app/config; echo $GREETING $MODE; pwd; cat /tmp/started")
            assert r.stdout == "built\ndebug = false\nhello production\n/app\nstarted\n", r.stderr
            assert sb.files.stat("/app/config").mode == "0640"
            started = [p for p in sb.processes.list() if p.cmd == ["sh", "-c", START]]
            assert started and started[0].state == "running", sb.processes.list()
            # Explicit create fields win over the template's defaults.
            assert sb.exec("echo $MODE", env={"MODE": "x"}).stdout == "x\n"

        # A second build is version 2; a create can still pin version 1.
        second = c.build_template(name, IMAGE, [Step.run("echo two > /two")], provider="docker", wait=True)
        assert second.version == 2
        assert [v.version for v in c.list_template_versions(name)] == [1, 2]
        assert c.get_template(name).version == 2 and c.get_template(name, version=1).version == 1
        assert name in [x.name for x in c.list_templates()]
        with c.sandbox(template=f"{name}:1", provider="docker") as pinned:
            assert pinned.info.template == f"{name}:1"
            assert pinned.exec("test -e /two").exit_code == 1

            # An ended build's log comes whole, with how it ended.
            ended = c.template_logs(name, version=1)
            text = "".join(ended)
            assert "mkdir -p /app" in text and ended.state == "ready" and ended.version == 1

            # Another tenant sees none of it.
            with pytest.raises(stacyvm.NotFound):
                stranger.get_template(name)
            with pytest.raises(stacyvm.NotFound):
                stranger.template_logs(name)
            assert name not in [x.name for x in stranger.list_templates()]
            with pytest.raises(stacyvm.ImageNotFound):
                stranger.create_sandbox(template=name, provider="docker")
            with pytest.raises(stacyvm.NotFound):
                stranger.delete_template(name)

            # Deleting the template leaves the running sandbox alone.
            c.delete_template(name)
            assert pinned.exec("cat /app/built").stdout == "built\n"
        with pytest.raises(stacyvm.NotFound):
            c.get_template(name)
    finally:
        try:
            c.delete_template(name)
        except stacyvm.NotFound:
            pass


def test_a_failing_step_fails_the_build_with_its_output(member: Tuple[stacyvm.Tenant, stacyvm.Client]) -> None:
    _, c = member
    name = _name("broken")
    try:
        steps = [Step.run("sleep 1; echo about to fail; echo oops >&2; exit 3"), Step.write("/never", "x")]
        building = c.build_template(name, IMAGE, steps, provider="docker")
        assert building.state == stacyvm.TemplateState.BUILDING and building.version == 1
        # Followed while it runs (or read whole if it already ended).
        log = c.template_logs(name)
        with log:
            text = "".join(log)
        assert log.state == stacyvm.TemplateState.FAILED and log.version == 1
        assert "oops" in text, text
        with pytest.raises(stacyvm.TemplateBuildFailed) as failed:
            c.wait_template(name)
        assert failed.value.template.state == "failed"
        assert "oops" in failed.value.message and "about to fail" in failed.value.message, failed.value.message
        assert "oops" in (c.get_template(name).failure or "")
        # Creates never use a failed version.
        with pytest.raises(stacyvm.ImageNotFound):
            c.create_sandbox(template=name, provider="docker")
    finally:
        c.delete_template(name)


def test_bad_builds_are_refused_with_typed_errors(member: Tuple[stacyvm.Tenant, stacyvm.Client]) -> None:
    _, c = member
    with pytest.raises(stacyvm.InvalidRequest):
        c.build_template("Not A Name", IMAGE, [Step.run("true")])
    with pytest.raises(stacyvm.InvalidRequest):
        c.build_template(_name("rel"), IMAGE, [Step.workdir("relative")])
    with pytest.raises(stacyvm.ImageNotFound):
        c.build_template(_name("nobase"), f"no-such-image-{uuid.uuid4().hex[:8]}", [Step.run("true")])
    with pytest.raises(stacyvm.NotFound):
        c.get_template(_name("missing"))
    with pytest.raises(ValueError):
        Step.run([])


async def test_async_operator_templates_are_every_tenants(server: Server, client: stacyvm.Client, tmp_path: Path) -> None:
    name = _name("public")
    _, member_key = _member_key(client, "tpl-async")
    src = tmp_path / "src"
    src.mkdir()
    (src / "main.sh").write_text("echo from upload\n")
    async with stacyvm.AsyncClient(server.url, server.admin_key) as admin:
        log: List[str] = []
        t = await admin.build_template(
            name,
            IMAGE,
            [Step.upload("/srv", src), Step.env({"WHO": "operator"})],
            provider="docker",
            wait=True,
            on_log=log.append,
        )
        try:
            assert t.state == "ready" and log
            async with stacyvm.AsyncClient(server.url, member_key) as m:
                assert name in [x.name for x in await m.list_templates()]
                assert (await m.get_template(name)).tenant_id == t.tenant_id
                async with m.sandbox(template=name, provider="docker") as sb:
                    r = await sb.exec("sh /srv/main.sh; echo $WHO")
                    assert r.stdout == "from upload\noperator\n", r.stderr
                with pytest.raises(stacyvm.Forbidden):
                    await m.delete_template(name)
                logs = await m.template_logs(name)
                assert await logs.wait() == "ready"
        finally:
            await admin.delete_template(name)
