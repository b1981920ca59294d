//! The parts of the client that need no server: the event-stream decoder, error classes, Retry-After, modes and the generated route table.

import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import {
  ConflictError,
  ERROR_CLASSES,
  InternalError,
  NotFoundError,
  RateLimitedError,
  ResourceExhaustedError,
  SSEDecoder,
  StacyVMError,
  errorFromBody,
  modeString,
  operations,
  parseRetryAfter,
} from "../src/index.js";
import { REPO_ROOT } from "./server.js";

const STREAM = new TextEncoder().encode(
  'event: stdout\ndata: {"data":"a\\n"}\n\n' +
    ": keep-alive\n\n" +
    'event: stderr\r\ndata: {"data":"\u00e9"}\r\n\r\n' +
    'event: exit\rdata: {"exit_code":0,"signal":null,"duration_ms":5,"timed_out":false}\r\r',
);
const EXPECTED = [
  { event: "stdout", data: '{"data":"a\\n"}' },
  { event: "stderr", data: '{"data":"\u00e9"}' },
  { event: "exit", data: '{"exit_code":0,"signal":null,"duration_ms":5,"timed_out":false}' },
];

test("the event-stream decoder is indifferent to how the bytes arrive", () => {
  // Piece sizes of 1 and 3 split the two-byte é and the \r\n pairs.
  for (const piece of [1, 2, 3, 7, STREAM.length]) {
    const d = new SSEDecoder();
    const events = [];
    for (let i = 0; i < STREAM.length; i += piece) events.push(...d.feed(STREAM.subarray(i, i + piece)));
    assert.deepEqual(events, EXPECTED, `pieces of ${piece}`);
  }
});

test("the event-stream decoder joins data lines and holds a partial event", () => {
  const d = new SSEDecoder();
  const enc = new TextEncoder();
  assert.deepEqual(d.feed(enc.encode("data: one\ndata:two\n")), []);
  assert.deepEqual(d.feed(enc.encode("\n")), [{ event: "message", data: "one\ntwo" }]);
  assert.deepEqual(d.feed(enc.encode("event: x\n\n")), []);
});

test("each API error code has its class; unknown bodies fall back on the status", () => {
  const h = new Headers({ "x-request-id": "req_h", "retry-after": "7" });
  const nf = errorFromBody(404, h, JSON.stringify({ error: { code: "not_found", message: "gone", request_id: "req_b" } }));
  assert.ok(nf instanceof NotFoundError && nf instanceof StacyVMError && nf instanceof Error);
  assert.deepEqual([nf.name, nf.code, nf.message, nf.requestId, nf.status], ["NotFoundError", "not_found", "gone", "req_b", 404]);
  const rl = errorFromBody(429, h, JSON.stringify({ error: { code: "rate_limited", message: "slow", request_id: "" } }));
  assert.ok(rl instanceof RateLimitedError);
  assert.equal(rl.retryAfter, 7);
  assert.equal(rl.requestId, "req_h");
  const ex = errorFromBody(409, h, JSON.stringify({ error: { code: "sandbox_resource_exhausted", message: "pids" } }));
  assert.ok(ex instanceof ResourceExhaustedError && ex instanceof ConflictError);
  const proxy = errorFromBody(500, new Headers(), "<html>bad gateway</html>");
  assert.ok(proxy instanceof InternalError);
  assert.match(proxy.message, /bad gateway/);
  const novel = errorFromBody(418, new Headers(), JSON.stringify({ error: { code: "teapot", message: "no" } }));
  assert.equal(novel.constructor, StacyVMError);
  assert.equal(novel.code, "teapot");
  for (const [code, cls] of Object.entries(ERROR_CLASSES)) assert.equal(new cls(code, "m").code, code);
});

test("Retry-After is seconds or an HTTP date", () => {
  assert.equal(parseRetryAfter("3"), 3);
  assert.equal(parseRetryAfter(null), null);
  assert.equal(parseRetryAfter("soon"), null);
  const now = Date.parse("2026-01-01T00:00:00Z");
  assert.equal(parseRetryAfter("Thu, 01 Jan 2026 00:00:05 GMT", now), 5);
});

test("modes go over the wire as octal strings", () => {
  assert.equal(modeString(0o755), "0755");
  assert.equal(modeString(0o4755), "4755");
  assert.equal(modeString("0644"), "0644");
  assert.throws(() => modeString(0o10000), RangeError);
});

test("the route table is the snapshot's, operation by operation", () => {
  const doc = JSON.parse(
    readFileSync(join(REPO_ROOT, "crates/control-plane/tests/control_plane/snapshots/openapi.json"), "utf8"),
  ) as { paths: Record<string, Record<string, { operationId: string; responses?: Record<string, unknown> }>> };
  const fromDoc = new Map<string, string>();
  for (const [path, item] of Object.entries(doc.paths)) {
    for (const [method, op] of Object.entries(item)) {
      // A WebSocket upgrade (only a 101 answer) is no fetch route.
      const codes = Object.keys(op.responses ?? {});
      if (codes.includes("101") && !codes.some((c) => /^2\d\d$/.test(c))) continue;
      fromDoc.set(op.operationId, `${method.toUpperCase()} ${path}`);
    }
  }
  const fromTable = new Map(Object.entries(operations).map(([id, r]) => [id, `${r.method} ${r.path}`]));
  assert.deepEqual(fromTable, fromDoc);
});
