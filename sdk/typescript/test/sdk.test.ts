//! The client against a real `stacyvm serve` with the Docker provider: sandboxes, exec, streams, files, admin calls, errors, tenancy and disposal.

import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { createHash, randomUUID } from "node:crypto";
import { execFileSync } from "node:child_process";
import { mkdtempSync, mkdirSync, rmSync, statSync, writeFileSync, createReadStream, createWriteStream } from "node:fs";
import { tmpdir } from "node:os";
import { Readable } from "node:stream";
import { pipeline } from "node:stream/promises";
import { join } from "node:path";
import v8 from "node:v8";
import { runInNewContext } from "node:vm";
import {
  Client,
  ConflictError,
  ForbiddenError,
  ImageNotFoundError,
  InvalidRequestError,
  NoCapacityError,
  NotFoundError,
  ProviderUnavailableError,
  QuotaExceededError,
  RateLimitedError,
  TransportError,
  UnauthenticatedError,
  type ExecEvent,
} from "../src/index.js";
import { IMAGE, type Server, isError, startServer, testImageTar } from "./server.js";
import { startProxy } from "./proxy.js";

const MIB = 1024 * 1024;

// A full garbage collection, without a command-line flag.
v8.setFlagsFromString("--expose-gc");
const collect = runInNewContext("gc") as () => void;

let server: Server;
let admin: Client;
let scratch: string;

before(async () => {
  server = await startServer();
  admin = server.admin;
  scratch = mkdtempSync(join(tmpdir(), "stacyvm-tssdk-files-"));
});

after(async () => {
  rmSync(scratch, { recursive: true, force: true });
  await server?.stop();
});

describe("sandboxes", () => {
  test("await using destroys the sandbox when the block ends", async () => {
    const tag = randomUUID();
    let id: string;
    {
      await using sb = await admin.sandbox({ image: IMAGE, labels: { tag }, env: { X: "1" } });
      id = sb.id;
      assert.equal(sb.info.state, "running");
      assert.equal((await sb.exec("echo $X")).stdout, "1\n");
      const page = await admin.listSandboxes({ state: "running", labels: { tag } });
      assert.deepEqual(page.items.map((s) => s.id), [id]);
      assert.equal(page.nextCursor, null);
    }
    assert.equal((await admin.getSandbox(id)).info.state, "destroyed");
  });

  test("await using destroys the sandbox when the block throws", async () => {
    let id = "";
    await assert.rejects(async () => {
      await using sb = await admin.sandbox({ image: IMAGE });
      id = sb.id;
      throw new Error("the block failed");
    }, /the block failed/);
    assert.equal((await admin.getSandbox(id)).info.state, "destroyed");
  });

  test("explicit destroy, refresh, timeout and logs", async () => {
    const sb = await admin.sandbox({ image: IMAGE, idempotencyKey: randomUUID() });
    const info = await sb.setTimeout(3600);
    assert.ok(info.expires_at && Date.parse(info.expires_at) - Date.now() > 50 * 60 * 1000);
    assert.equal((await sb.refresh()).state, "running");
    assert.ok((await sb.logs()).some((l) => l.source === "lifecycle"));
    await sb.destroy();
    await sb.destroy(); // idempotent
    assert.equal((await sb.refresh()).state, "destroyed");
  });

  test("pause, resume, followLogs, pages and the environment's defaults", async () => {
    const tag = randomUUID();
    const sb = await admin.sandbox({ image: IMAGE, labels: { tag } });
    try {
      assert.equal((await sb.pause()).state, "paused");
      assert.equal((await sb.resume()).state, "running");
      await using second = await admin.sandbox({ image: IMAGE, labels: { tag } });
      const first = await admin.listSandboxes({ labels: { tag }, limit: 1 });
      assert.equal(first.items.length, 1);
      assert.notEqual(first.nextCursor, null);
      const all: string[] = [];
      for await (const s of admin.sandboxes({ labels: { tag }, limit: 1 })) all.push(s.id);
      assert.deepEqual(all.sort(), [sb.id, second.id].sort());

      const saved = { url: process.env.STACYVM_URL, key: process.env.STACYVM_API_KEY };
      process.env.STACYVM_URL = server.url;
      process.env.STACYVM_API_KEY = server.adminKey;
      try {
        const fromEnv = new Client();
        assert.equal(fromEnv.url, server.url);
        assert.equal((await fromEnv.getSandbox(sb.id)).id, sb.id);
      } finally {
        for (const [name, value] of [["STACYVM_URL", saved.url], ["STACYVM_API_KEY", saved.key]] as const) {
          if (value === undefined) delete process.env[name];
          else process.env[name] = value;
        }
      }

      const follow = await sb.followLogs();
      const lines: string[] = [];
      for await (const line of follow) {
        lines.push(line.source);
        if (lines.length === 1) await sb.destroy();
      }
      assert.equal(lines[0], "lifecycle");
    } finally {
      await sb.destroy();
    }
  });

  test("an aborted call rejects with the signal's reason", async () => {
    await using sb = await admin.sandbox({ image: IMAGE });
    const ctl = new AbortController();
    const running = sb.exec(["sleep", "30"], { signal: ctl.signal });
    setTimeout(() => ctl.abort(new Error("given up")), 200);
    await assert.rejects(running, /given up/);
  });

  test("an idempotency key returns the first sandbox", async () => {
    const key = randomUUID();
    await using a = await admin.sandbox({ image: IMAGE, idempotencyKey: key });
    const b = await admin.sandbox({ image: IMAGE, idempotencyKey: key });
    assert.equal(b.id, a.id);
  });
});

