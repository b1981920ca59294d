//! Test support: a loopback HTTP proxy in front of a real server that counts the calls it sees and refuses those a plan picks.

import { createServer, request, type IncomingMessage, type ServerResponse } from "node:http";
import type { AddressInfo } from "node:net";

/** What the proxy answers instead of forwarding: a status, an error code and perhaps a `Retry-After`. */
export interface Refusal {
  status: number;
  code: string;
  retryAfter?: string;
}

export interface Proxy {
  url: string;
  /** Calls seen, as `METHOD /path` (no query), in order. */
  seen: string[];
  /** Decides, per call, whether to refuse it; `null` forwards it. */
  plan: (call: string) => Refusal | null;
  close(): Promise<void>;
}

export async function startProxy(upstream: string): Promise<Proxy> {
  const target = new URL(upstream);
  const proxy: Proxy = { url: "", seen: [], plan: () => null, close: async () => undefined };
  const server = createServer((req: IncomingMessage, res: ServerResponse) => {
    const call = `${req.method} ${(req.url ?? "").split("?")[0]}`;
    proxy.seen.push(call);
    const refusal = proxy.plan(call);
    if (refusal) {
      // Drain what the client sends, then refuse.
      req.resume();
      req.on("end", () => {
        const headers: Record<string, string> = { "content-type": "application/json", "x-request-id": "req_proxy" };
        if (refusal.retryAfter !== undefined) headers["retry-after"] = refusal.retryAfter;
        res.writeHead(refusal.status, headers);
        res.end(JSON.stringify({ error: { code: refusal.code, message: `refused by the test proxy`, request_id: "req_proxy" } }));
      });
      return;
    }
    const up = request(
      { host: target.hostname, port: target.port, method: req.method, path: req.url, headers: req.headers },
      (upRes) => {
        res.writeHead(upRes.statusCode ?? 502, upRes.headers);
        upRes.pipe(res);
      },
    );
    up.on("error", () => res.destroy());
    req.pipe(up);
  });
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", () => r()));
  proxy.url = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  proxy.close = () =>
    new Promise<void>((r) => {
      server.closeAllConnections();
      server.close(() => r());
    });
  return proxy;
}
