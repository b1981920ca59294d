// The console's client of the StacyVM API. The key lives in sessionStorage
// only: it is gone when the tab closes, and no other tab or site sees it.

const KEY = 'stacyvm.key';

export function apiKey() { return sessionStorage.getItem(KEY); }
export function setApiKey(k) { sessionStorage.setItem(KEY, k); }
export function forgetApiKey() { sessionStorage.removeItem(KEY); }

/** An API error: the `error` body of a non-2xx answer. */
export class ApiError extends Error {
  constructor(status, code, message, requestId) {
    super(`${status} ${code}: ${message}`);
    this.status = status;
    this.code = code;
    this.requestId = requestId;
  }
}

function authHeaders(extra) {
  return { Authorization: `Bearer ${apiKey() || ''}`, ...extra };
}

async function failure(r) {
  let e = null;
  try { e = (await r.json()).error; } catch { /* not a JSON error body */ }
  return new ApiError(r.status, (e && e.code) || `http_${r.status}`,
    (e && e.message) || r.statusText, e && e.request_id);
}

/**
 * Calls the API. `body` is sent as JSON unless `raw` is set (then it goes
 * as is: a File or Blob). Answers the parsed JSON, null for 204, and the
 * Response itself for anything else (file downloads).
 */
export async function call(method, path, { body, raw, signal } = {}) {
  const init = { method, headers: authHeaders(), signal };
  if (raw !== undefined) {
    init.body = raw;
    init.headers['Content-Type'] = 'application/octet-stream';
  } else if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers['Content-Type'] = 'application/json';
  }
  const r = await fetch(path, init);
  if (!r.ok) throw await failure(r);
  if (r.status === 204) return null;
  if ((r.headers.get('content-type') || '').includes('application/json')) return r.json();
  return r;
}

export const get = (path, opts) => call('GET', path, opts);
export const post = (path, body) => call('POST', path, { body });
export const del = (path) => call('DELETE', path);

/** `?a=1&b=2` from an object, leaving out empty values; arrays repeat the key. */
export function query(params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) {
    for (const one of Array.isArray(v) ? v : [v]) {
      if (one !== undefined && one !== null && one !== '') q.append(k, one);
    }
  }
  const s = q.toString();
  return s ? `?${s}` : '';
}

export const sandboxPath = (id, rest = '') => `/v1/sandboxes/${encodeURIComponent(id)}${rest}`;

/**
 * Runs a command over `POST …/exec/stream` and hands each server-sent
 * event to `onEvent(name, data)` as it arrives. Aborting `signal` closes
 * the connection, which kills the command.
 */
export async function execStream(id, body, onEvent, signal) {
  const r = await fetch(sandboxPath(id, '/exec/stream'), {
    method: 'POST',
    headers: authHeaders({ 'Content-Type': 'application/json', Accept: 'text/event-stream' }),
    body: JSON.stringify(body),
    signal,
  });
  if (!r.ok) throw await failure(r);
  const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += value.replace(/\r\n/g, '\n');
    let end;
    while ((end = buf.indexOf('\n\n')) >= 0) {
      const block = buf.slice(0, end);
      buf = buf.slice(end + 2);
      let event = 'message';
      const data = [];
      for (const line of block.split('\n')) {
        if (line.startsWith('event:')) event = line.slice(6).trim();
        else if (line.startsWith('data:')) data.push(line.slice(5).replace(/^ /, ''));
      }
      if (data.length === 0) continue; // a keep-alive comment
      let parsed;
      try { parsed = JSON.parse(data.join('\n')); } catch { parsed = { data: data.join('\n') }; }
      onEvent(event, parsed);
    }
  }
}
