//! Interactive terminals: `GET /v1/sandboxes/{id}/pty` over a WebSocket, with a small client of
//! its own on `node:http`/`node:https` upgrades (Node 20 has no stable global WebSocket, and the
//! SDK takes no dependencies).

import { createHash, randomBytes } from "node:crypto";
import { request as httpRequest, type IncomingMessage } from "node:http";
import { request as httpsRequest } from "node:https";
import type { Duplex } from "node:stream";
import { TransportError, errorFor, errorFromBody } from "./errors.js";

/** What `Sandbox.pty` takes. */
export interface PtyOptions {
  /** The argv array; default the image's shell (`/bin/sh`). */
  cmd?: readonly string[];
  /** Terminal size, 1–4096 each (default 80 × 24). */
  cols?: number;
  rows?: number;
  /** Added to the command's environment (through `env K=V … CMD` in the sandbox). */
  env?: Record<string, string>;
}

const GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
// Opcodes of RFC 6455.
const CONT = 0x0;
const TEXT = 0x1;
const BINARY = 0x2;
const CLOSE = 0x8;
const PING = 0x9;
const PONG = 0xa;
/** The largest message accepted from the server; terminal output comes in small frames. */
const MAX_MESSAGE = 16 * 1024 * 1024;

function frame(opcode: number, payload: Uint8Array): Buffer {
  const len = payload.length;
  const head: number[] = [0x80 | opcode];
  // Client frames are always masked.
  if (len < 126) head.push(0x80 | len);
  else if (len < 65536) head.push(0x80 | 126, len >> 8, len & 0xff);
  else {
    head.push(0x80 | 127);
    const big = Buffer.alloc(8);
    big.writeBigUInt64BE(BigInt(len));
    head.push(...big);
  }
  const mask = randomBytes(4);
  const out = Buffer.alloc(head.length + 4 + len);
  Buffer.from(head).copy(out, 0);
  mask.copy(out, head.length);
  const body = head.length + 4;
  for (let i = 0; i < len; i++) out[body + i] = (payload[i] ?? 0) ^ (mask[i & 3] ?? 0);
  return out;
}

type Item = { kind: "data"; data: Uint8Array } | { kind: "end" } | { kind: "error"; error: Error };

/**
 * An open terminal. Iterate it for the bytes the terminal prints (stdout
 * and stderr are one stream on a terminal); the iteration ends when the
 * command exits, with `exitCode` set. `send` types bytes (Ctrl-C is
 * `"\x03"`), `resize` resizes. `close()` (or the end of an `await using`
 * block) hangs up, which kills the command.
 */
export class Pty implements AsyncIterable<Uint8Array>, AsyncDisposable {
  /** The command's exit code (128 + N when signal N ended it), once it exited. */
  exitCode: number | null = null;
  private buf: Buffer = Buffer.alloc(0);
  private parts: Buffer[] = [];
  private partOpcode = 0;
  private readonly queue: Item[] = [];
  private waiter: (() => void) | null = null;
  private finished = false;
  private closing = false;
  private started = false;

  /** @internal */
  constructor(
    private readonly socket: Duplex,
    head: Buffer,
  ) {
    socket.on("data", (b: Buffer) => this.feed(b));
    socket.on("error", (e: Error) =>
      this.finish({ kind: "error", error: new TransportError("transport", "the terminal's connection failed", { cause: e }) }),
    );
    socket.on("close", () =>
      this.finish({
        kind: "error",
        error: new TransportError("transport", "the terminal's connection ended before the command's exit"),
      }),
    );
    if (head.length > 0) this.feed(head);
  }

  /** Types `data` into the terminal. */
  send(data: string | Uint8Array): void {
    const bytes = typeof data === "string" ? Buffer.from(data, "utf8") : data;
    if (bytes.length === 0 || this.finished || this.closing) return;
    this.socket.write(frame(BINARY, bytes));
  }

  /** Resizes the terminal; the command gets `SIGWINCH`. */
  resize(cols: number, rows: number): void {
    if (this.finished || this.closing) return;
    this.socket.write(frame(TEXT, Buffer.from(JSON.stringify({ resize: { cols, rows } }))));
  }

  async *[Symbol.asyncIterator](): AsyncGenerator<Uint8Array, void, undefined> {
    if (this.started) throw new TypeError("a terminal can be iterated once");
    this.started = true;
    for (;;) {
      const item = this.queue.shift();
      if (item === undefined) {
        await new Promise<void>((r) => (this.waiter = r));
        continue;
      }
      if (item.kind === "data") yield item.data;
      else if (item.kind === "end") return;
      else throw item.error;
    }
  }

  /** Reads (and drops) the rest of the output; returns the exit code. */
  async wait(): Promise<number> {
    if (!this.started) {
      for await (const _ of this) {
        // Output nobody asked for is dropped.
      }
    }
    if (this.exitCode === null) throw new TypeError("the terminal was closed before the command exited");
    return this.exitCode;
  }

  /** Reads everything the terminal prints until the exit; returns it with the exit code. */
  async output(): Promise<{ output: Uint8Array; exitCode: number }> {
    const chunks: Uint8Array[] = [];
    for await (const c of this) chunks.push(c);
    return { output: Buffer.concat(chunks), exitCode: this.exitCode ?? -1 };
  }

  /** Hangs up; a command still running is killed. */
  async close(): Promise<void> {
    if (!this.finished && !this.closing) {
      this.closing = true;
      const code = Buffer.alloc(2);
      code.writeUInt16BE(1000);
      this.socket.write(frame(CLOSE, code));
    }
    this.socket.end();
    this.finish({ kind: "error", error: new TypeError("the terminal was closed") });
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }

