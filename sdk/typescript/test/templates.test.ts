//! Templates against a real `stacyvm serve` with the Docker provider: a build from the busybox image with run, write, env, workdir and start steps and its streamed log; creates from it with its file, env and running start process; pinned versions; a failing step's output; another tenant that cannot see it; the operator's templates that every tenant can use.

import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import {
  Client,
  ForbiddenError,
  ImageNotFoundError,
  InvalidRequestError,
  NotFoundError,
  TemplateBuildFailedError,
  type TemplateStep,
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

const START = "echo started > /tmp/started; exec sleep 1000000";

function uniq(prefix: string): string {
  return `${prefix}-${randomUUID().slice(0, 8)}`;
}

/** A client holding a member key of a fresh tenant, and the tenant's id. */
async function member(): Promise<{ client: Client; tenantId: string }> {
  const t = await admin.createTenant(uniq("ts-tpl"));
  const k = await admin.createKey(t.id, "member", "ts-templates");
  return { client: new Client({ url: server.url, apiKey: k.key ?? "" }), tenantId: t.id };
}

async function deleteQuietly(client: Client, name: string): Promise<void> {
  await client.deleteTemplate(name).catch((e: unknown) => {
    if (!(e instanceof NotFoundError)) throw e;
  });
}

describe("templates", () => {
  test("a build runs its steps; creates get its files, env, workdir and running start process", async () => {
    const { client, tenantId } = await member();
    const other = (await member()).client;
    const name = uniq("app");
    const steps: TemplateStep[] = [
      { run: ["sh", "-c", "mkdir -p /app && echo built > /app/built"] },
      { write: { path: "/app/config", content: "debug = false\n", mode: "0640" } },
      { env: { GREETING: "hello" } },
      { workdir: "/app" },
    ];
    const log: string[] = [];
    try {
      const t = await client.buildTemplate({
        name,
        from: IMAGE,
        steps,
        provider: "docker",
        env: { MODE: "production" },
        start: ["sh", "-c", START],
        ready: ["test", "-e", "/tmp/started"],
        wait: true,
        onLog: (text) => log.push(text),
      });
      assert.equal(t.state, "ready");
      assert.equal(t.version, 1);
      assert.equal(t.tenant_id, tenantId);
      assert.ok(t.image?.startsWith(`template/${tenantId}/${name}:`), t.image ?? "no image");
      assert.deepEqual(t.env, { GREETING: "hello", MODE: "production" });
      assert.match(log.join(""), /mkdir -p \/app/);

      {
        await using sb = await client.sandbox({ template: name, provider: "docker" });
        assert.equal(sb.info.template, `${name}:1`);
        const r = await sb.exec("cat /app/built; cat /app/config; echo $GREETING $MODE; pwd; cat /tmp/started");
        assert.equal(r.stdout, "built\ndebug = false\nhello production\n/app\nstarted\n", r.stderr);
        assert.equal((await sb.files.stat("/app/config")).mode, "0640");
        const started = (await sb.processes.list()).filter((p) => JSON.stringify(p.cmd) === JSON.stringify(["sh", "-c", START]));
        assert.equal(started.length, 1);
        assert.equal(started[0]?.state, "running");
      }

      const second = await client.buildTemplate({ name, from: IMAGE, steps: [{ run: ["sh", "-c", "echo two > /two"] }], provider: "docker", wait: true });
      assert.equal(second.version, 2);
      assert.deepEqual((await client.listTemplateVersions(name)).map((v) => v.version), [1, 2]);
      assert.equal((await client.getTemplate(name)).version, 2);
      assert.equal((await client.getTemplate(name, { version: 1 })).version, 1);
      assert.ok((await client.listTemplates()).some((x) => x.name === name));

      await using pinned = await client.sandbox({ template: `${name}:1`, provider: "docker" });
      assert.equal((await pinned.exec("test -e /two")).exit_code, 1);
      const ended = await client.templateLogs(name, { version: 1 });
      let text = "";
      for await (const chunk of ended) text += chunk;
      assert.match(text, /mkdir -p \/app/);
      assert.deepEqual(ended.end, { state: "ready", failure: null, version: 1 });

      // Another tenant sees none of it.
      await assert.rejects(other.getTemplate(name), isError(NotFoundError, 404));
      await assert.rejects(other.templateLogs(name), isError(NotFoundError, 404));
      assert.ok(!(await other.listTemplates()).some((x) => x.name === name));
      await assert.rejects(other.sandbox({ template: name, provider: "docker" }), isError(ImageNotFoundError, 422));
      await assert.rejects(other.deleteTemplate(name), isError(NotFoundError, 404));

      // Deleting it leaves the running sandbox alone.
      await client.deleteTemplate(name);
      assert.equal((await pinned.exec("cat /app/built")).stdout, "built\n");
      await assert.rejects(client.getTemplate(name), isError(NotFoundError, 404));
    } finally {
      await deleteQuietly(client, name);
    }
  });

  test("a failing step fails the build with its output", async () => {
    const { client } = await member();
    const name = uniq("broken");
    try {
      const building = await client.buildTemplate({
        name,
        from: IMAGE,
        steps: [{ run: ["sh", "-c", "sleep 1; echo about to fail; echo oops >&2; exit 3"] }, { write: { path: "/never", content: "x" } }],
        provider: "docker",
      });
      assert.equal(building.state, "building");
      const log = await client.templateLogs(name);
      let text = "";
      for await (const chunk of log) text += chunk;
      assert.equal(log.end?.state, "failed");
      assert.match(text, /oops/);
      await assert.rejects(client.waitTemplate(name), (e: unknown) => {
        assert.ok(e instanceof TemplateBuildFailedError, String(e));
        assert.equal(e.template.state, "failed");
        assert.match(e.message, /oops/);
        assert.match(e.message, /about to fail/);
        return true;
      });
      await assert.rejects(client.sandbox({ template: name, provider: "docker" }), isError(ImageNotFoundError, 422));
    } finally {
      await deleteQuietly(client, name);
    }
  });

  test("bad builds are refused with typed errors", async () => {
    const { client } = await member();
    await assert.rejects(client.buildTemplate({ name: "Not A Name", from: IMAGE, steps: [{ run: ["true"] }] }), isError(InvalidRequestError, 400));
    await assert.rejects(client.buildTemplate({ name: uniq("rel"), from: IMAGE, steps: [{ workdir: "relative" }] }), isError(InvalidRequestError, 400));
    await assert.rejects(client.buildTemplate({ name: uniq("nobase"), from: uniq("no-such-image"), steps: [] }), isError(ImageNotFoundError, 422));
    await assert.rejects(client.getTemplate(uniq("missing")), isError(NotFoundError, 404));
  });

  test("the operator's templates are every tenant's to use, not to delete", async () => {
    const name = uniq("public");
    const t = await admin.buildTemplate({ name, from: IMAGE, steps: [{ env: { WHO: "operator" } }], provider: "docker", wait: true });
    try {
      const { client } = await member();
      assert.ok((await client.listTemplates()).some((x) => x.name === name));
      assert.equal((await client.getTemplate(name)).tenant_id, t.tenant_id);
      {
        await using sb = await client.sandbox({ template: name, provider: "docker" });
        assert.equal((await sb.exec("echo $WHO")).stdout, "operator\n");
      }
      await assert.rejects(client.deleteTemplate(name), isError(ForbiddenError, 403));
      assert.equal((await (await client.templateLogs(name)).wait()).state, "ready");
    } finally {
      await admin.deleteTemplate(name);
    }
  });
});
