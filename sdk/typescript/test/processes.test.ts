//! Background processes against a real `stacyvm serve` with the Docker provider: start with env and cwd, list, output from the start then live, stdin, signals and refusals.

import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { type Client, ConflictError, InvalidRequestError, NotFoundError } from "../src/index.js";
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

describe("background processes", () => {
  test("start, list, output from the start then live, stdin, signals", async () => {
    await using sb = await admin.sandbox({ image: IMAGE });
    const p = await sb.processes.start('echo "one $A $(pwd)"; echo err >&2; read line; echo "got-$line"; exec sleep 600', {
      env: { A: "b" },
      cwd: "/tmp",
    });
    assert.equal(p.state, "running");
    assert.deepEqual(p.cmd.slice(0, 2), ["sh", "-c"]);
    assert.ok((await sb.processes.list()).some((q) => q.pid === p.pid));

    // The first line is kept: a reader that comes later still sees it.
    const deadline = Date.now() + 60_000;
    for (;;) {
      let text = "";
      for await (const ev of await sb.processes.output(p.pid, { follow: false })) {
        if (ev.type === "stdout") text += ev.text;
      }
      if (text.includes("one b /tmp")) break;
      assert.ok(Date.now() < deadline, `no first line: ${JSON.stringify(text)}`);
      await new Promise((r) => setTimeout(r, 100));
    }

    const w = await sb.processes.writeStdin(p.pid, "hi\n");
    assert.deepEqual(w, { written: 3, closed: false });
    const out = await sb.processes.output(p.pid);
    let stdout = "";
    let stderr = "";
    let signalled = false;
    for await (const ev of out) {
      if (ev.type === "stdout") stdout += ev.text;
      else if (ev.type === "stderr") stderr += ev.text;
      if (stdout.includes("got-hi") && !signalled) {
        signalled = true;
        assert.equal((await sb.processes.signal(p.pid, "SIGTERM")).pid, p.pid);
      }
    }
    assert.ok(stdout.startsWith("one b /tmp\n"), stdout);
    assert.equal(stderr, "err\n");
    assert.equal(out.exit?.signal, 15);
    const ended = await sb.processes.get(p.pid);
    assert.equal(ended.state, "exited");
    assert.equal(ended.signal, 15);
    await assert.rejects(sb.processes.signal(p.pid, "KILL"), isError(ConflictError, 409));
    await assert.rejects(sb.processes.signal(p.pid, "NOPE"), isError(InvalidRequestError, 400));
    await assert.rejects(sb.processes.get(999_999), isError(NotFoundError, 404));
  });

  test("a quiet process gives its reader a stream; closing stdin ends a reader of it", async () => {
    await using sb = await admin.sandbox({ image: IMAGE });
    const p = await sb.processes.start(["cat"]);
    const out = await sb.processes.output(p.pid);
    const closed = await sb.processes.writeStdin(p.pid, new TextEncoder().encode("last\n"), { close: true });
    assert.deepEqual(closed, { written: 5, closed: true });
    const chunks: Uint8Array[] = [];
    for await (const ev of out) if (ev.type === "stdout") chunks.push(ev.data);
    assert.equal(Buffer.concat(chunks).toString(), "last\n");
    assert.equal(out.exit?.exit_code, 0);
    assert.equal(out.exit?.ok, true);
  });
});