describe("exec", () => {
  test("exit code, stdout, stderr, duration, stdin, env, cwd", async () => {
    await using sb = await admin.sandbox({ image: IMAGE });
    const r = await sb.exec(["sh", "-c", "cat; echo oops >&2; pwd; echo $A; exit 3"], {
      stdin: "in\n",
      env: { A: "a" },
      cwd: "/tmp",
      timeout_s: 30,
    });
    assert.equal(r.exit_code, 3);
    assert.equal(r.ok, false);
    assert.equal(r.stdout, "in\n/tmp\na\n");
    assert.equal(r.stderr, "oops\n");
    assert.equal(typeof r.duration_ms, "number");
    assert.equal(r.timed_out, false);
    const bytes = await sb.exec("printf 'a\\377b'");
    assert.deepEqual([...bytes.stdoutBytes], [0x61, 0xff, 0x62]);
    const missing = await sb.exec(["/no/such/program"]);
    assert.equal(missing.exit_code, 127);
    const slow = await sb.exec(["sleep", "30"], { timeout_s: 1 });
    assert.equal(slow.timed_out, true);
    assert.equal(slow.exit_code, null);
  });

  test("execStream yields output while the command runs, then exit", async () => {
    await using sb = await admin.sandbox({ image: IMAGE });
    const script = "echo first; while [ ! -e /tmp/go ]; do sleep 0.05; done; echo second >&2; exit 4";
    await using stream = await sb.execStream(["sh", "-c", script], { timeout_s: 60 });
    const events: ExecEvent[] = [];
    for await (const ev of stream) {
      events.push(ev);
      // The command is still waiting for /tmp/go: this output arrived before it ended.
      if (ev.type === "stdout" && ev.text === "first\n") await sb.files.write("/tmp/go", "");
    }
    assert.deepEqual(
      events.map((e) => (e.type === "exit" ? `exit ${e.exit_code}` : `${e.type} ${e.text}`)),
      ["stdout first\n", "stderr second\n", "exit 4"],
    );
    assert.equal(stream.exit?.exit_code, 4);
    assert.equal((await (await sb.execStream("printf '\\377'; exit 6")).wait()).exit_code, 6);
  });

  test("leaving an execStream early kills the command", async () => {
    await using sb = await admin.sandbox({ image: IMAGE });
    const stream = await sb.execStream(["sh", "-c", "echo $$ > /tmp/pid; echo up; exec sleep 300"]);
    for await (const ev of stream) {
      assert.equal(ev.type === "stdout" && ev.text, "up\n");
      break;
    }
    const pid = (await sb.files.readText("/tmp/pid")).trim();
    for (let i = 0; (await sb.exec(["kill", "-0", pid])).exit_code === 0; i++) {
      assert.ok(i < 300, "the abandoned command was never killed");
      await new Promise((r) => setTimeout(r, 100));
    }
  });
});

