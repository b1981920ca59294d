//! A sandbox handle: exec (whole or streamed), its files, its lifecycle, and disposal with `await using`.

import { createWriteStream } from "node:fs";
import { rename, unlink } from "node:fs/promises";
import { Readable } from "node:stream";
import { pipeline } from "node:stream/promises";
import type {
  ArchiveSummary,
  ExecRequest,
  ExecResponse,
  ExitStatus,
  ExposedPort,
  FileEntry,
  Image,
  LogLine,
  PortToken,
  Sandbox as SandboxInfo,
} from "./generated/api.js";
import { errorFor, NotFoundError, ProviderUnavailableError, TransportError } from "./errors.js";
import { type CallOptions, type Transport } from "./http.js";
import { LocalFile, type Upload } from "./body.js";
import { type SSEEvent, sseEvents } from "./sse.js";
import { Processes } from "./processes.js";
import { type Pty, type PtyOptions, openPty, ptyArgv } from "./pty.js";

/** The server's exec timeout when the caller gives none, in seconds. */
const DEFAULT_EXEC_TIMEOUT_S = 60;
// Extra time an exec call waits beyond the command's own timeout, so the
// server reports a timed-out command rather than the client giving up first.
const EXEC_GRACE_MS = 30_000;

/** A command: an argv array, sent as is, or a string, run under `sh -c`. */
export type Command = string | readonly string[];

/** What `exec` and `execStream` take besides the command: the API's exec fields. */
export type ExecOptions = Omit<ExecRequest, "cmd" | "stdin"> & CallOptions & {
  /** Text (or UTF-8 bytes) fed to the command's standard input. */
  stdin?: string | Uint8Array | null;
};

/** A finished command: the API's answer, plus the exact bytes of its output. */
export interface ExecResult extends ExecResponse {
  /** True when the command exited with status 0. */
  readonly ok: boolean;
  /** stdout's exact bytes (`stdout` is its text, invalid UTF-8 replaced). */
  readonly stdoutBytes: Uint8Array;
  readonly stderrBytes: Uint8Array;
}

/** A piece of a streamed command's output. */
export interface OutputEvent {
  type: "stdout" | "stderr";
  /** The exact bytes. */
  data: Uint8Array;
  /** Their UTF-8 reading (invalid bytes replaced). */
  text: string;
}

/** How a streamed command ended: always the last event. */
export interface ExitEvent extends ExitStatus {
  type: "exit";
  /** True when the command exited with status 0. */
  ok: boolean;
}

/** An event of `execStream`. */
export type ExecEvent = OutputEvent | ExitEvent;

/** A file mode: `0o755` or `"0755"`. */
export type Mode = number | string;

const encoder = new TextEncoder();

export function b64OrText(text: string, b64: string | null | undefined): Uint8Array {
  // The server sends base64 only where the bytes are not valid UTF-8.
  if (b64 !== null && b64 !== undefined) return new Uint8Array(Buffer.from(b64, "base64"));
  return encoder.encode(text);
}

export function argv(cmd: Command): string[] {
  if (typeof cmd === "string") return ["sh", "-c", cmd];
  const out = cmd.map(String);
  if (out.length === 0) throw new TypeError("the command must name a program");
  return out;
}

/** The API's octal mode string of a mode. */
export function modeString(mode: Mode): string {
  if (typeof mode === "string") return mode;
  if (!Number.isInteger(mode) || mode < 0 || mode > 0o7777) {
    throw new RangeError(`mode ${mode.toString(8)} is not a permission mode (0 to 0o7777)`);
  }
  return mode.toString(8).padStart(4, "0");
}

function execBody(cmd: Command, o: ExecOptions): ExecRequest {
  const stdin = o.stdin instanceof Uint8Array ? new TextDecoder().decode(o.stdin) : o.stdin;
  const body: ExecRequest = { cmd: argv(cmd) };
  if (o.env) body.env = o.env;
  if (o.cwd !== undefined && o.cwd !== null) body.cwd = o.cwd;
  if (stdin !== undefined && stdin !== null) body.stdin = stdin;
  if (o.timeout_s !== undefined && o.timeout_s !== null) body.timeout_s = o.timeout_s;
  if (o.user !== undefined && o.user !== null) body.user = o.user;
  return body;
}

function execDeadline(o: ExecOptions): { extraMs: number } {
  return { extraMs: (o.timeout_s ?? DEFAULT_EXEC_TIMEOUT_S) * 1000 + EXEC_GRACE_MS };
}

