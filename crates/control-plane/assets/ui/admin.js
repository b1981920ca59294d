// Status (providers, workers), tenants and quotas, keys, and the audit
// log. Buttons for calls the key's role may not make are not drawn.

import { h, fill, table, stateBadge, errorBox, time, formValues } from './dom.js';
import { get, post, del, call, query } from './api.js';
import { session } from './app.js';

const POLL_MS = 5000;

function health(ok) {
  return h('span', { class: `state ${ok ? 'ok' : 'bad'}` }, ok ? 'healthy' : 'unhealthy');
}

export function statusPage(el) {
  const body = h('div', { id: 'status' }, h('p', { class: 'muted' }, 'Loading…'));
  let stopped = false;

  async function refresh() {
    try {
      const st = await get('/v1/status');
      // Workers are the admin's view of the deployment; other keys' status
      // carries an empty list.
      const workers = session.can.admin ? (await get('/v1/workers')).workers : [];
      if (!stopped) draw(st, workers);
    } catch (e) {
      if (!stopped) fill(body, errorBox(e));
    }
  }

  async function drain(w, undo) {
    try { await post(`/v1/workers/${encodeURIComponent(w.id)}/${undo ? 'undrain' : 'drain'}`, {}); } catch (e) { alert(e.message); }
    refresh();
  }

  function draw(st, workers) {
    const counts = Object.entries(st.sandboxes || {}).map(([k, v]) => `${k}: ${v}`).join(', ') || 'none';
    fill(body,
      h('dl', { class: 'kv' },
        h('dt', null, 'Version'), h('dd', null, st.version),
        h('dt', null, 'Mode'), h('dd', null, st.mode),
        h('dt', null, 'Uptime'), h('dd', null, `${st.uptime_s} s`),
        h('dt', null, 'Store'), h('dd', null, `${st.store.kind} `, health(st.store.ok)),
        h('dt', null, 'Sandboxes'), h('dd', null, counts)),
      h('h2', null, 'Providers'),
      table([['Name', (p) => p.name], ['Health', (p) => health(p.healthy)],
        ['Certified', (p) => (p.certified == null ? '—' : p.certified ? `yes (${time(p.certified_at)})` : 'no')],
        ['Detail', (p) => p.detail || '']], st.providers || [], { id: 'providers-table' }),
      session.can.admin ? [h('h2', null, 'Workers'), workers.length === 0 ? h('p', { class: 'muted' }, 'No workers.') :
        table([['ID', (w) => h('span', { class: 'mono' }, w.id)], ['Name', (w) => w.name || ''],
          ['State', (w) => stateBadge(w.state)], ['Address', (w) => w.address || ''],
          ['Providers', (w) => (w.providers || []).map((p) => [health(p.healthy), ` ${p.name} `])],
          ['Sandboxes', (w) => `${w.sandboxes} / ${w.capacity ? w.capacity.sandboxes : '?'}`],
          ['Heartbeat', (w) => time(w.last_heartbeat)],
          ['', (w) => w.state === 'down' ? '' : h('button', { onclick: () => drain(w, w.state === 'draining') },
            w.state === 'draining' ? 'Undrain' : 'Drain')]], workers, { id: 'workers-table' })] : null);
  }

  fill(el, h('h1', null, 'Status'), body);
  refresh();
  const timer = setInterval(refresh, POLL_MS);
  return () => { stopped = true; clearInterval(timer); };
}

const QUOTA_FIELDS = [['max_sandboxes', 'Sandboxes'], ['max_cpu', 'CPU'], ['max_memory_mb', 'Memory (MiB)'],
  ['max_timeout_s', 'Lifetime (s)'], ['max_exec_per_minute', 'Execs / minute']];

function quotaText(q) {
  return QUOTA_FIELDS.map(([k, name]) => `${name}: ${q[k] == null ? '∞' : q[k]}`).join(' · ');
}

export function tenantsPage(el) {
  const list = h('div', { id: 'tenant-list' });
  const message = h('div');

  async function refresh() {
    try {
      const r = await get('/v1/tenants?limit=1000');
      fill(list, table([['ID', (t) => h('span', { class: 'mono' }, t.id)], ['Name', (t) => t.name],
        ['Quota', (t) => quotaText(t.quota || {})],
        ...(session.can.admin ? [['', (t) => h('button', { onclick: () => editQuota(t) }, 'Edit quota')]] : [])],
      r.tenants, { id: 'tenants-table' }));
    } catch (e) {
      fill(list, errorBox(e));
    }
  }

  function editQuota(t) {
    const form = h('form', { class: 'row', onsubmit: async (ev) => {
      ev.preventDefault();
      const v = formValues(form);
      const q = {};
      for (const [k] of QUOTA_FIELDS) q[k] = v[k] === '' ? null : Number(v[k]);
      try {
        await call('PUT', `/v1/tenants/${encodeURIComponent(t.id)}/quota`, { body: q });
        fill(message, h('div', { class: 'notice' }, `Quota of ${t.name} saved.`));
        refresh();
      } catch (e) { fill(message, errorBox(e)); }
    } },
    h('strong', null, `Quota of ${t.name} (empty = unlimited)`),
    QUOTA_FIELDS.map(([k, name]) => h('label', null, name,
      h('input', { name: k, type: 'number', min: 0, step: 'any', value: t.quota && t.quota[k] != null ? t.quota[k] : '' }))),
    h('button', { class: 'primary', type: 'submit' }, 'Save'));
    fill(message, form);
  }

  const create = session.can.admin ? h('form', { id: 'tenant-form', class: 'row', onsubmit: async (ev) => {
    ev.preventDefault();
    try {
      const t = await post('/v1/tenants', { name: formValues(ev.target).name });
      fill(message, h('div', { class: 'notice' }, `Created tenant ${t.name} (${t.id}).`));
      ev.target.reset();
      refresh();
    } catch (e) { fill(message, errorBox(e)); }
  } }, h('label', null, 'New tenant', h('input', { name: 'name', required: true })),
  h('button', { class: 'primary', type: 'submit' }, 'Create tenant')) : null;

  fill(el, h('h1', null, 'Tenants and quotas'), create, message, list);
  refresh();
  return null;
}

