//! Volumes, exposed ports and whoami against a real `stacyvm serve` with the Docker provider: data that outlives a sandbox, read-only mounts, refusals; a sandbox's HTTP server reached through the server with a key, publicly and with a token.

import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import {
  Client,
  ConflictError,
  ForbiddenError,
  InvalidRequestError,
  NotFoundError,
  UnauthenticatedError,
} from "../src/index.js";
import { IMAGE, type Server, isError, startServer } from "./server.js";

let server: Server;
let admin: Client;

before(async () => {
  server = await startServer();
  admin = server.admin;
});

after(async () => {
  await server?.stop();
});

/** A member key of a fresh tenant, and the admin-side ids. */
async function member(role: "member" | "viewer" = "member"): Promise<{ client: Client; tenantId: string; keyId: string }> {
  const t = await admin.createTenant(`ts-${role}-${randomUUID().slice(0, 8)}`);
  const k = await admin.createKey(t.id, role, `ts-${role}`);
  return { client: new Client({ url: server.url, apiKey: k.key ?? "" }), tenantId: t.id, keyId: k.id };
}

describe("whoami", () => {
  test("names the calling key, its tenant and its role", async () => {
    const me = await admin.whoami();
    assert.equal(me.role, "admin");
    assert.match(me.key_id, /^key_/);
    const m = await member("viewer");
    assert.deepEqual(await m.client.whoami(), { key_id: m.keyId, tenant_id: m.tenantId, role: "viewer" });
    await assert.rejects(new Client({ url: server.url, apiKey: "svm_nope" }).whoami(), isError(UnauthenticatedError, 401));
  });
});

describe("volumes", () => {
  test("data outlive the sandbox, read-only mounts refuse writes, a mounted volume is not deleted", async () => {
    const { client } = await member();
    const name = `data-${randomUUID().slice(0, 8)}`;
    const vol = await client.createVolume(name, 16);
    try {
      assert.equal(vol.name, name);
      assert.equal(vol.size_mb, 16);
      assert.match(vol.id, /^vol_/);
      assert.deepEqual(await client.getVolume(name), vol);
      assert.deepEqual((await client.listVolumes()).map((v) => v.id), [vol.id]);
      // Names are per tenant: another tenant's key (the admin's) finds no volume by that name.
      await assert.rejects(admin.getVolume(name), isError(NotFoundError, 404));
      await assert.rejects(admin.deleteVolume(name), isError(NotFoundError, 404));

      {
        await using writer = await client.sandbox({ image: IMAGE, volumes: [{ volume: name, path: "/data" }] });
        const w = await writer.exec("echo kept > /data/f.txt && cat /data/f.txt");
        assert.equal(w.stdout, "kept\n", w.stderr);
        // Mounted: deleting it is refused, and the refusal names the sandbox.
        await assert.rejects(client.deleteVolume(name), (e: unknown) => {
          assert.ok(e instanceof ConflictError, String(e));
          assert.match(e.message, new RegExp(writer.id));
          return true;
        });
      }

      await using reader = await client.sandbox({
        image: IMAGE,
        volumes: [{ volume: name, path: "/mnt/v", read_only: true }],
      });
      assert.equal(await reader.files.readText("/mnt/v/f.txt"), "kept\n");
      const ro = await reader.exec("echo x > /mnt/v/g.txt");
      assert.notEqual(ro.exit_code, 0);
      assert.match(ro.stderr, /read-only/i);
      await reader.destroy();

      await assert.rejects(
        client.sandbox({ image: IMAGE, volumes: [{ volume: name, path: "relative" }] }),
        isError(InvalidRequestError, 400),
      );
      await assert.rejects(
        client.sandbox({ image: IMAGE, volumes: [{ volume: "no-such-volume", path: "/data" }] }),
        isError(NotFoundError, 404),
      );
      await assert.rejects(client.createVolume(name, 16), isError(ConflictError, 409));
      await assert.rejects(client.createVolume("Bad Name", 16), isError(InvalidRequestError, 400));
    } finally {
      await client.deleteVolume(name);
    }
    await assert.rejects(client.getVolume(name), isError(NotFoundError, 404));
    assert.deepEqual(await client.listVolumes(), []);
  });

  test("a viewer may list volumes but not create them", async () => {
    const { client } = await member("viewer");
    assert.deepEqual(await client.listVolumes(), []);
    await assert.rejects(client.createVolume("v", 16), isError(ForbiddenError, 403));
  });
});

describe("ports", () => {
  test("expose, reach the sandbox's server with a key, publicly and with a token, list, unexpose", async () => {
    const { client } = await member();
    await using sb = await client.sandbox({ image: IMAGE });
    const up = await sb.exec(
      "mkdir -p /www && echo served > /www/index.html && " +
        "setsid busybox httpd -f -p 127.0.0.1:8080 -h /www </dev/null >/dev/null 2>&1 & " +
        "i=0; while ! nc -z 127.0.0.1 8080 2>/dev/null && [ $i -lt 100 ]; do i=$((i+1)); sleep 0.1; done; echo up",
    );
    assert.equal(up.stdout.trim(), "up", up.stderr);

    const exposed = await sb.expose(8080);
    assert.deepEqual({ port: exposed.port, public: exposed.public }, { port: 8080, public: false });
    const base = sb.portUrl(exposed);
    assert.equal(base, `${server.url}/v1/sandboxes/${sb.id}/ports/8080/`);
    const page = (headers: Record<string, string> = {}, url = `${base}index.html`) => fetch(url, { headers });
    const withKey = await page({ authorization: `Bearer ${server.adminKey}` });
    assert.equal(withKey.status, 200);
    assert.equal(await withKey.text(), "served\n");
    assert.equal((await page()).status, 401, "a private port opened without a key");

    const token = await sb.portToken(8080, { ttlSeconds: 60 });
    assert.match(token.url, /stacyvm_token=/);
    assert.ok(token.expires_at > Date.now() / 1000);
    const viaToken = new URL(sb.portUrl(token));
    viaToken.pathname += "index.html";
    const t = await page({}, viaToken.toString());
    assert.equal(t.status, 200);
    assert.equal(await t.text(), "served\n");

    assert.equal((await sb.expose(8080, { public: true })).public, true);
    assert.equal((await page()).status, 200, "the public port is closed");
    assert.deepEqual(
      (await sb.ports()).map((p) => [p.port, p.public]),
      [[8080, true]],
    );

    await sb.unexpose(8080);
    assert.deepEqual(await sb.ports(), []);
    assert.notEqual((await page()).status, 200, "an unexposed port still answers");
    await assert.rejects(sb.unexpose(8080), isError(NotFoundError, 404));
    await assert.rejects(sb.expose(0), isError(InvalidRequestError, 400));
    await assert.rejects(sb.expose(70000), isError(InvalidRequestError, 400));
  });
});