export function jsonData(ev: SSEEvent): Record<string, unknown> {
  try {
    const doc: unknown = ev.data ? JSON.parse(ev.data) : {};
    return doc && typeof doc === "object" ? (doc as Record<string, unknown>) : {};
  } catch {
    return { message: ev.data };
  }
}

export function streamError(ev: SSEEvent, what: string): Error {
  const d = jsonData(ev);
  return errorFor(
    typeof d.code === "string" ? d.code : "internal",
    typeof d.message === "string" ? d.message : `the ${what} stream failed`,
  );
}

/**
 * The output of a running command, event by event, as it is produced:
 * `stdout` and `stderr` events, then one `exit` event. Leaving the loop
 * early (`break`, an exception), `close()`, or the end of an `await using`
 * block ends the call, and the server kills the command. An `error` event
 * is thrown as the matching `StacyVMError`.
 */
export class ExecStream implements AsyncIterable<ExecEvent>, AsyncDisposable {
  /** How the command ended, once the `exit` event has been read. */
  exit: ExitEvent | null = null;
  private readonly events: AsyncGenerator<SSEEvent, void, undefined>;
  private started = false;

  constructor(body: ReadableStream<Uint8Array>) {
    this.events = sseEvents(body);
  }

  async *[Symbol.asyncIterator](): AsyncGenerator<ExecEvent, void, undefined> {
    if (this.started) throw new TypeError("an exec stream can be iterated once");
    this.started = true;
    try {
      for (;;) {
        let next: IteratorResult<SSEEvent, void>;
        try {
          next = await this.events.next();
        } catch (e) {
          throw new TransportError("transport", "the command's stream broke off", { cause: e });
        }
        if (next.done) {
          throw new ProviderUnavailableError(
            "provider_unavailable",
            "the command's stream ended before it reported an exit status",
          );
        }
        const ev = next.value;
        if (ev.event === "stdout" || ev.event === "stderr") {
          const d = jsonData(ev);
          const text = typeof d.data === "string" ? d.data : "";
          yield { type: ev.event, data: b64OrText(text, d.data_b64 as string | null | undefined), text };
        } else if (ev.event === "exit") {
          const d = jsonData(ev) as unknown as ExitStatus;
          this.exit = { ...d, type: "exit", ok: d.exit_code === 0 };
          yield this.exit;
          return;
        } else if (ev.event === "error") {
          throw streamError(ev, "command's");
        }
        // Other events (keep-alives, additions of a newer server) carry nothing for us.
      }
    } finally {
      await this.close();
    }
  }

  /** Reads the rest of the output and returns how the command ended. */
  async wait(): Promise<ExitEvent> {
    if (!this.started) {
      for await (const _ of this) {
        // Output nobody asked for is dropped.
      }
    }
    if (this.exit === null) throw new TypeError("the stream was closed before the command ended");
    return this.exit;
  }

  /** Ends the call; a command still running is killed. */
  async close(): Promise<void> {
    await this.events.return(undefined);
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }
}

/** A sandbox's log lines as they are written; ends when the sandbox does. */
export class LogStream implements AsyncIterable<LogLine>, AsyncDisposable {
  private readonly events: AsyncGenerator<SSEEvent, void, undefined>;

  constructor(body: ReadableStream<Uint8Array>) {
    this.events = sseEvents(body);
  }

  async *[Symbol.asyncIterator](): AsyncGenerator<LogLine, void, undefined> {
    try {
      for await (const ev of this.events) {
        if (ev.event === "log") yield jsonData(ev) as unknown as LogLine;
        else if (ev.event === "error") throw streamError(ev, "log");
      }
    } finally {
      await this.close();
    }
  }

  async close(): Promise<void> {
    await this.events.return(undefined);
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }
}

/** The files of one sandbox. Paths are absolute paths inside it. */
export class Files {
  constructor(
    private readonly t: Transport,
    private readonly id: string,
  ) {}

  /**
   * Creates or replaces the file at `path`, making parent directories.
   * `data` is text, bytes, a Blob, a `ReadableStream` or an async iterable
   * of byte chunks; streams are sent as they are read.
   */
  async write(path: string, data: Upload, options: { mode?: Mode } & CallOptions = {}): Promise<FileEntry> {
    return this.put(path, data, options);
  }

  /** Streams the local file `localPath` to `path` (retried like any idempotent call: the file is read afresh). */
  async upload(path: string, localPath: string, options: { mode?: Mode } & CallOptions = {}): Promise<FileEntry> {
    return this.put(path, new LocalFile(localPath), options);
  }