describe("files", () => {
  test("every file operation", async () => {
    await using sb = await admin.sandbox({ image: IMAGE });
    const f = sb.files;
    assert.equal((await f.write("/work/a/b.txt", "text")).size, 4);
    assert.equal(await f.readText("/work/a/b.txt"), "text");
    await f.write("/work/a/bytes.bin", new Uint8Array([1, 2, 3]), { mode: 0o600 });
    assert.equal((await f.stat("/work/a/bytes.bin")).mode, "0600");
    async function* parts(): AsyncGenerator<Uint8Array> {
      yield new TextEncoder().encode("x");
      yield new TextEncoder().encode("y");
    }
    await f.write("/work/a/it.bin", parts());
    await f.write("/work/a/blob.bin", new Blob(["blob"]));
    assert.deepEqual(
      (await f.list("/work/a")).map((e) => e.name),
      ["b.txt", "blob.bin", "bytes.bin", "it.bin"],
    );
    assert.equal((await f.list("/work", { recursive: true })).length, 5);
    assert.deepEqual(await f.glob("/work/**/*.bin"), ["/work/a/blob.bin", "/work/a/bytes.bin", "/work/a/it.bin"]);
    assert.equal((await f.move("/work/a/it.bin", "/work/a/moved.bin")).name, "moved.bin");
    await assert.rejects(f.move("/work/a/blob.bin", "/work/a/moved.bin"), isError(ConflictError, 409));
    assert.equal(await f.readText("/work/a/moved.bin"), "xy");
    assert.equal((await f.move("/work/a/blob.bin", "/work/a/moved.bin", { overwrite: true })).size, 4);
    assert.equal((await f.chmod("/work/a/moved.bin", 0o755)).mode, "0755");
    assert.equal((await f.chmod("/work/a/moved.bin", "0640")).mode, "0640");
    assert.equal((await f.mkdir("/work/d/e")).type, "dir");
    await assert.rejects(f.delete("/work/d"), isError(ConflictError, 409));
    await f.delete("/work/d", { recursive: true });
    assert.equal(await f.exists("/work/d"), false);
    assert.equal(await f.exists("/work/a"), true);
    await assert.rejects(f.read("/work/none"), isError(NotFoundError, 404));

    const tree = join(scratch, "tree");
    mkdirSync(join(tree, "d"), { recursive: true });
    writeFileSync(join(tree, "d", "f.txt"), "in a tar");
    const tarPath = join(scratch, "tree.tar");
    execFileSync("tar", ["-C", tree, "-cf", tarPath, "d"]);
    const summary = await f.writeArchive("/srv/tree", { localPath: tarPath });
    assert.deepEqual([summary.files, summary.dirs, summary.bytes], [1, 1, 8]);
    assert.equal(await f.readText("/srv/tree/d/f.txt"), "in a tar");

    // And back as one tar, which the system's tar reads.
    const back = join(scratch, "back.tar");
    await pipeline(
      Readable.fromWeb((await f.readArchiveStream("/srv/tree")) as import("node:stream/web").ReadableStream<Uint8Array>),
      createWriteStream(back),
    );
    assert.deepEqual(execFileSync("tar", ["-tf", back]).toString().trim().split("\n"), ["d/", "d/f.txt"]);
    await assert.rejects(f.readArchiveStream("/srv/none"), isError(NotFoundError, 404));
  });

  test("a multi-MiB file streams both ways without being held in memory", async () => {
    const size = 40 * MIB;
    const src = join(scratch, "big.in");
    const digest = createHash("sha256");
    {
      const out = createWriteStream(src);
      for (let i = 0; i < size / MIB; i++) {
        const block = Buffer.alloc(MIB, createHash("sha256").update(`block${i}`).digest());
        digest.update(block);
        if (!out.write(block)) await new Promise<void>((r) => out.once("drain", () => r()));
      }
      await new Promise<void>((r) => out.end(() => r()));
    }
    const want = digest.digest("hex");
    await using sb = await admin.sandbox({ image: IMAGE });
    // Peak of the buffers alive (collected first, so garbage does not
    // count) while the transfers run: holding the file whole would put it
    // over the size.
    let peak = 0;
    collect();
    const base = process.memoryUsage().arrayBuffers;
    const sampler = setInterval(() => {
      collect();
      peak = Math.max(peak, process.memoryUsage().arrayBuffers - base);
    }, 20);
    try {
      assert.equal((await sb.files.upload("/work/big", src)).size, size);
      assert.equal((await sb.files.write("/work/big2", createReadStream(src))).size, size);
      const dest = join(scratch, "big.out");
      assert.equal(await sb.files.download("/work/big", dest), size);
      assert.equal(statSync(dest).size, size);
      const got = createHash("sha256");
      for await (const chunk of createReadStream(dest)) got.update(chunk as Buffer);
      assert.equal(got.digest("hex"), want);
      const streamed = createHash("sha256");
      let n = 0;
      for await (const chunk of await sb.files.readStream("/work/big2")) {
        streamed.update(chunk);
        n += chunk.length;
      }
      assert.equal(n, size);
      assert.equal(streamed.digest("hex"), want);
    } finally {
      clearInterval(sampler);
    }
    // Streaming keeps a bounded window alive, which on a loaded host (a
    // slow consumer, late collections) has peaked at ~22 MiB; holding the
    // file whole would be the whole 40 MiB.
    assert.ok(peak < (size * 3) / 4, `peak buffer memory ${(peak / MIB).toFixed(1)} MiB for a ${size / MIB} MiB file`);
    assert.equal((await sb.exec(["sha256sum", "/work/big"])).stdout.split(" ")[0], want);
  });
});