export function keysPage(el) {
  const list = h('div', { id: 'key-list' });
  const message = h('div');

  async function refresh() {
    try {
      const r = await get('/v1/keys?limit=1000');
      fill(list, table([['ID', (k) => h('span', { class: 'mono' }, k.id)], ['Name', (k) => k.name],
        ['Tenant', (k) => h('span', { class: 'mono' }, k.tenant_id)], ['Role', (k) => k.role],
        ['Created', (k) => time(k.created_at)], ['Revoked', (k) => time(k.revoked_at) || '—'],
        ...(session.can.manageKeys ? [['', (k) => k.revoked_at || k.id === session.who.key_id ? '' :
          h('button', { class: 'danger', onclick: () => revoke(k) }, 'Revoke')]] : [])],
      r.keys, { id: 'keys-table' }));
    } catch (e) {
      fill(list, errorBox(e));
    }
  }

  async function revoke(k) {
    if (!confirm(`Revoke key ${k.name} (${k.id})? Calls made with it are refused from now on.`)) return;
    try { await del(`/v1/keys/${encodeURIComponent(k.id)}`); } catch (e) { fill(message, errorBox(e)); }
    refresh();
  }

  const roles = session.can.admin ? ['viewer', 'member', 'owner', 'admin'] : ['viewer', 'member', 'owner'];
  const create = session.can.manageKeys ? h('form', { id: 'key-form', class: 'row', onsubmit: async (ev) => {
    ev.preventDefault();
    const v = formValues(ev.target);
    try {
      const k = await post('/v1/keys', { tenant_id: v.tenant_id.trim(), role: v.role, name: v.name });
      fill(message, h('div', { class: 'notice' }, `Key ${k.name} created. Copy it now: it is not shown again. `,
        h('code', { id: 'new-key' }, k.key)));
      refresh();
    } catch (e) { fill(message, errorBox(e)); }
  } },
  h('label', null, 'Tenant', h('input', { name: 'tenant_id', required: true, value: session.who.tenant_id,
    readonly: !session.can.admin })),
  h('label', null, 'Role', h('select', { name: 'role' }, roles.map((r) => h('option', { value: r }, r)))),
  h('label', null, 'Name', h('input', { name: 'name', required: true })),
  h('button', { class: 'primary', type: 'submit' }, 'Create key')) : null;

  fill(el, h('h1', null, 'API keys'), create, message, list);
  refresh();
  return null;
}

export function auditPage(el) {
  const rows = h('div', { id: 'audit-list' });
  const more = h('p');
  let events = [];
  let latest = 0;

  async function load(filters, cursor) {
    // Only the newest query is drawn: an older answer arriving late would
    // show events the filters no longer ask for.
    const mine = ++latest;
    try {
      const r = await get(`/v1/audit${query({ ...filters, cursor, limit: 100 })}`);
      if (mine !== latest) return;
      events = cursor ? events.concat(r.events) : r.events;
      // Which sandbox the table shows, for whoever reads the page.
      rows.dataset.sandbox = filters.sandbox_id || '';
      fill(rows, events.length === 0 ? h('p', { class: 'muted' }, 'No events.') :
        table([['Time', (e) => time(e.ts)], ['Action', (e) => e.action],
          ['Outcome', (e) => h('span', { class: `state ${e.outcome === 'ok' ? 'ok' : 'bad'}` }, `${e.outcome} ${e.status}`)],
          ['Target', (e) => h('span', { class: 'mono' }, e.target || '')],
          ['Actor', (e) => (e.actor && e.actor.key_id ? `${e.actor.key_id} (${e.actor.role})` : 'no valid key')],
          ['Tenant', (e) => h('span', { class: 'mono' }, e.tenant_id || '')], ['Source', (e) => e.source_ip || ''],
          ['Request', (e) => h('span', { class: 'mono' }, e.request_id || '')]], events, { id: 'audit-table' }));
      fill(more, r.next_cursor ? h('button', { onclick: () => load(filters, r.next_cursor) }, 'More') : null);
    } catch (e) {
      fill(rows, errorBox(e));
    }
  }

  const form = h('form', { id: 'audit-form', class: 'row', onsubmit: (ev) => {
    ev.preventDefault();
    const v = formValues(ev.target);
    if (v.since) v.since = new Date(v.since).toISOString();
    load(v);
  } },
  h('label', null, 'Sandbox', h('input', { name: 'sandbox_id', placeholder: 'sbx_…' })),
  h('label', null, 'Action', h('input', { name: 'action', placeholder: 'sandbox.create' })),
  h('label', null, 'Outcome', h('select', { name: 'outcome' }, ['', 'ok', 'denied', 'error'].map((o) => h('option', { value: o }, o || 'any')))),
  h('label', null, 'Since', h('input', { name: 'since', type: 'datetime-local' })),
  h('button', { class: 'primary', type: 'submit' }, 'Filter'));

  fill(el, h('h1', null, 'Audit log'), form, rows, more);
  load({});
  return null;
}