  private async put(path: string, data: Upload | LocalFile, o: { mode?: Mode } & CallOptions): Promise<FileEntry> {
    const r = await this.t.send("file_write", {
      path: { id: this.id },
      query: { path, mode: o.mode === undefined ? undefined : modeString(o.mode) },
      body: data,
      deadline: "none",
      transfer: true,
      signal: o.signal,
    });
    return (await r.json()) as FileEntry;
  }

  /**
   * Unpacks a tar archive (bytes, a stream, an iterable of chunks, or a
   * local tar file as `{ localPath }`) into the directory `path`, made with
   * its parents, in one request. Modes, symlinks and hard links are kept;
   * nothing lands outside `path` (an entry that would is an
   * `InvalidRequestError`).
   */
  async writeArchive(path: string, tar: Upload | { localPath: string }, options: CallOptions = {}): Promise<ArchiveSummary> {
    const body = typeof tar === "object" && tar !== null && "localPath" in tar ? new LocalFile(tar.localPath) : tar;
    const r = await this.t.send("file_archive_put", {
      path: { id: this.id },
      query: { path },
      body,
      deadline: "none",
      transfer: true,
      signal: options.signal,
    });
    return (await r.json()) as ArchiveSummary;
  }

  /** The file's bytes as a stream, as they arrive: for files of any size. */
  async readStream(path: string, options: CallOptions = {}): Promise<ReadableStream<Uint8Array>> {
    const r = await this.t.send("file_read", {
      path: { id: this.id },
      query: { path },
      accept: "application/octet-stream",
      deadline: "headers",
      transfer: true,
      signal: options.signal,
    });
    return r.body ?? new ReadableStream<Uint8Array>({ start: (c) => c.close() });
  }

  /**
   * `path` (a directory, or one file) as a tar stream, as it arrives: a
   * directory's entries named relative to it (so `writeArchive` of it into a
   * directory gives back the tree); files, directories and symlinks (stored,
   * never followed) with their modes and times. The tar comes from the
   * sandbox: unpack it as untrusted input.
   */
  async readArchiveStream(path: string, options: CallOptions = {}): Promise<ReadableStream<Uint8Array>> {
    const r = await this.t.send("file_archive_get", {
      path: { id: this.id },
      query: { path },
      accept: "application/x-tar",
      deadline: "headers",
      transfer: true,
      signal: options.signal,
    });
    return r.body ?? new ReadableStream<Uint8Array>({ start: (c) => c.close() });
  }

  /** The whole file in memory; `readStream` or `download` for large files. */
  async read(path: string, options: CallOptions = {}): Promise<Uint8Array> {
    const r = await this.t.send("file_read", {
      path: { id: this.id },
      query: { path },
      accept: "application/octet-stream",
      signal: options.signal,
    });
    return new Uint8Array(await r.arrayBuffer());
  }

  /** The whole file as UTF-8 text. */
  async readText(path: string, options: CallOptions = {}): Promise<string> {
    return new TextDecoder().decode(await this.read(path, options));
  }

  /**
   * Streams the file at `path` into the local file `localPath`; returns the
   * bytes written. The local file appears only once complete.
   */
  async download(path: string, localPath: string, options: CallOptions = {}): Promise<number> {
    const stream = await this.readStream(path, options);
    const partial = `${localPath}.${process.pid}.${Date.now()}.partial`;
    let written = 0;
    const source = Readable.fromWeb(stream as import("node:stream/web").ReadableStream<Uint8Array>);
    source.on("data", (chunk: Uint8Array) => {
      written += chunk.length;
    });
    try {
      await pipeline(source, createWriteStream(partial, { flags: "wx" }));
      await rename(partial, localPath);
    } catch (e) {
      await unlink(partial).catch(() => undefined);
      if (e instanceof Error && !(e instanceof TransportError) && (e as { code?: string }).code === undefined) {
        throw new TransportError("transport", `the download of ${path} broke off`, { cause: e });
      }
      throw e;
    }
    return written;
  }

  /** The entry at `path` (a symlink is described, not followed). */
  async stat(path: string): Promise<FileEntry> {
    const r = await this.t.send("file_stat", { path: { id: this.id }, query: { path } });
    return (await r.json()) as FileEntry;
  }

  /** Whether anything is at `path`. */
  async exists(path: string): Promise<boolean> {
    try {
      await this.stat(path);
      return true;
    } catch (e) {
      if (e instanceof NotFoundError) return false;
      throw e;
    }
  }

