// Volumes: filesystems of a fixed size that outlive the sandboxes they are
// mounted into. Everyone sees the list (an admin: every tenant's); keys that
// may write create them and delete their own tenant's.

import { h, fill, table, errorBox, time, formValues } from './dom.js';
import { get, post, del } from './api.js';
import { session } from './app.js';

export function volumesPage(el) {
  const list = h('div', { id: 'volume-list' }, h('p', { class: 'muted' }, 'Loading…'));
  const message = h('div');

  async function refresh() {
    try {
      const r = await get('/v1/volumes');
      const columns = [['Name', (v) => h('span', { class: 'mono', 'data-volume': v.name }, v.name)],
        ['ID', (v) => h('span', { class: 'mono' }, v.id)], ['Tenant', (v) => h('span', { class: 'mono' }, v.tenant_id)],
        ['Size', (v) => `${v.size_mb} MiB`], ['Created', (v) => time(v.created_at)]];
      // A volume is named within its tenant, so only the caller's own
      // tenant's volumes can be deleted by name.
      if (session.can.write) {
        columns.push(['', (v) => v.tenant_id !== session.who.tenant_id ? '' :
          h('button', { class: 'danger', 'data-delete-volume': v.name, onclick: () => remove(v) }, 'Delete')]);
      }
      fill(list, r.volumes.length === 0 ? h('p', { class: 'muted' }, 'No volumes.')
        : table(columns, r.volumes, { id: 'volumes-table' }));
    } catch (e) {
      fill(list, errorBox(e));
    }
  }

  async function remove(v) {
    if (!confirm(`Delete volume ${v.name} and everything on it?`)) return;
    try {
      await del(`/v1/volumes/${encodeURIComponent(v.name)}`);
      fill(message, h('div', { class: 'notice' }, `Deleted volume ${v.name}.`));
    } catch (e) { fill(message, errorBox(e)); }
    refresh();
  }

  const create = session.can.write ? h('form', { id: 'volume-form', class: 'row', onsubmit: async (ev) => {
    ev.preventDefault();
    const v = formValues(ev.target);
    try {
      const made = await post('/v1/volumes', { name: v.name.trim(), size_mb: Number(v.size_mb) });
      fill(message, h('div', { class: 'notice', id: 'volume-created' }, `Created volume ${made.name} (${made.size_mb} MiB). `,
        'Mount it when creating a sandbox: ', h('code', null, `${made.name}:/data`)));
      ev.target.querySelector('input[name=name]').value = '';
      refresh();
    } catch (e) { fill(message, errorBox(e)); }
  } },
  h('label', null, 'Name', h('input', { name: 'name', required: true, placeholder: 'cache', pattern: '[a-z0-9][a-z0-9_\\-]{0,62}' })),
  h('label', null, 'Size (MiB, at least 8)', h('input', { name: 'size_mb', type: 'number', min: 8, value: 64, required: true })),
  h('button', { class: 'primary', type: 'submit' }, 'Create volume')) : null;

  fill(el, h('h1', null, 'Volumes'),
    h('p', { class: 'muted' }, 'Data that outlive a sandbox. Mount them at create (Docker provider, single-node servers).'),
    create, message, list);
  refresh();
  return null;
}
