//! The one place requests are sent: routes from the generated operation table, timeouts, and retries of idempotent calls.

import { operations, type OperationId, type Operations } from "./generated/api.js";
import { StacyVMError, TimeoutError, TransportError, errorFromResponse } from "./errors.js";
import { type Body, type LocalFile, type Upload, isReplayable, toRequestBody } from "./body.js";
import { transferFetch } from "./transfer.js";

export const DEFAULT_URL = "http://127.0.0.1:7070";
/** How long a plain call may take, in milliseconds. */
export const DEFAULT_TIMEOUT_MS = 60_000;
export const VERSION = "0.1.0";

/** How transient failures of idempotent calls are retried. */
export interface RetryOptions {
  /** Attempts in all, the first included; 1 turns retries off. Default 4. */
  maxAttempts?: number;
  /** The first backoff in milliseconds; it doubles on every attempt (plus up to 25% jitter). Default 200. */
  baseDelayMs?: number;
  /** No wait is longer than this, not even one a `Retry-After` asks for. Default 10 000. */
  maxDelayMs?: number;
  /** Called before each wait, e.g. to log it. */
  onRetry?: (info: RetryInfo) => void;
}

/** What `onRetry` is told. */
export interface RetryInfo {
  /** The operation being retried (its operationId in the OpenAPI document). */
  operation: string;
  /** The attempt that failed, counting from 1. */
  attempt: number;
  /** How long the client waits before the next attempt. */
  delayMs: number;
  error: StacyVMError;
}

/** Options of a `Client`. */
export interface ClientOptions {
  /** The server; default `STACYVM_URL`, else `http://127.0.0.1:7070`. */
  url?: string;
  /** The API key; default `STACYVM_API_KEY`. */
  apiKey?: string;
  /** How long a plain call may take, in milliseconds (default 60 000). Streams and transfers have no total deadline. */
  timeoutMs?: number;
  /** Retries of idempotent calls; `false` turns them off. */
  retry?: RetryOptions | false;
  /** Extra headers sent with every call. */
  headers?: Record<string, string>;
  /** The fetch plain calls use (default the platform's); streamed transfers go over `node:http`. */
  fetch?: typeof fetch;
}

/** Options most calls take. */
export interface CallOptions {
  /** Aborts the call (an aborted call rejects with the signal's reason). */
  signal?: AbortSignal;
}

type QueryValue = string | number | boolean | null | undefined;
type QueryOf<O extends OperationId> = { [K in keyof Operations[O]["query"]]?: QueryValue | readonly QueryValue[] };
type HeadersOf<O extends OperationId> = { [K in keyof Operations[O]["headers"]]?: string | null };
type PathArg<O extends OperationId> = Operations[O]["path"] extends Record<string, never>
  ? { path?: undefined }
  : { path: Operations[O]["path"] };

/**
 * How long a call may take: the client's timeout for the whole call
 * (`default`), that plus some milliseconds (a command's own timeout), the
 * client's timeout until the answer's headers only (a streamed answer), or
 * no deadline (a streamed upload).
 */
export type Deadline = "default" | "headers" | "none" | { extraMs: number };

/** One request, described by its operation. */
export type Request<O extends OperationId> = PathArg<O> & {
  query?: QueryOf<O>;
  headers?: HeadersOf<O>;
  /** A JSON body, of the type the document gives it. */
  json?: Operations[O]["body"];
  /** A raw body (files, tars). */
  body?: Upload | LocalFile;
  /** May be sent again after a transient failure (GET, DELETE and PUT are; a POST only when said so). */
  idempotent?: boolean;
  deadline?: Deadline;
  accept?: string;
  signal?: AbortSignal;
  /** A transfer of any size: sent over `node:http`, streamed both ways with backpressure. */
  transfer?: boolean;
};

interface Settings {
  url: string;
  headers: Record<string, string>;
  timeoutMs: number;
  retry: Required<Omit<RetryOptions, "onRetry">> & Pick<RetryOptions, "onRetry">;
  fetch: typeof fetch;
}

function env(name: string): string | undefined {
  const v = typeof process === "undefined" ? undefined : process.env[name];
  return v && v.trim() ? v.trim() : undefined;
}

/** Sends requests to one server. */
export class Transport {
  readonly url: string;
  private readonly s: Settings;

