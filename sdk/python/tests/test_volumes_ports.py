"""Volumes, exposed ports and whoami against a real server with the Docker
provider, through both clients: data that outlive a sandbox, read-only
mounts and refusals; a sandbox's HTTP server reached through the server with
a key, publicly and with a token."""

from __future__ import annotations

import uuid
from typing import Iterator, Tuple

import httpx
import pytest

import stacyvm
from conftest import IMAGE, Server


@pytest.fixture
def member(client: stacyvm.Client, server: Server) -> Iterator[Tuple[stacyvm.Tenant, stacyvm.ApiKey, stacyvm.Client]]:
    """A fresh tenant, a member key of it and a client holding that key."""
    tenant = client.create_tenant(f"vp-{uuid.uuid4().hex[:8]}")
    key = client.create_key(tenant.id, "member", "sdk-volumes")
    assert key.key is not None
    with stacyvm.Client(server.url, key.key) as c:
        yield tenant, key, c


def test_whoami_names_the_key_its_tenant_and_role(client: stacyvm.Client, member: Tuple[stacyvm.Tenant, stacyvm.ApiKey, stacyvm.Client]) -> None:
    tenant, key, c = member
    assert c.whoami() == stacyvm.WhoAmI(key_id=key.id, tenant_id=tenant.id, role="member")
    assert client.whoami().role == "admin"


def test_volume_data_outlive_the_sandbox(client: stacyvm.Client, member: Tuple[stacyvm.Tenant, stacyvm.ApiKey, stacyvm.Client]) -> None:
    tenant, _, c = member
    name = f"data-{uuid.uuid4().hex[:8]}"
    vol = c.create_volume(name, 16)
    try:
        assert (vol.name, vol.size_mb, vol.tenant_id) == (name, 16, tenant.id) and vol.id.startswith("vol_")
        assert c.get_volume(name) == vol
        assert [v.id for v in c.list_volumes()] == [vol.id]
        # Names are per tenant: the admin's key finds no volume by that name.
        with pytest.raises(stacyvm.NotFound):
            client.get_volume(name)

        with c.sandbox(image=IMAGE, provider="docker", volumes=[stacyvm.VolumeMount(volume=name, path="/data")]) as writer:
            r = writer.exec("echo kept > /data/f.txt && cat /data/f.txt")
            assert r.stdout == "kept\n", r.stderr
            with pytest.raises(stacyvm.Conflict) as mounted:
                c.delete_volume(name)
            assert writer.id in mounted.value.message

        # A mapping works as well as a VolumeMount.
        with c.sandbox(image=IMAGE, provider="docker", volumes=[{"volume": name, "path": "/mnt/v", "read_only": True}]) as reader:
            assert reader.files.read("/mnt/v/f.txt") == b"kept\n"
            ro = reader.exec("echo x > /mnt/v/g.txt")
            assert ro.exit_code != 0 and "read-only" in ro.stderr.lower(), ro

        with pytest.raises(stacyvm.InvalidRequest):
            c.create_sandbox(IMAGE, provider="docker", volumes=[stacyvm.VolumeMount(volume=name, path="relative")])
        with pytest.raises(stacyvm.NotFound):
            c.create_sandbox(IMAGE, provider="docker", volumes=[stacyvm.VolumeMount(volume="no-such-volume", path="/data")])
        with pytest.raises(stacyvm.Conflict):
            c.create_volume(name, 16)
        with pytest.raises(stacyvm.InvalidRequest):
            c.create_volume("Bad Name", 16)
    finally:
        c.delete_volume(name)
    with pytest.raises(stacyvm.NotFound):
        c.get_volume(name)
    assert c.list_volumes() == []


async def test_async_volumes_and_whoami(server: Server, member: Tuple[stacyvm.Tenant, stacyvm.ApiKey, stacyvm.Client]) -> None:
    tenant, key, _ = member
    assert key.key is not None
    async with stacyvm.AsyncClient(server.url, key.key) as c:
        assert (await c.whoami()).tenant_id == tenant.id
        name = f"async-{uuid.uuid4().hex[:8]}"
        vol = await c.create_volume(name, 8)
        try:
            assert await c.get_volume(name) == vol
            assert [v.name for v in await c.list_volumes()] == [name]
            async with c.sandbox(IMAGE, provider="docker", volumes=[stacyvm.VolumeMount(volume=name, path="/v")]) as sb:
                await sb.files.write("/v/a.txt", b"async")
            async with c.sandbox(IMAGE, provider="docker", volumes=[stacyvm.VolumeMount(volume=name, path="/w", read_only=True)]) as sb:
                assert await sb.files.read("/w/a.txt") == b"async"
        finally:
            await c.delete_volume(name)
        assert await c.list_volumes() == []


def test_ports_reach_the_sandboxs_server(server: Server, member: Tuple[stacyvm.Tenant, stacyvm.ApiKey, stacyvm.Client]) -> None:
    _, key, c = member
    with c.sandbox(image=IMAGE, provider="docker") as sb:
        up = sb.exec(
            "mkdir -p /www && echo served > /www/index.html && "
            "setsid busybox httpd -f -p 127.0.0.1:8080 -h /www </dev/null >/dev/null 2>&1 & "
            "i=0; while ! nc -z 127.0.0.1 8080 2>/dev/null && [ $i -lt 100 ]; do i=$((i+1)); sleep 0.1; done; echo up"
        )
        assert up.stdout.strip() == "up", up.stderr
        exposed = sb.expose(8080)
        assert isinstance(exposed, stacyvm.ExposedPort), exposed
        assert exposed.port == 8080 and exposed.public is False
        assert exposed.url == f"/v1/sandboxes/{sb.id}/ports/8080/"
        assert sb.ports() == [exposed]
        with httpx.Client(base_url=server.url, timeout=60) as h:
            page = exposed.url + "index.html"
            r = h.get(page, headers={"Authorization": f"Bearer {key.key}"})
            assert (r.status_code, r.text) == (200, "served\n")
            assert h.get(page).status_code == 401, "a private port opened without a key"
            token = sb.port_token(8080, ttl_seconds=60)
            assert isinstance(token, stacyvm.PortToken) and "stacyvm_token=" in token.url
            r = h.get(exposed.url + "index.html", params={"stacyvm_token": token.token})
            assert (r.status_code, r.text) == (200, "served\n")
            assert sb.expose(8080, public=True).public is True
            assert h.get(page).status_code == 200, "the public port is closed"
            assert [(p.port, p.public) for p in sb.ports()] == [(8080, True)]
            sb.unexpose(8080)
            assert sb.ports() == []
            assert h.get(page).status_code != 200, "an unexposed port still answers"
        with pytest.raises(stacyvm.NotFound):
            sb.unexpose(8080)
        with pytest.raises(stacyvm.InvalidRequest):
            sb.expose(0)
