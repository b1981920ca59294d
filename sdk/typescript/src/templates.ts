//! Template builds: the build log stream and the error of a build that failed.

import type { Template, TemplateLog, TemplateState } from "./generated/api.js";
import { ProviderUnavailableError, StacyVMError } from "./errors.js";
import { type SSEEvent, sseEvents } from "./sse.js";
import { jsonData, streamError } from "./sandbox.js";

/** How a build ended, as its log's last event says. */
export interface TemplateLogEnd {
  state: TemplateState;
  failure: string | null;
  version: number | null;
}

/**
 * A template build's log: the text so far, then (while the build runs) the
 * rest as it is written, until the build ends. Iterate it for text chunks;
 * when the loop ends, `end` says how the build ended. Leaving the loop
 * early, `close()`, or the end of an `await using` block leaves the build
 * running.
 */
export class TemplateLogStream implements AsyncIterable<string>, AsyncDisposable {
  private readonly events: AsyncGenerator<SSEEvent, void, undefined> | null;
  private readonly whole: string | null;
  /** How the build ended; set once the loop has read the log to its end. */
  end: TemplateLogEnd | null = null;

  /** A running build's event stream, or the whole log of an ended one. */
  constructor(source: ReadableStream<Uint8Array> | TemplateLog) {
    if (source instanceof ReadableStream) {
      this.events = sseEvents(source);
      this.whole = null;
    } else {
      this.events = null;
      this.whole = source.log;
      this.end = { state: source.state, failure: source.failure ?? null, version: source.version };
    }
  }

  async *[Symbol.asyncIterator](): AsyncGenerator<string, void, undefined> {
    if (this.events === null) {
      if (this.whole) yield this.whole;
      return;
    }
    try {
      for await (const ev of this.events) {
        if (ev.event === "log") {
          const d = jsonData(ev);
          if (typeof d.data === "string" && d.data) yield d.data;
        } else if (ev.event === "end") {
          const d = jsonData(ev);
          this.end = {
            state: (typeof d.state === "string" ? d.state : "unknown") as TemplateState,
            failure: typeof d.failure === "string" ? d.failure : null,
            version: typeof d.version === "number" ? d.version : null,
          };
          return;
        } else if (ev.event === "error") {
          throw streamError(ev, "build log");
        }
      }
      throw new ProviderUnavailableError("provider_unavailable", "the build log stream ended before the build did");
    } finally {
      await this.close();
    }
  }

  /** Reads the rest of the log; resolves to how the build ended. */
  async wait(): Promise<TemplateLogEnd> {
    for await (const _ of this) {
      // only the end matters
    }
    if (this.end === null) throw new ProviderUnavailableError("provider_unavailable", "the build log ended without its end");
    return this.end;
  }

  async close(): Promise<void> {
    await this.events?.return(undefined);
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }
}

/**
 * A template build that was waited for failed. `template` is the failed
 * version; the message (its `failure`) names the failing step and quotes
 * the end of its output. Nothing of the build is left behind.
 */
export class TemplateBuildFailedError extends StacyVMError {
  readonly template: Template;

  constructor(template: Template) {
    super("build_failed", `template ${template.name}:${template.version}: ${template.failure ?? "the build failed"}`);
    this.template = template;
  }
}
