//! Streamed transfers over `node:http`: Node's fetch keeps every chunk of a streamed request body until the request ends, and reads answers ahead of a slow reader.

import { request as httpRequest, type IncomingMessage } from "node:http";
import { request as httpsRequest } from "node:https";
import { Readable } from "node:stream";
import { type Body, streamOf } from "./body.js";

export interface TransferInit {
  method: string;
  headers: Record<string, string>;
  body?: Body;
  signal: AbortSignal;
}

function headersOf(res: IncomingMessage): Headers {
  const h = new Headers();
  for (const [k, v] of Object.entries(res.headers)) {
    if (Array.isArray(v)) for (const x of v) h.append(k, x);
    else if (v !== undefined) h.set(k, v);
  }
  return h;
}

/**
 * A fetch for transfers: the request body is written chunk by chunk as the
 * socket drains, and the answer's body is read from the socket only as
 * the caller reads it, so memory stays flat whatever the size.
 */
export function transferFetch(url: string, init: TransferInit): Promise<Response> {
  const u = new URL(url);
  const send = u.protocol === "https:" ? httpsRequest : httpRequest;
  return new Promise<Response>((resolve, reject) => {
    const req = send(u, { method: init.method, headers: init.headers, signal: init.signal });
    // Kept for the request's whole life: a socket error after the answer
    // arrived, or a failing upload source, must not be an unhandled event.
    req.on("error", reject);
    req.once("response", (res) => {
      const status = res.statusCode ?? 502;
      const empty = status === 204 || status === 304 || init.method === "HEAD";
      if (empty) res.resume();
      // The stream pulls one chunk at a time: the socket is read only as fast as the caller reads.
      const body = empty ? null : streamOf(res);
      resolve(new Response(body, { status, statusText: res.statusMessage ?? "", headers: headersOf(res) }));
    });
    const body = init.body;
    if (body === undefined) {
      req.end();
    } else if (typeof body === "string" || body instanceof Uint8Array) {
      req.end(body);
    } else {
      const source = body instanceof Blob ? body.stream() : body;
      const readable = Readable.fromWeb(source as import("node:stream/web").ReadableStream<Uint8Array>, {
        highWaterMark: 1,
        objectMode: false,
      });
      readable.on("error", (e) => req.destroy(e));
      // A request that ends early (refused, broken) releases its source (an open file, say).
      req.on("close", () => readable.destroy());
      readable.pipe(req);
    }
  });
}
