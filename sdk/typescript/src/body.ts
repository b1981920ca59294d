//! Upload bodies: what a write or an import takes, and how it becomes a fetch body without being held whole in memory.

import { createReadStream } from "node:fs";

/** A local file, opened afresh for each attempt, so its upload can be retried. */
export class LocalFile {
  constructor(readonly path: string) {}
}

/**
 * What an upload takes: text (UTF-8), bytes, a `Blob` (e.g. from
 * `fs.openAsBlob`), a `ReadableStream` or any async iterable of byte chunks
 * (a Node `Readable` is one). Streams and iterables are sent as they are
 * read, never gathered in memory; they can be sent once only, so their
 * uploads are not retried.
 */
export type Upload = string | Uint8Array | ArrayBuffer | Blob | ReadableStream<Uint8Array> | AsyncIterable<Uint8Array>;

/** What fetch is handed. */
export type Body = string | Uint8Array | Blob | ReadableStream<Uint8Array>;

/** Whether the body can be sent again after a failed attempt. */
export function isReplayable(body: Upload | LocalFile): boolean {
  return (
    typeof body === "string" ||
    body instanceof Uint8Array ||
    body instanceof ArrayBuffer ||
    body instanceof Blob ||
    body instanceof LocalFile
  );
}

const encoder = new TextEncoder();

function bytesOf(chunk: unknown): Uint8Array {
  if (chunk instanceof Uint8Array) return chunk;
  if (typeof chunk === "string") return encoder.encode(chunk);
  if (chunk instanceof ArrayBuffer) return new Uint8Array(chunk);
  if (ArrayBuffer.isView(chunk)) return new Uint8Array(chunk.buffer, chunk.byteOffset, chunk.byteLength);
  throw new TypeError(`an upload chunk must be bytes, not ${typeof chunk}`);
}

/** A pull-driven stream of an async iterable: a chunk is read only when fetch wants the next one. */
export function streamOf(source: AsyncIterable<unknown>): ReadableStream<Uint8Array> {
  const it = source[Symbol.asyncIterator]();
  return new ReadableStream<Uint8Array>(
    {
      async pull(controller) {
        const r = await it.next();
        if (r.done) controller.close();
        else controller.enqueue(bytesOf(r.value));
      },
      async cancel(reason) {
        await it.return?.(reason);
      },
    },
    { highWaterMark: 1 },
  );
}

/** The fetch body of an upload. */
export async function toRequestBody(body: Upload | LocalFile): Promise<Body> {
  if (typeof body === "string" || body instanceof Uint8Array || body instanceof Blob || body instanceof ReadableStream) {
    return body;
  }
  if (body instanceof ArrayBuffer) return new Uint8Array(body);
  if (body instanceof LocalFile) {
    const file = createReadStream(body.path, { highWaterMark: 1024 * 1024 });
    // Opening fails here, as a local error, rather than as a broken upload.
    await new Promise<void>((resolve, reject) => {
      file.once("open", () => resolve());
      file.once("error", reject);
    });
    return streamOf(file);
  }
  if (body && typeof (body as AsyncIterable<Uint8Array>)[Symbol.asyncIterator] === "function") {
    return streamOf(body);
  }
  throw new TypeError("an upload must be text, bytes, a Blob, a ReadableStream or an async iterable of bytes");
}