  private push(item: Item): void {
    this.queue.push(item);
    const w = this.waiter;
    this.waiter = null;
    w?.();
  }

  private finish(item: Item): void {
    if (this.finished) return;
    this.finished = true;
    this.push(item);
  }

  private feed(chunk: Buffer): void {
    this.buf = this.buf.length ? Buffer.concat([this.buf, chunk]) : chunk;
    for (;;) {
      if (this.buf.length < 2) return;
      const b0 = this.buf.readUInt8(0);
      const b1 = this.buf.readUInt8(1);
      let len = b1 & 0x7f;
      let at = 2;
      if (len === 126) {
        if (this.buf.length < 4) return;
        len = this.buf.readUInt16BE(2);
        at = 4;
      } else if (len === 127) {
        if (this.buf.length < 10) return;
        const big = this.buf.readBigUInt64BE(2);
        if (big > BigInt(MAX_MESSAGE)) return this.fail("a frame larger than the SDK accepts");
        len = Number(big);
        at = 10;
      }
      const masked = (b1 & 0x80) !== 0;
      if (masked) at += 4;
      if (this.buf.length < at + len) return;
      let payload = this.buf.subarray(at, at + len);
      if (masked) {
        const mask = this.buf.subarray(at - 4, at);
        payload = Buffer.from(payload.map((v, i) => v ^ (mask[i & 3] ?? 0)));
      }
      this.buf = this.buf.subarray(at + len);
      this.message(b0 & 0x80 ? true : false, b0 & 0x0f, Buffer.from(payload));
      if (this.finished) return;
    }
  }

  private message(fin: boolean, opcode: number, payload: Buffer): void {
    if (opcode === PING) {
      if (!this.closing) this.socket.write(frame(PONG, payload));
      return;
    }
    if (opcode === PONG) return;
    if (opcode === CLOSE) return this.closed(payload);
    if (opcode !== CONT) this.partOpcode = opcode;
    this.parts.push(payload);
    if (this.parts.reduce((n, p) => n + p.length, 0) > MAX_MESSAGE) return this.fail("a message larger than the SDK accepts");
    if (!fin) return;
    const whole = Buffer.concat(this.parts);
    this.parts = [];
    if (this.partOpcode === BINARY || this.partOpcode === TEXT) this.push({ kind: "data", data: whole });
  }

  private closed(payload: Buffer): void {
    const code = payload.length >= 2 ? payload.readUInt16BE(0) : 1005;
    const reason = payload.subarray(2).toString("utf8");
    if (!this.closing) {
      this.closing = true;
      this.socket.write(frame(CLOSE, payload.subarray(0, 2)));
    }
    this.socket.end();
    const m = /^exit:(-?\d+)$/.exec(reason);
    if (code === 1000 && m) {
      this.exitCode = Number(m[1]);
      this.finish({ kind: "end" });
      return;
    }
    const message = reason.replace(/^error: /, "") || `the terminal closed with code ${code}`;
    this.finish({ kind: "error", error: errorFor(code === 1008 ? "invalid_request" : "internal", message) });
  }

  private fail(message: string): void {
    this.socket.destroy();
    this.finish({ kind: "error", error: new TransportError("transport", message) });
  }
}

/** Opens the WebSocket of `url` (http/https) with `headers`; resolves with the terminal. @internal */
export function openPty(url: URL, headers: Record<string, string>, signal?: AbortSignal): Promise<Pty> {
  const key = randomBytes(16).toString("base64");
  const expected = createHash("sha1").update(key + GUID).digest("base64");
  const request = url.protocol === "https:" ? httpsRequest : httpRequest;
  return new Promise<Pty>((resolve, reject) => {
    const req = request(url, {
      method: "GET",
      headers: {
        ...headers,
        accept: "*/*",
        connection: "Upgrade",
        upgrade: "websocket",
        "sec-websocket-key": key,
        "sec-websocket-version": "13",
      },
      signal,
    });
    req.on("upgrade", (res: IncomingMessage, socket: Duplex, head: Buffer) => {
      if (res.headers["sec-websocket-accept"] !== expected) {
        socket.destroy();
        reject(new TransportError("transport", "the server's WebSocket handshake did not match the request"));
        return;
      }
      resolve(new Pty(socket, head));
    });
    req.on("response", (res: IncomingMessage) => {
      const chunks: Buffer[] = [];
      res.on("data", (c: Buffer) => chunks.push(c));
      res.on("end", () => {
        const h = new Headers();
        for (const [k, v] of Object.entries(res.headers)) if (typeof v === "string") h.set(k, v);
        reject(errorFromBody(res.statusCode ?? 0, h, Buffer.concat(chunks).toString("utf8")));
      });
      res.on("error", (e) => reject(new TransportError("transport", "the terminal's refusal broke off", { cause: e })));
    });
    req.on("error", (e) => reject(new TransportError("transport", `cannot reach ${url.origin}`, { cause: e })));
    req.end();
  });
}

/** The argv the server runs: the command, behind `env` when variables are set. @internal */
export function ptyArgv(o: PtyOptions): string[] {
  const cmd = [...(o.cmd ?? [])].map(String);
  const env = Object.entries(o.env ?? {});
  if (env.length === 0) return cmd;
  return ["env", ...env.map(([k, v]) => `${k}=${v}`), ...(cmd.length ? cmd : ["/bin/sh"])];
}
