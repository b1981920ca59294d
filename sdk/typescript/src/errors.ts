//! The errors the client throws: one class per API error code, all `StacyVMError`s.

/** What every `StacyVMError` carries besides its message. */
export interface ErrorDetails {
  /** The HTTP status, or `null` for transport failures and errors reported inside an event stream. */
  status?: number | null;
  /** The `x-request-id` of the failed call; the server log files the details under it. */
  requestId?: string | null;
  /** Seconds the server asked to wait before trying again (`Retry-After`). */
  retryAfter?: number | null;
  /** What led to it (a network error, say). */
  cause?: unknown;
}

/**
 * Base class of every error the client throws.
 *
 * `code` is the API error code (`not_found`, `conflict`, …), or `transport`
 * when the server could not be reached at all; `message` is the server's
 * explanation.
 */
export class StacyVMError extends Error {
  readonly code: string;
  readonly status: number | null;
  readonly requestId: string | null;
  readonly retryAfter: number | null;

  constructor(code: string, message: string, details: ErrorDetails = {}) {
    super(message, details.cause === undefined ? undefined : { cause: details.cause });
    this.name = new.target.name;
    this.code = code;
    this.status = details.status ?? null;
    this.requestId = details.requestId ?? null;
    this.retryAfter = details.retryAfter ?? null;
  }

  override toString(): string {
    const id = this.requestId ? ` (request id ${this.requestId})` : "";
    return `${this.name} [${this.code}]: ${this.message}${id}`;
  }
}

/** 400: malformed JSON, a missing or out-of-range field, a relative path, a NUL byte. */
export class InvalidRequestError extends StacyVMError {}
/** 401: no key, an unknown key or a revoked key. */
export class UnauthenticatedError extends StacyVMError {}
/** 403: the key's role may not do this. */
export class ForbiddenError extends StacyVMError {}
/** 404: no such object for this tenant (another tenant's object is a 404 too). */
export class NotFoundError extends StacyVMError {}
/** 409: the object's state does not allow the call. */
export class ConflictError extends StacyVMError {}
/** 409: the sandbox's provider cannot do this (for example pause). */
export class UnsupportedError extends StacyVMError {}
/**
 * 409: the sandbox ran out of processes, memory or file descriptors; the
 * message names which.
 */
export class ResourceExhaustedError extends ConflictError {}
/** 413: the body is over the server's configured limit. */
export class PayloadTooLargeError extends StacyVMError {}
/** 422: the image or template cannot be resolved. */
export class ImageNotFoundError extends StacyVMError {}
/** 429: the tenant's quota would be exceeded. Not retried: waiting does not free quota. */
export class QuotaExceededError extends StacyVMError {}
/** 429: too many requests; `retryAfter` (seconds) says when to try again. */
export class RateLimitedError extends StacyVMError {}
/** 503: no worker can take the sandbox now. */
export class NoCapacityError extends StacyVMError {}
/** 503: no provider can take the sandbox now, or the runtime went away. */
export class ProviderUnavailableError extends StacyVMError {}
/** 503: the server's store is unavailable; try again shortly. */
export class StoreUnavailableError extends StacyVMError {}
/** 504, or no answer within the client's timeout: the operation did not finish in time. */
export class TimeoutError extends StacyVMError {}
/** 500: a server bug; the server log has the details under `requestId`. */
export class InternalError extends StacyVMError {}
/** The server could not be reached, or the connection broke mid-call. */
export class TransportError extends StacyVMError {}

type ErrorClass = new (code: string, message: string, details?: ErrorDetails) => StacyVMError;

/** The class of each API error code. */
export const ERROR_CLASSES: Readonly<Record<string, ErrorClass>> = {
  invalid_request: InvalidRequestError,
  unauthenticated: UnauthenticatedError,
  forbidden: ForbiddenError,
  not_found: NotFoundError,
  conflict: ConflictError,
  unsupported: UnsupportedError,
  sandbox_resource_exhausted: ResourceExhaustedError,
  payload_too_large: PayloadTooLargeError,
  image_not_found: ImageNotFoundError,
  quota_exceeded: QuotaExceededError,
  rate_limited: RateLimitedError,
  no_capacity: NoCapacityError,
  provider_unavailable: ProviderUnavailableError,
  store_unavailable: StoreUnavailableError,
  timeout: TimeoutError,
  internal: InternalError,
  transport: TransportError,
};

// When a body carries no recognisable error (a proxy in between, say), the
// status alone still picks the closest class.
const BY_STATUS: Readonly<Record<number, string>> = {
  400: "invalid_request",
  401: "unauthenticated",
  403: "forbidden",
  404: "not_found",
  405: "invalid_request",
  409: "conflict",
  413: "payload_too_large",
  422: "image_not_found",
  429: "rate_limited",
  500: "internal",
  502: "provider_unavailable",
  503: "provider_unavailable",
  504: "timeout",
};

/** The error of an API error code (an unknown code gives a plain `StacyVMError`). */
export function errorFor(code: string, message: string, details: ErrorDetails = {}): StacyVMError {
  const cls = Object.prototype.hasOwnProperty.call(ERROR_CLASSES, code) ? ERROR_CLASSES[code] : undefined;
  return new (cls ?? StacyVMError)(code, message, details);
}

/**
 * `Retry-After` in seconds: delta-seconds or an HTTP date; `null` when absent
 * or unreadable.
 */
export function parseRetryAfter(value: string | null, now: number = Date.now()): number | null {
  if (value === null) return null;
  const text = value.trim();
  if (/^\d+(\.\d+)?$/.test(text)) return Number(text);
  const when = Date.parse(text);
  if (Number.isNaN(when)) return null;
  return Math.max(0, (when - now) / 1000);
}

/** The error of a non-2xx answer whose body has been read as `text`. */
export function errorFromBody(status: number, headers: Headers, text: string): StacyVMError {
  let requestId = headers.get("x-request-id");
  let code: string | undefined;
  let message: string | undefined;
  try {
    const doc: unknown = text ? JSON.parse(text) : null;
    const err = doc && typeof doc === "object" ? (doc as { error?: unknown }).error : undefined;
    if (err && typeof err === "object") {
      const e = err as Record<string, unknown>;
      if (typeof e.code === "string") code = e.code;
      if (typeof e.message === "string") message = e.message;
      if (typeof e.request_id === "string" && e.request_id) requestId = e.request_id;
    }
  } catch {
    // Not JSON: the status and the text still say something.
  }
  code ??= BY_STATUS[status] ?? "error";
  if (message === undefined) {
    const t = text.trim();
    message = t ? `the server answered ${status}: ${t.slice(0, 300)}` : `the server answered ${status}`;
  }
  return errorFor(code, message, { status, requestId, retryAfter: parseRetryAfter(headers.get("retry-after")) });
}

/** The error of a non-2xx `Response` (its body is read, at most as far as an error body goes). */
export async function errorFromResponse(response: Response): Promise<StacyVMError> {
  let text = "";
  try {
    text = await response.text();
  } catch {
    // The body broke off: the status alone decides.
  }
  return errorFromBody(response.status, response.headers, text);
}
