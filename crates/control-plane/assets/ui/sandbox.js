// One sandbox: its details (polled), logs, a command runner streaming its
// output over the SSE exec stream, a file browser and its exposed ports.

import { h, fill, table, stateBadge, errorBox, time } from './dom.js';
import { get, post, call, del, query, sandboxPath, execStream } from './api.js';
import { session } from './app.js';

const POLL_MS = 2000;
const LIVE = new Set(['pending', 'starting', 'running', 'paused', 'stopping']);

function joinPath(dir, name) {
  return dir.endsWith('/') ? dir + name : `${dir}/${name}`;
}

function parentOf(path) {
  const i = path.replace(/\/+$/, '').lastIndexOf('/');
  return i <= 0 ? '/' : path.slice(0, i);
}

function size(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KiB`;
  return `${(n / 1024 / 1024).toFixed(1)} MiB`;
}

export function sandboxPage(el, id) {
  let stopped = false;
  let current = null;
  const details = h('div', { id: 'sandbox-details' }, h('p', { class: 'muted' }, 'Loading…'));
  const message = h('div');
  const logs = h('pre', { id: 'logs', class: 'out' });

  async function refresh() {
    try {
      const sb = await get(sandboxPath(id));
      if (stopped) return;
      current = sb;
      drawDetails(sb);
    } catch (e) {
      if (!stopped) fill(details, errorBox(e));
    }
  }

  function drawDetails(sb) {
    const rows = [
      ['State', stateBadge(sb.state)], ['Image', sb.image], ['Template', sb.template || '—'],
      ['Provider', sb.provider], ['Worker', sb.worker_id || '—'], ['Tenant', sb.tenant_id],
      ['CPU', sb.cpu], ['Memory', `${sb.memory_mb} MiB`], ['Network', JSON.stringify(sb.network)],
      ['Labels', Object.entries(sb.labels || {}).map(([k, v]) => `${k}=${v}`).join(', ') || '—'],
      ['Created', time(sb.created_at)], ['Started', time(sb.started_at)], ['Expires', time(sb.expires_at)],
      ['Destroyed', time(sb.destroyed_at) || '—'],
    ];
    if (sb.failure) rows.push(['Failure', `${sb.failure.code}: ${sb.failure.message}`]);
    fill(details, h('dl', { class: 'kv' }, rows.map(([k, v]) => [h('dt', null, k), h('dd', null, v)])),
      session.can.write && LIVE.has(sb.state)
        ? h('p', null, h('button', { id: 'destroy', class: 'danger', onclick: destroy }, 'Destroy sandbox'))
        : null);
  }

  async function destroy() {
    if (!confirm(`Destroy ${id}?`)) return;
    try { await del(sandboxPath(id)); } catch (e) { fill(message, errorBox(e)); }
    refresh();
  }

  async function loadLogs() {
    try {
      const r = await get(sandboxPath(id, '/logs'));
      fill(logs, r.lines.map((l) => `${l.ts} [${l.source}] ${l.message}\n`));
    } catch (e) {
      fill(logs, String(e.message || e));
    }
  }

  fill(el, h('p', null, h('a', { href: '#/sandboxes' }, '← Sandboxes')),
    h('h1', null, 'Sandbox ', h('span', { class: 'mono' }, id)), message, details,
    session.can.write ? runner(id) : null,
    files(id),
    ports(id),
    h('h2', null, 'Logs'), h('p', null, h('button', { onclick: loadLogs }, 'Refresh logs')), logs);
  refresh();
  loadLogs();
  const timer = setInterval(() => { if (!current || LIVE.has(current.state)) refresh(); }, POLL_MS);
  return () => { stopped = true; clearInterval(timer); };
}

/** The command runner: `sh -c LINE`, its output streamed as it comes. */
function runner(id) {
  const out = h('pre', { id: 'exec-output', class: 'out' });
  const input = h('input', { id: 'exec-cmd', class: 'wide', name: 'cmd', placeholder: 'echo hello; ls /', required: true });
  const run = h('button', { id: 'exec-run', class: 'primary', type: 'submit' }, 'Run');
  const stop = h('button', { id: 'exec-stop', type: 'button', disabled: true }, 'Stop');
  let abort = null;
  stop.addEventListener('click', () => abort && abort.abort());

  async function submit(ev) {
    ev.preventDefault();
    out.replaceChildren();
    abort = new AbortController();
    run.disabled = true;
    stop.disabled = false;
    out.dataset.done = '';
    try {
      await execStream(id, { cmd: ['sh', '-c', input.value], timeout_s: 600 }, (event, data) => {
        if (event === 'stdout' || event === 'stderr') {
          out.append(h('span', { class: event }, data.data));
        } else if (event === 'exit') {
          const how = data.timed_out ? 'timed out' : data.signal != null ? `killed by signal ${data.signal}` : `exit code ${data.exit_code}`;
          out.append(h('span', { class: 'exit', id: 'exec-exit', 'data-exit-code': data.exit_code ?? '' }, `\n[${how}, ${data.duration_ms} ms]\n`));
        } else if (event === 'error') {
          out.append(h('span', { class: 'stderr' }, `\n[error ${data.code}: ${data.message}]\n`));
        }
        out.scrollTop = out.scrollHeight;
      }, abort.signal);
    } catch (e) {
      out.append(h('span', { class: 'stderr' }, e.name === 'AbortError' ? '\n[stopped]\n' : `\n[${e.message}]\n`));
    } finally {
      out.dataset.done = 'true';
      run.disabled = false;
      stop.disabled = true;
      abort = null;
    }
  }

  return h('section', null, h('h2', null, 'Run a command'),
    h('form', { id: 'exec-form', class: 'row', onsubmit: submit },
      h('label', null, 'Command (run with sh -c)', input), run, stop), out);
}

/**
 * The sandbox's exposed ports: each with its URL through this server. A
 * private port needs a key the browser does not send on a plain link, so
 * keys that may write get a signed link (valid one hour) to open instead.
 */
function ports(id) {
  const listing = h('div', { id: 'port-list' });
  const message = h('div');

  async function refresh() {
    try {
      const r = await get(sandboxPath(id, '/ports'));
      const columns = [['Port', (p) => String(p.port)], ['Access', (p) => (p.public ? 'public' : 'private (key or signed link)')],
        ['URL', (p) => h('a', { href: p.url, target: '_blank', rel: 'noopener', class: 'mono', 'data-port-url': p.port }, p.url)]];
      if (session.can.write) {
        columns.push(['', (p) => [
          p.public ? null : h('button', { 'data-port-token': p.port, onclick: () => signedLink(p) }, 'Signed link'),
          h('button', { class: 'danger', 'data-unexpose': p.port, onclick: () => unexpose(p) }, 'Close'),
        ]]);
      }
      fill(listing, r.ports.length === 0 ? h('p', { class: 'muted' }, 'No exposed ports.')
        : table(columns, r.ports, { id: 'ports-table' }));
    } catch (e) {
      fill(listing, errorBox(e));
    }
  }

  async function signedLink(p) {
    try {
      const t = await post(sandboxPath(id, `/ports/${p.port}/token`), { ttl_seconds: 3600 });
      fill(message, h('div', { class: 'notice' }, `Signed link to port ${p.port}, valid until ${time(new Date(t.expires_at * 1000).toISOString())}: `,
        h('a', { href: t.url, target: '_blank', rel: 'noopener', class: 'mono', id: 'port-signed-link' }, t.url)));
    } catch (e) { fill(message, errorBox(e)); }
  }

  async function unexpose(p) {
    try { await del(sandboxPath(id, `/ports/${p.port}`)); fill(message); } catch (e) { fill(message, errorBox(e)); }
    refresh();
  }

  const expose = session.can.write ? h('form', { id: 'expose-form', class: 'row', onsubmit: async (ev) => {
    ev.preventDefault();
    const form = ev.target;
    try {
      await post(sandboxPath(id, '/ports'), { port: Number(form.elements.port.value), public: form.elements.public.checked });
      fill(message);
      refresh();
    } catch (e) { fill(message, errorBox(e)); }
  } },
  h('label', null, 'Port inside the sandbox', h('input', { name: 'port', type: 'number', min: 1, max: 65535, required: true, placeholder: '8080' })),
  h('label', { class: 'check' }, h('input', { name: 'public', type: 'checkbox' }), 'public (no key needed)'),
  h('button', { type: 'submit' }, 'Expose')) : null;

  refresh();
  return h('section', null, h('h2', null, 'Ports'), expose, message, listing);
}

/** The file browser: list a directory, go in and up, download, upload. */
function files(id) {
  let dir = '/';
  const listing = h('div', { id: 'file-list' });
  const message = h('div');
  const pathInput = h('input', { id: 'file-path', class: 'wide', value: dir });

  async function open(path) {
    dir = path || '/';
    pathInput.value = dir;
    try {
      const r = await get(sandboxPath(id, `/files/list${query({ path: dir })}`));
      draw(r.entries);
    } catch (e) {
      fill(listing, errorBox(e));
    }
  }

  function draw(entries) {
    const columns = [
      ['Name', (e) => e.type === 'dir'
        ? h('button', { class: 'link', 'data-dir': e.path, onclick: () => open(e.path) }, `${e.name}/`)
        : h('span', { class: 'mono', 'data-file': e.path }, e.name + (e.symlink_target ? ` → ${e.symlink_target}` : ''))],
      ['Type', (e) => e.type], ['Size', (e) => (e.type === 'file' ? size(e.size) : '')],
      ['Mode', (e) => e.mode], ['Modified', (e) => time(e.mtime)],
      ['', (e) => [
        e.type === 'file' ? h('button', { 'data-download': e.path, onclick: () => download(e) }, 'Download') : null,
        session.can.write && e.type !== 'dir' ? h('button', { class: 'danger', onclick: () => remove(e) }, 'Delete') : null,
      ]],
    ];
    fill(listing, dir !== '/' ? h('p', null, h('button', { class: 'link', onclick: () => open(parentOf(dir)) }, '↑ parent directory')) : null,
      entries.length ? table(columns, entries, { id: 'files-table' }) : h('p', { class: 'muted' }, 'Empty directory.'));
  }

  async function download(entry) {
    try {
      const r = await call('GET', sandboxPath(id, `/files${query({ path: entry.path })}`));
      const url = URL.createObjectURL(await r.blob());
      const a = h('a', { href: url, download: entry.name });
      document.body.append(a);
      a.click();
      a.remove();
      setTimeout(() => URL.revokeObjectURL(url), 60000);
    } catch (e) {
      fill(message, errorBox(e));
    }
  }

  async function remove(entry) {
    if (!confirm(`Delete ${entry.path}?`)) return;
    try { await call('DELETE', sandboxPath(id, `/files${query({ path: entry.path })}`)); } catch (e) { fill(message, errorBox(e)); }
    open(dir);
  }

  async function upload(ev) {
    ev.preventDefault();
    const input = ev.target.querySelector('input[type=file]');
    const chosen = [...input.files];
    if (chosen.length === 0) return;
    fill(message);
    for (const f of chosen) {
      try {
        await call('PUT', sandboxPath(id, `/files${query({ path: joinPath(dir, f.name) })}`), { raw: f });
        message.append(h('div', { class: 'notice', 'data-uploaded': joinPath(dir, f.name) }, `Uploaded ${joinPath(dir, f.name)}.`));
      } catch (e) {
        message.append(errorBox(e));
      }
    }
    input.value = '';
    open(dir);
  }

  open(dir);
  return h('section', null, h('h2', null, 'Files'),
    h('form', { class: 'row', onsubmit: (ev) => { ev.preventDefault(); open(pathInput.value.trim()); } },
      h('label', null, 'Directory', pathInput), h('button', { type: 'submit' }, 'Open')),
    session.can.write ? h('form', { id: 'upload-form', class: 'row', onsubmit: upload },
      h('label', null, 'Upload into this directory', h('input', { id: 'upload-input', type: 'file', multiple: true })),
      h('button', { type: 'submit' }, 'Upload')) : null,
    message, listing);
}