  /** The entries of a directory, sorted by path. */
  async list(path: string, options: { recursive?: boolean } = {}): Promise<FileEntry[]> {
    const r = await this.t.send("file_list", {
      path: { id: this.id },
      query: { path, recursive: options.recursive ?? false },
    });
    return ((await r.json()) as { entries: FileEntry[] }).entries;
  }

  /** Paths matching `pattern`, sorted; `**` crosses directories. */
  async glob(pattern: string): Promise<string[]> {
    const r = await this.t.send("file_glob", { path: { id: this.id }, query: { pattern } });
    return ((await r.json()) as { paths: string[] }).paths;
  }

  /** Moves `from` to `to`; an existing `to` is a `ConflictError` unless `overwrite`. */
  async move(from: string, to: string, options: { overwrite?: boolean } = {}): Promise<FileEntry> {
    const r = await this.t.send("file_move", {
      path: { id: this.id },
      json: { from, to, overwrite: options.overwrite ?? false },
    });
    return (await r.json()) as FileEntry;
  }

  /** Sets the permission bits (`0o755` or `"0755"`). */
  async chmod(path: string, mode: Mode): Promise<FileEntry> {
    const r = await this.t.send("file_chmod", { path: { id: this.id }, json: { path, mode: modeString(mode) } });
    return (await r.json()) as FileEntry;
  }

  /** Makes a directory (and its missing parents unless `parents: false`). */
  async mkdir(path: string, options: { parents?: boolean } = {}): Promise<FileEntry> {
    const r = await this.t.send("file_mkdir", {
      path: { id: this.id },
      json: { path, parents: options.parents ?? true },
    });
    return (await r.json()) as FileEntry;
  }

  /** Deletes a file or directory; a non-empty directory needs `recursive`. */
  async delete(path: string, options: { recursive?: boolean } = {}): Promise<void> {
    await this.t.send("file_delete", {
      path: { id: this.id },
      query: { path, recursive: options.recursive ?? false },
    });
  }
}

/**
 * A handle on one sandbox. `await using sb = await client.sandbox(...)`
 * destroys it when the block ends; `destroy()` does so explicitly.
 */
export class Sandbox implements AsyncDisposable {
  /** The sandbox as last read from the server. */
  info: SandboxInfo;
  readonly files: Files;
  /** Its background processes. */
  readonly processes: Processes;

  constructor(
    private readonly t: Transport,
    info: SandboxInfo,
  ) {
    this.info = info;
    this.files = new Files(t, info.id);
    this.processes = new Processes(t, info.id);
  }

  get id(): string {
    return this.info.id;
  }

  /** Reads the sandbox's current description. */
  async refresh(): Promise<SandboxInfo> {
    const r = await this.t.send("sandbox_get", { path: { id: this.id } });
    this.info = (await r.json()) as SandboxInfo;
    return this.info;
  }

  /** Runs a command to completion. A non-zero exit is a result (`exit_code`), not an error. */
  async exec(cmd: Command, options: ExecOptions = {}): Promise<ExecResult> {
    const r = await this.t.send("sandbox_exec", {
      path: { id: this.id },
      json: execBody(cmd, options),
      deadline: execDeadline(options),
      signal: options.signal,
    });
    const d = (await r.json()) as ExecResponse;
    return {
      ...d,
      ok: d.exit_code === 0,
      stdoutBytes: b64OrText(d.stdout, d.stdout_b64),
      stderrBytes: b64OrText(d.stderr, d.stderr_b64),
    };
  }

  /**
   * Starts a command and returns its output as it is produced (see
   * `ExecStream`). Resolves once the server has started it; a refusal
   * (a destroyed sandbox, say) rejects here.
   */
  async execStream(cmd: Command, options: ExecOptions = {}): Promise<ExecStream> {
    const r = await this.t.send("sandbox_exec_stream", {
      path: { id: this.id },
      json: execBody(cmd, options),
      accept: "text/event-stream",
      deadline: "headers",
      signal: options.signal,
    });
    if (r.body === null) throw new ProviderUnavailableError("provider_unavailable", "the exec stream has no body");
    return new ExecStream(r.body);
  }

  /** Destroys the sandbox; repeating it is harmless. */
  async destroy(): Promise<void> {
    await this.t.send("sandbox_destroy", { path: { id: this.id } });
  }

  /** Destroys the sandbox automatically `timeoutS` seconds from now. */
  async setTimeout(timeoutS: number): Promise<SandboxInfo> {
    const r = await this.t.send("sandbox_timeout", { path: { id: this.id }, json: { timeout_s: timeoutS } });
    this.info = (await r.json()) as SandboxInfo;
    return this.info;
  }