describe("errors", () => {
  test("404, 400, 409 and 422 carry the API's codes", async () => {
    await assert.rejects(admin.getSandbox("sbx_nothere"), (e: unknown) => {
      assert.ok(e instanceof NotFoundError);
      assert.equal(e.code, "not_found");
      assert.equal(e.status, 404);
      assert.ok(e.requestId);
      assert.match(e.message, /sbx_nothere/);
      return true;
    });
    await assert.rejects(admin.sandbox({ image: "no-such-image-anywhere" }), isError(ImageNotFoundError, 422));
    const sb = await admin.sandbox({ image: IMAGE });
    try {
      await assert.rejects(sb.files.stat("relative/path"), (e: unknown) => {
        assert.ok(e instanceof InvalidRequestError);
        assert.equal(e.code, "invalid_request");
        assert.equal(e.status, 400);
        return true;
      });
      await assert.rejects(sb.exec(["sh", "-c", "true"], { timeout_s: -1 }), isError(InvalidRequestError, 400));
      // A refused streamed upload ends the call rather than waiting for the rest of the body.
      async function* big(): AsyncGenerator<Uint8Array> {
        for (let i = 0; i < 64; i++) yield new Uint8Array(MIB);
      }
      await assert.rejects(sb.files.write("relative.bin", big()), isError(InvalidRequestError, 400));
    } finally {
      await sb.destroy();
    }
    await assert.rejects(sb.exec(["true"]), isError(ConflictError, 409));
    await assert.rejects(sb.execStream(["true"]), isError(ConflictError, 409));
  });

  test("401 for a bad key, a transport error for no server", async () => {
    const bad = new Client({ url: server.url, apiKey: "svm_not_a_key" });
    await assert.rejects(bad.listSandboxes(), isError(UnauthenticatedError, 401));
    const dead = new Client({ url: "http://127.0.0.1:9", apiKey: "svm_x", retry: false });
    await assert.rejects(dead.health(), (e: unknown) => e instanceof TransportError && e.code === "transport");
  });
});

