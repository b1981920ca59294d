// The sandboxes list: live state (polled), filters by label and state,
// create and destroy.

import { h, fill, table, stateBadge, errorBox, time, formValues } from './dom.js';
import { get, post, del, query, sandboxPath } from './api.js';
import { session } from './app.js';

const POLL_MS = 2000;
const STATES = ['', 'pending', 'starting', 'running', 'paused', 'stopping', 'destroyed', 'failed', 'lost'];

/** `k=v, k2=v2` → ['k=v', 'k2=v2']; null when a part is not k=v. */
function parseLabels(text) {
  const parts = text.split(/[,\s]+/).filter(Boolean);
  return parts.every((p) => /^[^=]+=/.test(p)) ? parts : null;
}

/** `cache:/data, ref:/ref:ro` → volume mounts; null when a part is not name:/path[:ro]. */
function parseVolumes(text) {
  const mounts = [];
  for (const part of text.split(/[,\s]+/).filter(Boolean)) {
    const m = /^([^:]+):(\/[^:]*)(:ro)?$/.exec(part);
    if (!m) return null;
    mounts.push({ volume: m[1], path: m[2], read_only: Boolean(m[3]) });
  }
  return mounts;
}

export function sandboxesPage(el) {
  const filter = { label: sessionStorage.getItem('stacyvm.filter.label') || '', state: '' };
  const list = h('div', { id: 'sandbox-list' }, h('p', { class: 'muted' }, 'Loading…'));
  const message = h('div');
  let timer = null;
  let stopped = false;
  // Polls and filter edits overlap: only the newest answer is drawn, so a
  // slow answer to an old filter never replaces a newer one.
  let latest = 0;

  async function refresh() {
    const mine = ++latest;
    const labels = parseLabels(filter.label);
    if (labels === null) {
      fill(list, errorBox('A label filter looks like key=value (several: separated by commas).'));
      return;
    }
    try {
      const page = await get(`/v1/sandboxes${query({ label: labels, state: filter.state, limit: 200 })}`);
      if (!stopped && mine === latest) draw(page.sandboxes);
    } catch (e) {
      if (!stopped && mine === latest) fill(list, errorBox(e));
    }
  }

  function draw(sandboxes) {
    if (sandboxes.length === 0) { fill(list, h('p', { class: 'muted' }, 'No sandboxes.')); return; }
    const columns = [
      ['ID', (s) => h('a', { href: `#/sandboxes/${s.id}`, class: 'mono', 'data-sandbox': s.id }, s.id)],
      ['State', (s) => stateBadge(s.state)],
      ['Image', (s) => s.template ? `${s.image} (template ${s.template})` : s.image],
      ['Provider', (s) => s.provider],
      ['Labels', (s) => Object.entries(s.labels || {}).map(([k, v]) => `${k}=${v}`).join(', ')],
      ['Created', (s) => time(s.created_at)],
      ['Expires', (s) => time(s.expires_at)],
    ];
    if (session.can.write) {
      columns.push(['', (s) => ['destroyed', 'failed', 'lost'].includes(s.state) ? '' :
        h('button', { class: 'danger', 'data-destroy': s.id, onclick: () => destroy(s.id) }, 'Destroy')]);
    }
    fill(list, table(columns, sandboxes, { id: 'sandboxes-table' }));
  }

  async function destroy(id) {
    if (!confirm(`Destroy ${id}?`)) return;
    try { await del(sandboxPath(id)); } catch (e) { fill(message, errorBox(e)); }
    refresh();
  }

  async function create(ev) {
    ev.preventDefault();
    const v = formValues(ev.target);
    const body = { image: v.image.trim() };
    if (v.timeout_s) body.timeout_s = Number(v.timeout_s);
    if (v.provider) body.provider = v.provider.trim();
    if (v.labels.trim()) {
      const labels = parseLabels(v.labels);
      if (!labels) { fill(message, errorBox('Labels look like key=value, separated by commas.')); return; }
      body.labels = Object.fromEntries(labels.map((l) => [l.slice(0, l.indexOf('=')), l.slice(l.indexOf('=') + 1)]));
    }
    if (v.volumes.trim()) {
      const volumes = parseVolumes(v.volumes);
      if (!volumes) { fill(message, errorBox('Volumes look like name:/path or name:/path:ro, separated by commas.')); return; }
      body.volumes = volumes;
    }
    const button = ev.target.querySelector('button');
    button.disabled = true;
    fill(message, h('div', { class: 'notice' }, `Creating a sandbox from ${body.image}…`));
    try {
      const sb = await post('/v1/sandboxes', body);
      fill(message, h('div', { class: 'notice', id: 'created' }, 'Created ',
        h('a', { href: `#/sandboxes/${sb.id}`, class: 'mono' }, sb.id), '.'));
      refresh();
    } catch (e) {
      fill(message, errorBox(e));
    } finally {
      button.disabled = false;
    }
  }

  const filters = h('form', { class: 'row', onsubmit: (ev) => ev.preventDefault() },
    h('label', null, 'Label filter (k=v, …)', h('input', { id: 'label-filter', value: filter.label, placeholder: 'team=web',
      oninput: (ev) => { filter.label = ev.target.value; sessionStorage.setItem('stacyvm.filter.label', filter.label); refresh(); } })),
    h('label', null, 'State', h('select', { id: 'state-filter', onchange: (ev) => { filter.state = ev.target.value; refresh(); } },
      STATES.map((s) => h('option', { value: s }, s || 'any')))));

  const createForm = session.can.write ? h('form', { id: 'create-form', class: 'row', onsubmit: create },
    h('label', null, 'Image', h('input', { name: 'image', required: true, value: 'busybox' })),
    h('label', null, 'Provider (optional)', h('input', { name: 'provider', placeholder: 'docker' })),
    h('label', null, 'Timeout (s)', h('input', { name: 'timeout_s', type: 'number', min: 1, value: 300 })),
    h('label', null, 'Labels (k=v, …)', h('input', { name: 'labels', placeholder: 'team=web' })),
    h('label', null, 'Volumes (name:/path[:ro], …)', h('input', { name: 'volumes', placeholder: 'cache:/data' })),
    h('button', { class: 'primary', type: 'submit' }, 'Create sandbox')) : null;

  fill(el, h('h1', null, 'Sandboxes'), createForm ? [h('h2', null, 'New sandbox'), createForm] : null,
    message, h('h2', null, 'Sandboxes'), filters, list);
  refresh();
  timer = setInterval(refresh, POLL_MS);
  return () => { stopped = true; clearInterval(timer); };
}