  constructor(options: ClientOptions = {}) {
    const url = (options.url ?? env("STACYVM_URL") ?? DEFAULT_URL).replace(/\/+$/, "");
    try {
      new URL(url);
    } catch (e) {
      throw new TypeError(`the server URL ${JSON.stringify(url)} is not a URL`, { cause: e });
    }
    const apiKey = options.apiKey ?? env("STACYVM_API_KEY");
    const headers: Record<string, string> = { "user-agent": `stacyvm-typescript/${VERSION}`, accept: "application/json" };
    if (apiKey) headers.authorization = `Bearer ${apiKey}`;
    for (const [k, v] of Object.entries(options.headers ?? {})) headers[k.toLowerCase()] = v;
    const r = options.retry === false ? { maxAttempts: 1 } : (options.retry ?? {});
    this.url = url;
    this.s = {
      url,
      headers,
      timeoutMs: options.timeoutMs ?? DEFAULT_TIMEOUT_MS,
      retry: {
        maxAttempts: Math.max(1, Math.floor(r.maxAttempts ?? 4)),
        baseDelayMs: r.baseDelayMs ?? 200,
        maxDelayMs: r.maxDelayMs ?? 10_000,
        onRetry: r.onRetry,
      },
      fetch: options.fetch ?? globalThis.fetch.bind(globalThis),
    };
  }

  /** The headers every call carries (the key, the user agent), for a WebSocket upgrade. */
  upgradeHeaders(): Record<string, string> {
    return { ...this.s.headers };
  }

  /** The URL of an operation with its path parameters filled in and its query. */
  urlOf(op: OperationId, path: Record<string, string | number> | undefined, query: Record<string, unknown> | undefined): string {
    const route = operations[op];
    const p = route.path.replace(/\{([^}]+)\}/g, (_, name: string) => {
      // Numeric parameters (a process's pid) are typed as numbers.
      const raw = path?.[name];
      const v = typeof raw === "number" && Number.isSafeInteger(raw) ? String(raw) : raw;
      if (typeof v !== "string" || v === "") throw new TypeError(`${op}: the path parameter ${name} is missing`);
      // Image names may hold `/` (`org/app:tag`): that route takes the rest of the path.
      return name === "name" && op.startsWith("image_")
        ? v.split("/").map(encodeURIComponent).join("/")
        : encodeURIComponent(v);
    });
    const qs = new URLSearchParams();
    for (const [k, v] of Object.entries(query ?? {})) {
      for (const item of Array.isArray(v) ? v : [v]) {
        if (item === undefined || item === null) continue;
        qs.append(k, String(item));
      }
    }
    const q = qs.toString();
    return `${this.s.url}${p}${q ? `?${q}` : ""}`;
  }

  /**
   * Sends the request and returns the 2xx `Response` (its body unread), or
   * throws the `StacyVMError` of the answer. Idempotent calls with a body
   * that can be sent again are retried on 503, 429 `rate_limited`, a
   * failed connection or a timeout, with exponential backoff and jitter,
   * honouring `Retry-After`.
   */
  async send<O extends OperationId>(op: O, req: Request<O>): Promise<Response> {
    const route = operations[op];
    const replayable = req.body === undefined || isReplayable(req.body);
    const idempotent = req.idempotent ?? route.method !== "POST";
    const max = idempotent && replayable ? this.s.retry.maxAttempts : 1;
    const url = this.urlOf(op, req.path as Record<string, string | number> | undefined, req.query as Record<string, unknown>);
    for (let attempt = 1; ; attempt++) {
      try {
        return await this.once(op, url, req);
      } catch (e) {
        if (!(e instanceof StacyVMError) || attempt >= max || !transient(e)) throw e;
        const delayMs = this.delay(attempt, e.retryAfter);
        this.s.retry.onRetry?.({ operation: op, attempt, delayMs, error: e });
        await sleep(delayMs, req.signal);
      }
    }
  }

  private delay(attempt: number, retryAfter: number | null): number {
    const { baseDelayMs, maxDelayMs } = this.s.retry;
    if (retryAfter !== null) return Math.min(retryAfter * 1000, maxDelayMs);
    const exp = Math.min(baseDelayMs * 2 ** Math.min(attempt - 1, 16), maxDelayMs);
    // Up to 25% jitter, so many clients refused together do not come back together.
    return Math.min(exp + exp * Math.random() * 0.25, maxDelayMs);
  }

  private async once<O extends OperationId>(op: O, url: string, req: Request<O>): Promise<Response> {
    const route = operations[op];
    const headers: Record<string, string> = { ...this.s.headers };
    if (req.accept) headers.accept = req.accept;
    for (const [k, v] of Object.entries((req.headers ?? {}) as Record<string, string | null | undefined>)) {
      if (v !== undefined && v !== null) headers[k.toLowerCase()] = v;
    }
    let body: Body | undefined;
    if (req.json !== undefined) {
      headers["content-type"] = "application/json";
      body = JSON.stringify(req.json);
    } else if (req.body !== undefined) {
      headers["content-type"] = route.bodyContentType ?? "application/octet-stream";
      body = await toRequestBody(req.body);
    }
    const deadline = req.deadline ?? "default";
    const budget =
      deadline === "none" ? null : typeof deadline === "object" ? this.s.timeoutMs + deadline.extraMs : this.s.timeoutMs;
    const timer = new AbortController();
    const handle = budget === null ? null : setTimeout(() => timer.abort(), budget);
    const signal = req.signal ? AbortSignal.any([req.signal, timer.signal]) : timer.signal;
    let response: Response;
    try {
      if (req.transfer) {
        response = await transferFetch(url, { method: route.method, headers, body, signal });
      } else {
        const init: RequestInit & { duplex?: "half" } = { method: route.method, headers, body, signal };
        // A streamed request body must say so to fetch.
        if (body instanceof ReadableStream) init.duplex = "half";
        response = await this.s.fetch(url, init);
      }
    } catch (e) {
      if (handle) clearTimeout(handle);
      throw failure(op, e, req.signal, timer.signal);
    }
    if (!response.ok) {
      try {
        throw await errorFromResponse(response);
      } finally {
        if (handle) clearTimeout(handle);
      }
    }
    if (handle === null || deadline === "headers") {
      if (handle) clearTimeout(handle);
      return response;
    }
    // The deadline covers reading the answer too: the timer stays armed
    // until the caller has read it, and a timeout then shows as the
    // client's TimeoutError rather than a bare abort.
    return withDeadline(op, response, handle, timer.signal, req.signal);
  }
}

