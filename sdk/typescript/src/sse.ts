//! The incremental `text/event-stream` decoder the exec and log streams read with.

/** One dispatched server-sent event. */
export interface SSEEvent {
  event: string;
  data: string;
}

const LF = 0x0a;
const CR = 0x0d;

/**
 * Feed it bytes as they arrive and it returns the events completed so far,
 * by the WHATWG rules: `\n`, `\r\n` or `\r` end a line, a blank line
 * dispatches, `:` lines are comments. How the bytes are split into chunks
 * makes no difference, even inside a multi-byte character.
 */
export class SSEDecoder {
  private buf: Uint8Array = new Uint8Array(0);
  private event = "";
  private data: string[] = [];
  private hasData = false;
  // A `\r` ends its line at once; a `\n` right after it (perhaps in the next
  // chunk) belongs to the same line end and is skipped.
  private afterCr = false;
  private readonly text = new TextDecoder("utf-8");

  feed(chunk: Uint8Array): SSEEvent[] {
    const out: SSEEvent[] = [];
    if (this.afterCr && chunk.length > 0 && chunk[0] === LF) chunk = chunk.subarray(1);
    if (chunk.length > 0) this.afterCr = false;
    let buf: Uint8Array;
    if (this.buf.length === 0) {
      buf = chunk;
    } else {
      buf = new Uint8Array(this.buf.length + chunk.length);
      buf.set(this.buf, 0);
      buf.set(chunk, this.buf.length);
    }
    let start = 0;
    let i = 0;
    const n = buf.length;
    while (i < n) {
      const b = buf[i];
      if (b !== LF && b !== CR) {
        i++;
        continue;
      }
      const ev = this.line(this.text.decode(buf.subarray(start, i)));
      if (ev) out.push(ev);
      i++;
      if (b === CR) {
        if (i < n && buf[i] === LF) i++;
        else if (i === n) this.afterCr = true;
      }
      start = i;
    }
    // Keep only the unfinished line (a copy, so the caller's chunk is not held).
    this.buf = buf.slice(start);
    return out;
  }

  private line(line: string): SSEEvent | null {
    if (line === "") {
      if (!this.hasData) {
        this.event = "";
        return null;
      }
      const ev = { event: this.event || "message", data: this.data.join("\n") };
      this.event = "";
      this.data = [];
      this.hasData = false;
      return ev;
    }
    if (line.startsWith(":")) return null;
    const colon = line.indexOf(":");
    const name = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (name === "event") {
      this.event = value;
    } else if (name === "data") {
      this.data.push(value);
      this.hasData = true;
    }
    return null;
  }
}

/** The events of a byte stream, decoded as they arrive. */
export async function* sseEvents(body: ReadableStream<Uint8Array>): AsyncGenerator<SSEEvent, void, undefined> {
  const decoder = new SSEDecoder();
  const reader = body.getReader();
  let done = false;
  try {
    for (;;) {
      const r = await reader.read();
      if (r.done) {
        done = true;
        return;
      }
      yield* decoder.feed(r.value);
    }
  } finally {
    // Leaving early (a `break`, an error) ends the call: for exec, the
    // server kills the command when the connection goes.
    if (!done) await reader.cancel().catch(() => undefined);
    reader.releaseLock();
  }
}