describe("tenants and keys", () => {
  test("a member key cannot do admin things or reach another tenant's sandboxes", async () => {
    const a = await admin.createTenant(`ts-a-${randomUUID().slice(0, 8)}`);
    const b = await admin.createTenant(`ts-b-${randomUUID().slice(0, 8)}`);
    assert.ok((await admin.listTenants({ limit: 1000 })).items.some((t) => t.id === a.id));
    const keyA = await admin.createKey(a.id, "member", "ts-member-a");
    const keyB = await admin.createKey(b.id, "member", "ts-member-b");
    assert.ok(keyA.key?.startsWith("svm_"));
    assert.ok((await admin.listKeys({ limit: 1000 })).items.some((k) => k.id === keyA.id && !k.key));
    const memberA = new Client({ url: server.url, apiKey: keyA.key ?? "" });
    const memberB = new Client({ url: server.url, apiKey: keyB.key ?? "" });

    for (const call of [
      () => memberA.listWorkers(),
      () => memberA.createTenant("nope"),
      () => memberA.createKey(a.id, "owner", "nope"),
      () => memberA.setQuota(a.id, { max_sandboxes: 100 }),
      () => memberA.importImage("nope", new Uint8Array(0)),
    ]) {
      await assert.rejects(call(), (e: unknown) => {
        assert.ok(e instanceof ForbiddenError, `${String(e)}`);
        assert.equal(e.code, "forbidden");
        assert.equal(e.status, 403);
        return true;
      });
    }

    {
      await using sb = await memberA.sandbox({ image: IMAGE });
      await sb.files.write("/work/secret", "a's");
      const id = sb.id;
      await assert.rejects(memberB.getSandbox(id), isError(NotFoundError, 404));
      assert.equal((await admin.getSandbox(id)).info.tenant_id, a.id);
      await assert.rejects(memberB.destroySandbox(id), isError(NotFoundError, 404));
      assert.ok(!(await memberB.listSandboxes({ limit: 1000 })).items.some((s) => s.id === id));
      // Exec and files with B's key (no handle of B's can name the sandbox): 404 as well.
      const asB = { authorization: `Bearer ${keyB.key}`, "content-type": "application/json" };
      const exec = await fetch(`${server.url}/v1/sandboxes/${id}/exec`, {
        method: "POST",
        headers: asB,
        body: JSON.stringify({ cmd: ["cat", "/work/secret"] }),
      });
      assert.equal(exec.status, 404);
      const read = await fetch(`${server.url}/v1/sandboxes/${id}/files?path=/work/secret`, { headers: asB });
      assert.equal(read.status, 404);
      assert.equal((await memberA.getSandbox(id)).info.state, "running");
      assert.equal(await sb.files.readText("/work/secret"), "a's");

      const audit = await memberA.listAudit({ sandbox_id: id, limit: 100 });
      assert.ok(audit.items.some((e) => e.action === "sandbox.create"));
    }
    await admin.revokeKey(keyA.id);
    await assert.rejects(memberA.listSandboxes(), isError(UnauthenticatedError, 401));
  });

  test("status, workers, images and quotas", async () => {
    const st = await admin.status();
    assert.ok(st.store.ok);
    assert.ok(st.providers.some((p) => p.name === "docker" && p.healthy));
    const workers = await admin.listWorkers();
    assert.equal(workers[0]?.id, st.workers[0]?.id);
    const w = workers[0];
    assert.ok(w);
    assert.equal((await admin.getWorker(w.id)).id, w.id);
    assert.equal(await admin.health(), true);
    assert.equal((await admin.ready()).ready, true);
    assert.match(await admin.metrics(), /stacyvm_http_requests_total/);
    const imgs = await admin.listImages();
    assert.ok(imgs.some((i) => i.name === IMAGE));
    assert.equal((await admin.getImage(IMAGE)).name, IMAGE);
    const t = await admin.createTenant(`ts-q-${randomUUID().slice(0, 8)}`);
    const q = await admin.setQuota(t.id, { max_sandboxes: 3, max_cpu: 2 });
    assert.equal(q.max_sandboxes, 3);
    assert.equal((await admin.getQuota(t.id)).max_cpu, 2);
    const img = `ts-img-${randomUUID().slice(0, 8)}`;
    assert.equal((await admin.importImage(img, { localPath: testImageTar() })).name, img);
    await admin.deleteImage(img);
    await assert.rejects(admin.getImage(img), isError(NotFoundError, 404));
    assert.equal((await admin.drainWorker(w.id)).state, "draining");
    try {
      await assert.rejects(admin.sandbox({ image: IMAGE }), (e: unknown) => {
        assert.ok(e instanceof NoCapacityError || e instanceof ProviderUnavailableError, String(e));
        assert.equal(e.status, 503);
        return true;
      });
    } finally {
      assert.equal((await admin.undrainWorker(w.id)).state, "ready");
    }
    const tok = await admin.createWorkerToken(`ts-${randomUUID().slice(0, 8)}`);
    assert.ok(tok.token?.startsWith("svmw_"));
    assert.ok((await admin.listWorkerTokens()).some((x) => x.id === tok.id && !x.token));
    await admin.revokeWorkerToken(tok.id);
  });
});