/** Waits `ms`, or rejects with the signal's reason when it aborts. */
function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) return reject(signal.reason);
    const t = setTimeout(() => {
      signal?.removeEventListener("abort", onAbort);
      resolve();
    }, ms);
    const onAbort = (): void => {
      clearTimeout(t);
      reject(signal?.reason);
    };
    signal?.addEventListener("abort", onAbort, { once: true });
  });
}

function transient(e: StacyVMError): boolean {
  // A client-side timeout has no status; a 504 from the server is the server's answer.
  if (e instanceof TransportError || (e.code === "timeout" && e.status === null)) return true;
  return e.status === 503 || (e.status === 429 && e.code === "rate_limited");
}

/** What a fetch that threw means: the caller's abort (rethrown as is), the client's timeout, or a transport failure. */
function failure(op: string, e: unknown, caller: AbortSignal | undefined, timer: AbortSignal): unknown {
  if (caller?.aborted) return caller.reason;
  if (timer.aborted) return new TimeoutError("timeout", `${op}: no answer within the client's timeout`, { cause: e });
  if (e instanceof StacyVMError) return e;
  // fetch puts the system error in `cause`; node:http throws it as is.
  const err = e as { code?: string; cause?: { code?: string; message?: string } };
  const why = err?.cause?.code ?? err?.code ?? err?.cause?.message ?? (e instanceof Error ? e.message : String(e));
  return new TransportError("transport", `${op}: the server could not be reached or the connection broke (${why})`, {
    cause: e,
  });
}

/** The response, whose body reading ends the deadline's timer (or fails as a timeout). */
function withDeadline(
  op: string,
  response: Response,
  handle: ReturnType<typeof setTimeout>,
  timer: AbortSignal,
  caller: AbortSignal | undefined,
): Response {
  const body = response.body;
  if (body === null || response.status === 204) {
    clearTimeout(handle);
    return response;
  }
  const reader = body.getReader();
  const wrapped = new ReadableStream<Uint8Array>({
    async pull(controller) {
      try {
        const r = await reader.read();
        if (r.done) {
          clearTimeout(handle);
          controller.close();
        } else {
          controller.enqueue(r.value);
        }
      } catch (e) {
        clearTimeout(handle);
        controller.error(failure(op, e, caller, timer));
      }
    },
    async cancel(reason) {
      clearTimeout(handle);
      await reader.cancel(reason);
    },
  });
  return new Response(wrapped, { status: response.status, statusText: response.statusText, headers: response.headers });
}
