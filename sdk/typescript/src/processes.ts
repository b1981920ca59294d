//! Background processes of a sandbox: start, list, output from the start then live (SSE), stdin, signals.

import type { Process, ProcessList, ProcessStart, StdinWritten } from "./generated/api.js";
import { ProviderUnavailableError, TransportError } from "./errors.js";
import { type CallOptions, type Transport } from "./http.js";
import { type SSEEvent, sseEvents } from "./sse.js";
import { type Command, type ExitEvent, type OutputEvent, argv, b64OrText, jsonData, streamError } from "./sandbox.js";

/** How a background process ended: the `exit` event, with what its bounded output buffer dropped. */
export interface ProcessExitEvent extends ExitEvent {
  stdout_dropped: number;
  stderr_dropped: number;
}

/** An event of a process's output. */
export type ProcessEvent = OutputEvent | ProcessExitEvent;

/** What `start` takes besides the command. */
export interface ProcessStartOptions extends CallOptions {
  env?: Record<string, string>;
  /** Working directory (absolute); default the sandbox's workdir. */
  cwd?: string;
}

/**
 * A background process's output: `stdout` and `stderr` events from the
 * oldest byte the sandbox still keeps, then (when following) live ones, then
 * one `exit` event once the process has exited. Leaving the loop or `close()`
 * ends the call and leaves the process alone.
 */
export class ProcessOutput implements AsyncIterable<ProcessEvent>, AsyncDisposable {
  /** How the process ended, once the `exit` event has been read. */
  exit: ProcessExitEvent | null = null;
  private readonly events: AsyncGenerator<SSEEvent, void, undefined>;
  private started = false;

  constructor(
    body: ReadableStream<Uint8Array>,
    private readonly follow: boolean,
  ) {
    this.events = sseEvents(body);
  }

  async *[Symbol.asyncIterator](): AsyncGenerator<ProcessEvent, void, undefined> {
    if (this.started) throw new TypeError("a process output stream can be iterated once");
    this.started = true;
    try {
      for (;;) {
        let next: IteratorResult<SSEEvent, void>;
        try {
          next = await this.events.next();
        } catch (e) {
          throw new TransportError("transport", "the process's output stream broke off", { cause: e });
        }
        if (next.done) {
          if (!this.follow) return;
          throw new ProviderUnavailableError("provider_unavailable", "the process's output stream ended before its exit");
        }
        const ev = next.value;
        if (ev.event === "stdout" || ev.event === "stderr") {
          const d = jsonData(ev);
          const text = typeof d.data === "string" ? d.data : "";
          yield { type: ev.event, data: b64OrText(text, d.data_b64 as string | null | undefined), text };
        } else if (ev.event === "exit") {
          const d = jsonData(ev) as unknown as ProcessExitEvent;
          this.exit = { ...d, type: "exit", ok: d.exit_code === 0 };
          yield this.exit;
          return;
        } else if (ev.event === "error") {
          throw streamError(ev, "process's output");
        }
      }
    } finally {
      await this.close();
    }
  }

  /** Reads the rest of the output; returns how the process ended (null if it still runs and this does not follow). */
  async wait(): Promise<ProcessExitEvent | null> {
    if (!this.started) {
      for await (const _ of this) {
        // Output nobody asked for is dropped.
      }
    }
    return this.exit;
  }

  async close(): Promise<void> {
    await this.events.return(undefined);
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }
}

/** The background processes of one sandbox; they run on when the client goes away. */
export class Processes {
  constructor(
    private readonly t: Transport,
    private readonly id: string,
  ) {}

  /** Starts `cmd` (an argv array, or a string run under `sh -c`). */
  async start(cmd: Command, options: ProcessStartOptions = {}): Promise<Process> {
    const json: ProcessStart = { cmd: argv(cmd) };
    if (options.env) json.env = options.env;
    if (options.cwd !== undefined) json.cwd = options.cwd;
    const r = await this.t.send("process_start", { path: { id: this.id }, json, signal: options.signal });
    return (await r.json()) as Process;
  }

  /** Every process the sandbox keeps, running and exited. */
  async list(): Promise<Process[]> {
    const r = await this.t.send("process_list", { path: { id: this.id } });
    return ((await r.json()) as ProcessList).processes;
  }

  async get(pid: number): Promise<Process> {
    const r = await this.t.send("process_get", { path: { id: this.id, pid } });
    return (await r.json()) as Process;
  }

  /** The output from the oldest byte kept, then live until the exit (`follow: false`: only what is kept now). */
  async output(pid: number, options: { follow?: boolean } & CallOptions = {}): Promise<ProcessOutput> {
    const follow = options.follow ?? true;
    const r = await this.t.send("process_output", {
      path: { id: this.id, pid },
      query: { follow },
      accept: "text/event-stream",
      deadline: "headers",
      signal: options.signal,
    });
    if (r.body === null) throw new ProviderUnavailableError("provider_unavailable", "the output stream has no body");
    return new ProcessOutput(r.body, follow);
  }

  /** Writes `data` to the process's stdin; `close: true` closes it afterwards. */
  async writeStdin(pid: number, data: string | Uint8Array, options: { close?: boolean } = {}): Promise<StdinWritten> {
    const r = await this.t.send("process_stdin", {
      path: { id: this.id, pid },
      query: options.close ? { close: true } : {},
      body: data,
    });
    return (await r.json()) as StdinWritten;
  }

  /** Sends TERM, KILL, INT, HUP, USR1, USR2, STOP or CONT to the process's group. */
  async signal(pid: number, signal = "TERM"): Promise<Process> {
    const name = signal.trim().toUpperCase().replace(/^SIG/, "");
    const r = await this.t.send("process_signal", { path: { id: this.id, pid }, json: { signal: name } });
    return (await r.json()) as Process;
  }
}
