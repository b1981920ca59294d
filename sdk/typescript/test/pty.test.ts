//! Terminals against a real `stacyvm serve` with the Docker provider, over the SDK's own WebSocket client: a real tty of the size asked for, resize, Ctrl-C reaching the foreground job, the exit code, env, and refusals.

import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { type Client, InvalidRequestError, NotFoundError, type Pty } from "../src/index.js";
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

/** Reads the terminal until its output holds `needle`; returns it up to there. */
async function expectOutput(it: AsyncIterator<Uint8Array>, seen: { text: string }, needle: string): Promise<string> {
  const deadline = Date.now() + 60_000;
  while (!seen.text.includes(needle)) {
    const left = deadline - Date.now();
    assert.ok(left > 0, `no ${JSON.stringify(needle)} in ${JSON.stringify(seen.text)}`);
    let timer: NodeJS.Timeout | undefined;
    const next = await Promise.race([
      it.next(),
      new Promise<"late">((r) => (timer = setTimeout(() => r("late"), left))),
    ]);
    clearTimeout(timer);
    assert.notEqual(next, "late", `no ${JSON.stringify(needle)} in ${JSON.stringify(seen.text)}`);
    if (next === "late") break;
    assert.ok(!next.done, `the terminal ended before ${JSON.stringify(needle)}: ${JSON.stringify(seen.text)}`);
    seen.text += Buffer.from(next.value).toString("utf8");
  }
  const at = seen.text.indexOf(needle) + needle.length;
  const upto = seen.text.slice(0, at);
  seen.text = seen.text.slice(at);
  return upto;
}

async function sleeps(sb: { exec(cmd: string): Promise<{ stdout: string }> }, n: number): Promise<number> {
  const r = await sb.exec(
    `for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline 2>/dev/null; echo; done | grep -c '^sleep ${n} ' || true`,
  );
  return Number(r.stdout.trim());
}

describe("terminals", () => {
  test("a real terminal: size, resize, Ctrl-C, exit code", async () => {
    await using sb = await admin.sandbox({ image: IMAGE });
    const pty: Pty = await sb.pty({ cmd: ["sh"], cols: 100, rows: 30 });
    const it = pty[Symbol.asyncIterator]();
    const seen = { text: "" };
    // The markers are computed by the shell, so the echoed line never matches.
    pty.send("tty; stty size; echo T$((40+2))T\r");
    const first = await expectOutput(it, seen, "T42T");
    assert.ok(first.includes("/dev/pts/") && first.includes("30 100"), first);
    pty.resize(120, 40);
    pty.send("stty size; echo R$((1+1))R\r");
    assert.ok((await expectOutput(it, seen, "R2R")).includes("40 120"));

    const n = 100_000 + Math.floor(Math.random() * 60_000);
    pty.send(`sleep ${n}\r`);
    const deadline = Date.now() + 60_000;
    while ((await sleeps(sb, n)) !== 1) {
      assert.ok(Date.now() < deadline, "the sleep never started");
      await new Promise((r) => setTimeout(r, 200));
    }
    pty.send("\x03");
    pty.send("echo C$((2+2))C:$?\r");
    await expectOutput(it, seen, "C4C:130");
    assert.equal(await sleeps(sb, n), 0);
    pty.send("exit 7\r");
    const rest = await it.next();
    assert.ok(rest.done || rest.value !== undefined);
    for (let r = rest; !r.done; r = await it.next()) {
      // The shell's last output.
    }
    assert.equal(pty.exitCode, 7);
  });

  test("env, a command of its own, and refusals", async () => {
    await using sb = await admin.sandbox({ image: IMAGE });
    const pty = await sb.pty({ cmd: ["sh", "-c", 'echo "v=$GREETING"; exit 3'], env: { GREETING: "hello there" } });
    const { output, exitCode } = await pty.output();
    assert.equal(exitCode, 3);
    assert.ok(Buffer.from(output).toString().includes("v=hello there"));
    await assert.rejects(sb.pty({ cols: 0 }), isError(InvalidRequestError, 400));
    const gone = await admin.sandbox({ image: IMAGE });
    await gone.destroy();
    await assert.rejects(gone.pty(), (e: unknown) => e instanceof Error && "status" in e && (e.status === 404 || e.status === 409));
    const missing = Object.create(Object.getPrototypeOf(sb), { ...Object.getOwnPropertyDescriptors(sb) });
    missing.info = { ...sb.info, id: "sbx_nosuchsandbox" };
    await assert.rejects(missing.pty(), isError(NotFoundError, 404));
  });
});