describe("retries", () => {
  test("idempotent calls are retried on 503 honouring Retry-After; other POSTs are sent once", async () => {
    const proxy = await startProxy(server.url);
    try {
      const retries: { operation: string; attempt: number; delayMs: number }[] = [];
      const c = new Client({
        url: proxy.url,
        apiKey: server.adminKey,
        retry: { maxAttempts: 4, baseDelayMs: 1, maxDelayMs: 5000, onRetry: (i) => retries.push(i) },
      });
      await using sb = await admin.sandbox({ image: IMAGE });
      const path = `/v1/sandboxes/${sb.id}`;

      // A GET refused twice, with Retry-After 1 and 0, succeeds on the third attempt.
      let refusals = ["1", "0"];
      proxy.plan = (call) => {
        if (call !== `GET ${path}` || refusals.length === 0) return null;
        const retryAfter = refusals.shift();
        return { status: 503, code: "provider_unavailable", retryAfter };
      };
      assert.equal((await c.getSandbox(sb.id)).id, sb.id);
      assert.deepEqual(retries.map((r) => [r.operation, r.attempt, r.delayMs]), [
        ["sandbox_get", 1, 1000],
        ["sandbox_get", 2, 0],
      ]);
      assert.equal(proxy.seen.filter((s) => s === `GET ${path}`).length, 3);

      // Always refused: at most maxAttempts tries, then the last error.
      retries.length = 0;
      proxy.seen.length = 0;
      proxy.plan = (call) => (call === `GET ${path}` ? { status: 429, code: "rate_limited", retryAfter: "0" } : null);
      await assert.rejects(c.getSandbox(sb.id), (e: unknown) => {
        assert.ok(e instanceof RateLimitedError);
        assert.equal(e.retryAfter, 0);
        return true;
      });
      assert.equal(proxy.seen.length, 4);

      // A quota refusal is not retried: waiting does not free quota.
      proxy.seen.length = 0;
      proxy.plan = (call) => (call === `GET ${path}` ? { status: 429, code: "quota_exceeded" } : null);
      await assert.rejects(c.getSandbox(sb.id), isError(QuotaExceededError, 429));
      assert.equal(proxy.seen.length, 1);

      // Exec is a POST: sent once, whatever the answer.
      proxy.seen.length = 0;
      proxy.plan = (call) => (call === `POST ${path}/exec` ? { status: 503, code: "provider_unavailable", retryAfter: "0" } : null);
      const handle = await c.getSandbox(sb.id);
      await assert.rejects(handle.exec(["true"]), isError(ProviderUnavailableError, 503));
      assert.deepEqual(proxy.seen, [`GET ${path}`, `POST ${path}/exec`]);

      // An upload of bytes can be sent again; one of a stream cannot.
      proxy.seen.length = 0;
      let once = true;
      proxy.plan = (call) => {
        if (call !== `PUT ${path}/files` || !once) return null;
        once = false;
        return { status: 503, code: "provider_unavailable", retryAfter: "0" };
      };
      assert.equal((await handle.files.write("/work/r.txt", "retried")).size, 7);
      assert.equal(proxy.seen.length, 2);
      once = true;
      proxy.seen.length = 0;
      async function* body(): AsyncGenerator<Uint8Array> {
        yield new TextEncoder().encode("streamed");
      }
      await assert.rejects(handle.files.write("/work/s.txt", body()), isError(ProviderUnavailableError, 503));
      assert.equal(proxy.seen.length, 1);

      // A create with an idempotency key is retried, and makes one sandbox.
      proxy.seen.length = 0;
      once = true;
      proxy.plan = (call) => {
        if (call !== "POST /v1/sandboxes" || !once) return null;
        once = false;
        return { status: 503, code: "no_capacity", retryAfter: "0" };
      };
      const tag = randomUUID();
      await using created = await c.sandbox({ image: IMAGE, labels: { tag }, idempotencyKey: randomUUID() });
      assert.equal(proxy.seen.filter((s) => s === "POST /v1/sandboxes").length, 2);
      assert.deepEqual((await admin.listSandboxes({ labels: { tag } })).items.map((s) => s.id), [created.id]);
      // Without a key it is sent once.
      proxy.seen.length = 0;
      once = true;
      await assert.rejects(c.sandbox({ image: IMAGE, labels: { tag } }), isError(NoCapacityError, 503));
      assert.equal(proxy.seen.length, 1);
    } finally {
      await proxy.close();
    }
  });

  test("real 429s from the server: quota_exceeded, and rate_limited with Retry-After on exec", async () => {
    const t = await admin.createTenant(`ts-rate-${randomUUID().slice(0, 8)}`);
    const key = await admin.createKey(t.id, "member", "ts-rate");
    const retried: string[] = [];
    const member = new Client({
      url: server.url,
      apiKey: key.key ?? "",
      retry: { onRetry: (i) => retried.push(i.operation) },
    });
    await admin.setQuota(t.id, { max_sandboxes: 0 });
    await assert.rejects(member.sandbox({ image: IMAGE }), (e: unknown) => {
      assert.ok(e instanceof QuotaExceededError);
      assert.equal(e.status, 429);
      assert.equal(e.code, "quota_exceeded");
      return true;
    });
    await admin.setQuota(t.id, { max_sandboxes: 1, max_exec_per_minute: 1 });
    await using sb = await member.sandbox({ image: IMAGE });
    assert.equal((await sb.exec(["true"])).exit_code, 0);
    await assert.rejects(sb.exec(["true"]), (e: unknown) => {
      assert.ok(e instanceof RateLimitedError);
      assert.equal(e.status, 429);
      assert.equal(e.code, "rate_limited");
      assert.ok(e.retryAfter !== null && e.retryAfter > 0, `retryAfter ${e.retryAfter}`);
      return true;
    });
    // Neither is retried: a quota does not free itself, and exec is not idempotent.
    assert.deepEqual(retried, []);
  });
});