  /** Pauses the sandbox (`UnsupportedError` where its provider cannot). */
  async pause(): Promise<SandboxInfo> {
    const r = await this.t.send("sandbox_pause", { path: { id: this.id } });
    this.info = (await r.json()) as SandboxInfo;
    return this.info;
  }

  async resume(): Promise<SandboxInfo> {
    const r = await this.t.send("sandbox_resume", { path: { id: this.id } });
    this.info = (await r.json()) as SandboxInfo;
    return this.info;
  }

  /**
   * Saves the sandbox's filesystem as a new catalog image of its tenant, which creates then take
   * like any other image. A taken name is a `ConflictError`; a provider that cannot snapshot an
   * `UnsupportedError`. The whole filesystem is copied before the answer: no total deadline.
   */
  async snapshot(image: string, options: CallOptions = {}): Promise<Image> {
    const r = await this.t.send("sandbox_snapshot", {
      path: { id: this.id },
      json: { image },
      deadline: "none",
      signal: options.signal,
    });
    return (await r.json()) as Image;
  }

  /**
   * Makes `port` inside the sandbox (on its loopback) reachable through the
   * server, HTTP and WebSocket alike, even with network `none`. Private ports
   * need the caller's API key or a `portToken`; `public: true` opens the port
   * to anyone who has the URL. `url` is the host form when the server has a
   * proxy domain, else a path relative to the server (see `portUrl`).
   * Exposing a port again changes only whether it is public.
   */
  async expose(port: number, options: { public?: boolean } & CallOptions = {}): Promise<ExposedPort> {
    const r = await this.t.send("port_expose", {
      path: { id: this.id },
      json: { port, public: options.public ?? false },
      // Exposing is idempotent: the same port again is the same exposure.
      idempotent: true,
      signal: options.signal,
    });
    return (await r.json()) as ExposedPort;
  }

  /** The sandbox's exposed ports. */
  async ports(): Promise<ExposedPort[]> {
    const r = await this.t.send("port_list", { path: { id: this.id } });
    return ((await r.json()) as { ports: ExposedPort[] }).ports;
  }

  /** Closes an exposed port (`NotFoundError` when it is not exposed). */
  async unexpose(port: number): Promise<void> {
    await this.t.send("port_remove", { path: { id: this.id, port } });
  }

  /**
   * A signed token that opens a private port without an API key for
   * `ttlSeconds` (default 3600): `url` carries it as `?stacyvm_token=`.
   */
  async portToken(port: number, options: { ttlSeconds?: number } = {}): Promise<PortToken> {
    const r = await this.t.send("port_token", {
      path: { id: this.id, port },
      json: { ttl_seconds: options.ttlSeconds ?? 3600 },
    });
    return (await r.json()) as PortToken;
  }

  /** An exposed port's `url` made absolute: a path form is resolved against the server's URL. */
  portUrl(exposed: Pick<ExposedPort, "url">): string {
    return new URL(exposed.url, `${this.t.url}/`).toString();
  }

  /** The sandbox's log so far. */
  async logs(): Promise<LogLine[]> {
    const r = await this.t.send("sandbox_logs", { path: { id: this.id } });
    return ((await r.json()) as { lines: LogLine[] }).lines;
  }

  /** The log so far, then new lines as they come, until the sandbox ends. */
  async followLogs(options: CallOptions = {}): Promise<LogStream> {
    const r = await this.t.send("sandbox_logs", {
      path: { id: this.id },
      query: { follow: true },
      accept: "text/event-stream",
      deadline: "headers",
      signal: options.signal,
    });
    if (r.body === null) throw new ProviderUnavailableError("provider_unavailable", "the log stream has no body");
    return new LogStream(r.body);
  }

  /**
   * Opens an interactive terminal running `cmd` (default the image's shell)
   * on a `cols` × `rows` pseudo-terminal. A refusal (an unknown sandbox, a
   * viewer key, limits) rejects with the matching `StacyVMError`.
   */
  async pty(options: PtyOptions & CallOptions = {}): Promise<Pty> {
    const url = new URL(`${this.t.url}/v1/sandboxes/${encodeURIComponent(this.id)}/pty`);
    for (const a of ptyArgv(options)) url.searchParams.append("cmd", a);
    url.searchParams.set("cols", String(options.cols ?? 80));
    url.searchParams.set("rows", String(options.rows ?? 24));
    return openPty(url, this.t.upgradeHeaders(), options.signal);
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.destroy();
  }
}
