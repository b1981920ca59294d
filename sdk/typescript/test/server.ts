//! Test support: a real `stacyvm serve` (SQLite store, Docker provider) on a free loopback port, with the busybox test image imported.

import { spawn, execFileSync, type ChildProcess } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { Client, StacyVMError } from "../src/index.js";

// dist-test/test/server.js → the repository root.
export const REPO_ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "..", "..", "..", "..");
export const ADMIN_KEY = "svm_tssdktest_tssdktest_tssdktest_tssdktest";
export const IMAGE = "busybox";

const ANSI = /\x1b\[[0-9;]*m/g;
const ADDRESS = [/StacyVM is serving\s+addr=(\S+)/, /StacyVM is up at (http:\/\/\S+)/];

export interface Server {
  url: string;
  adminKey: string;
  admin: Client;
  stop(): Promise<void>;
  logTail(): string;
}

function stacyvmBin(): string {
  const given = process.env.STACYVM_BIN;
  if (given) {
    if (!existsSync(given)) throw new Error(`STACYVM_BIN=${given} does not name a file`);
    return given;
  }
  const built = join(REPO_ROOT, "target", "debug", "stacyvm");
  if (!existsSync(built)) throw new Error(`no stacyvm binary at ${built}: build it (cargo build -p stacyvm) or set STACYVM_BIN`);
  return built;
}

function agentBin(): string {
  const given = process.env.STACYVM_AGENT_BIN;
  if (given) return given;
  const built = join(REPO_ROOT, "target", "x86_64-unknown-linux-gnu", "release", "stacyvm-agent");
  if (existsSync(built)) return built;
  const out = execFileSync(join(REPO_ROOT, "scripts", "build-agent.sh"), { cwd: REPO_ROOT, encoding: "utf8" });
  return out.trim().split("\n").pop() ?? "";
}

/** The busybox root filesystem tar the suites share (built when missing). */
export function testImageTar(): string {
  const given = process.env.STACYVM_TEST_IMAGE_TAR;
  if (given) return given;
  const out = join(REPO_ROOT, "target", "test-images", "busybox.tar");
  if (!existsSync(out)) execFileSync(join(REPO_ROOT, "scripts", "build-test-image.sh"), [out], { cwd: REPO_ROOT, stdio: "inherit" });
  return out;
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/** Destroys every live sandbox on the server; returns the failures. */
export async function destroyAll(admin: Client): Promise<string[]> {
  const failures: string[] = [];
  for await (const sb of admin.sandboxes({ limit: 1000 })) {
    if (["destroyed", "failed", "lost"].includes(sb.state)) continue;
    try {
      await admin.destroySandbox(sb.id);
    } catch (e) {
      failures.push(`${sb.id}: ${String(e)}`);
    }
  }
  return failures;
}

/**
 * Unmounts whatever is mounted at or below `dir`, deepest first: volumes
 * stay mounted when their server stops (they outlive it by design), and
 * removing a data dir through a mounted volume would fail or reach into it.
 */
function unmountUnder(dir: string): void {
  let targets: string[];
  try {
    targets = execFileSync("findmnt", ["-rn", "-o", "TARGET"], { encoding: "utf8" }).split("\n");
  } catch (e) {
    console.error(`findmnt failed, mounts under ${dir} may be left: ${String(e)}`);
    return;
  }
  for (const t of targets.filter((t) => t === dir || t.startsWith(`${dir}/`)).sort().reverse()) {
    try {
      execFileSync("umount", [t]);
    } catch (e) {
      console.error(`could not unmount ${t}: ${String(e)}`);
    }
  }
}

/**
 * Starts `stacyvm serve` in a fresh data dir, waits until it is ready and
 * imports the test image as `busybox`. `stop()` destroys every sandbox,
 * stops the server and removes the data dir.
 */
export async function startServer(extraArgs: string[] = []): Promise<Server> {
  const dir = mkdtempSync(join(tmpdir(), "stacyvm-tssdk-"));
  const env: Record<string, string> = {};
  for (const [k, v] of Object.entries(process.env)) if (!k.startsWith("STACYVM_") && v !== undefined) env[k] = v;
  Object.assign(env, { STACYVM_ADMIN_KEY: ADMIN_KEY, STACYVM_AGENT_BIN: agentBin(), NO_COLOR: "1" });
  let output = "";
  const proc: ChildProcess = spawn(
    stacyvmBin(),
    ["serve", "--data-dir", join(dir, "data"), "--listen", "127.0.0.1:0", "--providers", "docker", ...extraArgs],
    { env, stdio: ["ignore", "pipe", "pipe"] },
  );
  const collect = (b: Buffer): void => {
    output += b.toString("utf8").replace(ANSI, "");
    if (output.length > 200_000) output = output.slice(-100_000);
  };
  proc.stdout?.on("data", collect);
  proc.stderr?.on("data", collect);
  const exited = new Promise<number | null>((r) => proc.once("exit", (code) => r(code)));
  let alive = true;
  void exited.then(() => {
    alive = false;
  });

  const stop = async (admin?: Client): Promise<void> => {
    if (alive && admin) {
      const failures = await destroyAll(admin).catch((e: unknown) => [String(e)]);
      if (failures.length) console.error(`sandboxes that could not be destroyed: ${failures.join("; ")}`);
    }
    if (alive) {
      proc.kill("SIGTERM");
      const done = await Promise.race([exited.then(() => true), sleep(30_000).then(() => false)]);
      if (!done) {
        proc.kill("SIGKILL");
        await exited;
      }
    }
    unmountUnder(dir);
    rmSync(dir, { recursive: true, force: true });
  };

  try {
    let url: string | undefined;
    for (let i = 0; i < 2400 && url === undefined; i++) {
      for (const re of ADDRESS) {
        const m = re.exec(output);
        if (m?.[1]) {
          url = m[1].startsWith("http") ? m[1] : `http://${m[1]}`;
          break;
        }
      }
      if (url === undefined) {
        if (!alive) throw new Error(`stacyvm serve exited:\n${output.slice(-4000)}`);
        await sleep(50);
      }
    }
    if (url === undefined) throw new Error(`stacyvm serve did not report its address within 120 s:\n${output.slice(-4000)}`);
    const admin = new Client({ url, apiKey: ADMIN_KEY });
    for (let i = 0; ; i++) {
      const r = await admin.ready().catch((e: unknown) => ({ ready: false, detail: String(e) }));
      if (r.ready) break;
      if (i > 600) throw new Error(`the server never became ready (${r.detail}):\n${output.slice(-4000)}`);
      await sleep(100);
    }
    await admin.importImage(IMAGE, { localPath: testImageTar() });
    return { url, adminKey: ADMIN_KEY, admin, stop: () => stop(admin), logTail: () => output.slice(-4000) };
  } catch (e) {
    await stop();
    throw e;
  }
}

/** Whether an error is a `StacyVMError` of the class and status given (for `assert.rejects`). */
export function isError(cls: abstract new (...args: never[]) => StacyVMError, status?: number) {
  return (e: unknown): boolean => {
    if (!(e instanceof cls)) throw e;
    if (status !== undefined && e.status !== status) throw e;
    return true;
  };
}

export function readText(path: string): string {
  return readFileSync(path, "utf8");
}
